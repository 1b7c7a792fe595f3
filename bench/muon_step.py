"""The optimizer step alone: train.optimizer=muon (torch's Muon on the blocks' matrices, AdamW on
the rest) against AdamW on everything, on the CPU, in one process.

Both runs are built with `fitgpt.train.build` (same seed, synthetic tokens), take one training
step (the optimizer state exists), then `optimizer.step()` is timed alone on the gradients of
that step, the two alternating, `--repeats` times; the ratio is the median of the ratios within
a repeat. Whole training steps (forward, backward, step) are what `fitgpt bench --variants
chunked,chunked+muon` compares.

    python bench/muon_step.py [--config bench-cpu] [--threads 1] [--steps 5] [--repeats 5] [overrides]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fitgpt.config.load import load_config
from fitgpt.planner.verify import SyntheticBatches
from fitgpt.train.build import build_training


def _step_seconds(tr, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.optimizer.step()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="bench-cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args, overrides = ap.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {}
    for opt in ("adamw", "muon"):
        cfg = load_config(args.config, [*overrides, "--train.device=cpu", f"--train.optimizer={opt}"])
        m = cfg.model
        tr = build_training(cfg, batches=SyntheticBatches(m.vocab_size, cfg.train.batch_size, m.block_size, 0),
                            compile=False)
        tr.step()  # the state exists; keep this step's gradients for the timed steps
        for p in tr.model.parameters():
            p.grad = torch.randn_like(p)
        runs[opt] = tr
    times: dict[str, list[float]] = {"adamw": [], "muon": []}
    for i in range(args.repeats):
        for opt in (("adamw", "muon") if i % 2 == 0 else ("muon", "adamw")):
            times[opt].append(_step_seconds(runs[opt], args.steps))
    ratio = statistics.median(a / b for a, b in zip(times["adamw"], times["muon"]))
    m = cfg.model
    print(f"{args.config}: {m.n_layer} layers, n_embd {m.n_embd}, vocab {m.vocab_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats x {args.steps} steps")
    for opt in ("adamw", "muon"):
        print(f"  {opt:5s} optimizer step: {statistics.median(times[opt]) * 1e3:9.1f} ms (median)")
    print(f"  muon step speed / adamw step speed: {ratio:.3f}x")


if __name__ == "__main__":
    main()
