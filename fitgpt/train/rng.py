"""Random state, in the two places a run needs it whole.

- With each checkpoint (`rng_state` / `set_rng_state`): Python's, NumPy's, torch's CPU and every
  CUDA generator, as plain lists and tensors (loadable with weights_only), so that a resumed run
  draws the same dropout masks as one never stopped.
- Before each training step (`rng_snapshot` / `rng_restore`): the generator dropout draws from,
  so that a retry after out of memory draws the masks the failed attempt drew, not the ones
  after them. Host copies only: taking it costs no device sync.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from fitgpt.model.runtime import Runtime


def rng_state() -> dict[str, Any]:
    st = np.random.get_state()
    out = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in st["python"]))
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def rng_snapshot(rt: Runtime) -> tuple:
    """The state dropout draws from: the CPU generator and, on CUDA, the device's."""
    cuda = torch.cuda.get_rng_state(rt.device) if rt.device_type == "cuda" else None
    return torch.get_rng_state(), cuda


def rng_restore(rt: Runtime, snap: tuple) -> None:
    cpu, cuda = snap
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, rt.device)
