#!/usr/bin/env bash
# Issue 8's GPU check, for a machine with one CUDA GPU: the seed's 77M model for a few steps in
# one process, under torchrun with DDP (1 rank, NCCL), and with FSDP2 (1 rank); compare the
# tokens/s and peak memory each run's summary.json records. Synthetic data: a 2M-token shard
# written by the script itself.
set -euo pipefail
py=${PYTHON:-python3}
out=${1:-/tmp/fitgpt_parallel_check}
mkdir -p "$out/data"
"$py" - "$out/data" <<'PY'
import sys, numpy as np
from fitgpt.data import write_shard
rng = np.random.default_rng(0)
write_shard(f"{sys.argv[1]}/synthetic_val_000000.bin", rng.integers(0, 50257, 300_000, dtype=np.uint16))
write_shard(f"{sys.argv[1]}/synthetic_train_000001.bin", rng.integers(0, 50257, 2_000_000, dtype=np.uint16))
PY
common=(fitgpt/configs/seed-77m.py --data.dir="$out/data" --max_iters=20 --eval_interval=20
        --eval.tokens=65536 --log.interval=5 --gradient_accumulation_steps=4 --log.out_dir="$out")
"$py" -m fitgpt train "${common[@]}" --log.run_name=single
"$py" -m torch.distributed.run --standalone --nproc_per_node=1 -m fitgpt train "${common[@]}" --log.run_name=ddp
"$py" -m torch.distributed.run --standalone --nproc_per_node=1 -m fitgpt train "${common[@]}" --parallel.mode=fsdp --log.run_name=fsdp
"$py" - "$out" <<'PY'
import json, sys
for name in ("single", "ddp", "fsdp"):
    s = json.load(open(f"{sys.argv[1]}/{name}/summary.json"))
    print(f"| {name} | {s['tokens_per_second']:.0f} tok/s | train peak {s['peak_train_bytes'] / 2**30:.2f} GiB "
          f"(predicted {s['predicted_train_bytes'] / 2**30:.2f}) | eval peak {s['peak_eval_bytes'] / 2**30:.2f} GiB |")
PY
