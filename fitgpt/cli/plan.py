"""`fitgpt plan [CONFIG] [--gpu NAME_OR_SIZE] [--fit] [--json] [--verify] [--png FILE]`.

Never imports torch (tests check it), except for --verify, which measures on this machine.
"""

from __future__ import annotations

from fitgpt.config.cmdline import split_args
from fitgpt.errors import FitError

USAGE = """usage: fitgpt plan [CONFIG] [--section.key=value ...] [--gpu NAME_OR_SIZE] [--fit] [--json] [--verify]
                   [--png FILE]

Predicts the peak memory of a training step and of an evaluation, part by part, before anything
is allocated, and compares it with a card. Nothing is imported from torch (unless --verify).

  --gpu NAME_OR_SIZE  the card: a name (rtx4070, 'RTX 4090', 4060ti-16gb, a100-80gb, h100, l4,
                      t4, ...) or a size (12GB, 11.5GiB, 8000MB). Default: the card nvidia-smi
                      lists, if any. --memory.budget=SIZE, when given, is the limit instead.
  --fit               also show what --memory.fit=auto would pick (fastest setting that fits;
                      memory levers only when nothing else does, host memory shown apart)
  --json              print the same information as JSON
  --verify            run 3 training steps and one evaluation on this machine's device with
                      synthetic tokens, and print predicted against measured memory
  --png FILE          also draw the plan: training and evaluation as bars stacked by part
                      against the card's memory and the headroom limit, each proposal's peak
                      beside them

The verdict compares the larger of the two peaks with the budget minus memory.headroom (10 %).
When it does not fit, or uses under 40 % of the card, ranked proposals follow, each with the
overrides to paste.
Cards: {cards}
"""
FLAGS = ("--fit", "--json", "--verify")


def cmd_plan(args: list[str]) -> int:
    """Print the plan (fitgpt.planner.plan), as text or JSON, optionally drawn and verified."""
    if "-h" in args or "--help" in args:
        from fitgpt.planner.gpus import gpu_names

        print(USAGE.format(cards=", ".join(gpu_names())))
        return 0
    flags = {a for a in args if a in FLAGS}
    config, opts, overrides = split_args([a for a in args if a not in flags], ("--gpu", "--png"))
    if "--png" in opts:
        from fitgpt.report.plots import check_png_path

        check_png_path(opts["--png"])  # before any work: a bad path is one line
    from fitgpt.config.load import load_config
    from fitgpt.planner.plan import make_plan

    notes: list[str] = []
    cfg = load_config(config, overrides, notes=notes)
    gpu = _card(cfg, opts.get("--gpu"), fit="--fit" in flags)
    if "--verify" in flags and cfg.parallel.nproc > 1:
        raise FitError(f"--verify measures in this one process, but the plan is per process of "
                       f"parallel.nproc={cfg.parallel.nproc}; verify with --parallel.nproc=1, or train under "
                       f"torchrun and compare summary.json's measured and predicted peaks "
                       f"(bench/ddp_memory_cpu.py does that on a CPU)")
    plan = make_plan(cfg, gpu, fit="--fit" in flags)
    if "--png" in opts:
        from fitgpt.report.plots import plan_png

        plan_png(plan, opts["--png"])
    result = None
    if "--verify" in flags:
        from fitgpt.planner.verify import verify

        result = verify(cfg)
    if "--json" in flags:
        _print_json(plan, result)
    else:
        _print_text(plan, result, notes, opts.get("--png"))
    return 0


def _card(cfg, name: str | None, fit: bool):
    """The card of --gpu; else, for a GPU config without a budget, the one nvidia-smi lists."""
    from fitgpt.planner.gpus import find_gpu, smi_gpu

    gpu = find_gpu(name) if name is not None else None
    if gpu is None and cfg.train.device != "cpu" and not cfg.memory.budget:
        gpu = smi_gpu()
    if fit and gpu is None and not cfg.memory.budget:
        raise FitError("--fit needs a card: --gpu NAME_OR_SIZE or --memory.budget=SIZE")
    return gpu


def _print_json(plan, result) -> None:
    import json

    from fitgpt.planner.plan import as_json

    data = as_json(plan)
    if result is not None:
        data["verify"] = result
    print(json.dumps(data, indent=2))


def _print_text(plan, result, notes: list[str], png: str | None) -> None:
    from fitgpt.console import console
    from fitgpt.planner.plan import render, render_verify

    for note in notes:
        console.print(f"note: {note}", markup=False)
    render(plan, console)
    if png is not None:
        console.print(f"wrote {png}", markup=False)
    if result is not None:
        console.print()
        render_verify(result, console)
