"""Planner accuracy on the CPU: predicted vs measured (storage tracker) peak of a training step
and an evaluation pass over the test grid. Prints a markdown table.

    python bench/estimate_accuracy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_estimate import GRID, make_cfg, measure  # noqa: E402

from fitgpt.planner.estimate import estimate  # noqa: E402


def main() -> None:
    print("| layers | n_embd | vocab | block | batch | accum | loss | ckpt | bias | dropout | eval b x s "
          "| dtype | train measured MiB | predicted | error | eval measured MiB | predicted | error |")
    print("|" + "---|" * 18)
    worst = 0.0
    for row in GRID:
        *shape, dtype, dropout = row
        cfg = make_cfg(*shape, dropout=dropout)
        est = estimate(cfg, "cpu", dtype)
        train, ev = measure(cfg, dtype)
        et = (est.train.allocated - train) / train * 100
        ee = (est.eval.allocated - ev) / ev * 100
        worst = max(worst, abs(et), abs(ee))
        L, C, H, V, T, b, acc, loss, ck, bias, eb, eT = shape
        print(f"| {L} | {C} | {V} | {T} | {b} | {acc} | {loss} | {ck} | {bias} | {dropout} | "
              f"{cfg.eval_batch_size} x {cfg.eval_block_size} | {dtype} | {train / 2**20:.2f} | "
              f"{est.train.allocated / 2**20:.2f} | {et:+.2f}% | {ev / 2**20:.2f} | "
              f"{est.eval.allocated / 2**20:.2f} | {ee:+.2f}% |", flush=True)
    print(f"\nlargest error: {worst:.2f}%")


if __name__ == "__main__":
    main()
