"""``manifest.json`` of a prepared data folder, read and checked in one place; and the largest
token id of every shard, checked once before training starts.

The manifest is written by `fitgpt prepare` (:mod:`fitgpt.data.prepare.pipeline`) and read by the resume of
a preparation, by `fitgpt data inspect` and by training. A hand-edited or damaged manifest must
give one line naming what is wrong, never a KeyError deep in one of them, so its structure is
checked here and nowhere else.

Token ids: a shard may hold an id the model's vocabulary cannot embed (shards made with another
tokenizer, or a damaged file). Found by a batch, it stops the run at a random step, and on
resume at the same one. Instead every shard's largest id is checked before step 0. Computing it
reads the whole shard (``bench/shard_max_cost.py`` on the development machine: 0.14 s per 100M
tokens read from disk, 0.04 s from the page cache, so 14 s for 10B tokens, and a disk that
reads 500 MB/s needs 40 s), so it is cached:
in the manifest entry of shards that `fitgpt prepare` wrote (``max_token``), and for other
shards (llm.c downloads, nanoGPT files) in the fitgpt cache folder, keyed by the file's path,
size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fitgpt.errors import DataError

MANIFEST = "manifest.json"
#: Whole numbers an entry may carry; "tokens" is required, the others are optional.
_ENTRY_COUNTS = ("tokens", "documents", "end_record", "end_offset", "max_token")
#: What resuming a preparation needs in every entry, besides file, tokens, sha256 and split.
_RESUME_KEYS = ("documents", "end_record", "end_offset")
_SCAN_TOKENS = 1 << 24  # tokens read at a time when looking for the first bad id


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), f"a {type(value).__name__}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(i: int, entry: Any, resumable: bool) -> str | None:
    where = f"shards[{i}]"
    if not isinstance(entry, dict):
        return f"{where} is {_kind(entry)}, not an object"
    name = entry.get("file")
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        return f"{where} has no plain file name under 'file' (got {name!r})"
    where = f"{where} ({name})"
    required = ("tokens", *_RESUME_KEYS) if resumable else ("tokens",)
    for key in _ENTRY_COUNTS:
        if key not in entry:
            if key in required:
                return f"{where} has no {key!r}"
        elif not _is_count(entry[key]):
            return f"{where}: {key!r} is {entry[key]!r}, not a whole number >= 0"
    if not isinstance(entry.get("sha256"), str):
        return f"{where}: 'sha256' is missing or not a string"
    if entry.get("split") not in ("val", "train"):
        return f"{where}: 'split' is {entry.get('split')!r}, expected 'val' or 'train'"
    return None


def manifest_problem(obj: Any, resumable: bool = False) -> str | None:
    """What is structurally wrong with a parsed manifest, or None. ``resumable`` also requires
    what resuming a preparation reads (its settings and each shard's input position)."""
    if not isinstance(obj, dict):
        return f"it holds {_kind(obj)}, not a JSON object"
    if not isinstance(obj.get("shards"), list):
        return "'shards' is missing" if "shards" not in obj else f"'shards' is {_kind(obj['shards'])}, not a list"
    for key in ("source", "tokenizer", "settings"):
        if key in obj and not isinstance(obj[key], dict):
            return f"{key!r} is {_kind(obj[key])}, not an object"
    if "status" in obj and not isinstance(obj["status"], str):
        return f"'status' is {_kind(obj['status'])}, not a string"
    if resumable and "settings" not in obj:
        return "'settings' is missing (it was not written by `fitgpt prepare`)"
    files = obj.get("source", {}).get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
        return "'source.files' is not a list of objects with a 'path'"
    seen: set[str] = set()
    for i, entry in enumerate(obj["shards"]):
        problem = _entry_problem(i, entry, resumable)
        if problem is not None:
            return problem
        if entry["file"] in seen:
            return f"shards[{i}] ({entry['file']}) is listed twice"
        seen.add(entry["file"])
    return None


def read_manifest(path: str | os.PathLike[str], fix: str, resumable: bool = False) -> dict[str, Any] | None:
    """The manifest at ``path``, checked; None if there is none.

    Raises:
        DataError: unreadable, not JSON, or malformed: one line naming the problem, then ``fix``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); {fix}") from exc
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); {fix}") from exc
    problem = manifest_problem(obj, resumable)
    if problem is not None:
        raise DataError(f"{path}: malformed manifest: {problem}; {fix}")
    return obj


# ----------------------------------------------------------------------------- token ids


def _cache_file(path: Path) -> Path:
    from fitgpt.data.prepare.demo import cache_root

    key = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return cache_root() / "shard-ids" / f"{key}.json"


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cached_max(path: Path) -> int | None:
    try:
        entry = json.loads(_cache_file(path).read_bytes())
        if isinstance(entry, dict) and entry.get("stamp") == _stamp(path) and _is_count(entry.get("max_token")):
            return int(entry["max_token"])
    except (OSError, ValueError):
        pass
    return None


def _store_max(path: Path, top: int) -> None:
    """Best effort: a cache folder that cannot be written only costs the next run a re-read."""
    from fitgpt.fileio import write_json

    target = _cache_file(path)
    entry = {"stamp": _stamp(path), "max_token": top}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, entry, indent=None)  # one line
    except OSError:
        pass


def _listed_max(shards: list[Path]) -> dict[Path, int]:
    """``max_token`` of the shards whose folder's manifest lists them with their current size."""
    from fitgpt.data.shards import shard_bytes

    found: dict[Path, int] = {}
    for folder in {s.parent for s in shards}:
        manifest = read_manifest(folder / MANIFEST, "remove it (training does not need it) or re-run "
                                 "the `fitgpt prepare` command that wrote the folder")
        listed = {e["file"]: e for e in (manifest or {}).get("shards", [])}
        for shard in (s for s in shards if s.parent == folder and s.name in listed):
            entry = listed[shard.name]
            if "max_token" in entry and shard.stat().st_size == shard_bytes(entry["tokens"]):
                found[shard] = entry["max_token"]
    return found


def max_token_ids(shards: list[Path]) -> dict[Path, int]:
    """The largest token id of each shard: from its manifest entry, else from the cache, else
    read (and cached). An empty shard counts as 0.

    Raises:
        DataError: a shard is unreadable, or its folder's manifest is malformed.
    """
    from fitgpt.data.shards import read_shard

    tops = _listed_max(shards)
    for shard in shards:
        if shard in tops:
            continue
        top = _cached_max(shard)
        if top is None:
            tokens = read_shard(shard)
            top = int(tokens.max()) if tokens.size else 0
            del tokens
            _store_max(shard, top)
        tops[shard] = top
    return tops


def first_at_least(path: Path, limit: int) -> tuple[int, int]:
    """``(position, id)`` of the first token id >= ``limit`` in a shard (read in blocks)."""
    from fitgpt.data.shards import read_shard

    tokens = read_shard(path)
    for start in range(0, tokens.size, _SCAN_TOKENS):
        block = np.asarray(tokens[start : start + _SCAN_TOKENS])
        hits = np.flatnonzero(block >= limit)
        if hits.size:
            return start + int(hits[0]), int(block[hits[0]])
    raise DataError(f"shard {path}: no token id >= {limit} (the shard changed while it was read)")


def check_token_ids(shards: list[Path], vocab: int, resuming: bool = False) -> None:
    """Stop before training when a shard holds a token id the model cannot embed.

    The message names the shard, the first bad position and id, and a fix that the command
    accepts: a larger ``model.vocab_size`` for a new run, but a resumed run keeps its
    checkpoint's vocabulary, so there the fix is to take the shard out (or start a new run).

    Raises:
        DataError: an id >= ``vocab``, in one line.
    """
    tops = max_token_ids(shards)
    need = max(tops.values(), default=0) + 1  # a vocabulary that every shard fits in
    for shard in shards:
        if tops[shard] < vocab:
            continue
        pos, bad = first_at_least(shard, vocab)
        where = f"{shard}: token id {bad} >= model.vocab_size {vocab} at position {pos:,}"
        if resuming:
            raise DataError(
                f"{where}; a resumed run keeps its checkpoint's vocab_size, so move that shard out of {shard.parent} "
                f"(or re-prepare it with the run's tokenizer) and resume, or start a new run with "
                f"--model.vocab_size={need}")
        raise DataError(
            f"{where}; if the shards were made with a larger vocabulary set --model.vocab_size={need} "
            "(or more), else re-prepare or remove that shard")
