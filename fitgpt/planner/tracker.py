"""Count the bytes of live tensor storages, on any device, without a GPU.

`StorageTracker` is a `TorchDispatchMode`: every operator output's storage is counted once
(rounded up to 512 bytes, as the CUDA caching allocator rounds) and subtracted when the storage
is freed. It sees autograd's saved tensors, backward and recomputation, and the optimizer's
state. Tensors that already existed when tracking began (weights, optimizer state) are added
with `add`. `peak` is the most that was alive at once since the last `reset_peak`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROUND = 512


def rounded(nbytes: int) -> int:
    return (nbytes + ROUND - 1) // ROUND * ROUND


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of the storages that ops create (and those added by hand)."""

    def __init__(self, device_type: str | None = None):
        super().__init__()
        self.device_type = device_type  # count only storages on this device type (None: all)
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _count(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if self.device_type is not None and t.device.type != self.device_type:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live:
            return
        size = rounded(st.nbytes())
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def add(self, tensors: Iterable[torch.Tensor] | torch.nn.Module | torch.optim.Optimizer) -> None:
        """Count tensors that existed before tracking (a module's parameters and buffers,
        their gradients, an optimizer's state)."""
        if isinstance(tensors, torch.nn.Module):
            items = [*tensors.parameters(), *tensors.buffers()]
            items += [p.grad for p in tensors.parameters() if p.grad is not None]
        elif isinstance(tensors, torch.optim.Optimizer):
            items = tree_leaves([dict(s) for s in tensors.state.values()])
        else:
            items = list(tensors)
        for t in items:
            self._count(t)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._count(t)
        return out
