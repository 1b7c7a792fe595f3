"""ReLU squared and the parameter-free RMS norm, as autograd functions that save one tensor.

Written out rather than composed from PyTorch ops so that what they keep for backward is the
same on every device and as small as GPT-2's GELU and LayerNorm (the planner replays it,
`fitgpt.planner.blocks`): `F.relu(u).square()` keeps the ReLU output and its square's input and
allocates three temporaries in backward, and on CUDA autocast runs `pow` in fp32; `F.rms_norm`
is a composite on the CPU whose backward allocates some seven (N, C) temporaries, and a fused
kernel on CUDA. Here:
- relu2(u) = relu(u)^2 saves u (as GELU does) and computes relu(u) * g * 2 in backward, in u's
  dtype, on one new tensor.
- rms_norm(x) = x / sqrt(mean(x^2) + eps), eps the dtype's machine epsilon (F.rms_norm's
  default, as modded-nanogpt and nanochat call it), without weight. It saves x and the (N, 1)
  reciprocal RMS (LayerNorm saves x, the mean and the reciprocal std); the RMS comes from a
  vector norm, so the forward makes no (N, C) temporary besides its output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ReLU2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return F.relu(u).square_()

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return F.relu(u).mul_(g).mul_(2)  # d relu(u)^2 / du = 2 relu(u)


def relu2(u: torch.Tensor) -> torch.Tensor:
    """ReLU squared (model.mlp = "relu2"), elementwise, in u's dtype."""
    return _ReLU2.apply(u)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        n = x.size(-1)
        eps = torch.finfo(x.dtype).eps
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
        rstd = rstd.square_().div_(n).add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd)
        return x * rstd

    @staticmethod
    def backward(ctx, g):
        # dx = rstd * g - x * rstd^3 * mean(g * x) over the last dimension
        x, rstd = ctx.saved_tensors
        coef = (g * x).mean(-1, keepdim=True).mul_(rstd.pow(3)).neg_()  # (..., 1)
        return (g * rstd).addcmul_(x, coef)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dimension (model.norm = "rmsnorm"), no weight."""
    return _RMSNorm.apply(x)
