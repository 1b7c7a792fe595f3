"""Each memory lever of issue 15: its model state per parameter (the planner) and its training
speed against plain AdamW, measured in the same run.

    python bench/levers.py                          # every lever, timed where it runs here
    python bench/levers.py --steps 6 --repeats 3 --out levers.json --markdown

One row per lever (`LEVERS`: a name and the config overrides that switch it on; a lever that
only runs on some device types says which). For each row:
- **planner**: bytes per parameter of model state at the training peak on a card (weights,
  gradients, AdamW state and autocast's weight copies alive there) and in host memory, for
  `--plan-config` (default GPT-2 124M) on `--gpu` (default rtx4070), from `fitgpt.planner`
  (no torch, no GPU);
- **measured**: tokens/s of the training step `fitgpt train` runs (`build_training`, seeded
  synthetic tokens, eager) for `--config` (default bench-cpu: 4 layers, n_embd 128, the GPT-2
  vocabulary) on this machine's device, and its ratio to the plain-AdamW row timed in the same
  run: the rows take turns (order reversed every repeat, `warmup` untimed steps each time) and
  the ratio is the median over repeats of the ratio within a repeat, so a machine that slows
  down for a while weighs on both sides.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from fitgpt.config.load import load_config
from fitgpt.console import say
from fitgpt.errors import ConfigError
from fitgpt.planner.estimate import estimate
from fitgpt.planner.gpus import find_gpu

MODEL_STATE = ("weights", "gradients", "optimizer state", "autocast weight copies")


@dataclass(frozen=True)
class Lever:
    """One row: the overrides (`--section.key=value`) that switch the lever on."""

    name: str
    overrides: tuple[str, ...] = ()
    runs_on: tuple[str, ...] = ("cpu", "cuda")  # device types where it can be timed
    note: str = ""


BASELINE = Lever("plain AdamW (fp32 state)")
LEVERS: list[Lever] = [
    BASELINE,
    Lever("8-bit AdamW state", ("--memory.optimizer_state=8bit",),
          note="bitsandbytes; the CPU step written out in PyTorch operators"),
    Lever("optimizer offloaded to host", ("--memory.offload_optimizer=true", "--train.dtype=bfloat16"),
          runs_on=("cuda",), note="bfloat16 weights and gradients on the card; fp32 masters + AdamW on the CPU"),
    Lever("offloaded, 8-bit host state", ("--memory.offload_optimizer=true", "--memory.optimizer_state=8bit",
                                         "--train.dtype=bfloat16"), runs_on=("cuda",)),
    Lever("fused backward (AdamW in backward)", ("--memory.fused_backward=true", "--train.grad_clip=0"),
          note="one AdamW step per parameter in its gradient hook; no clipping (the baseline clips)"),
    Lever("every 2nd block checkpointed", ("--memory.checkpointing=true", "--memory.checkpoint_every=2"),
          note="activations, not model state: half the blocks' forward recomputed in backward"),
    Lever("activation offload", ("--memory.activation_offload=true", "--train.dtype=bfloat16"),
          runs_on=("cuda",), note="activations, not model state: saved tensors to pinned host memory"),
]


@dataclass
class Row:
    lever: Lever
    card_bpp: float | None = None  # model state on the card at the training peak, bytes/param
    host_bpp: float = 0.0
    plan_error: str | None = None
    tps: list[float] = field(default_factory=list)  # tokens/s per repeat
    ratios: list[float] = field(default_factory=list)  # against the baseline, per repeat


def plan_row(row: Row, config: str, gpu: str) -> None:
    """The planner's bytes per parameter for the lever on the card."""
    try:
        cfg = load_config(config, list(row.lever.overrides))
        est = estimate(cfg, "cuda", None if cfg.train.dtype != "auto" else "bfloat16", find_gpu(gpu))
    except ConfigError as e:
        row.plan_error = str(e)
        return
    state = sum(p.bytes for p in est.train.parts if p.name in MODEL_STATE)
    row.card_bpp = state / est.params
    row.host_bpp = sum(p.bytes for p in est.host if p.name != "optimizer step") / est.params


