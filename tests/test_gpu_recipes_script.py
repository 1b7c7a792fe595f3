"""bench/gpu_recipes.py, the GPU comparison of the two recipes, works without a GPU as far as it can:
its dry run names the three runs, the modern one with exactly the shipped demo's options, and its
tokens-to-reach arithmetic interpolates between evaluations."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("gpu_recipes", ROOT / "bench" / "gpu_recipes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_names_the_recipes(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_recipes.py"), str(tmp_path), "--dry-run",
                          "--steps", "100"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    gpt2, modern, speedrun = res.stdout.strip().splitlines()
    assert "gpt2-124m" in gpt2 and "--log.run_name=gpt2" in gpt2 and "--model." not in gpt2
    for opt in load().modern_overrides():
        assert opt in modern.split()
    assert "--train.optimizer=muon" in modern and "--model.position=rotary" in modern
    assert "--model.mlp=gelu" in modern and "--model.mlp=relu2" in speedrun.split()
    assert "--model.mlp=gelu" not in speedrun and "--train.optimizer=muon" in speedrun


def test_tokens_to_reach_interpolates():
    g = load()
    pts = [{"tokens": 0, "val_loss": 10.0}, {"tokens": 100, "val_loss": 6.0}, {"tokens": 200, "val_loss": 4.0}]
    assert g.tokens_to_reach(pts, 5.0) == 150.0
    assert g.tokens_to_reach(pts, 6.0) == 100.0
    assert g.tokens_to_reach(pts, 3.0) is None
