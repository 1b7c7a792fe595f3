"""Shared fixtures: tiny token shards and tiny configs, so every test runs in seconds on a CPU."""

from __future__ import annotations

import numpy as np
import pytest

from fitgpt.config.schema import Config
from fitgpt.data.shards import write_shard


def make_tokens(n: int, vocab: int, seed: int) -> np.ndarray:
    """A learnable stream: the same random 'sentence' of 32 tokens repeated, with 10 % noise
    that differs by seed."""
    base = np.random.default_rng(123).integers(0, vocab, size=32)
    rng = np.random.default_rng(seed)
    toks = np.tile(base, n // 32 + 1)[:n]
    noise = rng.random(n) < 0.1
    toks[noise] = rng.integers(0, vocab, size=int(noise.sum()))
    return toks.astype(np.uint16)


@pytest.fixture
def shard_dir(tmp_path):
    """llm.c-format shards: one val shard and two train shards, ids below 256."""
    d = tmp_path / "shards"
    d.mkdir()
    write_shard(d / "tiny_val_000000.bin", make_tokens(4096, 256, 0))
    write_shard(d / "tiny_train_000001.bin", make_tokens(20000, 256, 1))
    write_shard(d / "tiny_train_000002.bin", make_tokens(20000, 256, 2))
    return d


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test writes to the user's cache or the working directory's runs/."""
    monkeypatch.setenv("FITGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def tiny_config(data_dir, out_dir, **over) -> Config:
    """2 layers, n_embd 32, block 32, vocab 256: a training step takes milliseconds."""
    cfg = Config(name="tiny")
    m, t, e, lg = cfg.model, cfg.train, cfg.eval, cfg.log
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 2, 2, 32, 32, 256
    t.batch_size, t.grad_accum, t.max_steps, t.lr, t.min_lr, t.warmup_steps = 4, 2, 6, 3e-3, 3e-4, 2
    t.device, t.dtype = "cpu", "float32"
    e.interval, e.tokens, e.batch_size = 3, 512, 5
    lg.out_dir, lg.run_name, lg.interval, lg.progress = str(out_dir), "run", 1, False
    cfg.data.dir = str(data_dir)
    cfg.memory.loss_chunk = 48
    for key, value in over.items():
        sec, name = key.split("__")
        setattr(getattr(cfg, sec), name, value)
    return cfg


def train_losses(run_dir) -> list[float]:
    """The training losses a run wrote to its metrics.jsonl, in order."""
    import json
    from pathlib import Path

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def torchrun_train(config_path) -> None:
    """`fitgpt train CONFIG` in 2 real gloo processes under torchrun; fails the test on a non-zero exit."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fitgpt", "train", str(config_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def count_timeline_allocs(monkeypatch) -> list:
    """Patch the planner's Timeline.alloc to append 1 to the returned list on every call."""
    from fitgpt.planner.timeline import Timeline

    calls: list = []
    real = Timeline.alloc

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Timeline, "alloc", counting)
    return calls
