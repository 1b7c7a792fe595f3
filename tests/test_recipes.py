"""The modern recipe as shipped: the built-in demo (the default) and seed-77m-modern configs
against demo-gpt2 and seed-77m, the documented option set, a tiny CPU run of every speedrun
option at once, and bench/recipes.py's variants and arithmetic."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from fitgpt.config.load import check, load_config, to_dict
from fitgpt.data.shards import find_splits, read_shard, write_shard
from fitgpt.train.trainer import run

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import recipes  # noqa: E402  (bench/recipes.py)

# The modern recipe, as docs/performance.md ("Recipes") gives it, and every option of the
# speedrun records that fitgpt has (the modern recipe keeps those that measured better).
MODERN = {"model.position": "rotary", "model.qk_norm": True, "model.tie_embeddings": False,
          "train.optimizer": "muon"}
SPEEDRUN = {**MODERN, "model.mlp": "relu2", "model.norm": "rmsnorm", "model.zero_init": True,
            "model.logit_softcap": 15.0}


def differences(a: str, b: str) -> dict:
    """Dotted key -> value in `b`, for every field in which built-in config b differs from a."""
    da, db = to_dict(load_config(a, [])), to_dict(load_config(b, []))
    return {f"{s}.{k}": v for s, fields in db.items() if isinstance(fields, dict)
            for k, v in fields.items() if da[s][k] != v}


@pytest.mark.parametrize("base, modern, warmup", [("demo-gpt2", "demo", 30), ("seed-77m", "seed-77m-modern", 300)])
def test_modern_configs_are_their_base_plus_the_documented_options(base, modern, warmup):
    """Each modern built-in passes the checks and differs from its GPT-2 counterpart in exactly
    the recipe's options and Muon's momentum warm-up (about a sixth of the sources' runs, so
    scaled to the run): same size, data, batch, steps and learning rates."""
    cfg = load_config(modern, [])
    check(cfg)
    assert cfg.name == modern
    assert differences(base, modern) == {**MODERN, "train.muon_momentum_warmup": warmup}


def test_documented_recipe_is_the_shipped_one():
    """docs/performance.md's Recipes table names every speedrun option with its value, and says
    which are in the modern recipe."""
    text = (ROOT / "docs" / "performance.md").read_text()
    section = text.split("## Recipes", 1)[1].split("\n## ", 1)[0]
    for key in SPEEDRUN:
        row = next(line for line in section.splitlines() if line.startswith(f"| `{key}"))
        assert ("| yes |" in row) == (key in MODERN), row
    for key, value in SPEEDRUN.items():
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        assert re.search(rf"`{re.escape(key)}\s*=\s*\"?{re.escape(shown)}", section), key


def test_modern_recipe_trains_on_the_cpu(shard_dir, tmp_path):
    """2 layers, 32 wide: every speedrun option at once trains without error and the val loss falls."""
    cfg = tiny_config(shard_dir, tmp_path / "runs", train__max_steps=12, eval__interval=6)
    for key, value in SPEEDRUN.items():
        sec, name = key.split(".")
        setattr(getattr(cfg, sec), name, value)
    s = run(cfg)
    assert s["status"] == "completed" and s["steps"] == 12
    assert s["val_loss"] < s["first_val_loss"] - 0.5


def test_bench_variants_come_from_the_builtin_config():
    """bench/recipes.py measures what ships: its modern variant is the demo's option set, and
    each +KEY / modern-KEY variant adds or removes exactly one option; chains compose."""
    table = recipes.variants(None)
    assert table["gpt2"] == []
    warmup = "train.muon_momentum_warmup=30"  # goes with Muon wherever Muon goes
    assert {o.split("=")[0] for o in table["modern"]} == set(MODERN) | {warmup.split("=")[0]}
    assert {o.split("=")[0] for o in table["speedrun"]} == set(SPEEDRUN) | {warmup.split("=")[0]}
    assert warmup in table["+optimizer"] and warmup not in table["modern-optimizer"]
    for key in SPEEDRUN:
        name = key.split(".")[1]
        assert table["+" + name][0].startswith(key + "=") and len(table["+" + name]) == 1 + (name == "optimizer")
        assert (("modern-" + name) in table) == (key in MODERN)
    for key in MODERN:
        assert len(table["modern-" + key.split(".")[1]]) == len(MODERN) - (key == "train.optimizer")
    chain = recipes.variants(["+position+optimizer", "modern-qk_norm+mlp", "modern-muon_momentum_warmup"])
    assert chain["modern-muon_momentum_warmup"] == [o for o in table["modern"] if o != warmup]
    assert chain["+position+optimizer"] == ["model.position=rotary", "train.optimizer=muon"]
    assert set(chain["modern-qk_norm+mlp"]) == set(table["modern"]) - {"model.qk_norm=true"} | {"model.mlp=relu2"}


def test_tokens_to_target_interpolates_between_evaluations():
    curve = [(0, 10.0), (100, 6.0), (200, 5.0), (300, 4.5)]
    assert recipes.tokens_to(curve, 5.5) == pytest.approx(150.0)
    assert recipes.tokens_to(curve, 5.0) == pytest.approx(200.0)
    assert recipes.tokens_to(curve, 4.0) is None


def test_compact_renumbers_densely_and_keeps_the_text(tmp_path):
    """The benchmark's dense ids: same sequence, ids 0..n-1 in the original order of ids."""
    src = tmp_path / "src"
    src.mkdir()
    val, train = np.array([50256, 7, 7, 900], np.uint16), np.array([900, 3, 50256], np.uint16)
    write_shard(src / "x_val_000000.bin", val)
    write_shard(src / "x_train_000001.bin", train)
    n = recipes.compact(src, tmp_path / "dst")
    assert n == 4
    tr, va = find_splits(tmp_path / "dst")
    assert read_shard(va[0]).tolist() == [3, 1, 1, 2]
    assert read_shard(tr[0]).tolist() == [2, 0, 3]
