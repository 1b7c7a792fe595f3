"""`fitgpt data inspect DIR [--verify] [--sample N]`: the report is fitgpt.data.inspect's."""

from __future__ import annotations

import argparse

from fitgpt.errors import DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fitgpt data", description="Look at prepared token shards.")
    sub = parser.add_subparsers(dest="action", required=True)
    ins = sub.add_parser("inspect", help="shards, checks, document lengths and a decoded sample",
                         description="Per-shard counts, the manifest's checks, document-length statistics "
                         "(from EOT positions) and a decoded sample of the validation data.")
    ins.add_argument("dir", help="folder of *_val_*.bin / *_train_*.bin shards, *_val.bin / *_train.bin "
                     "(llm.c) or nanoGPT's train.bin / val.bin")
    ins.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest")
    ins.add_argument("--sample", type=int, default=64, metavar="N",
                     help="decode the first N tokens of the validation data (default 64; 0: none)")
    return parser


def cmd_data(args: list[str]) -> int:
    """Exit code 0; a failed check is a DataError (exit code 2) naming the first problem."""
    ns = _parser().parse_args(args)
    from fitgpt.data.inspect import inspect_dir

    report = inspect_dir(ns.dir, verify=ns.verify, sample=ns.sample)
    if report["problems"]:
        raise DataError(f"{ns.dir}: {len(report['problems'])} check(s) failed: {report['problems'][0]}")
    return 0
