"""The `fitgpt` command: the usage, the allocator setting, and which module runs each command.

Each subcommand's argument handling is a module of its own (fitgpt.cli.train, .plan, ...),
imported when the command runs. Nothing here imports torch before the allocator setting is in
place.
"""

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


# Each command's module, imported only when the command runs (so that `fitgpt plan` and `fitgpt
# --help` never import torch): command -> (module, function taking the arguments after it).
COMMANDS = {"train": ("fitgpt.cli.train", "cmd_train"), "eval": ("fitgpt.cli.eval", "cmd_eval"),
            "plan": ("fitgpt.cli.plan", "cmd_plan"), "prepare": ("fitgpt.cli.prepare", "cmd_prepare"),
            "data": ("fitgpt.cli.data", "cmd_data"), "sample": ("fitgpt.cli.sample", "cmd_sample"),
            "export": ("fitgpt.cli.export", "cmd_export"), "plot": ("fitgpt.cli.plot", "cmd_plot"),
            "runs": ("fitgpt.cli.runs", "cmd_runs"), "bench": ("fitgpt.train.bench", "cli")}


def find_command(name: str):
    """The function that runs command `name`, or None."""
    if name not in COMMANDS:
        return None
    import importlib

    module, func = COMMANDS[name]
    return getattr(importlib.import_module(module), func)


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
