"""Out-of-memory recovery: recognise the error, release what the failed attempt held, back off.
A retry starts from the random state the failed attempt started from (fitgpt.train.rng).

The caller catches the error, keeps only a description of it, and calls `release` *after* the
`except` block: inside it, the exception's traceback still references the failed frames and
their tensors, so memory freed there is not actually free.
"""

from __future__ import annotations

import gc

import torch

from fitgpt.model.runtime import Runtime


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and (
        "out of memory" in str(exc) or "can't allocate memory" in str(exc))


def attempt(fn, recover: bool = True):
    """(True, fn()) or, when fn ran out of memory and recovery is on, (False, None). The
    exception and its traceback are gone when this returns: release memory after it."""
    if not recover:
        return True, fn()
    try:
        return True, fn()
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_oom(e):
            raise
    return False, None


def release(model: torch.nn.Module, optimizer, rt: Runtime) -> None:
    """Drop partial gradients, collect the failed attempt's garbage, return cached blocks."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    gc.collect()
    if rt.device_type == "cuda":
        torch.cuda.empty_cache()


def best_suggestion(cfg) -> str:
    """The planner's best fitting proposal for this card (or memory.budget), as a line to
    print, or '' when there is no card to plan for or nothing fits."""
    try:
        from fitgpt.config.load import parse_size
        from fitgpt.planner.fit import proposals
        from fitgpt.planner.gpus import current_gpu, find_gpu

        gpu = find_gpu(cfg.memory.budget) if cfg.memory.budget else (
            current_gpu() if torch.cuda.is_available() else None)
        if gpu is None:
            return ""
        budget = parse_size(cfg.memory.budget) if cfg.memory.budget else gpu.memory
        limit = int(budget * (1 - cfg.memory.headroom))
        props = [p for p in proposals(cfg, gpu, limit) if p.fits]
    except Exception:  # noqa: BLE001 - a suggestion is a courtesy, never a second failure
        return ""
    if not props:
        return ""
    best = props[0]
    return f"the planner suggests: {best.description} ({' '.join(best.overrides)})"
