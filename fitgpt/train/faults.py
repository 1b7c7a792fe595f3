"""Fault injection, for tests: make a chosen step run out of memory, produce a NaN loss, or
kill the process, so that recovery paths are exercised on a CPU.

Set FITGPT_FAULT to a comma-separated list of:
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
                        manifest lists it
  raise:RANK:STEP       raise an error in process RANK at STEP (a failing rank under torchrun)
  stop:RANK:STEP        request a graceful stop (as Ctrl-C does) in process RANK before STEP
Steps count optimizer steps from 0, as the log does. Unset, every check is a dictionary lookup.
"""

from __future__ import annotations

import functools
import os
import signal


@functools.lru_cache(maxsize=8)
def _parse(spec: str) -> list[tuple[str, ...]]:
    return [tuple(item.strip().split(":")) for item in spec.split(",") if item.strip()]


def _faults() -> list[tuple[str, ...]]:
    spec = os.environ.get("FITGPT_FAULT", "")
    return _parse(spec) if spec else []


def maybe_oom(phase: str, step: int, batch: int) -> None:
    for f in _faults():
        if f[0] == "oom" and f[1] == phase and int(f[2]) == step and batch >= int(f[3]) and (
                len(f) < 5 or int(f[4]) == _rank()):
            import torch

            raise torch.OutOfMemoryError(
                f"injected out-of-memory ({phase}, step {step}, batch {batch})")


def nan_at(step: int) -> bool:
    return any(f[0] == "nan" and int(f[1]) == step for f in _faults())


def infgrad_at(step: int) -> bool:
    return any(f[0] == "infgrad" and int(f[1]) == step for f in _faults())


def nanweights_at(step: int) -> bool:
    return any(f[0] == "nanweights" and int(f[1]) == step for f in _faults())


def maybe_kill(step: int, kind: str = "kill") -> None:
    if any(f[0] == kind and int(f[1]) == step for f in _faults()):
        os.kill(os.getpid(), signal.SIGKILL)


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def maybe_raise(step: int) -> None:
    if any(f[0] == "raise" and int(f[1]) == _rank() and int(f[2]) == step for f in _faults()):
        raise RuntimeError(f"injected failure in rank {_rank()} at step {step}")


def stop_at(step: int) -> bool:
    return any(f[0] == "stop" and int(f[1]) == _rank() and int(f[2]) == step for f in _faults())
