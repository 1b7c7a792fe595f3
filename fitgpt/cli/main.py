"""The `fitgpt` command. Nothing here imports torch before the allocator setting is in place."""

from __future__ import annotations

import os
import sys

from fitgpt.errors import FitError

ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")

USAGE = """usage: fitgpt <command> [options]

commands:
  train [CONFIG] [--resume RUN_DIR|auto] [--section.key=value ...]
                     train a GPT; with no CONFIG, the built-in demo (a small GPT on the King
                     James Bible, a few minutes on a CPU)
  eval --ckpt RUN_DIR_OR_FILE [--task hellaswag --file F] [--section.key=value ...]
                     evaluate a checkpoint on the validation windows (or on HellaSwag)
  plan [CONFIG] [--section.key=value ...] [--gpu NAME_OR_SIZE] [--fit] [--json] [--verify] [--png FILE]
                     predict the memory of training and evaluation on a card (rtx4070, a100-80gb,
                     12GB, ...), and what to change if it does not fit; --verify measures it;
                     --png draws it
  prepare fineweb|text ...  tokenize FineWeb or text files into shards (fitgpt prepare -h)
  data inspect DIR [--verify] [--sample N]  shard counts, checks, document lengths, a sample
  sample --ckpt RUN_DIR_OR_FILE [--prompt TEXT|--prompt-file F] [--max-new-tokens N ...]
                     generate text from a checkpoint (fitgpt's or nanoGPT's), with a KV cache
  export --ckpt RUN_DIR_OR_FILE --to hf OUT_DIR
                     write a Hugging Face GPT-2 folder (needs: pip install 'fitgpt[hf]')
  plot RUN_DIR [RUN_DIR ...] [--out FILE.png]
                     loss against tokens, each phase's peak memory against its prediction
  runs [DIR]         list the runs under DIR (default runs/): size, tokens, best val, status
  bench [CONFIG] [--variants full_logits,chunked,...] [--steps N] [--repeats R] [--json]
                     training and evaluation speed (tokens/s, MFU) and peak memory of variants
                     side by side, on synthetic tokens (default config: bench-cpu)

CONFIG is a TOML file, a nanoGPT-style Python config file, or a built-in name (demo, gpt2-124m,
seed-77m). Overrides: --eval.batch_size=4 or nanoGPT's flat --eval_batch_size=4.
`fitgpt train --help` lists every setting.
"""


def set_allocator_env() -> None:
    """Expandable segments cut fragmentation; newer PyTorch reads PYTORCH_ALLOC_CONF, older
    PYTORCH_CUDA_ALLOC_CONF. Set both, before torch is imported, unless the user set either."""
    if not any(v in os.environ for v in ALLOC_VARS):
        for v in ALLOC_VARS:
            os.environ[v] = "expandable_segments:True"


def split_args(args: list[str], options: tuple[str, ...]) -> tuple[str | None, dict[str, str], list[str]]:
    """(positional CONFIG, {option: value}, overrides). Overrides are everything else."""
    config, opts, rest = None, {}, []
    i = 0
    while i < len(args):
        tok = args[i]
        name, _, val = tok.partition("=")
        if name in options:
            if not val:
                if i + 1 >= len(args):
                    raise FitError(f"{name} needs a value")
                val = args[i + 1]
                i += 1
            opts[name] = val
        elif not tok.startswith("-") and config is None and not rest:
            config = tok
        else:
            rest.append(tok)
        i += 1
    return config, opts, rest


