"""Golden outputs: record what fitgpt prints for fixed inputs, then check a later tree against them.

For refactors that must not change behaviour (issue 14's restructure): `record` before, `check`
after. It stores, in one JSON file:
- `fitgpt plan --json` for configs covering the seed, GPT-2 124M, checkpointing, full logits,
  DDP with 2 processes, FSDP2, auto-fit, an eval-only nanoGPT file and a float16 CPU plan;
- with --demo, the built-in demo run's metrics.jsonl losses and summary.json peaks (the run is
  deterministic on a CPU; about 3 minutes on 2 cores).

    python bench/golden.py record /tmp/golden.json [--demo]
    python bench/golden.py check /tmp/golden.json [--demo]     # exit 1 and a diff on a change
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

EVAL_GPT2_LARGE = "batch_size = 8\neval_iters = 500\neval_only = True\nwandb_log = False\ninit_from = 'gpt2-large'\n"

PLANS = {
    "seed-77m": ["seed-77m", "--gpu", "rtx4070"],
    "seed-77m-full-logits": ["seed-77m", "--gpu", "rtx4070", "--memory.loss=full"],
    "gpt2-124m": ["gpt2-124m", "--gpu", "rtx4070"],
    "gpt2-124m-checkpointing": ["gpt2-124m", "--gpu", "rtx4090", "--memory.checkpointing=true"],
    "gpt2-124m-ddp2": ["gpt2-124m", "--gpu", "a100-80gb", "--parallel.nproc=2"],
    "gpt2-124m-fsdp2": ["gpt2-124m", "--gpu", "a100-80gb", "--parallel.nproc=2", "--parallel.mode=fsdp"],
    "seed-77m-fit": ["seed-77m", "--gpu", "rtx4070", "--memory.loss=full", "--fit"],
    "eval-gpt2-large-nanogpt-file": ["{eval_file}", "--gpu", "rtx4070"],
    "demo-cpu-float16": ["demo-gpt2", "--train.device=cpu", "--train.dtype=float16"],
}
# The GPT-2-recipe demo was the built-in `demo` when bench/golden-before-issue14.json was recorded;
# the default demo trains the modern recipe since issue 16, so the record compares demo-gpt2.
RENAMED = {"demo-gpt2": "demo"}


def fitgpt(args: list[str], cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "fitgpt", *args], cwd=cwd, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "200"})
    if out.returncode != 0:
        raise SystemExit(f"fitgpt {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def plans(work: Path) -> dict:
    eval_file = work / "eval_gpt2_large.py"
    eval_file.write_text(EVAL_GPT2_LARGE)
    result = {}
    for name, args in PLANS.items():
        args = [a.format(eval_file=eval_file) for a in args]
        text = fitgpt(["plan", *args, "--json"], work)
        plan = json.loads(text[text.index("{"):])
        plan["config"] = Path(str(plan.get("config"))).name  # the temp folder's name varies
        plan["config"] = RENAMED.get(plan["config"], plan["config"])
        result[name] = plan
    return result


def demo(work: Path) -> dict:
    fitgpt(["train", "demo-gpt2", f"--log.out_dir={work / 'runs'}", "--log.run_name=golden",
            "--log.progress=false"], work)
    run = work / "runs" / "golden"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    losses = [(r.get("kind"), r.get("step"), r.get("loss")) for r in records]
    summary = json.loads((run / "summary.json").read_text())
    return {"losses": losses, "peaks": {k: v for k, v in summary.items() if "peak" in k or "predicted" in k}}


def collect(with_demo: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out = {"plans": plans(work)}
        if with_demo:
            out["demo"] = demo(work)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["record", "check"])
    p.add_argument("file", type=Path)
    p.add_argument("--demo", action="store_true", help="also the demo run (about 3 minutes)")
    a = p.parse_args()
    now = collect(a.demo)
    if a.action == "record":
        a.file.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(now['plans'])} plans{' and the demo run' if a.demo else ''} in {a.file}")
        return 0
    old = json.loads(a.file.read_text())
    bad = [k for k in now["plans"] if old.get("plans", {}).get(k) != now["plans"][k]]
    if a.demo and old.get("demo") != json.loads(json.dumps(now["demo"])):
        bad.append("demo")
    for k in bad:
        print(f"changed: {k}")
    print("identical" if not bad else f"{len(bad)} of {len(now['plans']) + a.demo} outputs changed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
