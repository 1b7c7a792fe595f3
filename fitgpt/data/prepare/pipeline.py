"""The `fitgpt prepare` pipeline: documents into llm.c token shards, in parallel, resumable.

The pipeline: a source yields records (documents) in order; they are cut into chunks; worker
processes tokenize the chunks (``Pool.imap`` returns them in order, so the output does not depend
on the number of workers; workers are spawn-safe, see :func:`start_method`); the writer fills
shards of fixed size and writes each one atomically
(:func:`fitgpt.data.shards.write_shard`), then rewrites ``manifest.json``. The manifest lists every
finished shard with its sha256 and the input position where it ends (record index, and tokens
of that record already written), so re-running the same command verifies the finished shards,
skips the input up to the end of the last good one and continues from there, producing exactly
the bytes of an uninterrupted run. The manifest is written (with no shards) before the first
shard, and every file goes through a temporary name and a rename, so a kill at any moment
leaves a folder that the same command resumes; the folder is locked while a preparation
writes to it, so temporary files that a killed run left are removed safely.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fitgpt.data.manifest import MANIFEST, read_manifest
from fitgpt.data.prepare.encode import Chunk, Encoded, encode_chunk, init_worker, tokenizer_info
from fitgpt.data.shards import ShardCutter, manifest_header, shard_bytes, shard_path, shard_split, write_shard
from fitgpt.data.tokenizer import EOT
from fitgpt.errors import ConfigError, DataError
from fitgpt.fileio import file_sha256, write_json

_CHUNK_CHARS = 1 << 18  # a chunk holds about 256 kB of text (some 60k tokens, ~50 ms of work)
_CHUNK_RECORDS = 4096
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


class Source(Protocol):
    total_records: int | None

    def describe(self) -> dict[str, Any]: ...

    def records(self, start: int = 0) -> Iterator[str]: ...


class Reporter(Protocol):
    """What the pipeline tells about its progress (see fitgpt.data.prepare.job.Progress)."""

    def advance(self, records: int, documents: int, tokens: int, nbytes: int) -> None: ...

    def shard_done(self, entry: dict[str, Any]) -> None: ...


def check_name(name: str) -> str:
    """A shard name prefix that find_splits cannot misread (no ``_``, no ``/``, not hidden)."""
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '.' and '-' (no '_' or '/')")
    return name


def _chunks(records: Iterator[str], start: int) -> Iterator[Chunk]:
    """Group records into chunks of about ``_CHUNK_CHARS`` characters (numbered from start)."""
    texts: list[str] = []
    size = 0
    for text in records:
        texts.append(text)
        size += len(text)
        if size >= _CHUNK_CHARS or len(texts) >= _CHUNK_RECORDS:
            yield start, texts
            start, texts, size = start + len(texts), [], 0
    if texts:
        yield start, texts


class _Feeder:
    """The chunk iterator handed to ``Pool.imap``, with at most ``limit`` chunks in flight.

    ``imap`` drains its input in a background thread; the semaphore keeps it from reading the
    whole corpus into memory. An error of the source is kept and re-raised by the writer.
    """

    def __init__(self, chunks: Iterator[Chunk], limit: int) -> None:
        self.chunks, self.error = chunks, None
        self.slots = threading.Semaphore(limit)
        self.stopped = threading.Event()

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while True:
                while not self.slots.acquire(timeout=0.1):
                    if self.stopped.is_set():
                        return
                if self.stopped.is_set():
                    return
                chunk = next(self.chunks, None)
                if chunk is None:
                    return
                yield chunk
        except BaseException as exc:  # noqa: BLE001 - handed to the writer thread
            self.error = exc

    def stop(self) -> None:
        self.stopped.set()
        self.slots.release()


def start_method() -> str:
    """How worker processes start: ``fork`` on Linux while this process runs a single thread
    (instant, the tokenizer is inherited), else ``spawn`` (safe everywhere, about half a second
    per worker to import tiktoken and load the GPT-2 files). ``FITGPT_PREPARE_START`` overrides."""
    chosen = os.environ.get("FITGPT_PREPARE_START")
    if chosen:
        return chosen
    if sys.platform == "linux" and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _encoded(chunks: Iterator[Chunk], workers: int, lock_fd: int | None = None) -> Iterator[Encoded]:
    """Tokenized chunks in input order: in this process for one worker, else a process pool.

    Workers die with this process (see :func:`fitgpt.data.prepare.encode.init_worker`); forked ones close
    their copy of the folder lock ``lock_fd``, so that the lock ends with this process.
    """
    if workers <= 1:
        for chunk in chunks:
            yield encode_chunk(chunk)
        return
    feeder = _Feeder(chunks, limit=4 * workers)
    method = start_method()
    parent = os.getpid() if method in ("fork", "spawn") else None  # a forkserver is their parent
    inherited = lock_fd if method == "fork" else None
    pool = get_context(method).Pool(workers, initializer=init_worker, initargs=(parent, inherited))
    try:
        for result in pool.imap(encode_chunk, feeder):
            feeder.slots.release()
            yield result
        if feeder.error is not None:
            raise feeder.error
    finally:
        feeder.stop()
        pool.terminate()
        pool.join()


def _position(start: int, lengths: np.ndarray, ends: np.ndarray, p: int) -> tuple[int, int]:
    """Input position after ``p`` (> 0) tokens of a chunk: (record, tokens of it written).

    The form is canonical (independent of where chunks begin): a record finished exactly at
    ``p`` gives (next record, 0).
    """
    j = int(np.searchsorted(ends, p, side="left"))
    done = p - int(ends[j] - lengths[j])
    return (start + j + 1, 0) if done == lengths[j] else (start + j, done)


def _bad_shard(out: Path, entry: dict[str, Any]) -> str | None:
    """Why a manifest's shard fails its check (size and sha256), or None if it passes."""
    path = out / entry["file"]
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if size != shard_bytes(int(entry["tokens"])):
        return f"{size} bytes, expected {shard_bytes(int(entry['tokens']))}"
    if file_sha256(path) != entry["sha256"]:
        return "sha256 differs from the manifest"
    return None


