"""`fitgpt plan --verify`: run a few real steps and one evaluation, compare with the estimate.

The run uses fitgpt's own machinery (the step `build_training` makes for `fitgpt train`,
`evaluate`, `Meter`) on the config's device, with synthetic random tokens, so no data files are
needed. It measures:
- training: the steps after the first (the optimizer state exists from the first step on),
  with gradient accumulation capped at 2 micro-batches, because the second micro-batch
  already has every gradient alive and later ones repeat it (3 with memory.fused_backward,
  whose last micro-batch differs: it updates and frees the gradients);
- evaluation: with the model and optimizer state alive, as in a training run; for a config
  with train.eval_only, evaluation alone, with the weights and no optimizer state.
On CUDA the allocator's peak allocated and reserved; on the CPU the storage tracker.
"""

from __future__ import annotations

import gc
from typing import Any

from fitgpt.config.schema import Config


class SyntheticBatches:
    """Random (x, y) token batches with the TrainBatches interface."""

    def __init__(self, vocab: int, batch_size: int, block: int, seed: int = 0):
        import torch

        self.vocab, self.batch_size, self.block = vocab, batch_size, block
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self):
        import torch

        t = torch.randint(0, self.vocab, (self.batch_size, self.block + 1), generator=self.gen)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class SyntheticVal:
    """A fixed set of random windows with the ValWindows interface."""

    def __init__(self, vocab: int, n_windows: int, block: int, seed: int = 1):
        self.src = SyntheticBatches(vocab, n_windows, block, seed)
        self.x, self.y = self.src.next_batch()

    def batches(self, batch_size: int):
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]


def _error(pred: int | None, meas: int | None) -> float | None:
    if pred is None or meas is None or meas == 0:
        return None
    return 100.0 * (pred - meas) / meas


def verify(cfg: Config, steps: int = 3, catch_oom: bool = False) -> dict[str, Any]:
    """Measured against predicted peak memory of training and evaluation on cfg's device.

    Returns {"device", "dtype", "how", "train": {...}, "eval": {...}} where each phase has
    predicted_allocated, measured_allocated, error_allocated_pct (prediction minus measurement,
    in % of the measurement) and, on CUDA, the same for reserved (the prediction being the
    total without the CUDA context, which the allocator does not see). With catch_oom, a phase
    that runs out of memory is reported as "OOM" instead of raising."""
    import torch

    from fitgpt.model.runtime import enable_tf32, resolve_runtime
    from fitgpt.planner.estimate import estimate

    rt = resolve_runtime(cfg.train.device, cfg.train.dtype)
    enable_tf32(rt)
    dtype = str(rt.dtype).replace("torch.", "")
    cuda = rt.device_type == "cuda"
    card = None
    if cuda:
        from fitgpt.planner.gpus import current_gpu

        card = current_gpu(rt.device.index)  # its architecture sizes the cuBLAS workspaces
    est = estimate(cfg, rt.device_type, dtype, card)
    result: dict[str, Any] = {
        "device": str(rt.device), "dtype": dtype, "config": cfg.name,
        "how": "cuda max_memory_allocated/reserved" if cuda else "storage tracker",
    }
    for name, ph in (("train", est.train), ("eval", est.eval)):
        result[name] = {"predicted_allocated": ph.allocated}
        if cuda:
            context = sum(p.bytes for p in ph.overhead if "context" in p.name.lower())
            result[name]["predicted_reserved"] = ph.total - context
            result[name]["predicted_total"] = ph.total
    if cuda:
        torch.cuda.empty_cache()
    peaks, oom = _measure(cfg, rt, steps, catch_oom)
    gc.collect()  # the model and optimizer died with _measure's frame
    if cuda:
        torch.cuda.empty_cache()
    for name in ("train", "eval"):
        r = result[name]
        if name == "train" and cfg.train.eval_only:
            r["measured_allocated"] = "not run (eval-only)"
            continue
        if oom == name or (oom == "train" and name == "eval"):
            r["measured_allocated"] = "OOM" if oom == name else "not run"
            if cuda:
                r["measured_reserved"] = r["measured_allocated"]
            continue
        r["measured_allocated"] = max(peaks[name]) if peaks[name] else None
        r["error_allocated_pct"] = _error(r["predicted_allocated"], r["measured_allocated"])
        if cuda:
            r["measured_reserved"] = max(peaks[f"{name}_r"]) if peaks[f"{name}_r"] else None
            r["error_reserved_pct"] = _error(r["predicted_reserved"], r["measured_reserved"])
    result["oom"] = oom
    return result


def _measure(cfg: Config, rt, steps: int, catch_oom: bool) -> tuple[dict[str, list[int]], str | None]:
    """Peaks of the training steps after the first and of one evaluation; the phase that ran
    out of memory (with catch_oom), or None. The step is the one `fitgpt train` runs
    (fitgpt.train.build), in one process and eager: the plan does not model torch.compile."""
    import torch

    from fitgpt.train.build import build_training
    from fitgpt.train.measure import Meter

    batches = SyntheticBatches(cfg.model.vocab_size, cfg.train.batch_size, cfg.model.block_size,
                               cfg.train.seed)
    tr = build_training(cfg, batches=batches, compile=False, rt=rt)
    meter = Meter(rt, track_cpu=True)
    val = SyntheticVal(cfg.model.vocab_size, 2 * cfg.eval_batch_size, cfg.eval_block_size)
    accum = min(cfg.train.grad_accum, 3 if cfg.memory.fused_backward else 2)  # fused: first, middle, last
    peaks: dict[str, list[int]] = {"train": [], "train_r": [], "eval": [], "eval_r": []}

    def record(name: str, peak: int | None, reserved: int | None) -> None:
        peaks[name] += [peak] if peak is not None else []
        peaks[f"{name}_r"] += [reserved] if reserved is not None else []

    try:
        done = 0 if not cfg.train.eval_only else steps + 5  # eval-only: no training, no AdamW state
        # fp16 may skip the first optimizer steps (inf gradients): measure once state exists
        while done < steps or (not peaks["train"] and done < steps + 5):
            measure = bool(tr.optimizer.state)
            _, peak, reserved = meter.measure(lambda: tr.step(accum=accum, split=cfg.memory.micro_split),
                                              tr.model, tr.optimizer, measure)
            if measure:
                record("train", peak, reserved)
            done += 1
    except torch.OutOfMemoryError:
        if not catch_oom:
            raise
        return peaks, "train"
    tr.optimizer.zero_grad(set_to_none=True)
    try:
        _, peak, reserved = meter.measure(
            lambda: tr.evaluate(val, cfg.eval_batch_size), tr.model, tr.optimizer, True)
        record("eval", peak, reserved)
    except torch.OutOfMemoryError:
        if not catch_oom:
            raise
        return peaks, "eval"
    return peaks, None
