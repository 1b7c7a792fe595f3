"""`fitgpt train [CONFIG] [--resume RUN_DIR|auto] [--section.key=value ...]`.

The config comes from the file (or a resumed run's checkpoint); several processes are started
through torchrun; the run itself is fitgpt.train.trainer.run, after the planner's pre-flight.
"""

from __future__ import annotations

import os

from fitgpt.config.cmdline import split_args
from fitgpt.errors import FitError

USAGE = ("usage: fitgpt train [CONFIG] [--resume RUN_DIR|auto] [--section.key=value ...]\n\n"
         "Defaults < CONFIG < command line. nanoGPT's flat names work too "
         "(--batch_size=8), and so does its --init_from=resume (continue the run in "
         "log.out_dir; CONFIG then applies on top of the checkpoint's settings).\n")


def cmd_train(args: list[str]) -> int:
    """Exit code 0 for a run that completed or was stopped, 1 for one that failed."""
    from fitgpt.config.load import help_text

    if "-h" in args or "--help" in args:
        print(USAGE + help_text())
        return 0
    config, opts, overrides = split_args(args, ("--resume",))
    notes: list[str] = []
    cfg, ckpt, run_dir = _config(config, opts, overrides, notes)
    if cfg.parallel.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from fitgpt.train.distributed import launch

        return launch(cfg.parallel.nproc, ["train", *torchrun_args(config, opts, overrides)])
    from fitgpt.train.distributed import world_from_env

    world = world_from_env()  # made once, here, and passed down
    if world.size > 1 and cfg.parallel.nproc != world.size:  # launched by torchrun itself
        notes.append(f"parallel.nproc={world.size} from torchrun's WORLD_SIZE (memory is planned per process)")
        cfg.parallel.nproc = world.size
    from fitgpt.console import say

    for note in notes:
        say(f"note: {note}")
    from fitgpt.planner.plan import prepare_training

    cfg, lines = prepare_training(cfg)
    for line in lines:
        say(line)
    from fitgpt.train.trainer import run

    summary = run(cfg, ckpt=ckpt, run_dir=run_dir, world=world)
    return 0 if summary["status"] in ("completed", "stopped") else 1


def _config(config: str | None, opts: dict[str, str], overrides: list[str], notes: list[str]):
    """(config, checkpoint to resume or None, its run folder or None) for this command line."""
    from fitgpt.config.load import load_config
    from fitgpt.store.resume import resume_config, resume_wanted

    resume = opts.get("--resume") or ("auto" if resume_wanted(config, overrides) else None)
    if resume is not None:  # --resume RUN, or nanoGPT's init_from='resume' (file or flag)
        return resume_config(resume, config, overrides, notes)
    cfg = load_config(config, overrides, notes=notes)
    refuse_released_weights(cfg.train.init_from, config)
    return cfg, None, None


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
    for key, text in parse_overrides(overrides):  # keys come back spelled with '_'
        full = NANOGPT_KEYS.get(key, key)
        out.append(f"--{full}" if text is None else f"--{full}={text}")
    return out
