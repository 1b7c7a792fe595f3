"""Rotary position embeddings (RoPE) and the QK-norm, for the attention of fitgpt.model.gpt.

`model.position = "rotary"`: no learned position embedding; each head's queries and keys are
rotated by an angle proportional to their position (Su et al. 2021, arXiv:2104.09864), so the
score of a query and a key depends on their distance only. The rotate-half form (the head's
first half paired with its second half, as in nanochat, modded-nanogpt and Hugging Face's Llama)
rather than the interleaved one (pairs of neighbouring channels, RoFormer and Meta's Llama):
both rotate the same pairs of frequencies, and rotate-half works on two contiguous slices, with
no complex view (which has no bfloat16) and no strided pairs. Base 10000, as in RoFormer and
nanochat (modded-nanogpt's records use other bases and truncations tuned for its 1024-token
windows; 10000 is the common, well-tested choice).

`model.qk_norm = true`: queries and keys RMS-normalised per head, without parameters, before
attention (modded-nanogpt; nanochat), by `F.rms_norm` exactly as those sources do. It runs
before the rotation (modded-nanogpt's order; a rotation keeps each head vector's norm, so
nanochat's order gives the same result).

The tables are made once per forward pass for the positions it runs (`tables`), in the dtype the
matmuls produce, and each layer's queries and keys are rotated with them (`rotate`). With a KV
cache the positions start at the cache's, so cached keys were rotated at their own positions.
The planner replays what these functions allocate and save (`fitgpt.planner.blocks`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BASE = 10000.0


def tables(start: int, T: int, head_size: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles of positions start..start+T-1, each (T, 1, head_size // 2)
    (broadcast over the batch and the heads of (B, T, nh, hs/2)), in `dtype`. The angles are
    computed in float32 position by position, so a position's angle does not depend on which
    other positions are computed with it (cached generation equals uncached)."""
    half = head_size // 2
    inv_freq = 1.0 / BASE ** (torch.arange(half, dtype=torch.float32, device=device) / half)
    pos = torch.arange(start, start + T, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq)  # (T, hs/2)
    return angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, nh, hs) rotated: each channel i < hs/2 paired with i + hs/2 and turned by the
    angle of its position and frequency. Saves only cos and sin for backward."""
    if cos.dtype != x.dtype:  # a model run in 16 bits without autocast
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=-1)


def qk_norm(x: torch.Tensor) -> torch.Tensor:
    """RMS norm over each head's channels (the last dimension), no parameters."""
    return F.rms_norm(x, (x.size(-1),))


def compute_dtype(device_type: str, weight: torch.Tensor) -> torch.dtype:
    """The dtype the attention's matmuls produce: autocast's when it is on, else the weights'."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype
