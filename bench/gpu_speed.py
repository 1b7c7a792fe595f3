"""Speed on one GPU: the figures `fitgpt bench` cannot measure on a CPU-only machine.

Run on a CUDA machine (written for an H100; about 8-10 minutes with compilation; --parts picks
some of them):

    python bench/gpu_speed.py --out gpu_speed.json

Four parts, each a `fitgpt.train.bench.run_bench` call (warm-up, timed steps, one evaluation per
variant, order alternating over repeats, ratios within a repeat):

1. `124m`: GPT-2 124M (`gpt2-124m`: 12 layers, n_embd 768, block 1024), bfloat16, compiled,
   micro-batch 16: chunked loss against full logits. Target: MFU >= 45 % against the card's
   dense 16-bit peak (989 TFLOP/s for an H100 SXM in fitgpt's card table).
2. `seed`: the seed's 77M model (`seed-77m`, float16, micro-batch 16) with the caching allocator
   capped at 12 GiB (`set_per_process_memory_fraction`, the seed's RTX 4070): the chunked loss at
   batch 16 against the full-logits path at the largest micro-batch that fits the same cap
   (found by the planner's estimate, then confirmed by `fitgpt.planner.verify` before timing).
3. `chunks`: GPT-2 124M, bfloat16, eager (no compile, so that it is quick): full logits and the
   chunked loss at 512, 1024, 2048 and 4096 rows per chunk, for the CUDA default of
   memory.loss_chunk.
4. `sync`: the cost of train_step's one host sync per optimizer step (the loss, the gradient
   norm and the wish to stop, read together by `fitgpt.train.step.host_values`), by timing the 124M
   chunked run with it replaced by host-side zeros (an experiment only; training keeps it).

`--dry-run` prints what would run, with the planner's predictions, without a GPU. Part 1 from
the command line (part 2 needs the allocator cap, which only this script sets):

    fitgpt bench gpt2-124m --train.batch_size=16 --train.grad_accum=2 --train.dtype=bfloat16 \
        --eval.batch_size=16 --variants chunked+compile,full_logits+compile --steps 10 \
        --warmup 2 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fitgpt.cli.main import set_allocator_env  # noqa: E402
from fitgpt.config.load import load_config  # noqa: E402
from fitgpt.console import fmt_bytes, say
from fitgpt.planner.estimate import estimate  # noqa: E402
from fitgpt.train.bench import Variant, markdown, run_bench  # noqa: E402

CAP = 12 * 2**30
SEED_BATCHES = (16, 12, 8, 6, 4, 2, 1)


def config_124m(accum: int):
    return load_config("gpt2-124m", ["--train.batch_size=16", f"--train.grad_accum={accum}",
                                     "--train.dtype=bfloat16", "--eval.batch_size=16"])


def config_seed(accum: int):
    return load_config("seed-77m", [f"--train.grad_accum={accum}"])


def full_batch_candidates(accum: int) -> list[tuple[int, int]]:
    """(batch, predicted total bytes) of the full-logits path, largest first, predicted to fit."""
    out = []
    for b in SEED_BATCHES:
        cfg = Variant("full", "full", batch=b).apply(config_seed(accum))
        est = estimate(cfg, "cuda", "float16")
        total = max(est.train.total, est.eval.total)
        if total <= CAP:
            out.append((b, total))
    return out


@contextlib.contextmanager
def no_finite_check():
    """train_step's one host sync replaced by zeros (finite, no wish to stop): experiment only."""
    import fitgpt.train.step

    real = fitgpt.train.step.host_values
    fitgpt.train.step.host_values = lambda t: [0.0] * t.numel()  # numel() is known on the host
    try:
        yield
    finally:
        fitgpt.train.step.host_values = real


def part_124m(args) -> dict[str, Any]:
    cfg = config_124m(args.accum)
    vs = [Variant("chunked+compile", "chunked", compile=True),
          Variant("full_logits+compile", "full", compile=True)]
    return run_bench(cfg, vs, args.steps, args.warmup, args.repeats, progress=lambda t: say(f"124m: {t}"))


def part_seed(args) -> dict[str, Any]:
    import torch

    from fitgpt.planner.verify import verify

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP / total))
    cfg = config_seed(args.accum)
    chosen = None
    for b, predicted in full_batch_candidates(args.accum):
        res = verify(Variant("full", "full", batch=b).apply(cfg), steps=2, catch_oom=True)
        fits = res["oom"] is None
        say(f"seed: full logits at batch {b}: predicted {fmt_bytes(predicted)}, "
            f"{'fits' if fits else 'out of memory'} under the 12 GiB cap")
        torch.cuda.empty_cache()
        if fits:
            chosen = b
            break
    vs = [Variant("chunked+batch:16", "chunked", batch=16)]
    if chosen is not None:
        vs.append(Variant(f"full_logits+batch:{chosen}", "full", batch=chosen))
    out = run_bench(cfg, vs, args.steps, args.warmup, args.repeats, progress=lambda t: say(f"seed: {t}"))
    out["cap_bytes"] = CAP
    torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def part_chunks(args) -> dict[str, Any]:
    cfg = config_124m(args.accum)
    vs = [Variant("full_logits", "full")] + [Variant(f"chunked:{c}", "chunked", chunk=c)
                                             for c in (512, 1024, 2048, 4096)]
    return run_bench(cfg, vs, args.steps, 1, args.repeats, progress=lambda t: say(f"chunks: {t}"))


def part_sync(args) -> dict[str, Any]:
    cfg = config_124m(args.accum)
    v = [Variant("chunked+compile", "chunked", compile=True)]
    times: dict[str, list[float]] = {"with check": [], "without": []}
    for r in range(args.repeats):
        for name in (("with check", "without") if r % 2 == 0 else ("without", "with check")):
            ctx = no_finite_check() if name == "without" else contextlib.nullcontext()
            with ctx:
                res = run_bench(cfg, v, args.steps, args.warmup, 1)
            times[name].append(res["rows"][0]["tokens_per_s"])
    ratio = statistics.median(a / b for a, b in zip(times["with check"], times["without"]))
    return {"tokens_per_s": times, "with_over_without": ratio}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_speed.json", help="JSON file for the results")
    ap.add_argument("--parts", default="124m,seed,chunks,sync", help="which parts, comma-separated")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile: >= 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--dry-run", action="store_true", help="print the plan only (no GPU needed)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if args.dry_run:
        say(f"parts {parts}; {args.repeats} repeats x ({args.warmup} warm-up + {args.steps} steps), "
            f"accum {args.accum}")
        cands = full_batch_candidates(args.accum)
        say("seed, full logits, batches predicted to fit 12 GiB: "
            + ", ".join(f"{b} ({fmt_bytes(t)})" for b, t in cands))
        return 0
    set_allocator_env()
    import torch

    if not torch.cuda.is_available():
        say("no CUDA device: use --dry-run on this machine")
        return 2
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                               "args": vars(args)}
    for part, fn in (("124m", part_124m), ("seed", part_seed), ("chunks", part_chunks),
                     ("sync", part_sync)):
        if part not in parts:
            continue
        t0 = time.perf_counter()
        results[part] = fn(args)
        results[part]["seconds"] = round(time.perf_counter() - t0, 1)
        if "rows" in results[part]:
            say(markdown(results[part]))
        else:
            say(f"sync: tokens/s with the check / without: {results[part]['with_over_without']:.4f}")
        with open(args.out, "w") as f:  # after every part: a later failure keeps the earlier ones
            json.dump(results, f, indent=2)
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
