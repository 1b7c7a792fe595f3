"""Fault injection, for tests: make a chosen step run out of memory, produce a NaN loss, or
kill the process, so that recovery paths are exercised on a CPU.

The environment is read once, at the start of a run (`Faults.from_env`), and the object is
handed to the trainer, the step and evaluation; a normal run gets `NO_FAULTS`, whose checks
find nothing. Set FITGPT_FAULT to a comma-separated list of:
  oom:PHASE:STEP:BATCH[:RANK]
                        raise torch.OutOfMemoryError in PHASE at STEP while the (micro- or
                        eval) batch is at least BATCH sequences (only in process RANK when given).
                        PHASE: train (a micro-step's start), backward (just before a micro-step's
                        backward) or eval
  nan:STEP              make the training loss NaN at STEP
  infgrad:STEP          make one gradient infinite at STEP while the loss stays finite (a
                        diverging run's gradient overflow)
  nanweights:STEP       make the weights NaN right after the optimizer step at STEP (what an
                        infinite learning rate does)
  kill:STEP             SIGKILL this process right after the checkpoint at STEP is saved
  killafter:STEP        SIGKILL this process once step STEP's records are written (between
                        checkpoints: a resumed run redoes the steps since the last one)
  killshard:INDEX       SIGKILL `fitgpt prepare` right after shard INDEX is written, before the
                        manifest lists it (read by fitgpt.data.prepare.pipeline itself: data/
                        sits below train/)
  raise:RANK:STEP       raise an error in process RANK at STEP (a failing rank under torchrun)
  stop:RANK:STEP        request a graceful stop (as Ctrl-C does) in process RANK before STEP
Steps count optimizer steps from 0, as the log does.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

ENV = "FITGPT_FAULT"


@dataclass(frozen=True)
class Faults:
    """The faults asked for, as (kind, field, ...) tuples of text, and this process's rank
    (for the faults that name one)."""

    items: tuple[tuple[str, ...], ...] = ()
    rank: int = 0

    @classmethod
    def from_env(cls, rank: int = 0, env: dict[str, str] | None = None) -> Faults:
        spec = (os.environ if env is None else env).get(ENV, "")
        items = tuple(tuple(item.strip().split(":")) for item in spec.split(",") if item.strip())
        return cls(items, rank) if items else NO_FAULTS

    def _at(self, kind: str, step: int) -> bool:
        return any(f[0] == kind and int(f[1]) == step for f in self.items)

    def _here_at(self, kind: str, step: int) -> bool:
        """KIND:RANK:STEP in this process."""
        return any(f[0] == kind and int(f[1]) == self.rank and int(f[2]) == step for f in self.items)

    def maybe_oom(self, phase: str, step: int, batch: int) -> None:
        for f in self.items:
            if f[0] == "oom" and f[1] == phase and int(f[2]) == step and batch >= int(f[3]) and (
                    len(f) < 5 or int(f[4]) == self.rank):
                import torch

                raise torch.OutOfMemoryError(
                    f"injected out-of-memory ({phase}, step {step}, batch {batch})")

    def nan_at(self, step: int) -> bool:
        return self._at("nan", step)

    def infgrad_at(self, step: int) -> bool:
        return self._at("infgrad", step)

    def nanweights_at(self, step: int) -> bool:
        return self._at("nanweights", step)

    def maybe_kill(self, step: int, kind: str = "kill") -> None:
        if self._at(kind, step):
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_raise(self, step: int) -> None:
        if self._here_at("raise", step):
            raise RuntimeError(f"injected failure in rank {self.rank} at step {step}")

    def stop_at(self, step: int) -> bool:
        return self._here_at("stop", step)


NO_FAULTS = Faults()
