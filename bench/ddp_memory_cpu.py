"""Per-process memory of DDP on 2 CPU processes: the planner's prediction against the storage
tracker's measurement, for training and evaluation, in a few settings.

Each setting is a real `fitgpt train` under torchrun (gloo, 2 ranks, 3 steps) on synthetic
shards written here; the figures come from the run's summary.json (rank 0). About a minute per
setting on 2 cores. Prints a markdown table.

    .venv/bin/python bench/ddp_memory_cpu.py [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fitgpt.console import fmt_bytes
from fitgpt.data.shards import write_shard

CONFIG = """name = "ddp-memory"
[model]
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
vocab_size = 8192
[train]
batch_size = 8
grad_accum = 2
max_steps = 3
device = "cpu"
dtype = "float32"
[eval]
interval = 3
tokens = 2048
batch_size = 8
[log]
progress = false
"""

SETTINGS = [  # (name, overrides)
    ("fp32, accumulation 2", []),
    ("fp32, accumulation 4", ["--train.grad_accum=4"]),
    ("bf16 autocast", ["--train.dtype=bfloat16"]),
    ("checkpointing + full logits", ["--memory.checkpointing=true", "--memory.loss=full"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fitgpt-ddp-mem-"))
    rng = np.random.default_rng(0)
    (root / "shards").mkdir()
    write_shard(root / "shards" / "s_val_000000.bin", rng.integers(0, 8192, 20_000, dtype=np.uint16))
    write_shard(root / "shards" / "s_train_000001.bin", rng.integers(0, 8192, 200_000, dtype=np.uint16))
    (root / "base.toml").write_text(CONFIG)
    rows = ["| setting | phase | predicted | measured | error |", "| --- | --- | --- | --- | --- |"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i, (name, extra) in enumerate(SETTINGS):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "fitgpt", "train", str(root / "base.toml"), f"--data.dir={root / 'shards'}",
               f"--log.out_dir={root / 'runs'}", f"--log.run_name=r{i}", "--parallel.mode=ddp", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        s = json.loads((root / "runs" / f"r{i}" / "summary.json").read_text())
        for phase in ("train", "eval"):
            p, m = s[f"predicted_{phase}_bytes"], s[f"peak_{phase}_bytes"]
            rows.append(f"| {name} | {phase} | {fmt_bytes(p)} | {fmt_bytes(m)} | {(p - m) / m:+.2%} |")
        print(rows[-2], rows[-1], sep="\n", flush=True)
    print(f"\n{args.nproc} processes (gloo), DDP, per process:\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
