"""Selective activation checkpointing on the CPU: measured training peak (storage tracker) and
step time for none, every k-th and every block checkpointed, as ratios against no
checkpointing measured in the same run, beside the planner's prediction and its recompute
fraction. fitgpt's own step (`fitgpt.train.step.train_step`) on synthetic tokens.

    python bench/selective_ckpt_cpu.py                  # 6 layers, n_embd 128, 8 x 128 tokens
    python bench/selective_ckpt_cpu.py --layers 12 --repeats 5

Step times on a shared CPU are noisy: the median of --repeats steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fitgpt.config.schema import Config
from fitgpt.console import fmt_bytes, say
from fitgpt.model.runtime import Runtime, build_model
from fitgpt.planner.activations import recompute_fraction
from fitgpt.planner.estimate import estimate
from fitgpt.planner.tracker import StorageTracker
from fitgpt.planner.verify import SyntheticBatches
from fitgpt.train.step import train_step


def config(args, every: int | None) -> Config:
    cfg = Config()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = args.layers, 4, args.width, args.block, 2048
    m.dropout = args.dropout
    cfg.train.batch_size, cfg.train.grad_accum = args.batch, 1
    cfg.memory.checkpointing = every is not None
    cfg.memory.checkpoint_every = every or 1
    return cfg


def measure(cfg: Config, repeats: int) -> tuple[int, float]:
    """(tracker peak of a steady-state step, median seconds per step)."""
    rt = Runtime(torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    batches = SyntheticBatches(cfg.model.vocab_size, cfg.train.batch_size, cfg.model.block_size)

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(model, opt, scaler, batches, 1, 1.0, rt)  # AdamW state exists from here on
    tracker = StorageTracker("cpu")
    tracker.add(model)
    tracker.add(opt)
    with tracker:
        train_step(model, opt, scaler, batches, 1, 1.0, rt)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_step(model, opt, scaler, batches, 1, 1.0, rt)
        times.append(time.perf_counter() - t0)
    return tracker.peak, statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    say(f"{args.layers} layers, n_embd {args.width}, batch {args.batch} x {args.block}, fp32, "
        f"dropout {args.dropout:g}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    say("| checkpointing | recompute fraction | measured peak | vs none | predicted | error | "
        "step time | vs none |")
    say("|---|---|---|---|---|---|---|---|")
    base = None
    for every in (None, args.layers, 3, 2, 1):
        cfg = config(args, every)
        peak, secs = measure(cfg, args.repeats)
        pred = estimate(cfg, "cpu", "float32").train.allocated
        base = base or (peak, secs)
        name = "none" if every is None else f"checkpoint_every={every}"
        say(f"| {name} | {recompute_fraction(cfg):.2f} | {fmt_bytes(peak)} | {peak / base[0]:.2f}x | "
            f"{fmt_bytes(pred)} | {100 * (pred - peak) / peak:+.2f}% | {secs * 1e3:.0f} ms | "
            f"{secs / base[1]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
