"""Tokenizing batches of documents: the work done in `fitgpt prepare`'s worker processes.

This module stays light (numpy, tiktoken, no torch) because every worker process imports it.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import ctypes
import functools
import hashlib
import os
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

from fitgpt.data.tokenizer import EOT, gpt2_encoding, offline_bpe_files
from fitgpt.errors import DataError

#: A chunk of documents as sent to a worker: (index of its first record, texts). Records that
#: are empty or only whitespace stay in the list (they keep the indices right) and get no tokens.
Chunk = tuple[int, list[str]]
#: What a worker sends back: (first record index, tokens, tokens per record, UTF-8 bytes read).
Encoded = tuple[int, np.ndarray, np.ndarray, int]

_NO_SPECIAL: frozenset[str] = frozenset()
_EOT_ARRAY = np.array([EOT], dtype=np.uint32)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def init_worker(parent: int | None = None, inherited_fd: int | None = None) -> None:
    """Pool initializer: load the tokenizer once per worker, before the first chunk arrives.

    Ctrl-C is left to the parent process, which stops the pool: otherwise every worker would
    print its own KeyboardInterrupt traceback. The worker dies with ``parent`` (see
    :func:`_die_with_parent`). ``inherited_fd`` (a forked worker's copy of the parent's folder
    lock) is closed, so that the lock ends with the parent.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    if inherited_fd is not None:
        with contextlib.suppress(OSError):
            os.close(inherited_fd)
    gpt2_encoding()


def _die_with_parent(parent: int | None) -> None:
    """End this worker, silently, when the process that started it dies.

    A worker orphaned by a SIGKILL of `fitgpt prepare` would finish its chunk, fail to send it
    back and print two BrokenPipeError tracebacks. On Linux the kernel kills it with its
    parent (``PR_SET_PDEATHSIG``); elsewhere a thread watches the parent's pid (a worker that
    finishes a chunk in the moment before may still print). ``parent`` None: no pid check.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if parent is not None and os.getppid() != parent:
            os._exit(0)  # the parent died before the kernel knew to kill this process
        return
    if parent is None:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _encode_one(enc: Any, text: str) -> np.ndarray:
    """Token ids of ``text`` as uint32, special tokens treated as plain text.

    ``encode_to_numpy`` with no special token allowed is tiktoken's ``encode(text,
    disallowed_special=())``, which tiktoken documents as equivalent to ``encode_ordinary``; it
    skips the copy into a Python list. Lone surrogates (possible in JSON input) are replaced the
    way ``encode_ordinary`` does it.
    """
    try:
        return enc.encode_to_numpy(text, allowed_special=_NO_SPECIAL, disallowed_special=())
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, allowed_special=_NO_SPECIAL, disallowed_special=())


def encode_chunk(chunk: Chunk) -> Encoded:
    """Tokenize a chunk: EOT (50256) *before* every non-blank document, as llm.c does.

    Returns the chunk's first record index, all its tokens as one uint16 array, the number of
    tokens of each record (EOT included; 0 for a blank record) and the UTF-8 size of its text.

    Raises:
        DataError: a token id does not fit in uint16 (the shard format holds ids < 65536).
    """
    start, texts = chunk
    enc = gpt2_encoding()
    parts: list[np.ndarray] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    nbytes = 0
    for i, text in enumerate(texts):
        if not text or text.isspace():
            continue
        ids = _encode_one(enc, text)
        parts.append(_EOT_ARRAY)
        parts.append(ids)
        lengths[i] = ids.size + 1
        nbytes += len(text.encode("utf-8", "surrogatepass"))
    if not parts:
        return start, np.zeros(0, dtype=np.uint16), lengths, nbytes
    tokens = np.concatenate(parts)
    top = int(tokens.max())
    if top >= 65536:
        record = start + int(np.searchsorted(np.cumsum(lengths), int(np.argmax(tokens)), side="right"))
        raise DataError(
            f"token id {top} in record {record} does not fit in uint16: the llm.c shard format "
            "holds ids 0..65535 (a tokenizer with a larger vocabulary needs another format)"
        )
    return start, tokens.astype(np.uint16), lengths, nbytes


@functools.lru_cache(maxsize=1)
def _tokenizer_info() -> dict[str, Any]:
    """The tokenizer as recorded in a manifest: name, vocabulary size, EOT and hashes.

    ``vocab_sha256`` is the sha256 of the whole vocabulary written in tiktoken's ``.tiktoken``
    layout (one ``base64(token bytes) id`` line per id, ``<|endoftext|>`` included), so it is the
    same whichever way the GPT-2 files were obtained. ``bpe_files`` holds the sha256 of
    ``vocab.bpe`` and ``encoder.json`` when the offline copies were used.
    """
    enc = gpt2_encoding()
    lines = [base64.b64encode(enc.decode_single_token_bytes(i)) + b" %d\n" % i for i in range(enc.n_vocab)]
    digest = hashlib.sha256(b"".join(lines))
    info: dict[str, Any] = {
        "name": enc.name,
        "library": "tiktoken",
        "n_vocab": enc.n_vocab,
        "eot": EOT,
        "vocab_sha256": digest.hexdigest(),
    }
    files = offline_bpe_files()
    if files is not None:
        info["bpe_files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    return info


def tokenizer_info() -> dict[str, Any]:
    """A copy of :func:`_tokenizer_info` (computed once per process)."""
    return copy.deepcopy(_tokenizer_info())