def cmd_train(args: list[str]) -> int:
    from fitgpt.config.load import help_text, load_config

    if "-h" in args or "--help" in args:
        print("usage: fitgpt train [CONFIG] [--resume RUN_DIR|auto] [--section.key=value ...]\n\n"
              "Defaults < CONFIG < command line. nanoGPT's flat names work too "
              "(--batch_size=8), and so does its --init_from=resume (continue the run in "
              "log.out_dir; CONFIG then applies on top of the checkpoint's settings).\n" + help_text())
        return 0
    config, opts, overrides = split_args(args, ("--resume",))
    notes: list[str] = []
    from fitgpt.store.resume import resume_config, resume_wanted

    resume = opts.get("--resume") or ("auto" if resume_wanted(config, overrides) else None)
    if resume is not None:  # --resume RUN, or nanoGPT's init_from='resume' (file or flag)
        cfg, ckpt, run_dir = resume_config(resume, config, overrides, notes)
    else:
        cfg = load_config(config, overrides, notes=notes)
        ckpt, run_dir = None, None
        refuse_released_weights(cfg.train.init_from, config)
    if cfg.parallel.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from fitgpt.train.distributed import launch

        return launch(cfg.parallel.nproc, ["train", *torchrun_args(config, opts, overrides)])
    from fitgpt.train.distributed import world_from_env

    world = world_from_env().size
    if world > 1 and cfg.parallel.nproc != world:  # launched by torchrun itself
        notes.append(f"parallel.nproc={world} from torchrun's WORLD_SIZE (memory is planned per process)")
        cfg.parallel.nproc = world
    from fitgpt.console import say

    for note in notes:
        say(f"note: {note}")
    from fitgpt.planner.plan import prepare_training

    cfg, lines = prepare_training(cfg)
    for line in lines:
        say(line)
    from fitgpt.train.loop import run

    summary = run(cfg, ckpt=ckpt, run_dir=run_dir)
    return 0 if summary["status"] in ("completed", "stopped") else 1


def refuse_released_weights(init_from: str, config: str | None) -> None:
    """nanoGPT's init_from='gpt2*' fine-tunes OpenAI's weights; fitgpt plans that shape but has
    no weights to start from, so training stops here, saying what does work."""
    if init_from.startswith("gpt2"):
        plan = f"fitgpt plan {config}" if config else f"fitgpt plan --init_from={init_from}"
        raise FitError(f"init_from={init_from!r} starts from OpenAI's released GPT-2 weights, which "
                       f"fitgpt does not download; `{plan}` shows the memory that fine-tuning "
                       f"needs, and --init_from=scratch trains the same shape from random weights")


def torchrun_args(config: str | None, opts: dict[str, str], overrides: list[str]) -> list[str]:
    """The command line again, for the processes torchrun starts, with every override in its
    dotted `--section.key=value` form: torchrun's own parser matches abbreviations anywhere on
    its command line (`--nproc 8` stopped it: "ambiguous option: --nproc could match
    --nproc-per-node, --nproc_per_node"), and none of its options contains a dot."""
    from fitgpt.config.load import NANOGPT_KEYS, parse_overrides

    out = [config] if config is not None else []
    out += [f"{k}={v}" for k, v in opts.items()]
    for key, text in parse_overrides(overrides):
        key = key.replace("-", "_")
        full = NANOGPT_KEYS.get(key, key)
        out.append(f"--{full}" if text is None else f"--{full}={text}")
    return out


