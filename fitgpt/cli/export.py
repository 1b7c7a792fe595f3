"""`fitgpt export --ckpt RUN_DIR_OR_FILE --to hf OUT_DIR`: the folder is written by
fitgpt.report.export."""

from __future__ import annotations

import argparse
from pathlib import Path

from fitgpt.errors import FitError, parse_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fitgpt export", allow_abbrev=False, description=(
        "Export a checkpoint (fitgpt's or nanoGPT's) as a Hugging Face GPT-2 folder that "
        "transformers' GPT2LMHeadModel.from_pretrained loads. Needs: pip install 'fitgpt[hf]'."))
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint file")
    p.add_argument("--to", required=True, nargs=2, metavar=("FORMAT", "OUT_DIR"),
                   help="the format (hf) and the folder to write")
    p.add_argument("--data.dir", dest="data_dir", metavar="DIR",
                   help="the model's data folder, where a character-level dataset's meta.pkl is "
                        "(default: the data.dir the checkpoint recorded)")
    return p


def cmd_export(args: list[str]) -> int:
    """Exit code 0; an unknown format or an output folder that is not new and empty is refused
    before the checkpoint is read."""
    a = parse_args(_parser(), args)
    fmt, out = a.to
    if fmt != "hf":
        raise FitError(f"--to {fmt}: the only format is hf (Hugging Face GPT-2)")
    out_dir = Path(out)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir())):
        raise FitError(f"{out_dir}: exists and is not an empty folder; choose a new one")
    from fitgpt.report.export import export_checkpoint

    export_checkpoint(a.ckpt, out_dir, a.data_dir)
    return 0
