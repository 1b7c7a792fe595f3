"""Where `fitgpt prepare` reads documents from: text, JSON lines and parquet files, FineWeb
streamed from the Hugging Face hub, or a list in memory (the demo corpus).

A source yields *records* in a fixed order, numbered from 0: a file, a line or a JSON/parquet
record, depending on ``split_by``. A record that is empty or only whitespace is kept in the
numbering but holds no document. ``records(start)`` restarts at record ``start``, which is how
an interrupted preparation resumes without reading its input again from the beginning.

``pyarrow`` and ``datasets`` are imported only when a parquet file or the hub is used.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fitgpt.errors import DataError

SPLIT_BY = ("file", "line", "record")
#: Default document unit per input format (``--split-by``).
DEFAULT_SPLIT = {"text": "file", "jsonl": "record", "parquet": "record"}
FINEWEB_REPOS = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
_PARQUET_HINT = "pip install pyarrow (or pip install 'fitgpt[fineweb]')"
_PARQUET_BATCH_ROWS = 1024


def file_format(path: Path) -> str:
    """``"jsonl"``, ``"parquet"`` or ``"text"``, from the file's suffix."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "text"


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by ``patterns``: paths, folders (their visible files, sorted) or globs.

    Raises:
        DataError: a path does not exist, a glob matches nothing, or nothing is left.
    """
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not inside:
                raise DataError(f"input folder {path} holds no files")
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(pattern):
            matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)) if Path(p).is_file())
            if not matched:
                raise DataError(f"no input file matches {pattern!r}")
            files.extend(matched)
        else:
            raise DataError(f"input {pattern} not found")
    if not files:
        raise DataError("no input files given")
    return files


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"reading parquet files needs pyarrow: {_PARQUET_HINT}") from exc
    return pq


def _open_parquet(path: Path, column: str) -> Any:
    """``pyarrow.parquet.ParquetFile`` for ``path`` with a string column ``column``, checked."""
    pq = _pyarrow_parquet()
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # ArrowInvalid, OSError, ...: one line naming the file
        raise DataError(f"{path}: not a readable parquet file ({_one_line(exc)})") from exc
    schema = pf.schema_arrow
    if column not in schema.names:
        raise DataError(
            f"{path}: parquet file has no column {column!r} (its columns: {', '.join(schema.names)}); "
            "name the text column with --field"
        )
    kind = str(schema.field(column).type)
    if kind not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column {column!r} holds {kind}, expected text (string)")
    return pf


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class FileSource:
    """Documents from text, JSON-lines and parquet files, in the order given.

    Args:
        files: the input files (see :func:`expand_inputs`).
        split_by: ``file``, ``line`` or ``record``; None picks each format's default (text: a
            document per file; JSON lines and parquet: a document per record).
        field: the JSON key or parquet column holding the text.
        kind: what the manifest calls this source.
    """

    def __init__(
        self, files: list[Path], split_by: str | None = None, field: str = "text", kind: str = "files"
    ) -> None:
        self.files, self.field, self.kind = files, field, kind
        formats = {file_format(f) for f in files}
        if split_by is None:
            defaults = {DEFAULT_SPLIT[f] for f in formats}
            if len(defaults) > 1:
                raise DataError(
                    f"inputs mix formats ({', '.join(sorted(formats))}) whose default --split-by "
                    "differs; give --split-by file|line|record"
                )
            split_by = defaults.pop()
        if split_by not in SPLIT_BY:
            raise DataError(f"--split-by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
        if split_by == "record" and "text" in formats:
            raise DataError("plain text files have no records: use --split-by line or --split-by file")
        if split_by == "line" and "parquet" in formats:
            raise DataError("parquet files have no lines: use --split-by record or --split-by file")
        self.split_by = split_by
        self._parquet = {f: _open_parquet(f, field) for f in files if file_format(f) == "parquet"}
        sizes = [f.stat().st_size for f in files]
        if not any(sizes):
            raise DataError(f"input is empty: {', '.join(str(f) for f in files[:3])} hold no bytes")
        self._sizes = sizes
        self.total_records: int | None = None
        if split_by == "file":
            self.total_records = len(files)
        elif len(self._parquet) == len(files):
            self.total_records = sum(pf.metadata.num_rows for pf in self._parquet.values())

    def describe(self) -> dict[str, Any]:
        """What the manifest records (and what a resumed run must match)."""
        return {
            "kind": self.kind,
            "split_by": self.split_by,
            "field": self.field,
            "files": [{"path": str(f), "bytes": n} for f, n in zip(self.files, self._sizes)],
        }

    def estimated_text_bytes(self) -> int:
        """Roughly how many bytes of text the input holds (for the default validation size)."""
        total = 0
        for f, size in zip(self.files, self._sizes):
            pf = self._parquet.get(f)
            if pf is None:
                total += size
                continue
            index = pf.schema_arrow.names.index(self.field)
            for g in range(pf.metadata.num_row_groups):
                total += pf.metadata.row_group(g).column(index).total_uncompressed_size
        return total

    def records(self, start: int = 0) -> Iterator[str]:
        """Records from index ``start`` on."""
        if self.split_by == "file":
            for f in self.files[start:]:
                yield self._whole_file(f)
            return
        skip = start
        for f in self.files:
            pf = self._parquet.get(f)
            if pf is not None:
                rows = pf.metadata.num_rows
                if skip >= rows:
                    skip -= rows
                    continue
                yield from self._parquet_rows(f, pf, skip)
            else:
                yield from itertools.islice(self._lines(f), skip, None)
            skip = 0

    def _lines(self, path: Path) -> Iterator[str]:
        """Each line of a text file, or the text field of each JSON line ('' for a blank line)."""
        as_json = file_format(path) == "jsonl"
        lineno = 0
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):  # noqa: B007 - lineno is used after errors
                    if not as_json:
                        yield line.rstrip("\r\n")
                    elif line.strip():
                        yield self._json_text(line, path, lineno)
                    else:
                        yield ""
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno + 1}: not UTF-8 text ({exc.reason})") from exc
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc

    def _json_text(self, line: str, path: Path, lineno: int) -> str:
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: not a JSON line ({exc})") from exc
        if not isinstance(record, dict) or self.field not in record:
            raise DataError(f"{path}:{lineno}: no {self.field!r} field; name the text field with --field")
        text = record[self.field]
        if text is None:
            return ""
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {self.field!r} is {type(text).__name__}, not text")
        return text

    def _parquet_rows(self, path: Path, pf: Any, skip: int) -> Iterator[str]:
        first = 0  # whole row groups before `skip` are not read
        while first < pf.metadata.num_row_groups and skip >= pf.metadata.row_group(first).num_rows:
            skip -= pf.metadata.row_group(first).num_rows
            first += 1
        groups = list(range(first, pf.metadata.num_row_groups))
        if not groups:
            return
        try:
            batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=[self.field])
            for batch in batches:
                values = batch.column(0).to_pylist()
                if skip:
                    values, skip = values[skip:], max(0, skip - len(values))
                for text in values:
                    yield text or ""
        except Exception as exc:
            raise DataError(f"{path}: cannot read parquet data ({_one_line(exc)})") from exc

    def _whole_file(self, path: Path) -> str:
        fmt = file_format(path)
        if fmt == "text":
            try:
                return path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
            except OSError as exc:
                raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        rows = self._parquet_rows(path, self._parquet[path], 0) if fmt == "parquet" else self._lines(path)
        return "\n\n".join(t for t in rows if t and not t.isspace())


class ListSource:
    """Documents held in memory (the demo corpus): one record per string."""

    def __init__(self, docs: list[str], description: dict[str, Any]) -> None:
        self.docs, self.description = docs, description
        self.total_records: int | None = len(docs)

    def describe(self) -> dict[str, Any]:
        return dict(self.description)

    def estimated_text_bytes(self) -> int:
        return sum(len(d) for d in self.docs)

    def records(self, start: int = 0) -> Iterator[str]:
        yield from itertools.islice(self.docs, start, None)


_NETWORK_WORDS = ("Connect", "Timeout", "Offline", "Network", "Transport")


def _network_error(exc: BaseException) -> bool:
    """True for errors of connection, time-out or offline mode (requests, httpx, datasets),
    judged by the exception's classes (httpx's RemoteProtocolError is a TransportError), and
    for a hub that answers 5xx or 429 (down or rate-limited: the dataset may well exist)."""
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if any(w in t.__name__ for t in type(e).__mro__ for w in _NETWORK_WORDS):
            return True
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
    return False


def _offline_env() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


class FineWebSource:
    """FineWeb (or FineWeb-Edu) streamed from the Hugging Face hub with ``datasets``.

    Only what is read is downloaded, so ``--tokens 1B`` takes about 1B tokens' worth of the
    subset. A record is a row of the dataset.

    Raises (on construction):
        DataError: ``datasets`` is missing, or the hub cannot be reached (checked with one
            request of at most ``timeout`` seconds, so no network fails in seconds).
    """

    total_records: int | None = None

    def __init__(self, dataset: str, subset: str, timeout: float = 5.0) -> None:
        self.repo = FINEWEB_REPOS.get(dataset, dataset)
        self.dataset, self.subset = dataset, subset
        local = "download its parquet files and use: fitgpt prepare fineweb --parquet 'DIR/*.parquet'"
        try:
            import datasets
        except ImportError as exc:
            raise DataError(
                f"streaming {self.repo} needs the datasets package: pip install datasets "
                f"(or pip install 'fitgpt[fineweb]'); or {local}"
            ) from exc
        try:
            if not _offline_env():  # one quick request instead of datasets' ~25 s of retries
                import huggingface_hub

                huggingface_hub.HfApi().dataset_info(self.repo, timeout=timeout)
            self._ds = datasets.load_dataset(self.repo, name=subset, split="train", streaming=True)
        except Exception as exc:
            why = f"{type(exc).__name__}: {_one_line(exc)}"
            if _network_error(exc):
                raise DataError(f"cannot reach {self.repo} on the Hugging Face hub ({why}); offline, {local}") from exc
            raise DataError(
                f"cannot open {self.repo} subset {subset} ({why}); check --dataset and --subset, or {local}"
            ) from exc

    def describe(self) -> dict[str, Any]:
        return {"kind": "huggingface", "dataset": self.repo, "subset": self.subset, "split": "train"}

    def estimated_text_bytes(self) -> int | None:
        return None

    def records(self, start: int = 0) -> Iterator[str]:
        rows = iter(self._ds.skip(start) if start else self._ds)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as exc:
                raise DataError(
                    f"streaming {self.repo} failed ({type(exc).__name__}: {_one_line(exc)}); "
                    "re-run the same command to resume"
                ) from exc
            yield row.get("text") or ""
