"""The planner's bookkeeping: a timeline of allocations and frees, rounded as the allocators
round, that remembers what was alive at its peak; and the estimate it produces, part by part.
Pure Python: no torch import.

Its cost does not grow with the model or the batch: identical tensors are allocated as one
(`count`), and a run of identical layers is replayed as its first and last layer one by one
plus its middle in one go (`repeated`). The peak of a run of identical steps is at its first or
its last step: each step starts where the previous one ended, shifted by the same amount, and
rises above its start by the same amount, so the middle can never hold the peak.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

ROUND = 512


def r(n: float) -> int:
    n = int(n)
    return (n + ROUND - 1) // ROUND * ROUND


@dataclass
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass
class PhaseEstimate:
    phase: str
    parts: list[Part]
    allocated: int
    overhead: list[Part] = field(default_factory=list)
    host: int = 0  # pinned host memory the phase holds for the device (activation offload)

    @property
    def total(self) -> int:
        return self.allocated + sum(p.bytes for p in self.overhead)


@dataclass
class Estimate:
    train: PhaseEstimate
    eval: PhaseEstimate
    device_type: str
    dtype: str
    params: int

    eval_only: bool = False  # only the evaluation runs (train.eval_only)
    host: list[Part] = field(default_factory=list)  # model state in host memory (offload_optimizer)

    @property
    def host_total(self) -> int:
        """Host memory the run holds for the device: the offloaded model state (`host`, all
        run long; its step transient included) and the larger phase's offloaded activations."""
        return sum(p.bytes for p in self.host) + max(self.train.host, self.eval.host)

    @property
    def peak(self) -> int:
        """What must fit: the larger phase, or the evaluation alone for an eval-only run."""
        return self.eval.total if self.eval_only else max(self.train.total, self.eval.total)


class Timeline:
    """Running total of live bytes by kind; remembers the breakdown at the peak."""

    def __init__(self, scale: dict[str, float] | None = None):
        self.live: dict[str, int] = {}
        self.current = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.scale = scale or {}  # per kind: 1/world for what FSDP shards, 0 for what it removes
        self.times = 1  # inside `repeated(k)`: every allocation stands for k of them
        self.host = 0  # pinned host memory held for the device (activation offload), and its peak
        self.host_peak = 0
        self.moved = 0  # bytes copied from the device to the host (each comes back once)

    def alloc(self, kind: str, n: float, count: int = 1) -> tuple[str, int]:
        """`count` tensors of n bytes each (each rounded), alive together; one handle for all."""
        n = n * self.scale.get(kind, 1)
        n = (r(n) if n > 0 else 0) * count * self.times
        self.live[kind] = self.live.get(kind, 0) + n
        self.current += n
        if self.current > self.peak and self.times == 1:
            self.peak, self.at_peak = self.current, dict(self.live)
        return kind, n

    def free(self, *handles: tuple[str, int]) -> None:
        for kind, n in handles:
            self.live[kind] -= n
            self.current -= n

    def to_host(self, reserved: int, moved: int) -> None:
        """Copies to pinned host memory: `reserved` bytes of it held, `moved` bytes copied."""
        self.host += reserved
        self.moved += moved
        self.host_peak = max(self.host_peak, self.host)

    def from_host(self, reserved: int) -> None:
        self.host -= reserved

    def transient(self, kind: str, *sizes: float) -> None:
        """Allocate sizes one after another, all alive together, then free them."""
        hs = [self.alloc(kind, s) for s in sizes]
        self.free(*hs)

    @contextmanager
    def repeated(self, k: int):
        """Replay one step as k identical steps, without tracking the peak (see the module
        docstring: call it only between the first and the last of a run of identical steps,
        which are replayed one by one). Handles allocated inside stand for all k; frees of
        handles from outside count once, so the caller frees what the k-1 others consumed.
        Nested, the repetitions multiply."""
        self.times *= k
        try:
            yield
        finally:
            self.times //= k


def split(handle: tuple[str, int], k: int) -> tuple[tuple[str, int], tuple[str, int]]:
    """A handle from `repeated(k)` as (one step's share, the other k-1 steps' share)."""
    kind, n = handle
    return (kind, n // k), (kind, n - n // k)


def merge(a: tuple[str, int], b: tuple[str, int]) -> tuple[str, int]:
    """Two handles of the same kind as one (freed together)."""
    assert a[0] == b[0], (a, b)
    return a[0], a[1] + b[1]
