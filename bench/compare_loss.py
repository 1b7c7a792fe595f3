"""The chunked loss of a git revision against the working tree's, inside one `fitgpt bench` run.

    python bench/compare_loss.py 6298b10 --chunks 256,2048 --repeats 3 --steps 2 [--section.key=value ...]

Variants: full_logits, then for every chunk size `REV:N` (fitgpt/model/loss.py as it was at REV) and
`now:N` (as it is now), all on the bench config (default bench-cpu), in one process, order
alternating over repeats, so the speed ratios compare the two implementations under the same
machine load. Used for the loss.py changes recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fitgpt.model.gpt as model_module  # noqa: E402
import fitgpt.train.bench as bench  # noqa: E402
from fitgpt.config.load import load_config  # noqa: E402
from fitgpt.console import console, say


def loss_at(rev: str) -> types.ModuleType:
    """fitgpt/model/loss.py as it was at a git revision, as a module."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:fitgpt/model/loss.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"loss_{rev}")
    exec(compile(src, f"{rev}:fitgpt/model/loss.py", "exec"), mod.__dict__)  # our own file, from git
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev", help="git revision whose fitgpt/model/loss.py is compared")
    ap.add_argument("--config", default=None, help="bench config (default bench-cpu)")
    ap.add_argument("--chunks", default="256,2048")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args, overrides = ap.parse_known_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    impls = {"now": model_module.chunked_cross_entropy,
             args.rev: loss_at(args.rev).chunked_cross_entropy}
    variants = [bench.Variant("full_logits", "full")]
    for c in (int(x) for x in args.chunks.split(",")):
        variants += [bench.Variant(f"{args.rev}:{c}", "chunked", chunk=c),
                     bench.Variant(f"now:{c}", "chunked", chunk=c)]
    apply, one_run = bench.Variant.apply, bench._one_run

    def tagged_apply(self, cfg):
        out = apply(self, cfg)
        out.name = self.name  # which implementation to run, read back below
        return out

    def swapped_run(cfg, *a, **kw):
        model_module.chunked_cross_entropy = impls.get(cfg.name.split(":")[0], impls["now"])
        try:
            return one_run(cfg, *a, **kw)
        finally:
            model_module.chunked_cross_entropy = impls["now"]

    bench.Variant.apply, bench._one_run = tagged_apply, swapped_run
    cfg = load_config(args.config, overrides, default="bench-cpu")
    result = bench.run_bench(cfg, variants, args.steps, args.warmup, args.repeats,
                             progress=lambda t: say(f"compare: {t}"))
    result["command"] = " ".join(["python", "bench/compare_loss.py", *(argv or sys.argv[1:])])
    say(f"$ {result['command']}")
    bench.render(result, console)
    say(bench.markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
