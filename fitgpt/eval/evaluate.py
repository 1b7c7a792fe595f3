"""Evaluation on the fixed validation windows: the part that ran out of memory in the seed.

It runs under `torch.no_grad()` with the model in eval mode, with its own batch size and window
length, and sums token losses (no per-batch means), so the result does not depend on the eval
batch size. The caller has released the training step's tensors before calling it (a training
step is a function whose locals are gone when it returns).

Bits per byte make losses comparable across tokenizers: the summed nats of every target token
over ln 2 times the UTF-8 bytes those targets stand for. End-of-text tokens stand for no bytes:
their nats count, their bytes are 0 (the cost of marking a document's end is charged to the text).
It needs to know the bytes of each token id, so it is reported for the GPT-2 vocabulary
(model.vocab_size 50257) and for a character-level nanoGPT dataset whose meta.pkl the caller
passes as `byte_table` (each id's character in UTF-8 bytes), and is None otherwise (the tiny
test models' 256 ids are not text).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from fitgpt.errors import DataError
from fitgpt.model.runtime import Runtime


@dataclass
class EvalResult:
    loss: float  # mean nats per target token
    tokens: int  # target tokens scored
    seconds: float
    bpb: float | None = None  # bits per UTF-8 byte of the targets; None if the ids are not GPT-2's
    target_bytes: int | None = None  # UTF-8 bytes of the targets (bpb's denominator), or None


@functools.lru_cache(maxsize=1)
def _gpt2_token_bytes() -> np.ndarray | None:
    from fitgpt.data.tokenizer import gpt2_encoding
    from fitgpt.errors import FitError

    try:
        enc = gpt2_encoding()
    except FitError:  # no offline files and no network: evaluate without bpb
        return None
    return np.array([0 if i == enc.eot_token else len(enc.decode_single_token_bytes(i))
                     for i in range(enc.n_vocab)], dtype=np.int64)


def token_bytes(vocab: int | None, size: int | None = None) -> np.ndarray | None:
    """UTF-8 bytes of each token id (0 for end-of-text and for padding ids >= 50257), `size`
    entries (default: 50257); None unless `vocab` is the GPT-2 vocabulary's 50257."""
    from fitgpt.data.tokenizer import N_VOCAB

    if vocab != N_VOCAB:
        return None
    table = _gpt2_token_bytes()
    if table is None:
        return None
    size = max(size or N_VOCAB, N_VOCAB)
    return np.concatenate([table, np.zeros(size - N_VOCAB, dtype=np.int64)])


def bits_per_byte(total_nats: float, total_bytes: int) -> float | None:
    """bpb = total_nats / (ln 2 x total_bytes); None without bytes."""
    return total_nats / (math.log(2) * total_bytes) if total_bytes else None


@torch.no_grad()
def evaluate(model: torch.nn.Module, val, batch_size: int, rt: Runtime, step: int = 0,
             vocab: int | None = None, byte_table: np.ndarray | None = None,
             faults=None) -> EvalResult:
    """Mean loss over every validation window, `batch_size` windows per forward pass.
    With vocab, a token id outside the model's vocabulary is a DataError, not a crash, and
    for the GPT-2 vocabulary (or with byte_table: UTF-8 bytes per id, 2**16 entries) the result
    has bits per byte. `faults`: the trainer's fault injection (fitgpt.train.faults.Faults, whose
    `maybe_oom("eval", step, batch)` is called before each batch); None injects none."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    acc = torch.float32 if rt.device_type == "mps" else torch.float64  # mps has no float64
    total = torch.zeros((), dtype=acc, device=rt.device)
    tokens = nbytes = 0
    table = byte_table if byte_table is not None else token_bytes(vocab, 2**16)  # uint16 ids
    try:
        for x, y in val.batches(batch_size):
            if vocab is not None and max(int(x.max()), int(y.max())) >= vocab:
                raise DataError(f"validation data: token id {max(int(x.max()), int(y.max()))} >= "
                                f"model.vocab_size {vocab}; set --model.vocab_size or re-prepare")
            if table is not None:
                nbytes += int(table[y.numpy()].sum())
            if faults is not None:
                faults.maybe_oom("eval", step, x.size(0))
            x, y = rt.to_device(x, y)
            with rt.autocast():
                total += model(x, y, reduction="sum").to(acc)
            tokens += y.numel()
            del x, y
    finally:
        model.train(was_training)
    nats = total.item()
    if table is None:
        return EvalResult(nats / max(tokens, 1), tokens, time.perf_counter() - t0)
    return EvalResult(nats / max(tokens, 1), tokens, time.perf_counter() - t0,
                      bits_per_byte(nats, nbytes), nbytes)
