"""One `fitgpt prepare` job: its input, its sizes, and its progress on the console.

`fitgpt.cli.prepare` turns the command line into a :class:`PrepareJob`; :func:`run_job` picks
the source (:mod:`fitgpt.data.prepare.sources`), defaults the validation size, runs
:func:`fitgpt.data.prepare.pipeline.prepare_shards` with a :class:`Progress` and says what was
written.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from typing import Any

from fitgpt.console import console, fmt_count, say

DEFAULT_SHARD_TOKENS = 100_000_000
FINEWEB_VAL_TOKENS = 10_000_000
#: Default validation share of a text input: 5 % of its estimated tokens (bytes / 4), at most
#: FINEWEB_VAL_TOKENS, and at most a tenth of --tokens.
TEXT_VAL_SHARE = 0.05
BYTES_PER_TOKEN = 4


@dataclass
class PrepareJob:
    """What `fitgpt prepare fineweb|text` was asked to do (the command line's options, by name)."""

    source: str  # "fineweb" or "text"
    workers: int = 1
    tokens: int | None = None  # stop after this many tokens in all
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_tokens: int | None = None  # None: see val_tokens_of
    name: str | None = None  # shard file prefix; None: the dataset's short name, or "text"
    out: str | None = None  # None (fineweb only): data/SHORT_NAME
    # fineweb
    dataset: str = "fineweb"
    subset: str = "sample-10BT"
    parquet: str | None = None  # a glob of local parquet files instead of the hub
    # text
    files: list[str] | None = None
    field: str = "text"
    split_by: str | None = None


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


def source_of(job: PrepareJob) -> tuple[Any, str, str, dict[str, Any]]:
    """(source, out folder, shard name, manifest extras) of the job."""
    from fitgpt.data.prepare import sources

    if job.source == "text":
        files = sources.expand_inputs(job.files or [])
        return sources.FileSource(files, job.split_by, job.field, kind="files"), job.out, job.name or "text", {}
    short = job.dataset.split("/")[-1].lower()
    repo = sources.FINEWEB_REPOS.get(job.dataset, job.dataset)
    out, name = job.out or f"data/{short}", job.name or re.sub(r"[^A-Za-z0-9.-]", "-", short)
    if job.parquet:
        files = sources.expand_inputs([job.parquet])
        return sources.FileSource(files, "record", "text", kind="parquet"), out, name, {"dataset": repo}
    return sources.FineWebSource(job.dataset, job.subset), out, name, {"dataset": repo, "subset": job.subset}


def val_tokens_of(job: PrepareJob, source: Any) -> int:
    """--val-tokens, or its default: 10M for FineWeb, 5 % of a text input's estimated tokens (at
    most 10M); never over a tenth of --tokens."""
    if job.val_tokens is not None:
        return int(job.val_tokens)
    if job.source == "fineweb":
        val = FINEWEB_VAL_TOKENS
    else:
        val = int(source.estimated_text_bytes() / BYTES_PER_TOKEN * TEXT_VAL_SHARE)
        val = min(max(val, 1), FINEWEB_VAL_TOKENS)
    if job.tokens is not None:
        val = min(val, max(job.tokens // 10, 1))
    return val


def run_job(job: PrepareJob) -> dict[str, Any]:
    """Prepare the shards (resuming an earlier run of the same job), saying how it goes; the
    manifest. An interrupted job keeps its finished shards and says how to resume."""
    from fitgpt.data.prepare.pipeline import check_name, prepare_shards

    source, out, name, extra = source_of(job)
    check_name(name)
    val = val_tokens_of(job, source)
    progress = Progress(job.tokens, source.total_records)
    begin = time.perf_counter()
    try:
        manifest = prepare_shards(
            source, out, name, val_tokens=val, shard_tokens=job.shard_tokens, max_tokens=job.tokens,
            workers=job.workers, extra=extra, report=progress, say=say)
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
    return manifest
