"""`fitgpt prepare fineweb|text ...`: the command line of a preparation.

The job itself (source, sizes, progress) is fitgpt.data.prepare.job; the shards are written by
fitgpt.data.prepare.pipeline.
"""

from __future__ import annotations

import argparse
import os
import re

from fitgpt.data.prepare.job import DEFAULT_SHARD_TOKENS, PrepareJob, run_job
from fitgpt.errors import ConfigError

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}

USAGE_EPILOG = """\
examples:
  fitgpt prepare fineweb --tokens 1B                       # first 1B tokens of sample-10BT -> data/fineweb
  fitgpt prepare fineweb --parquet 'fineweb/*.parquet'     # local FineWeb parquet files, no network
  fitgpt prepare text books/*.txt --out data/books         # a document per file
  fitgpt prepare text corpus.jsonl --field content --out data/corpus
Re-running the same command resumes an interrupted preparation.
"""


def parse_count(text: str) -> int:
    """``"1B"`` -> 1_000_000_000; also ``100M``, ``10k``, ``2.5M``, ``1e9``, ``1_000_000``."""
    s = text.strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:e\d+)?)([kmbgt]?)", s, flags=re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (examples: 1B, 100M, 10k, 1000000)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return int(value)


def default_workers() -> int:
    """The cores this process may run on: the default number of tokenizer processes."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _common() -> argparse.ArgumentParser:
    """The options both sources take."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tokens", type=parse_count, help="stop after this many tokens in all (1B, 100M, ...)")
    common.add_argument("--shard-tokens", type=parse_count, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard (default 100M, as llm.c)")
    common.add_argument("--val-tokens", type=parse_count,
                        help="tokens of the first (validation) shard; default: 10M for FineWeb; for text "
                        "5%% of the input's estimated tokens (bytes/4), at most 10M; never over a tenth "
                        "of --tokens")
    common.add_argument("--workers", type=int, default=default_workers(),
                        help="tokenizer processes (default: all cores); the output does not depend on it")
    common.add_argument("--name", help="shard file prefix: NAME_val_000000.bin, NAME_train_000001.bin, ...")
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fitgpt prepare", description="Tokenize text into llm.c token shards (GPT-2 BPE, EOT before "
        "every document) plus manifest.json; re-running the same command resumes.",
        epilog=USAGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True, metavar="{fineweb,text}")
    common = _common()
    fw = sub.add_parser("fineweb", parents=[common], help="FineWeb from the Hugging Face hub, or local parquet",
                        description="FineWeb (HuggingFaceFW/fineweb) streamed with `datasets`; only what is "
                        "read is downloaded. --parquet reads local FineWeb parquet files instead.")
    fw.add_argument("--dataset", default="fineweb", help="fineweb (default), fineweb-edu, or a hub repo id")
    fw.add_argument("--subset", default="sample-10BT", help="dataset subset (default sample-10BT)")
    fw.add_argument("--parquet", metavar="GLOB", help="local parquet files ('DIR/*.parquet'), no network")
    fw.add_argument("--out", help="output folder (default data/fineweb, data/fineweb-edu for --dataset fineweb-edu)")
    tx = sub.add_parser("text", parents=[common], help="plain text, JSON lines or parquet files",
                        description="Plain text (.txt, any other suffix), JSON lines (.jsonl/.ndjson/.json) "
                        "or parquet files. Documents: a file each (text default), a line each (blank lines "
                        "skipped), or a record each (JSON lines and parquet default).")
    tx.add_argument("files", nargs="+", metavar="FILE", help="files, folders or globs, read in the order given")
    tx.add_argument("--out", required=True, help="output folder")
    tx.add_argument("--field", default="text", help="JSON key or parquet column holding the text (default text)")
    tx.add_argument("--split-by", choices=("file", "line", "record"),
                    help="document unit (default: file for text, record for JSON lines and parquet)")
    return parser


def cmd_prepare(args: list[str]) -> int:
    """`fitgpt prepare fineweb|text ...`; returns the exit code (errors raise FitError)."""
    ns = _parser().parse_args(args)
    if ns.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {ns.workers}")
    run_job(PrepareJob(**vars(ns)))
    return 0
