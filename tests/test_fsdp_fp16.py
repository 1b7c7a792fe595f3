"""float16 under FSDP2 on 2 CPU processes (gloo): steps are taken, and skipped, together.

The test launches this file under torchrun; each process runs `_worker` and writes what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCALE = 65536.0  # GradScaler's initial scale


def _worker(out: Path) -> None:
    """Two optimizer steps through fitgpt's own wrap, scaler and train_step, then a probe."""
    from conftest import tiny_config

    from fitgpt.model.runtime import Runtime, build_model
    from fitgpt.train import distributed
    from fitgpt.train.step import train_step

    world = distributed.init("cpu", "gloo")
    rt = Runtime(torch.device("cpu"), torch.float16)
    cfg = tiny_config(out, out, train__dtype="float16")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, rt.device)
    wrapped = distributed.wrap(model, "fsdp", world, rt)
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    scaler = distributed.grad_scaler(rt, fsdp=True)
    mixed = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    batches = {"mixed tokens": (mixed[:, :-1], mixed[:, 1:]),
               "one repeated token": (torch.full((4, 32), 150), torch.full((4, 32), 150))}
    seen = {"type": type(scaler).__name__}
    for name, batch in batches.items():
        before = [p.to_local().clone() for p in model.parameters()]
        loss, _, _ = train_step(wrapped, opt, scaler, None, 1, 1.0, rt, data=[batch])
        moved = any(not torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
        seen[name] = {"loss_finite": bool(torch.isfinite(loss)), "stepped": moved,
                      "scale": scaler.get_scale()}
    # the condition itself: at the initial scale, which process's own shards hold an inf?
    x, y = batches["one repeated token"]
    with rt.autocast():
        loss = wrapped(x, y)
    (loss * SCALE).backward()
    seen["own shards finite"] = all(bool(torch.isfinite(p.grad.to_local()).all())
                                    for p in model.parameters())
    (out / f"rank{world.rank}.json").write_text(json.dumps(seen))
    # both processes past their last collective before either tears the group down (without it a
    # loaded machine once saw gloo abort one process at exit: "terminate called without an active
    # exception")
    torch.distributed.barrier()
    distributed.shutdown()


def test_fsdp2_float16_steps_and_skips_together(tmp_path):
    """Under FSDP2 with float16 parameters on the CPU, ln_f gives float16 hidden states.
    - A batch of mixed tokens: both processes take the step at the initial scale 65536. Before
      the fix the chunked loss cast that scale to float16 (inf), every gradient was inf or NaN,
      and every step was skipped.
    - A batch of one repeated token (150, in the upper half of the 256-token vocabulary): at
      65536 its float16 embedding gradient overflows in rows that process 1 holds, not process 0
      (the probe at the end checks that). Both processes must skip the step and halve the scale
      together, or their weights and scales part."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["type"] == "ShardedGradScaler"
    assert (r0["own shards finite"], r1["own shards finite"]) == (True, False)
    for seen in (r0, r1):
        assert seen["mixed tokens"] == {"loss_finite": True, "stepped": True, "scale": SCALE}
        assert seen["one repeated token"] == {"loss_finite": True, "stepped": False, "scale": SCALE / 2}


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