def _load_previous(out: Path, name: str, settings: dict[str, Any], say: Callable[[str], None]) -> dict | None:
    """The manifest of an earlier run with the same settings, cut to its verified shards."""
    path = out / MANIFEST
    manifest = read_manifest(path, f"remove {out} or choose another --out", resumable=True)
    if manifest is None:
        leftovers = sorted(p.name for p in out.glob(f"{name}_*.bin"))
        if leftovers:
            raise DataError(
                f"{out} holds {name} shards ({leftovers[0]}, ...) but no {MANIFEST}, so they were not "
                "written by `fitgpt prepare`; remove them or choose another --out"
            )
        return None
    previous, shards = manifest["settings"], manifest["shards"]
    if previous != settings:
        diff = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise DataError(
            f"{out} holds a preparation with other settings ({', '.join(diff)} differ); "
            "re-run it with the same command to resume, or choose another --out"
        )
    for i, entry in enumerate(shards):
        problem = _bad_shard(out, entry)
        if problem is not None:
            say(f"{entry['file']}: {problem}; preparing again from there")
            manifest["shards"] = shards[:i]
            manifest["status"] = "in progress"
            break
    return manifest


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[int | None]:
    """Hold an exclusive lock (``flock``) on the output folder; yield its descriptor (None where
    there is no ``fcntl``). The kernel releases it when the process dies, however it dies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield None
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise DataError(f"another `fitgpt prepare` is writing to {out}; wait for it to end, "
                            "or choose another --out") from exc
        yield fd
    finally:
        os.close(fd)


def _remove_stale_temps(out: Path, name: str, say: Callable[[str], None]) -> None:
    """Delete the temporary shard and manifest files (``.*NAME_*.bin.tmp``,
    ``.*manifest.json.tmp``) that a killed run left; safe only under :func:`_exclusive`."""
    stale = [*out.glob(f".*{name}_*.bin.tmp"), *out.glob(f".*{MANIFEST}.tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        say(f"{out}: removed {len(stale)} temporary file(s) left by an interrupted run")


def _totals(manifest: dict[str, Any]) -> None:
    shards = manifest["shards"]
    manifest["total_tokens"] = sum(e["tokens"] for e in shards)
    manifest["val_tokens"] = sum(e["tokens"] for e in shards if e["split"] == "val")
    manifest["train_tokens"] = manifest["total_tokens"] - manifest["val_tokens"]
    manifest["documents"] = sum(e["documents"] for e in shards)


_NO_ROOM = {getattr(errno, "EDQUOT", errno.ENOSPC): "disk quota exceeded", errno.ENOSPC: "disk full",
            errno.EFBIG: "file too large for the file system or the file-size limit (ulimit -f)"}


def _killshard_fault(index: int) -> None:
    """For the tests: FITGPT_FAULT=killshard:INDEX SIGKILLs this process right after shard INDEX
    is written, before the manifest lists it (the other faults are fitgpt.train.faults')."""
    spec = os.environ.get("FITGPT_FAULT", "")
    if f"killshard:{index}" in (item.strip() for item in spec.split(",")):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _write_error(exc: OSError, path: Path) -> DataError:
    if exc.errno in _NO_ROOM:
        return DataError(f"{_NO_ROOM[exc.errno]} while writing {path}; make room, then re-run the same "
                         "command to resume")
    return DataError(f"cannot write {path} ({exc.strerror or exc})")


def _save(out: Path, manifest: dict[str, Any]) -> None:
    try:
        write_json(out / MANIFEST, manifest)
    except OSError as exc:
        raise _write_error(exc, out / MANIFEST) from exc


class _Writer:
    """Writes shards in order and lists each one in the manifest once its file is complete."""

    def __init__(self, out: Path, name: str, manifest: dict[str, Any], report: Reporter | None) -> None:
        self.out, self.name, self.manifest, self.report = out, name, manifest, report
        self.shards: list[dict[str, Any]] = manifest["shards"]

    def write(self, tokens: np.ndarray, end: tuple[int, int]) -> None:
        index = len(self.shards)
        path = shard_path(self.out, self.name, index)
        try:
            sha256 = write_shard(path, tokens)
        except OSError as exc:
            raise _write_error(exc, path) from exc
        _killshard_fault(index)
        entry = {"file": path.name, "split": shard_split(index), "tokens": int(tokens.size),
                 "documents": int(np.count_nonzero(tokens == EOT)), "max_token": int(tokens.max()),
                 "sha256": sha256, "end_record": end[0], "end_offset": end[1]}
        self.shards.append(entry)
        _totals(self.manifest)
        try:
            _save(self.out, self.manifest)
        except DataError:
            self.shards.pop()
            raise
        if self.report is not None:
            self.report.shard_done(entry)


def prepare_shards(
    source: Source,
    out_dir: str | os.PathLike[str],
    name: str,
    *,
    val_tokens: int,
    shard_tokens: int,
    max_tokens: int | None = None,
    workers: int = 1,
    extra: dict[str, Any] | None = None,
    report: Reporter | None = None,
    say: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Tokenize ``source`` into llm.c shards in ``out_dir`` (resuming an earlier run); return
    the manifest.

    The token stream (EOT before every document) is cut without regard to documents: the first
    ``val_tokens`` tokens form ``NAME_val_000000.bin``, then ``NAME_train_000001.bin``, ... of
    ``shard_tokens`` each, the last one shorter; ``max_tokens`` caps the total.

    Raises:
        ConfigError: bad sizes or name.
        DataError: unreadable input, no tokens for training, a folder that cannot be written,
            a full disk, an earlier preparation with other settings in ``out_dir``, or another
            preparation writing there now.
    """
    _check_sizes(name, val_tokens, shard_tokens, max_tokens)
    out = _output_folder(out_dir)
    tokenizer = tokenizer_info()
    settings = {"name": name, "source": source.describe(), "tokenizer_vocab_sha256": tokenizer["vocab_sha256"],
                "val_tokens": val_tokens, "shard_tokens": shard_tokens, "max_tokens": max_tokens}
    with _exclusive(out) as lock_fd:
        if lock_fd is not None:
            _remove_stale_temps(out, name, say)
        manifest = _load_previous(out, name, settings, say)
        if manifest is not None and manifest.get("status") == "complete":
            say(f"{out}: already complete ({len(manifest['shards'])} shards verified)")
            return manifest
        created = manifest is None
        if created:  # listed before the first shard exists: a kill leaves it resumable
            manifest = _new_manifest(out, name, source.describe(), tokenizer, settings, extra)
        writer = _Writer(out, name, manifest, report)
        try:
            _fill(source, writer, val_tokens, shard_tokens, max_tokens, workers, lock_fd, say)
        except BaseException:
            if created and not manifest["shards"]:  # nothing to resume: leave the folder as found
                for path in [out / MANIFEST, *out.glob(f"{name}_*.bin")]:
                    path.unlink(missing_ok=True)
            raise
        manifest["status"] = "complete"
        _save(out, manifest)
    return manifest


def _check_sizes(name: str, val_tokens: int, shard_tokens: int, max_tokens: int | None) -> None:
    """ConfigError for a bad shard name, a size that is not a positive integer, or --tokens that
    leave nothing for training."""
    check_name(name)
    for label, value in (("val tokens", val_tokens), ("shard tokens", shard_tokens), ("tokens", max_tokens)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{label} must be a positive integer, got {value!r}")
    if max_tokens is not None and max_tokens <= val_tokens:
        raise ConfigError(f"--tokens {max_tokens} leaves nothing for training after --val-tokens {val_tokens}")


def _output_folder(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the output folder {out} ({exc.strerror or exc})") from exc
    return out


def _new_manifest(out: Path, name: str, source: dict[str, Any], tokenizer: dict[str, Any],
                  settings: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of a new preparation, saved at once with no shards."""
    manifest = {**manifest_header(name), "status": "in progress", "source": source, "tokenizer": tokenizer,
                "eot": EOT, "settings": settings, "shards": []}
    manifest.update(extra or {})
    _totals(manifest)
    _save(out, manifest)
    return manifest


def _fill(source: Source, writer: _Writer, val_tokens: int, shard_tokens: int, max_tokens: int | None,
          workers: int, lock_fd: int | None, say: Callable[[str], None]) -> None:
    """Tokenize the input from where the listed shards end and write the remaining shards.

    A full shard is written only once a token follows it: the val shard alone is an error (no
    training data), and the last shard is written after the input ends."""
    shards = writer.shards
    record, skip = (shards[-1]["end_record"], shards[-1]["end_offset"]) if shards else (0, 0)
    if shards:
        say(f"resuming after {shards[-1]['file']}: {len(shards)} shards verified, record {record}")
    cutter = ShardCutter(val_tokens, shard_tokens, index=len(shards))
    budget = None if max_tokens is None else max_tokens - sum(e["tokens"] for e in shards)
    pending: tuple[np.ndarray, tuple[int, int]] | None = None  # a full shard, and where it ends
    end = (record, skip)
    if budget is None or budget > 0:
        encoded = _encoded(_chunks(source.records(record), record), workers, lock_fd)
        try:
            for start, tokens, lengths, nbytes in encoded:
                ends = np.cumsum(lengths)
                p = first = skip
                skip = 0
                while p < tokens.size and budget != 0:
                    if pending is not None:  # more tokens follow: the full shard can be written
                        writer.write(*pending)
                        pending = None
                    take = cutter.put(tokens[p:] if budget is None else tokens[p : p + budget])
                    p += take
                    budget = None if budget is None else budget - take
                    end = _position(start, lengths, ends, p)
                    if cutter.full:
                        pending = (cutter.cut(), end)
                if writer.report is not None:
                    writer.report.advance(len(lengths), int(np.count_nonzero(lengths)), p - first, nbytes)
                if budget == 0:
                    break
        finally:
            encoded.close()
    _write_last(writer, pending or ((cutter.cut(), end) if cutter.filled else None), val_tokens)


def _write_last(writer: _Writer, last: tuple[np.ndarray, tuple[int, int]] | None, val_tokens: int) -> None:
    """Write the last shard; a DataError when the input ran out before any training token."""
    if not writer.shards and last is None:
        raise DataError("the input holds no documents (every record is empty or blank)")
    if not writer.shards:  # the val shard is written only once a token for training follows it
        raise DataError(
            f"the input holds {last[0].size} tokens (EOTs included), not more than --val-tokens {val_tokens}: "
            "nothing is left for training; lower --val-tokens or add input"
        )
    if last is not None:
        writer.write(*last)
