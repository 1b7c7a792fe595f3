"""The largest GPT-2 that trains under a 12 GiB cap, with and without the memory levers (issue 15).

For each released GPT-2 size (124M, 350M, 774M, 1558M) and each mode, the planner's auto-fit
picks the settings for a 12 GiB card (the cheap ones only: chunked loss, micro-batch and
accumulation, checkpointing, eval batch; or those plus the levers: every-k-th-block
checkpointing, 8-bit AdamW state, fused backward, activation offload, optimizer offload). On a
CUDA card capped at 12 GiB with `torch.cuda.set_per_process_memory_fraction` it then runs that
config's training step and evaluation (`fitgpt.planner.verify`: synthetic tokens, fitgpt's own
step) and reports predicted against measured peaks, or OOM. Each case runs in its own process,
so one case's cached blocks or pinned host buffers never weigh on the next.

    python bench/gpu_largest_model.py --out largest.json          # on a CUDA machine
    python bench/gpu_largest_model.py --dry-run [--gpu rtx4070]    # the plans only, no GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitgpt.config.load import load_config  # noqa: E402
from fitgpt.errors import ConfigError  # noqa: E402
from fitgpt.planner.fit import auto_fit, overrides_of  # noqa: E402
from fitgpt.planner.gpus import find_gpu  # noqa: E402

SIZES = ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m")
MODES = {"cheap settings only": [], "with the levers": None}  # auto_fit's `levers`: [] none, None all
GIB = 2**30


def plan(size: str, levers, cap_gib: float, gpu_name: str) -> dict:
    """The auto-fitted overrides for one size and mode under the cap, or why nothing fits."""
    cfg = load_config(size, ["--train.device=cuda", "--train.dtype=bfloat16"])
    gpu = find_gpu(gpu_name)
    try:
        new, lines = auto_fit(cfg, int(cap_gib * GIB), cfg.memory.headroom, device_type="cuda",
                              dtype="bfloat16", gpu=gpu, host_bytes=None, levers=levers)
    except ConfigError as e:
        return {"fits": False, "why": str(e).splitlines()[0]}
    return {"fits": True, "overrides": overrides_of(cfg, new), "lines": lines}


def run_case(size: str, overrides: list[str], cap_gib: float) -> dict:
    """In this process: cap the card, verify the fitted config (2 steps, one evaluation)."""
    import torch

    from fitgpt.planner.verify import verify

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
    cfg = load_config(size, ["--train.device=cuda", "--train.dtype=bfloat16", *overrides])
    r = verify(cfg, steps=2, catch_oom=True)
    return {"device": torch.cuda.get_device_name(0), "train": r["train"], "eval": r["eval"],
            "oom": r["oom"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_largest_model.json")
    ap.add_argument("--cap-gib", type=float, default=12.0)
    ap.add_argument("--gpu", default="rtx4070", help="the card the plans are made for (default rtx4070)")
    ap.add_argument("--dry-run", action="store_true", help="plans only, no GPU")
    ap.add_argument("--case", nargs=2, metavar=("SIZE", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # the child process of one case
        print(json.dumps(run_case(args.case[0], json.loads(args.case[1]), args.cap_gib)))
        return 0
    rows = []
    for size in SIZES:
        for mode, levers in MODES.items():
            row = {"size": size, "mode": mode, **plan(size, levers, args.cap_gib, args.gpu)}
            if row["fits"] and not args.dry_run:
                out = subprocess.run([sys.executable, __file__, "--cap-gib", str(args.cap_gib), "--case",
                                      size, json.dumps(row["overrides"])], capture_output=True, text=True)
                row["measured"] = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                                   else {"error": out.stderr.strip().splitlines()[-1:]})
            rows.append(row)
            got = row.get("measured", {})
            status = ("cannot fit: " + row["why"]) if not row["fits"] else (
                "planned: " + " ".join(row["overrides"]) if args.dry_run else
                f"measured train {got.get('train', {}).get('measured_allocated')} B, oom {got.get('oom')}")
            print(f"{size:11s} {mode:20s} {status}", flush=True)
    Path(args.out).write_text(json.dumps({"cap_gib": args.cap_gib, "gpu_plan": args.gpu, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
