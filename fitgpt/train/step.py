"""One optimizer step, and the learning rate at each step.

`train_step` is the step that `fitgpt train`, `fitgpt plan --verify` and `fitgpt bench` all run
(through `fitgpt.train.build.Training.step`): forward and backward over the step's micro-batches,
the gradient norm, the optimizer step, with one host sync for everything the caller reads.
With `memory.fused_backward` the optimizer step happens inside the last backward, parameter by
parameter (fitgpt.train.fused), and the gradient norm is the one those updates saw.
"""

from __future__ import annotations

import math

import torch

from fitgpt.config.schema import Config
from fitgpt.model.runtime import Runtime
from fitgpt.train import distributed
from fitgpt.train.faults import NO_FAULTS, Faults
from fitgpt.train.fused import FusedBackward
from fitgpt.train.guard import grad_norm

__all__ = ["host_values", "lr_at", "momentum_at", "train_step"]

MOMENTUM_START = 0.85  # Muon's momentum at step 0 with train.muon_momentum_warmup (the sources' value)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to train.lr, then cosine down to train.min_lr at lr_decay_steps."""
    t = cfg.train
    if not t.decay_lr:
        return t.lr
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    decay = cfg.lr_decay_steps
    if step >= decay:
        return t.min_lr
    ratio = (step - t.warmup_steps) / max(1, decay - t.warmup_steps)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


def momentum_at(step: int, cfg: Config) -> float:
    """Muon's momentum at `step`: linear from MOMENTUM_START to train.muon_momentum over
    train.muon_momentum_warmup steps, then constant (from the start when the warm-up is 0)."""
    t = cfg.train
    if step >= t.muon_momentum_warmup:
        return t.muon_momentum
    return MOMENTUM_START + (t.muon_momentum - MOMENTUM_START) * step / t.muon_momentum_warmup


def host_values(t: torch.Tensor) -> list[float]:
    """The step's one device-to-host copy (a sync on CUDA); bench/gpu_speed.py's `sync` part
    replaces it to time a step without it."""
    return t.tolist()


def _backward(model, scaler, data: list, split: int, rt: Runtime, step: int, exchange: dict | None,
              faults: Faults, fused: FusedBackward | None = None) -> torch.Tensor:
    """Forward and backward over every micro-batch, each as `split` slices; the summed loss of
    the micro-batches (a device tensor). Gradients are all-reduced on the last slice only; with
    `fused`, the last slice's backward also updates the parameters."""
    grad_accum = len(data)
    loss_sum = torch.zeros((), device=rt.device)
    pieces = [(i, xs, ys) for i, (xb, yb) in enumerate(data)
              for xs, ys in zip(xb.tensor_split(split), yb.tensor_split(split)) if xs.size(0)]
    for k, (i, xs, ys) in enumerate(pieces):
        n = data[i][0].size(0)
        faults.maybe_oom("train", step, xs.size(0))
        faults.maybe_raise(step)
        x, y = rt.to_device(xs, ys)
        last = k == len(pieces) - 1
        with distributed.no_sync(model, last=last):
            with rt.autocast():
                loss = model(x, y)
            if faults.nan_at(step):
                loss = loss * float("nan")
            weight = xs.size(0) / n / grad_accum  # slices of a micro-batch weigh by their size
            if exchange is not None and last and distributed.is_ddp(model):
                exchange["began"] = True
            faults.maybe_oom("backward", step, xs.size(0))
            if fused is not None and last:  # the whole step's loss is known: update from here on
                fused.arm(loss_sum + loss.detach() * (xs.size(0) / n), poison=faults.infgrad_at(step))
            scaler.scale(loss * weight).backward()
        loss_sum += loss.detach() * (xs.size(0) / n)
        del x, y, loss
    return loss_sum


def _fused_backward(model, scaler, data: list, split: int, rt: Runtime, step: int,
                    exchange: dict | None, faults: Faults, fused: FusedBackward):
    """Forward and backward with the parameters updated during the last backward; (summed loss,
    gradient norm). Out of memory once a parameter has been updated sets exchange["updated"]:
    retrying the same tokens would apply those updates twice."""
    fused.updated = 0
    try:
        loss_sum = _backward(model, scaler, data, split, rt, step, exchange, faults, fused)
    except BaseException:
        fused.disarm()
        if fused.updated and exchange is not None:
            exchange["updated"] = True
        raise
    return loss_sum, fused.finish()


def train_step(model, optimizer, scaler, batches, grad_accum: int, grad_clip: float, rt: Runtime,
               split: int = 1, data: list | None = None, step: int = 0, exchange: dict | None = None,
               faults: Faults = NO_FAULTS, fused: FusedBackward | None = None):
    """One optimizer step over grad_accum micro-batches, each processed as `split` slices (the
    out-of-memory back-off: the same tokens, a smaller peak). Returns (mean loss, grad norm,
    skipped) with the loss and norm as device tensors; nothing else survives the call.
    A non-finite loss or gradient norm skips the optimizer step (the GradScaler's own skip with
    float16); both are read in one host sync (fitgpt.train.guard).
    With `fused` (memory.fused_backward, fitgpt.train.fused) the parameters are updated inside
    the last backward: the norm is that of the gradients they were updated with, and a
    non-finite one stopped the updates where it turned non-finite (all of them for a
    non-finite loss).
    With several processes, `exchange` carries what the step shares besides the gradients:
    in, "want_stop" (this process's wish to stop, folded into the loss's all-reduce, so sharing
    it costs no extra sync); out, "stop" (any process's wish) and "began" (DDP's gradient
    all-reduce started: out of memory after it cannot be retried by one process alone); also
    "updated" (fused backward: some parameters took the step, so it cannot be retried)."""
    data = data if data is not None else [batches.next_batch() for _ in range(grad_accum)]
    grad_accum = len(data)  # this process's share of the step's micro-batches
    if fused is not None:
        loss_sum, norm = _fused_backward(model, scaler, data, split, rt, step, exchange, faults, fused)
    else:
        loss_sum = _backward(model, scaler, data, split, rt, step, exchange, faults)
        if faults.infgrad_at(step):
            next(p for p in model.parameters() if p.grad is not None).grad.add_(float("inf"))
        norm = grad_norm(model, optimizer, scaler, grad_clip)  # clipped in place when grad_clip > 0
    mean = loss_sum / grad_accum
    share_stop = exchange is not None and "want_stop" in exchange
    if share_stop:
        mean = torch.stack([mean, mean.new_tensor(float(exchange["want_stop"]))])
    mean = distributed.mean_across(mean)  # NaN on any process: NaN on all
    loss = mean[0] if share_stop else mean
    # one sync per optimizer step: the loss, the wish to stop and the gradient norm together
    host = host_values(torch.cat([mean.reshape(-1)] + ([norm.reshape(1).to(mean)] if norm is not None else [])))
    if share_stop:
        exchange["stop"] = host[1] > 0
    # with float16 a non-finite gradient is the GradScaler's routine overflow: it skips that step
    skipped = not math.isfinite(host[0]) or (
        norm is not None and not scaler.is_enabled() and not math.isfinite(host[-1]))
    if fused is None:
        to_none = not distributed.grads_live_in_buckets(model)
        if skipped and not scaler.is_enabled():
            optimizer.zero_grad(set_to_none=to_none)
            return loss, norm, True
        scaler.step(optimizer)  # with float16, skips steps whose gradients are not finite
        scaler.update()
        optimizer.zero_grad(set_to_none=to_none)
    if faults.nanweights_at(step) and (fused is None or not skipped):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    return loss, norm, skipped
