"""Numerical guards of a training step: a run never applies, or saves, numbers that are not finite.

- `grad_norm`: the global gradient norm, computed before the optimizer step (and clipped when
  train.grad_clip > 0). The training step reads it in the same host sync as the loss and skips
  the optimizer step when either is not finite: a gradient norm of inf (one element overflowed)
  clipped to max_norm multiplies every gradient by 0, and inf x 0 is NaN in every weight.
- `weights_finite`: whether every parameter is finite, on every process. Checked before each
  checkpoint (a run never saves, and so never prunes a good checkpoint in favour of, weights
  that are not finite) and after a step whose loss was not finite (an optimizer step with a
  finite gradient can still make weights infinite, e.g. an enormous learning rate).
"""

from __future__ import annotations

import torch

from fitgpt.train import distributed


def grad_norm(model: torch.nn.Module, optimizer, scaler, grad_clip: float) -> torch.Tensor | None:
    """The global gradient norm as a device tensor, after clipping to grad_clip when it is > 0;
    None with float16 and no clipping, where the GradScaler checks the gradients itself."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    elif not scaler.is_enabled():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
    else:
        return None
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor; every process needs the whole value
        norm = norm.full_tensor()
    return norm


def weights_finite(model: torch.nn.Module, device: torch.device) -> bool:
    """True when no parameter holds inf or NaN, on any process. min and max propagate NaN and
    show inf, so two reductions per tensor and one sync decide it, with no tensor-sized
    temporaries (a sum could overflow on finite weights)."""
    ends = []
    for p in model.parameters():
        t = p.detach()
        t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2: this process's shard
        if t.numel():
            ends.extend(e.float() for e in torch.aminmax(t))
    ok = bool(torch.isfinite(torch.stack(ends)).all().item()) if ends else True
    bad = distributed.all_reduce_sum([0.0 if ok else 1.0], device)[0]
    return bad == 0
