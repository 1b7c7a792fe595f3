"""Which checkpoint file a path on the command line means.

`--ckpt`, `--resume` and nanoGPT's `init_from='resume'` accept any of:
- a checkpoint file (fitgpt's `step_N.pt` or nanoGPT's `ckpt.pt`);
- a run folder: fitgpt's `checkpoints/latest` (or, if that is missing, its newest `step_N.pt`),
  or a nanoGPT `out_dir` with `ckpt.pt`. A folder with both (a nanoGPT run that fitgpt
  continued, or the reverse) means the one further along, compared by step; a tie goes to
  fitgpt's, which also holds the data sampler's position and the RNG states;
- a folder of run folders (`log.out_dir`, fitgpt's `runs/` or a nanoGPT-style `out_dir` that
  fitgpt runs were written into: `OUT_DIR/<run_name>/checkpoints/...`, see fitgpt.report.metrics): the
  run whose checkpoint was written last.
Whenever more than one candidate was found, the note says which one was taken and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fitgpt.errors import CheckpointError

CKPT_DIR = "checkpoints"  # as in fitgpt.store.checkpoint
NANOGPT_CKPT = "ckpt.pt"
_STEP_NAME = re.compile(r"step_(\d+)\.pt")


@dataclass
class Found:
    path: Path
    note: str | None = None


def fitgpt_checkpoint(folder: Path) -> Path | None:
    """The checkpoint `latest` names in a run folder (or in its checkpoints/ folder itself)."""
    ckdir = folder / CKPT_DIR if (folder / CKPT_DIR).is_dir() else folder
    latest = ckdir / "latest"
    if latest.is_file():
        name = latest.read_text(errors="replace").strip()
        if not _STEP_NAME.fullmatch(name):  # a file name in this folder, never a path
            raise CheckpointError(f"{latest}: names {name[:60]!r}, not a step_N.pt file in "
                                  f"{ckdir}; pass the checkpoint file itself")
        if (ckdir / name).is_file():
            return ckdir / name
    files = sorted(ckdir.glob("step_*.pt"))
    return files[-1] if files else None


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step a checkpoint was saved at: from fitgpt's file name, else from the file
    (nanoGPT's iter_num), memory-mapped so that no tensor is read; None if unreadable."""
    m = _STEP_NAME.fullmatch(path.name)
    if m:
        return int(m.group(1))
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state.get("iter_num", state.get("step")))
    except Exception:  # noqa: BLE001 - an unreadable file just loses the comparison
        return None


def _rank(step: int | None) -> int:
    return -1 if step is None else step


def _describe(path: Path, step: int | None) -> str:
    return f"{path} ({'unreadable' if step is None else f'step {step}'})"


def own_checkpoint(folder: Path) -> Found | None:
    """The checkpoint of one run folder: fitgpt's, nanoGPT's, or the further along of both."""
    fit = fitgpt_checkpoint(folder)
    nano = folder / NANOGPT_CKPT if (folder / NANOGPT_CKPT).is_file() else None
    if fit is None or nano is None:
        return Found(fit or nano) if (fit or nano) else None
    fit_step, nano_step = checkpoint_step(fit), checkpoint_step(nano)
    pick = nano if _rank(nano_step) > _rank(fit_step) else fit
    return Found(pick, f"{folder} holds both nanoGPT's {_describe(nano, nano_step)} and fitgpt's "
                       f"{_describe(fit, fit_step)}: using the one further along, {pick}")


def locate(where: str | Path) -> Found:
    """The checkpoint file `where` means (see the module docstring)."""
    p = Path(where)
    if p.is_file():
        return Found(p)
    own = own_checkpoint(p) if p.is_dir() else None
    runs = [own] if own else []
    if p.is_dir():
        for sub in sorted(q for q in p.iterdir() if q.is_dir() and q.name != CKPT_DIR):
            found = own_checkpoint(sub)
            if found is not None:
                runs.append(found)
    if not runs:
        raise CheckpointError(f"no checkpoint at {p}: expected a .pt file, a run folder with "
                              f"{CKPT_DIR}/latest, a nanoGPT out_dir with {NANOGPT_CKPT}, or a folder "
                              f"of run folders")
    if len(runs) == 1:
        return runs[0]
    newest = max(runs, key=lambda f: f.path.stat().st_mtime)
    note = (f"{p} holds {len(runs)} runs with checkpoints; using the one written last, "
            f"{newest.path}" + (f" ({newest.note})" if newest.note else ""))
    return Found(newest.path, note)