def cmd_eval(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print("usage: fitgpt eval --ckpt RUN_DIR_OR_FILE [--eval.batch_size=N --eval.block_size=N "
              "--eval.tokens=N --data.dir=DIR --train.device=... ...]\n"
              "       fitgpt eval --task hellaswag --file hellaswag_val.jsonl --ckpt RUN_DIR_OR_FILE "
              "[--eval.batch_size=N ...]")
        return 0
    config, opts, overrides = split_args(args, ("--ckpt", "--task", "--file"))
    if "--ckpt" not in opts:
        raise FitError("fitgpt eval needs --ckpt RUN_DIR_OR_FILE")
    if config is not None:
        raise FitError(f"unexpected argument {config!r}; use --ckpt and --section.key=value")
    if "--task" in opts:
        if opts["--task"] != "hellaswag":
            raise FitError(f"--task {opts['--task']}: the only task is hellaswag")
        if "--file" not in opts:
            raise FitError("--task hellaswag needs --file hellaswag_val.jsonl (the official "
                           "release's JSON lines)")
        from fitgpt.eval.hellaswag import eval_hellaswag

        eval_hellaswag(opts["--ckpt"], opts["--file"], overrides)
        return 0
    if "--file" in opts:
        raise FitError("--file goes with --task hellaswag")
    from fitgpt.store.resume import eval_checkpoint

    eval_checkpoint(opts["--ckpt"], overrides)
    return 0


PLAN_USAGE = """usage: fitgpt plan [CONFIG] [--section.key=value ...] [--gpu NAME_OR_SIZE] [--fit] [--json] [--verify]
                   [--png FILE]

Predicts the peak memory of a training step and of an evaluation, part by part, before anything
is allocated, and compares it with a card. Nothing is imported from torch (unless --verify).

  --gpu NAME_OR_SIZE  the card: a name (rtx4070, 'RTX 4090', 4060ti-16gb, a100-80gb, h100, l4,
                      t4, ...) or a size (12GB, 11.5GiB, 8000MB). Default: the card nvidia-smi
                      lists, if any. --memory.budget=SIZE, when given, is the limit instead.
  --fit               also show what --memory.fit=auto would pick (fastest setting that fits)
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


def cmd_plan(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        from fitgpt.planner.gpus import gpu_names

        print(PLAN_USAGE.format(cards=", ".join(gpu_names())))
        return 0
    flags = {a for a in args if a in ("--fit", "--json", "--verify")}
    config, opts, overrides = split_args([a for a in args if a not in flags], ("--gpu", "--png"))
    if "--png" in opts:
        from fitgpt.report.plots import check_png_path

        check_png_path(opts["--png"])  # before any work: a bad path is one line
    from fitgpt.config.load import load_config
    from fitgpt.planner.gpus import find_gpu, smi_gpu
    from fitgpt.planner.plan import as_json, make_plan, render

    notes: list[str] = []
    cfg = load_config(config, overrides, notes=notes)
    gpu = find_gpu(opts["--gpu"]) if "--gpu" in opts else None
    if gpu is None and cfg.train.device != "cpu" and not cfg.memory.budget:
        gpu = smi_gpu()
    if "--fit" in flags and gpu is None and not cfg.memory.budget:
        raise FitError("--fit needs a card: --gpu NAME_OR_SIZE or --memory.budget=SIZE")
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
        import json

        data = as_json(plan)
        if result is not None:
            data["verify"] = result
        print(json.dumps(data, indent=2))
        return 0
    from fitgpt.console import console

    for note in notes:
        console.print(f"note: {note}", markup=False)
    render(plan, console)
    if "--png" in opts:
        console.print(f"wrote {opts['--png']}", markup=False)
    if result is not None:
        from fitgpt.planner.plan import render_verify

        console.print()
        render_verify(result, console)
    return 0


# Commands whose code lives in its own module, imported only when the command runs (so that
# `fitgpt plan` never imports torch): command -> (module, function).
LAZY = {"prepare": ("fitgpt.data.prepare.command", "cmd_prepare"), "data": ("fitgpt.data.inspect", "cmd_data"),
        "sample": ("fitgpt.eval.sample", "cmd_sample"), "export": ("fitgpt.report.export", "cmd_export"),
        "plot": ("fitgpt.report.runs", "cmd_plot"), "runs": ("fitgpt.report.runs", "cmd_runs"),
        "bench": ("fitgpt.train.bench", "cli")}
COMMANDS = {"train": cmd_train, "eval": cmd_eval, "plan": cmd_plan}


def find_command(name: str):
    """The function that runs command `name`, or None."""
    if name in LAZY:
        import importlib

        module, func = LAZY[name]
        return getattr(importlib.import_module(module), func)
    return COMMANDS.get(name)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. Output into a closed pipe (`fitgpt train --help | head`)
    ends the command quietly, as it ends `cat` or `ls`, whatever the command was printing."""
    try:
        code = run_command(argv)
        sys.stdout.flush()  # inside the try: a closed pipe shows up at the latest here
        return code
    except BrokenPipeError:
        # Python would try to flush stdout again at exit and print a traceback; point stdout
        # at /dev/null first, so the exit is quiet. 128 + SIGPIPE is what a shell reports for
        # a command stopped by a closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def run_command(argv: list[str] | None = None) -> int:
    set_allocator_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from fitgpt import __version__

        print(f"fitgpt {__version__}")
        return 0
    cmd = find_command(argv[0])
    if cmd is None:
        print(f"fitgpt: error: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return cmd(argv[1:])
    except FitError as e:
        print(f"fitgpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fitgpt: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.filename is None:
            raise
        print(f"fitgpt: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2


def entry() -> None:
    raise SystemExit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
