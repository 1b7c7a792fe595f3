"""Predicted against measured GPU memory for the seed's model and a grid of settings around it.

Run on a CUDA machine (about 2-4 minutes on an H100):

    python bench/gpu_memory_check.py --out gpu_memory.json

The caching allocator is capped at 12 GiB with `torch.cuda.set_per_process_memory_fraction`,
so a large card behaves like the seed's 12 GB RTX 4070 (the CUDA context is outside the cap).
For each configuration it runs 3 training steps (2 micro-batches each) and one evaluation on
synthetic tokens with fitgpt's own code (`fitgpt.planner.verify.verify`), and reports the
predicted and measured peak allocated and reserved bytes of each phase, or OOM. The model is
the seed's: 12 layers, 12 heads, n_embd 576, block 1024, vocab 50304, float16.

`--dry-run` prints the grid and the predictions without torch (works on any machine).
The rows with activation offload also pin host memory for the saved activations (about
12 x 38 x 16 x 1024 x 576 B = 4.3 GB at batch 16, each copy rounded up to a power of two).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from fitgpt.cli.main import set_allocator_env
from fitgpt.config.schema import Config
from fitgpt.console import fmt_bytes, say
from fitgpt.planner.estimate import estimate

CAP = 12 * 2**30

# (name, loss, checkpointing, batch, eval batch, eval block[, {memory field: value}])
GRID: list[tuple] = [
    ("seed as written (eval at batch 16)", "full", False, 16, 16, 1024),
    ("seed, eval batch 4", "full", False, 16, 4, 1024),
    ("full + checkpointing", "full", True, 16, 4, 1024),
    ("full, batch 8", "full", False, 8, 4, 1024),
    ("full, batch 4, eval block 512", "full", False, 4, 4, 512),
    ("chunked (fitgpt default), eval 16", "chunked", False, 16, 16, 1024),
    ("chunked, eval 16 x 512", "chunked", False, 16, 16, 512),
    ("chunked + checkpointing", "chunked", True, 16, 16, 1024),
    ("chunked, batch 8, eval 4", "chunked", False, 8, 4, 1024),
    ("chunked, batch 4, eval 4 x 512", "chunked", False, 4, 4, 512),
    ("chunked + checkpointing, batch 4", "chunked", True, 4, 4, 1024),
    ("full + checkpointing, eval 16 x 512", "full", True, 16, 16, 512),
    # activation levers (issue 15): a trailing dict sets memory.* fields
    ("chunked + every 2nd block checkpointed", "chunked", True, 16, 16, 1024,
     {"checkpoint_every": 2}),
    ("full + every 3rd block checkpointed, batch 8", "full", True, 8, 4, 1024,
     {"checkpoint_every": 3}),
    ("chunked + activation offload", "chunked", False, 16, 16, 1024, {"activation_offload": True}),
    ("chunked + every 2nd checkpointed, rest offloaded", "chunked", True, 16, 16, 1024,
     {"checkpoint_every": 2, "activation_offload": True}),
    ("chunked + activation offload, batch 4", "chunked", False, 4, 4, 1024,
     {"activation_offload": True}),
    # optimizer-state levers (issue 15); a dotted key sets another section's field
    ("chunked + 8-bit AdamW state", "chunked", False, 16, 16, 1024, {"optimizer_state": "8bit"}),
    ("full + 8-bit AdamW state, batch 8", "full", False, 8, 4, 1024, {"optimizer_state": "8bit"}),
    ("chunked + optimizer offloaded (bfloat16)", "chunked", False, 16, 16, 1024,
     {"offload_optimizer": True, "train.dtype": "bfloat16"}),
    ("chunked + optimizer offloaded, 8-bit host state", "chunked", True, 16, 16, 1024,
     {"offload_optimizer": True, "optimizer_state": "8bit", "train.dtype": "bfloat16"}),
]


def seed_config(loss: str, ckpt: bool, batch: int, eval_batch: int, eval_block: int,
                memory: dict | None = None, device: str = "cuda", dtype: str = "float16") -> Config:
    cfg = Config(name="seed-77m")
    m, t, e, mem = cfg.model, cfg.train, cfg.eval, cfg.memory
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 12, 12, 576, 1024, 50304
    t.batch_size, t.grad_accum, t.device, t.dtype = batch, 512 // batch, device, dtype
    e.batch_size, e.block_size = eval_batch, eval_block
    mem.loss, mem.checkpointing = loss, ckpt
    for name, value in (memory or {}).items():
        sec, _, key = name.rpartition(".")
        setattr(getattr(cfg, sec) if sec else mem, key, value)
    return cfg


def _cell(v: Any) -> str:
    return v if isinstance(v, str) else ("" if v is None else fmt_bytes(v))


def _err(v: float | None) -> str:
    return "" if v is None else f"{v:+.1f}%"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| config | phase | predicted alloc | measured alloc | err | predicted reserved | "
            "measured reserved | err | fits 12 GiB (predicted) |")
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        for ph in ("train", "eval"):
            p = r[ph]
            lines.append(
                f"| {r['name']} | {ph} | {_cell(p['predicted_allocated'])} | "
                f"{_cell(p.get('measured_allocated'))} | {_err(p.get('error_allocated_pct'))} | "
                f"{_cell(p.get('predicted_reserved'))} | {_cell(p.get('measured_reserved'))} | "
                f"{_err(p.get('error_reserved_pct'))} | "
                f"{'yes' if p.get('predicted_reserved', 0) <= CAP else 'no'} |")
    return "\n".join(lines)


def predictions(dtype: str, gpu=None) -> list[dict[str, Any]]:
    """The grid's predicted peaks on a card (its architecture sizes the cuBLAS workspaces; None:
    unknown, the larger size)."""
    rows = []
    for name, *setting in GRID:
        cfg = seed_config(*setting, dtype=dtype)  # a row may set its own dtype (offload: bfloat16)
        est = estimate(cfg, "cuda", cfg.train.dtype, gpu)
        row = {"name": name, "setting": setting}
        if est.host:  # the offloaded optimizer's host memory (predicted only: not measured here)
            row["predicted_host"] = est.host_total
        for ph in ("train", "eval"):
            pe = getattr(est, ph)
            context = sum(p.bytes for p in pe.overhead if "context" in p.name.lower())
            row[ph] = {"predicted_allocated": pe.allocated, "predicted_reserved": pe.total - context}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_memory_check.json", help="JSON file for the results")
    ap.add_argument("--dry-run", action="store_true", help="print the grid and predictions only")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--cap-gib", type=float, default=12.0, help="allocator cap (0: none)")
    ap.add_argument("--only", type=int, nargs="*", help="run only these grid rows (0-based)")
    ap.add_argument("--gpu", help="--dry-run: the card to predict for (e.g. rtx4070, h100)")
    args = ap.parse_args(argv)
    from fitgpt.planner.gpus import find_gpu

    rows = predictions(args.dtype, find_gpu(args.gpu) if args.gpu else None)
    if args.only:
        rows = [rows[i] for i in args.only]
    if args.dry_run:
        say(f"{len(rows)} configurations; predictions for CUDA {args.dtype} (no run):")
        say(markdown(rows))
        return 0
    set_allocator_env()
    import torch

    from fitgpt.planner.verify import verify

    if not torch.cuda.is_available():
        say("no CUDA device: use --dry-run on this machine")
        return 2
    total = torch.cuda.get_device_properties(0).total_memory
    if args.cap_gib > 0:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    meta = {"device": torch.cuda.get_device_name(0), "total_memory": total, "cap": args.cap_gib,
            "torch": torch.__version__, "dtype": args.dtype,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    say(f"{meta['device']}, allocator capped at {args.cap_gib} GiB, torch {torch.__version__}")
    for row in rows:
        t0 = time.perf_counter()
        cfg = seed_config(*row["setting"], dtype=args.dtype)
        res = verify(cfg, steps=3, catch_oom=True)
        for ph in ("train", "eval"):  # verify's prediction is for this very card
            row[ph].update(res[ph])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        say(f"{row['name']}: train {_cell(row['train'].get('measured_allocated'))}, eval "
            f"{_cell(row['eval'].get('measured_allocated'))} ({row['seconds']} s)")
        torch.cuda.reset_peak_memory_stats()
        done = [r for r in rows if "seconds" in r]  # after every row: a timeout keeps the earlier ones
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": done, "markdown": markdown(done)}, f, indent=2)
    say(markdown(rows))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
