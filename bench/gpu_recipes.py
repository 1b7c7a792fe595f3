"""GPT-2 124M on FineWeb, both recipes, on one CUDA card: val loss against tokens and wall time.

Needs a prepared FineWeb slice (on a machine with network: `fitgpt prepare fineweb --tokens
200M --out OUT`; carry OUT to the GPU machine). Trains `gpt2-124m` three times for the same
steps and tokens: as shipped (GPT-2's recipe), with the modern options of the built-in `demo` config (read
from it, so this measures what ships: rotary, QK-norm, untied head, Muon), and with every
speedrun option fitgpt has (modern plus ReLU^2, RMSNorm, zero-init and the soft cap, which the
CPU benchmark at the demo's scale did not support; 124M is where the sources measured them),
each from the same seed. It prints and writes the val loss at every evaluation with its token
count and wall time, and the tokens each recipe needs to reach the GPT-2 recipe's final val loss.

    python bench/gpu_recipes.py DATA_DIR --steps 2000 --out gpu_recipes.json
    python bench/gpu_recipes.py DATA_DIR --dry-run        # the three command lines only
    python bench/gpu_recipes.py DATA_DIR --runs gpt2 modern   # two of them
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitgpt.config.load import load_config, to_dict  # noqa: E402

OPTIONS = {"model": ("position", "qk_norm", "mlp", "norm", "tie_embeddings", "zero_init", "logit_softcap"),
           "train": ("optimizer", "muon_lr", "muon_momentum", "muon_momentum_warmup")}


SPEEDRUN_EXTRA = ["--model.mlp=relu2", "--model.norm=rmsnorm", "--model.zero_init=true",
                  "--model.logit_softcap=15.0"]


def modern_overrides() -> list[str]:
    """The modern options as `--section.key=value`, read from the shipped demo config."""
    d = to_dict(load_config("demo", []))
    return [f"--{s}.{k}={str(d[s][k]).lower() if isinstance(d[s][k], bool) else d[s][k]}"
            for s, keys in OPTIONS.items() for k in keys]


def command(data: str, steps: int, out_dir: str, name: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fitgpt", "train", "gpt2-124m", f"--data.dir={data}",
            f"--train.max_steps={steps}", f"--eval.interval={max(1, steps // 10)}",
            f"--log.out_dir={out_dir}", f"--log.run_name={name}", "--log.progress=false",
            "--memory.fit=auto", *extra]


def curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"]}
            for r in rows if r.get("kind") == "eval"]


def tokens_to_reach(points: list[dict], target: float) -> float | None:
    """Linear interpolation between evaluations: the first token count with val loss <= target."""
    for a, b in zip(points, points[1:]):
        if b["val_loss"] <= target < a["val_loss"]:
            f = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return a["tokens"] + f * (b["tokens"] - a["tokens"])
    return points[0]["tokens"] if points and points[0]["val_loss"] <= target else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="gpu_recipes.json")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--runs", nargs="+", default=["gpt2", "modern", "speedrun"],
                    choices=["gpt2", "modern", "speedrun"], help="gpt2 is the baseline and always runs")
    args = ap.parse_args()
    out_dir = tempfile.mkdtemp(prefix="fitgpt_recipes_")
    modern = modern_overrides()
    every = {"gpt2": [], "modern": modern, "speedrun": [o for o in modern if o.split("=")[0] not in
                                                        {e.split("=")[0] for e in SPEEDRUN_EXTRA}] + SPEEDRUN_EXTRA}
    runs = {k: v for k, v in every.items() if k == "gpt2" or k in args.runs}
    result: dict = {"steps": args.steps, "runs": {}}
    for name, extra in runs.items():
        cmd = command(args.data, args.steps, out_dir, name, extra)
        print(" ".join(cmd[1:]), flush=True)
        if args.dry_run:
            continue
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        result["runs"][name] = {"wall_seconds": time.perf_counter() - t0, "evals": curve(Path(out_dir) / name)}
        Path(args.out).write_text(json.dumps(result, indent=1))  # a stopped session keeps its runs
    if not args.dry_run:
        gpt2 = result["runs"]["gpt2"]["evals"]
        target = result["gpt2_final_val_loss"] = gpt2[-1]["val_loss"]
        for name in runs:
            if name != "gpt2":
                reach = tokens_to_reach(result["runs"][name]["evals"], target)
                result[f"{name}_tokens_to_reach_it"] = reach
                result[f"{name}_ratio"] = None if reach is None else reach / gpt2[-1]["tokens"]
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
