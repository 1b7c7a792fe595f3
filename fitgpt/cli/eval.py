"""`fitgpt eval --ckpt RUN_DIR_OR_FILE [--task hellaswag --file F] [--section.key=value ...]`."""

from __future__ import annotations

from fitgpt.config.cmdline import split_args
from fitgpt.errors import FitError

USAGE = ("usage: fitgpt eval --ckpt RUN_DIR_OR_FILE [--eval.batch_size=N --eval.block_size=N "
         "--eval.tokens=N --data.dir=DIR --train.device=... ...]\n"
         "       fitgpt eval --task hellaswag --file hellaswag_val.jsonl --ckpt RUN_DIR_OR_FILE "
         "[--eval.batch_size=N ...]")


def cmd_eval(args: list[str]) -> int:
    """The validation windows (fitgpt.eval.run.eval_checkpoint) or HellaSwag
    (fitgpt.eval.hellaswag) on a checkpoint; exit code 0."""
    if "-h" in args or "--help" in args:
        print(USAGE)
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
    from fitgpt.eval.run import eval_checkpoint

    eval_checkpoint(opts["--ckpt"], overrides)
    return 0
