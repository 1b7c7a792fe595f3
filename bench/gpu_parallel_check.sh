#!/usr/bin/env bash
# Issue 8's GPU check: the seed's 77M model for a few steps in one process, then under torchrun
# on every visible GPU with DDP and with FSDP2 (NCCL); prints tokens/s and the measured against
# the predicted peak memory per process from each run's summary.json. Synthetic data: a
# 2M-token shard written by the script itself.
#
# DDP and FSDP2 need 2 GPUs or more. fitgpt runs `torchrun --nproc_per_node=1` as a single
# process (WORLD_SIZE 1), and NCCL refuses two ranks on one GPU, so with one GPU only the
# single-process run is made, and the script says so.
#
#   bash bench/gpu_parallel_check.sh [OUT_DIR [FITGPT_ARGS...]]
# PYTHON picks the interpreter; NPROC overrides the number of processes (default: the GPUs), and
# the extra arguments go to every run: a CPU smoke test of this script is
#   NPROC=2 bash bench/gpu_parallel_check.sh /tmp/pc --train.device=cpu --train.dtype=float32 \
#     --model.n_layer=2 --model.n_head=2 --model.n_embd=64 --model.block_size=64 --batch_size=4 \
#     --max_iters=2 --eval.tokens=256
set -euo pipefail
py=${PYTHON:-python3}
out=${1:-/tmp/fitgpt_parallel_check}
mkdir -p "$out/data"
"$py" - "$out/data" <<'PY'
import sys, numpy as np
from fitgpt.data.shards import write_shard
rng = np.random.default_rng(0)
write_shard(f"{sys.argv[1]}/synthetic_val_000000.bin", rng.integers(0, 50257, 300_000, dtype=np.uint16))
write_shard(f"{sys.argv[1]}/synthetic_train_000001.bin", rng.integers(0, 50257, 2_000_000, dtype=np.uint16))
PY
ngpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
nproc=${NPROC:-$ngpu}
accum=$(( nproc > 1 ? 4 * nproc : 4 ))  # divisible by the number of processes
common=(fitgpt/configs/seed-77m.py --data.dir="$out/data" --max_iters=20 --eval_interval=20
        --eval.tokens=65536 --log.interval=5 --gradient_accumulation_steps="$accum" --log.out_dir="$out"
        "${@:2}")
"$py" -m fitgpt train "${common[@]}" --log.run_name=single
runs=(single)
if (( nproc >= 2 )); then
  "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m fitgpt train "${common[@]}" --log.run_name=ddp
  "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m fitgpt train "${common[@]}" --parallel.mode=fsdp --log.run_name=fsdp
  runs+=(ddp fsdp)
else
  echo "only $ngpu GPU: DDP and FSDP2 need 2 or more (one process under torchrun is a single process); single run only"
fi
"$py" - "$out" "${runs[@]}" <<'PY'
import json, sys
gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"
print("| run | tokens/s | train peak (predicted) | eval peak (predicted) |")
print("| --- | --- | --- | --- |")
for name in sys.argv[2:]:
    s = json.load(open(f"{sys.argv[1]}/{name}/summary.json"))
    print(f"| {name} | {s['tokens_per_second']:.0f} | {gib(s['peak_train_bytes'])} ({gib(s['predicted_train_bytes'])}) "
          f"| {gib(s['peak_eval_bytes'])} ({gib(s['predicted_eval_bytes'])}) |")
PY
