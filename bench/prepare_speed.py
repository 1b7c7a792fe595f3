"""Speed of `fitgpt prepare`'s pipeline against tiktoken itself, on the King James chapters.

Measures tokens/s of:
  * tiktoken's own ``encode_ordinary_batch`` on the same documents, with one thread (the same
    one core the pipeline's single worker uses) and with its default 8 threads;
  * the whole pipeline (chunking, tokenizing, shard buffers, atomic shard writes with sha256,
    manifest) with one worker (in this process) and with two worker processes.

The pipeline's time is end to end (pool start-up included); "steady" counts from the first
tokenized chunk to the last, which leaves out the pool's start-up (each spawned worker imports
tiktoken and loads the GPT-2 files; forked workers, fitgpt's choice on Linux, inherit them).
Each figure is the best of --repeat runs, because a shared machine is noisy. Prints a markdown
table.

    .venv/bin/python bench/prepare_speed.py [--copies 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fitgpt.data.prepare.demo import kjv_chapters, kjv_path
from fitgpt.data.prepare.pipeline import prepare_shards
from fitgpt.data.prepare.sources import ListSource
from fitgpt.data.tokenizer import gpt2_encoding


class Clock:
    """A progress reporter that remembers when the first and the last chunk came back."""

    def __init__(self) -> None:
        self.first = self.last = None
        self.tokens = self.first_tokens = 0

    def advance(self, records: int, documents: int, tokens: int, nbytes: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first, self.first_tokens = now, tokens
        self.last = now
        self.tokens += tokens

    def shard_done(self, entry: dict) -> None:
        pass

    def steady(self) -> float:
        if self.first is None or self.last == self.first:
            return float("nan")
        return (self.tokens - self.first_tokens) / (self.last - self.first)


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process and by its finished (reaped) children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def run_pipeline(docs: list[str], workers: int, root: Path, start: str = "") -> dict:
    """Rates, CPU seconds and shard sha256s of one preparation; ``start``: how worker processes
    start (default: fitgpt's choice, fork on Linux)."""
    os.environ["FITGPT_PREPARE_START"] = start
    out = root / f"w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    manifest = prepare_shards(ListSource(docs, {"kind": "bench"}), out, "kjv", val_tokens=100_000,
                              shard_tokens=1_000_000, workers=workers, report=clock)
    dt = time.perf_counter() - t0
    cpu1 = cpu_seconds()
    text_tokens = manifest["total_tokens"] - manifest["documents"]  # EOTs left out, as for tiktoken
    return {"rate": text_tokens / dt, "steady": clock.steady(), "wall": dt,
            "main_cpu": cpu1[0] - cpu0[0], "worker_cpu": cpu1[1] - cpu0[1],
            "sha256": [e["sha256"] for e in manifest["shards"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=3, help="copies of the 1,189 KJV chapters (about 1M tokens each)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best is kept")
    args = ap.parse_args()
    chapters = kjv_chapters(kjv_path())
    docs = chapters * args.copies
    random.Random(0).shuffle(docs)
    enc = gpt2_encoding()
    n_tokens = sum(len(t) for t in enc.encode_ordinary_batch(docs[:50]))  # warm-up
    best: dict[str, float] = {}
    steady: dict[str, float] = {}
    hashes: dict[str, list[str]] = {}
    cpu: dict[str, dict] = {}
    batch_cpu = w1_cpu = float("inf")
    root = Path(tempfile.mkdtemp(prefix="fitgpt-bench-"))
    try:
        for _ in range(args.repeat):
            for threads in (1, 8):
                cpu0, start = sum(cpu_seconds()), time.perf_counter()
                n_tokens = sum(len(t) for t in enc.encode_ordinary_batch(docs, num_threads=threads))
                rate = n_tokens / (time.perf_counter() - start)
                best[f"batch{threads}"] = max(best.get(f"batch{threads}", 0.0), rate)
                if threads == 1:
                    batch_cpu = min(batch_cpu, sum(cpu_seconds()) - cpu0)
            for key, workers, start in (("w1", 1, ""), ("w2", 2, ""), ("w2spawn", 2, "spawn")):
                r = run_pipeline(docs, workers, root, start)
                if r["rate"] > best.get(key, 0.0):
                    cpu[key] = r
                best[key] = max(best.get(key, 0.0), r["rate"])
                steady[key] = max(steady.get(key, 0.0), r["steady"])
                hashes[key] = r["sha256"]
                if key == "w1":
                    w1_cpu = min(w1_cpu, r["main_cpu"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = best["batch1"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"input: {len(docs):,} KJV chapters ({args.copies} copies), {n_tokens:,} tokens + {len(docs):,} EOT; "
          f"{cores} cores; load average {os.getloadavg()[0]:.1f}; best of {args.repeat}")
    print()
    print("| what | tokens/s | vs tiktoken batch, 1 thread |")
    print("|---|---:|---:|")
    rows = [
        ("tiktoken `encode_ordinary_batch`, num_threads=1", best["batch1"]),
        ("tiktoken `encode_ordinary_batch`, default 8 threads", best["batch8"]),
        ("`fitgpt prepare` pipeline, 1 worker, end to end", best["w1"]),
        ("`fitgpt prepare` pipeline, 2 workers (fork), end to end", best["w2"]),
        ("`fitgpt prepare` pipeline, 2 workers (spawn), end to end", best["w2spawn"]),
        ("`fitgpt prepare` pipeline, 2 workers (spawn), steady (after pool start)", steady["w2spawn"]),
    ]
    for label, rate in rows:
        print(f"| {label} | {rate / 1e6:.2f}M | {rate / base:.2f}x |")
    print()
    print("| pipeline run (the best one) | wall s | main process CPU s | worker processes CPU s |")
    print("|---|---:|---:|---:|")
    for key, label in (("w1", "1 worker"), ("w2", "2 workers (fork)"), ("w2spawn", "2 workers (spawn)")):
        r = cpu[key]
        print(f"| {label} | {r['wall']:.2f} | {r['main_cpu']:.2f} | {r['worker_cpu']:.2f} |")
    print()
    print(f"least CPU seconds for the documents: tiktoken batch (1 thread) {batch_cpu:.2f}, pipeline (1 worker) "
          f"{w1_cpu:.2f}: {batch_cpu / w1_cpu:.2f}x tiktoken's rate per CPU second")
    print(f"2 workers vs 1: {best['w2'] / best['w1']:.2f}x end to end (fork), "
          f"{best['w2spawn'] / best['w1']:.2f}x (spawn), {steady['w2spawn'] / steady['w1']:.2f}x steady (spawn); "
          f"identical shards: {hashes['w1'] == hashes['w2'] == hashes['w2spawn']}")


if __name__ == "__main__":
    main()
