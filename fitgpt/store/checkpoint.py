"""Checkpoints that cannot be half-written and cannot run code when loaded.

Layout in a run folder: `checkpoints/step_00000100.pt` (the newest `keep` of them) and
`checkpoints/latest`, a one-line text file naming the newest, rewritten only after that
checkpoint is complete on disk. Each file is written to a fresh temporary name (created with
O_EXCL, never through a link), flushed, fsynced, and renamed (fitgpt.fileio). Loading maps
everything to the CPU with `weights_only=True`: a pickle that would run code is refused; then
every entry is checked (fitgpt.store.ckptcheck) before anything is built from it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from fitgpt.errors import CheckpointError
from fitgpt.fileio import atomic_write
from fitgpt.store.ckptcheck import check_entries

CKPT_DIR = "checkpoints"


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write state as checkpoints/step_N.pt, point `latest` at it, keep the newest `keep`."""
    ckdir = run_dir / CKPT_DIR
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {ckdir}: {e.strerror or e}") from None
    path = ckdir / f"step_{step:08d}.pt"
    try:
        atomic_write(path, lambda f: torch.save(state, f))
        atomic_write(ckdir / "latest", lambda f: f.write(f"{path.name}\n".encode()))
    except (OSError, RuntimeError) as e:
        # torch.save's zip writer turns a failed write (full disk, file too large) into a
        # RuntimeError whose context is the OSError
        e = e if isinstance(e, OSError) else e.__context__
        if not isinstance(e, OSError):
            raise
        latest = ckdir / "latest"
        prev = latest.read_text().strip() if latest.is_file() else None
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; "
                              + (f"the previous checkpoint {prev} is intact" if prev
                                 else "no earlier checkpoint exists")) from None
    old = sorted(ckdir.glob("step_*.pt"))
    for p in old[:-keep]:
        if p != path:
            p.unlink(missing_ok=True)
    return path


def find_checkpoint(where: str | Path) -> Path:
    """A checkpoint file, a run folder (its `latest`), a nanoGPT out_dir (`ckpt.pt`) or a folder
    of runs -> the checkpoint file (fitgpt.store.locate says which, when there was a choice)."""
    from fitgpt.store.locate import locate

    return locate(where).path


def load_checkpoint(where: str | Path) -> dict[str, Any]:
    """Load to the CPU without running code; refuse anything that is not plain tensors and data."""
    from fitgpt.store.locate import locate

    found = locate(where)
    path = found.path
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here is a bad file, said in one line
        text = (str(e).strip() or type(e).__name__).splitlines()[0][:160]
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise CheckpointError(f"{path}: refused: the file holds objects that could run code "
                                  f"when loaded; only load checkpoints you trust with other "
                                  f"tools") from None
        raise CheckpointError(f"{path}: cannot be read ({text}); the file is damaged or not a "
                              f"checkpoint") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a fitgpt or nanoGPT checkpoint (no 'model' entry)")
    check_entries(state, str(path))
    state["_path"] = str(path)
    if found.note:
        state["_note"] = found.note  # which of several candidates: fitgpt.store.load.config_of says it
    return state
