"""The run folder: its name, who may write it, and what a new run may not overwrite.

- A run name is a name, not a path: separators, `.`, `..`, NUL and empty names are refused when
  the config is checked (fitgpt.config.names), so `--log.run_name=../../x` cannot write outside
  out_dir.
- One process at a time writes a run folder. `open_run_dir` takes an exclusive `flock` on
  `RUN/.lock` for the life of the run (the kernel drops it when the process dies, however it
  dies, so there are no stale locks to clean up); a second process gets one line naming the
  holder's process id. Under torchrun only rank 0 writes, so only rank 0 locks.
- A new run never writes into a folder that already holds files. With an explicit
  `log.run_name` it is refused, and the message says how to continue that run: renaming it
  silently would leave `--resume runs/NAME` pointing at the old run. Without one, the folder is
  named from the config name and the time, and a taken name gets a `-2`, `-3`, ... suffix.
- Under the lock, temporary files a killed writer left behind are deleted (no live writer can own
  one), so interrupted saves do not pile up.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from fitgpt.config.names import check_name
from fitgpt.config.schema import Config
from fitgpt.errors import FitError
from fitgpt.fileio import remove_stale_temps

LOCK_NAME = ".lock"
CKPT_DIR = "checkpoints"


class RunFolderBusy(FitError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder, held until `release` or the end of the process."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self.fd = run_dir, fd

    def release(self) -> None:
        if self.fd is not None:
            _HELD.pop(_key(self.run_dir), None)
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


# This process's locks by folder: a run that ended with an exception before releasing its lock
# (a test, a notebook) must not lock this same process out of its own folder.
_HELD: dict[str, RunLock] = {}


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    for _ in range(20):  # the holder writes its pid just after locking: wait briefly for it
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        if text:
            pid, host = text[0], text[1] if len(text) > 1 else "?"
            where = "" if host == socket.gethostname() else f" on host {host}"
            return f"process {pid}{where}"
        time.sleep(0.01)
    return "another process"


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take the run folder's lock, or raise RunFolderBusy naming the process that holds it."""
    held = _HELD.get(_key(run_dir))
    if held is not None:
        return held
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise FitError(f"{path} is a symbolic link; remove it (fitgpt does not write through "
                           f"links in a run folder)") from None
        raise FitError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _holder(fd)
        os.close(fd)
        raise RunFolderBusy(f"{run_dir} is in use by {who}: one run folder takes one run at a "
                            f"time (two would mix their checkpoints and metrics); wait for that "
                            f"run to end or stop it, then try again") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    lock = _HELD[_key(run_dir)] = RunLock(run_dir, fd)
    for folder in (run_dir, run_dir / CKPT_DIR):
        if folder.is_dir():
            remove_stale_temps(folder)
    return lock


def _contents(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)


def claim_new(base: Path, name: str, numbered: bool) -> tuple[Path, RunLock]:
    """A locked, empty folder base/name for a new run (base/name-2, -3, ... when `numbered`
    and the name is taken); with numbered False a taken name is an error."""
    n = 1
    while True:
        cand = base / (name if n == 1 else f"{name}-{n}")
        n += 1
        if cand.exists() and not cand.is_dir():
            if numbered:
                continue
            raise FitError(f"{cand} exists and is not a folder; choose another --log.run_name")
        try:
            cand.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FitError(f"cannot create the run folder {cand}: {e.strerror or e}") from None
        try:
            lock = lock_run_dir(cand)
        except RunFolderBusy:
            if numbered:
                continue
            raise
        used = _contents(cand)
        if not used:
            return cand, lock
        lock.release()
        if not numbered:
            shown = ", ".join(used[:4]) + (", ..." if len(used) > 4 else "")
            raise FitError(f"{cand} already holds a run ({shown}); a new run never writes into "
                           f"another run's folder: continue it with `fitgpt train --resume {cand}`, "
                           f"or choose another --log.run_name")


def open_run_dir(cfg: Config, run_dir: Path | None) -> tuple[Path, RunLock]:
    """The locked run folder: `run_dir` when resuming (it exists), else a new one under
    log.out_dir named log.run_name (or the config name and the time)."""
    if run_dir is not None:
        return run_dir, lock_run_dir(Path(run_dir))
    if cfg.log.run_name is not None:
        check_name("log.run_name", cfg.log.run_name)
        return claim_new(Path(cfg.log.out_dir), cfg.log.run_name, numbered=False)
    check_name("name", cfg.name)
    return claim_new(Path(cfg.log.out_dir), f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                     numbered=True)


def check_not_moved(run_dir: Path, step: int | None, lock: RunLock) -> None:
    """A resume reads its checkpoint before it holds the lock. If another process saved a later
    checkpoint in between (it ended just before this one locked), continuing from the older one
    would train those steps again and overwrite the newer files: refuse, and say to run again."""
    from fitgpt.store.locate import checkpoint_step, fitgpt_checkpoint

    path = fitgpt_checkpoint(Path(run_dir))
    now = checkpoint_step(path) if path is not None else None
    if now is not None and step is not None and now > step:
        lock.release()
        raise FitError(f"{run_dir} moved on to step {now} while this resume was reading its "
                       f"checkpoint of step {step} (another run of it just ended); run the same "
                       f"command again to continue from step {now}")
