"""Activation offloading: what autograd saves for backward goes to host memory during the
forward pass and comes back, one backward node at a time, in backward.

PyTorch's `torch.autograd.graph.save_on_cpu(pin_memory=True)` moves every saved tensor, weights
included (a linear layer saves its weight, or under autocast the 16-bit copy of it). These hooks
(`saved_tensors_hooks`, the same mechanism) move only activations:
- a weight stays: a leaf that requires grad, or a view or cast of one (`W.t()`, autocast's
  16-bit copy, which autocast's cache keeps on the device anyway until the forward ends);
- a tensor smaller than `MIN_BYTES` stays: its copy costs a transfer's latency (~10 us) for
  little memory (LayerNorm statistics, attention's log-sum-exp at small batches).
A moved tensor is copied to pinned host memory on the current stream (ordered with the kernels,
so the device memory it leaves can be reused at once; a strided one, such as attention's q, k
and v, goes through a contiguous device copy first) and copied back when its backward node
unpacks it; that copy lives only while the node runs. The planner models exactly this
(`fitgpt.planner.blocks`, `OFFLOAD_MIN_BYTES` there equals `MIN_BYTES`).
"""

from __future__ import annotations

import torch

MIN_BYTES = 2**20  # tensors below 1 MiB stay on the device

# grad_fn types through which a saved tensor is still a weight: transpose, view, dtype cast
_WEIGHT_VIEWS = {"TBackward0", "TransposeBackward0", "ViewBackward0", "ToCopyBackward0",
                 "AliasBackward0", "PermuteBackward0"}


class PinnedHost:
    """Page-locked host memory from PyTorch's caching host allocator (sizes rounded up to a
    power of two, kept for reuse); copies on the current stream."""

    def put(self, t: torch.Tensor):
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def get(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return host.to(device, non_blocking=True)


def is_weight(t: torch.Tensor) -> bool:
    """A parameter, or a transpose, view or dtype cast of one (what a linear layer saves)."""
    if t.is_leaf:
        return t.requires_grad
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _WEIGHT_VIEWS:
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        fn = nxt[0]
    return fn is not None and type(fn).__name__ == "AccumulateGrad"


def offloading(host, min_bytes: int | None = None):
    """A `saved_tensors_hooks` context that sends activations of at least `min_bytes` (default
    MIN_BYTES) to `host` (an object with put(tensor) and get(stored, device))."""
    least = MIN_BYTES if min_bytes is None else min_bytes

    def pack(t: torch.Tensor):
        if t.numel() * t.element_size() < least or is_weight(t):
            return t
        return _Stored(t.device, host.put(t))

    def unpack(packed):
        if isinstance(packed, _Stored):
            return host.get(packed.data, packed.device)
        return packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _Stored:
    """A tensor in host memory and the device it came from."""

    __slots__ = ("device", "data")

    def __init__(self, device: torch.device, data):
        self.device, self.data = device, data
