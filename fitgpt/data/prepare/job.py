"""`fitgpt prepare`: FineWeb or your own text into llm.c token shards (command line and progress).

The work is done by :func:`fitgpt.data.prepare.pipeline.prepare_shards`; the inputs come from
:mod:`fitgpt.data.prepare.sources`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any

from fitgpt.console import console, fmt_count, say
from fitgpt.errors import ConfigError

DEFAULT_SHARD_TOKENS = 100_000_000
FINEWEB_VAL_TOKENS = 10_000_000
#: Default validation share of a text input: 5 % of its estimated tokens (bytes / 4), at most
#: FINEWEB_VAL_TOKENS, and at most a tenth of --tokens.
TEXT_VAL_SHARE = 0.05
BYTES_PER_TOKEN = 4
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
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


class Progress:
    """Progress of a preparation: a rich bar on a terminal, otherwise a log line every
    ``interval`` seconds. The bar's total (and ETA) is ``--tokens`` when given, else the number
    of records when the input tells it (parquet metadata, a document per file)."""

    def __init__(
        self, total_tokens: int | None, total_records: int | None, tty: bool | None = None, interval: float = 10.0
    ) -> None:
        self.total_tokens, self.total_records = total_tokens, total_records
        self.records = self.documents = self.tokens = self.nbytes = 0
        self.start = self.last = time.perf_counter()
        self.interval = interval
        self._bar: Any = None
        self._tty = sys.stdout.isatty() if tty is None else tty

    def _start_bar(self) -> None:
        """The bar starts with the first progress, after the worker pool: its refresh thread
        would otherwise make the pool spawn its workers instead of forking them."""
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]prepare"), BarColumn(), TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(), console=console, transient=True)
        self._task = self._bar.add_task("prepare", total=self.total_tokens or self.total_records, status="")
        self._bar.start()

    def status(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return (f"{fmt_count(self.documents)} docs | {fmt_count(self.tokens)} tokens | "
                f"{self.nbytes / dt / 1e6:.1f} MB/s | {fmt_count(self.tokens / dt)} tok/s")

    def eta(self) -> str:
        done, total = (self.tokens, self.total_tokens) if self.total_tokens else (self.records, self.total_records)
        if not total or not done:
            return ""
        left = (time.perf_counter() - self.start) * max(total - done, 0) / done
        return f" | ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"

    def advance(self, records: int, documents: int, tokens: int, nbytes: int) -> None:
        self.records += records
        self.documents += documents
        self.tokens += tokens
        self.nbytes += nbytes
        if self._tty and self._bar is None:
            self._start_bar()
        if self._bar is not None:
            done = self.tokens if self.total_tokens else self.records
            self._bar.update(self._task, completed=done, status=self.status())
        elif time.perf_counter() - self.last >= self.interval:
            self.last = time.perf_counter()
            say(f"prepare: {self.status()}{self.eta()}")

    def shard_done(self, entry: dict[str, Any]) -> None:
        msg = f"wrote {entry['file']}: {entry['tokens']:,} tokens, {entry['documents']:,} documents"
        if self._bar is not None:
            self._bar.console.print(msg, markup=False, highlight=False)
        else:
            say(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self._tty = False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fitgpt prepare", description="Tokenize text into llm.c token shards (GPT-2 BPE, EOT before "
        "every document) plus manifest.json; re-running the same command resumes.",
        epilog=USAGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True, metavar="{fineweb,text}")
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


def _source(args: argparse.Namespace) -> tuple[Any, str, str, dict[str, Any]]:
    """(source, out folder, shard name, manifest extras) for the parsed command line."""
    from fitgpt.data.prepare import sources

    if args.source == "text":
        files = sources.expand_inputs(args.files)
        return sources.FileSource(files, args.split_by, args.field, kind="files"), args.out, args.name or "text", {}
    short = args.dataset.split("/")[-1].lower()
    repo = sources.FINEWEB_REPOS.get(args.dataset, args.dataset)
    out, name = args.out or f"data/{short}", args.name or re.sub(r"[^A-Za-z0-9.-]", "-", short)
    if args.parquet:
        files = sources.expand_inputs([args.parquet])
        return sources.FileSource(files, "record", "text", kind="parquet"), out, name, {"dataset": repo}
    return sources.FineWebSource(args.dataset, args.subset), out, name, {"dataset": repo, "subset": args.subset}


def _val_tokens(args: argparse.Namespace, source: Any) -> int:
    if args.val_tokens is not None:
        return int(args.val_tokens)
    if args.source == "fineweb":
        val = FINEWEB_VAL_TOKENS
    else:
        val = int(source.estimated_text_bytes() / BYTES_PER_TOKEN * TEXT_VAL_SHARE)
        val = min(max(val, 1), FINEWEB_VAL_TOKENS)
    if args.tokens is not None:
        val = min(val, max(args.tokens // 10, 1))
    return val


def cmd_prepare(args: list[str]) -> int:
    """`fitgpt prepare fineweb|text ...`; returns the exit code (errors raise FitError)."""
    ns = _parser().parse_args(args)
    if ns.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {ns.workers}")
    from fitgpt.data.prepare.pipeline import check_name, prepare_shards

    source, out, name, extra = _source(ns)
    check_name(name)
    val = _val_tokens(ns, source)
    progress = Progress(ns.tokens, source.total_records)
    begin = time.perf_counter()
    try:
        manifest = prepare_shards(
            source, out, name, val_tokens=val, shard_tokens=ns.shard_tokens, max_tokens=ns.tokens,
            workers=ns.workers, extra=extra, report=progress, say=say)
    except KeyboardInterrupt:
        progress.close()
        say(f"interrupted: finished shards are kept in {out}; re-run the same command to resume")
        raise
    finally:
        progress.close()
    dt = time.perf_counter() - begin
    rate = f", {dt:.1f} s ({fmt_count(progress.tokens / max(dt, 1e-9))} tok/s)" if progress.tokens else ""
    say(f"done: {len(manifest['shards'])} shards in {out}: {manifest['total_tokens']:,} tokens "
        f"(val {manifest['val_tokens']:,}, train {manifest['train_tokens']:,}), "
        f"{manifest['documents']:,} documents{rate}")
    say(f"train on it: fitgpt train CONFIG --data.dir={out}   (check it: fitgpt data inspect {out})")
    return 0
