"""The run's log: train.log and metrics.jsonl in the run folder, and the live progress bar.

Only rank 0 writes them; library code calls `RunLog` or `fitgpt.console.say`, never `print`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fitgpt.console import console, fmt_bytes, fmt_count, is_main_process, say  # noqa: F401


def drop_superseded(path: Path, step: int, eval_at_step: bool) -> int:
    """On resume from the checkpoint of `step`: rewrite metrics.jsonl, atomically, without the
    records the resumed run will write again (training records after `step`, evaluation records
    after it, and at it when the resumed run evaluates there again) and without a line a kill
    tore in half. Those records describe training whose weights were thrown away; dropping them
    here means every reader (plots, `fitgpt runs`, a user's pandas) sees one record per step
    without knowing about resumes; train.log keeps the full story. Returns the number dropped."""
    from fitgpt.fileio import atomic_write

    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            s = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if s > step or (s == step and eval_at_step and rec.get("kind") == "eval"):
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        atomic_write(path, lambda f: f.write("".join(kept).encode()))
    return dropped


class RunLog:
    """Console output plus `train.log` and `metrics.jsonl` in the run folder."""

    def __init__(self, run_dir: Path | None, total_steps: int, progress: bool = True):
        self.main = is_main_process()
        self.run_dir = run_dir
        self._log = self._metrics = None
        if run_dir is not None and self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            from fitgpt.fileio import open_append  # never appends through a planted link

            self._log = open_append(run_dir / "train.log")
            self._metrics = open_append(run_dir / "metrics.jsonl")
        # (file name, OSError) of the first write that failed (a full disk): later writes to the
        # files are dropped, the console keeps printing, and the training loop stops and saves
        self.write_error: tuple[str, OSError] | None = None
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
        self._write(self._log, "train.log", f"{time.strftime('%H:%M:%S')} {msg}\n")

    def metrics(self, record: dict[str, Any]) -> None:
        self._write(self._metrics, "metrics.jsonl", json.dumps(record) + "\n")

    def _write(self, f, name: str, text: str) -> None:
        """A line to one of the run's files; a failed write (disk full, file too large) is kept
        in `write_error` instead of raised, so that the loop can still save a checkpoint."""
        if f is None or self.write_error is not None:
            return
        try:
            f.write(text)
        except OSError as e:
            self.write_error = (name, e)

    def advance(self, step: int, status: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=status)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        for f in (self._log, self._metrics):
            if f:
                try:
                    f.close()
                except OSError:  # what it could not flush is already in write_error
                    pass
        self._log = self._metrics = None
