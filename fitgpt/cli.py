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
  eval --ckpt RUN_DIR_OR_FILE [--section.key=value ...]
                     evaluate a checkpoint on the validation windows

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
    from fitgpt.configio import help_text, load_config

    if "-h" in args or "--help" in args:
        print("usage: fitgpt train [CONFIG] [--resume RUN_DIR|auto] [--section.key=value ...]\n\n"
              "Defaults < CONFIG < command line. nanoGPT's flat names work too "
              "(--batch_size=8).\n" + help_text())
        return 0
    config, opts, overrides = split_args(args, ("--resume",))
    notes: list[str] = []
    if "--resume" in opts:
        from fitgpt.resume import resume_config

        cfg, ckpt, run_dir = resume_config(opts["--resume"], config, overrides, notes)
    else:
        cfg = load_config(config, overrides, notes=notes)
        ckpt, run_dir = None, None
        if cfg.train.init_from.startswith("gpt2"):
            raise FitError(f"train.init_from={cfg.train.init_from!r} needs OpenAI's released "
                           "weights from the Hugging Face hub, which fitgpt does not download; "
                           "use init_from='scratch', or plan it with `fitgpt plan`")
        if cfg.train.init_from == "resume":
            from fitgpt.resume import resume_config

            cfg, ckpt, run_dir = resume_config("auto", config, overrides, notes)
    from fitgpt.log import say

    for note in notes:
        say(f"note: {note}")
    from fitgpt.train import run

    summary = run(cfg, ckpt=ckpt, run_dir=run_dir)
    return 0 if summary["status"] in ("completed", "stopped") else 1


def cmd_eval(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print("usage: fitgpt eval --ckpt RUN_DIR_OR_FILE [--eval.batch_size=N --eval.block_size=N "
              "--eval.tokens=N --data.dir=DIR --train.device=... ...]")
        return 0
    config, opts, overrides = split_args(args, ("--ckpt",))
    if "--ckpt" not in opts:
        raise FitError("fitgpt eval needs --ckpt RUN_DIR_OR_FILE")
    if config is not None:
        raise FitError(f"unexpected argument {config!r}; use --ckpt and --section.key=value")
    from fitgpt.resume import eval_checkpoint

    eval_checkpoint(opts["--ckpt"], overrides)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    set_allocator_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from fitgpt import __version__

        print(f"fitgpt {__version__}")
        return 0
    cmd = COMMANDS.get(argv[0])
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
