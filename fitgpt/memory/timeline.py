"""The planner's bookkeeping: a timeline of allocations and frees, rounded as the allocators
round, that remembers what was alive at its peak; and the estimate it produces, part by part.
Pure Python: no torch import."""

from __future__ import annotations

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

    @property
    def peak(self) -> int:
        return max(self.train.total, self.eval.total)


class Timeline:
    """Running total of live bytes by kind; remembers the breakdown at the peak."""

    def __init__(self, scale: dict[str, float] | None = None):
        self.live: dict[str, int] = {}
        self.current = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.scale = scale or {}  # per kind: 1/world for what FSDP shards, 0 for what it removes

    def alloc(self, kind: str, n: int) -> tuple[str, int]:
        n = n * self.scale.get(kind, 1)
        n = r(n) if n > 0 else 0
        self.live[kind] = self.live.get(kind, 0) + n
        self.current += n
        if self.current > self.peak:
            self.peak, self.at_peak = self.current, dict(self.live)
        return kind, n

    def free(self, *handles: tuple[str, int]) -> None:
        for kind, n in handles:
            self.live[kind] -= n
            self.current -= n

    def transient(self, kind: str, *sizes: float) -> None:
        """Allocate sizes one after another, all alive together, then free them."""
        hs = [self.alloc(kind, s) for s in sizes]
        self.free(*hs)
