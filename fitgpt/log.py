"""The one place that prints: console lines, a live progress bar, the run's log and metrics files.

Only rank 0 prints (the process group sets RANK); library code calls `RunLog` or `say`, never
`print`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(highlight=False, soft_wrap=True)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(msg: str = "") -> None:
    """Print one line (rank 0 only)."""
    if is_main_process():
        console.print(msg, markup=False)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


class RunLog:
    """Console output plus `train.log` and `metrics.jsonl` in the run folder."""

    def __init__(self, run_dir: Path | None, total_steps: int, progress: bool = True):
        self.main = is_main_process()
        self.run_dir = run_dir
        self._log = self._metrics = None
        if run_dir is not None and self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(run_dir / "train.log", "a", buffering=1)
            self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self._progress: Progress | None = None
        self._task = None
        if progress and self.main and sys.stdout.isatty() and total_steps > 0:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                console=console, transient=True)
            self._task = self._progress.add_task("train", total=total_steps, status="")
            self._progress.start()

    def info(self, msg: str) -> None:
        if not self.main:
            return
        say(msg)
        if self._log:
            self._log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    def metrics(self, record: dict[str, Any]) -> None:
        if self._metrics:
            self._metrics.write(json.dumps(record) + "\n")

    def advance(self, step: int, status: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=status)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        for f in (self._log, self._metrics):
            if f:
                f.close()
        self._log = self._metrics = None
