"""Measure the peak memory of one phase (a training step, an evaluation pass) as it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fitgpt.model.runtime import Runtime
from fitgpt.planner.tracker import StorageTracker


@dataclass
class PhasePeaks:
    """Peak allocated bytes of training and evaluation (and reserved, on CUDA)."""

    train: int | None = None
    eval: int | None = None
    train_reserved: int | None = None
    eval_reserved: int | None = None

    def record(self, phase: str, allocated: int | None, reserved: int | None) -> None:
        if allocated is not None:
            setattr(self, phase, max(getattr(self, phase) or 0, allocated))
        if reserved is not None:
            key = f"{phase}_reserved"
            setattr(self, key, max(getattr(self, key) or 0, reserved))


class Meter:
    """Measures one phase's peak: CUDA allocator statistics, or the CPU storage tracker (with
    the model and optimizer state that existed before the phase added by hand)."""

    def __init__(self, rt: Runtime, track_cpu: bool):
        self.rt = rt
        self.cuda = rt.device_type == "cuda"
        self.track_cpu = track_cpu and rt.device_type == "cpu"

    def measure(self, fn, model, optimizer, enabled: bool) -> tuple[Any, int | None, int | None]:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.rt.device)
            out = fn()
            return (out, torch.cuda.max_memory_allocated(self.rt.device),
                    torch.cuda.max_memory_reserved(self.rt.device))
        if not (self.track_cpu and enabled):
            return fn(), None, None
        tracker = StorageTracker("cpu")
        tracker.add(model)
        if optimizer is not None:
            tracker.add(optimizer)
        with tracker:
            out = fn()
        return out, tracker.peak, None
