"""Evaluation on the fixed validation windows: the part that ran out of memory in the seed.

It runs under `torch.no_grad()` with the model in eval mode, with its own batch size and window
length, and sums token losses (no per-batch means), so the result does not depend on the eval
batch size. The caller has released the training step's tensors before calling it (a training
step is a function whose locals are gone when it returns).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fitgpt import faults
from fitgpt.errors import DataError
from fitgpt.runtime import Runtime


@dataclass
class EvalResult:
    loss: float  # mean nats per target token
    tokens: int  # target tokens scored
    seconds: float


@torch.no_grad()
def evaluate(model: torch.nn.Module, val, batch_size: int, rt: Runtime, step: int = 0,
             vocab: int | None = None) -> EvalResult:
    """Mean loss over every validation window, `batch_size` windows per forward pass.
    With vocab, a token id outside the model's vocabulary is a DataError, not a crash."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    acc = torch.float32 if rt.device_type == "mps" else torch.float64  # mps has no float64
    total = torch.zeros((), dtype=acc, device=rt.device)
    tokens = 0
    try:
        for x, y in val.batches(batch_size):
            if vocab is not None and max(int(x.max()), int(y.max())) >= vocab:
                raise DataError(f"validation data: token id {max(int(x.max()), int(y.max()))} >= "
                                f"model.vocab_size {vocab}; set --model.vocab_size or re-prepare")
            faults.maybe_oom("eval", step, x.size(0))
            x, y = rt.to_device(x, y)
            with rt.autocast():
                total += model(x, y, reduction="sum").to(acc)
            tokens += y.numel()
            del x, y
    finally:
        model.train(was_training)
    return EvalResult(total.item() / max(tokens, 1), tokens, time.perf_counter() - t0)