def time_one(config: str, overrides: tuple[str, ...], device: str | None, steps: int, warmup: int) -> float:
    """Tokens/s of `steps` training steps after `warmup` (fitgpt's own step)."""
    import torch

    from fitgpt.planner.verify import SyntheticBatches
    from fitgpt.train.build import build_training

    extra = [f"--train.device={device}"] if device else []
    cfg = load_config(config, [*overrides, *extra])
    batches = SyntheticBatches(cfg.model.vocab_size, cfg.train.batch_size, cfg.model.block_size, 0)
    tr = build_training(cfg, batches=batches, compile=False)
    for _ in range(warmup):
        tr.step()
    tr.rt.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.step()
    tr.rt.synchronize()
    seconds = time.perf_counter() - t0
    tokens = steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    del tr
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return tokens / seconds


def measure(rows: list[Row], config: str, device: str | None, steps: int, warmup: int, repeats: int) -> str:
    """Time the rows that run on this device, alternating their order; the device type."""
    from fitgpt.model.runtime import resolve_runtime

    cfg = load_config(config, [f"--train.device={device}"] if device else [])
    dtype = resolve_runtime(cfg.train.device, cfg.train.dtype).device_type
    timed = [r for r in rows if dtype in r.lever.runs_on and r.plan_error is None]
    for k in range(repeats):
        order = timed if k % 2 == 0 else timed[::-1]
        got = {}
        for r in order:
            say(f"repeat {k + 1}/{repeats}: {r.lever.name}")
            got[r.lever.name] = time_one(config, r.lever.overrides, device, steps, warmup)
            r.tps.append(got[r.lever.name])
        for r in timed:
            r.ratios.append(got[r.lever.name] / got[BASELINE.name])
    return dtype


def markdown(rows: list[Row], device: str | None) -> str:
    lines = ["| lever | model state on the card (B/param) | host (B/param) | tokens/s | vs plain AdamW |",
             "|---|---|---|---|---|"]
    for r in rows:
        card = f"{r.card_bpp:.2f}" if r.card_bpp is not None else f"refused: {r.plan_error}"
        host = f"{r.host_bpp:.2f}" if r.host_bpp else "-"
        if r.tps:
            speed, ratio = f"{statistics.median(r.tps):,.0f}", f"{statistics.median(r.ratios):.3f}x"
        else:
            why = "not timed" if device is None else f"runs on {'/'.join(r.lever.runs_on)} only"
            speed, ratio = why, "-"
        lines.append(f"| {r.lever.name} | {card} | {host} | {speed} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="bench-cpu", help="the config timed on this machine")
    ap.add_argument("--device", default=None, help="train.device for the timing (default: the config's)")
    ap.add_argument("--plan-config", default="gpt2-124m", help="the config the planner counts")
    ap.add_argument("--gpu", default="rtx4070", help="the card the planner counts for")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-timing", action="store_true", help="the planner's columns only (no torch)")
    ap.add_argument("--out", help="JSON file for the results")
    args = ap.parse_args(argv)
    rows = [Row(lever) for lever in LEVERS]
    for r in rows:
        plan_row(r, args.plan_config, args.gpu)
    device = None if args.no_timing else measure(rows, args.config, args.device, args.steps,
                                                 args.warmup, args.repeats)
    table = markdown(rows, device)
    say(f"planner: {args.plan_config} on {args.gpu}; timed: {args.config} on {device or 'nothing'} "
        f"({args.steps} steps after {args.warmup}, {args.repeats} repeats)")
    say(table)
    if args.out:
        data: dict[str, Any] = {"args": vars(args), "device": device, "markdown": table, "rows": [
            {"lever": r.lever.name, "overrides": list(r.lever.overrides), "card_bytes_per_param": r.card_bpp,
             "host_bytes_per_param": r.host_bpp, "plan_error": r.plan_error, "tokens_per_s": r.tps,
             "ratio_to_plain": r.ratios} for r in rows]}
        with open(args.out, "w") as f:
            json.dump(data, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
