"""memory.fused_backward on the CPU: the training step's peak measured (storage tracker, the
`fitgpt plan --verify` path) and predicted, with the lever and without it in the same run.

    python bench/fused_backward_memory.py            # the grid of tests/test_fused_backward.py
    python bench/fused_backward_memory.py --markdown

Each row: a small model whose state is large against its activations (n_layer 2, n_embd 128,
vocabulary 1024, 2 x 32 tokens per micro-batch), float32 or bfloat16, chunked or full loss,
checkpointing, accumulation, micro_split. The plain rows clip at 1.0 (the default); the fused
ones cannot (train.grad_clip=0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from test_fused_backward import GRID, verify_cfg  # noqa: E402

from fitgpt.planner.verify import verify  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    lines = ["| dtype | accum | loss | ckpt | bias | split | fused: measured | predicted | error "
             "| measured fused / plain | predicted fused / plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in GRID:
        dtype, accum, loss, ckpt, bias, split, _ = row
        cfg = verify_cfg(accum, loss, ckpt, bias, split)
        cfg.train.dtype = dtype
        fused = verify(cfg, steps=2)["train"]
        cfg.memory.fused_backward, cfg.train.grad_clip = False, 1.0
        plain = verify(cfg, steps=2)["train"]
        m, p = fused["measured_allocated"], fused["predicted_allocated"]
        lines.append(f"| {dtype} | {accum} | {loss} | {ckpt} | {bias} | {split} | {m / 2**20:.2f} MiB "
                     f"| {p / 2**20:.2f} MiB | {fused['error_allocated_pct']:+.2f} % "
                     f"| {m / plain['measured_allocated']:.3f} | {p / plain['predicted_allocated']:.3f} |")
    print("\n".join(lines if args.markdown else [ln.replace("|", " ") for ln in lines if "---" not in ln]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
