"""End to end on tiny shards: training, evaluation, checkpoints, resume, the seed's config."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fitgpt.cli.main import main
from fitgpt.config.schema import Config
from fitgpt.data.shards import ValWindows, find_splits
from fitgpt.errors import CheckpointError, ConfigError
from fitgpt.eval.evaluate import evaluate
from fitgpt.model.runtime import Runtime, build_model
from fitgpt.store.checkpoint import load_checkpoint
from fitgpt.store.resume import resume_config
from fitgpt.train.step import lr_at
from fitgpt.train.trainer import run

SEED = Path(__file__).parent.parent / "fitgpt" / "configs" / "seed-77m.py"


def test_tiny_run_learns_and_writes_a_self_describing_folder(shard_dir, tmp_path):
    """A run evaluates at the start, at intervals and at the end, learns, and leaves config,
    log, metrics, summary and a checkpoint behind, with measured peaks for both phases."""
    cfg = tiny_config(shard_dir, tmp_path / "runs", train__max_steps=12, eval__interval=6)
    s = run(cfg)
    run_dir = Path(s["run_dir"])
    assert s["status"] == "completed" and s["steps"] == 12
    assert s["val_loss"] < s["first_val_loss"] - 0.5
    assert s["peak_train_bytes"] > 0 and s["peak_eval_bytes"] > 0
    # the run's own measurement agrees with the planner's prediction (batches come from the
    # shard reader here, so allow a little more than the planner's 3 %)
    assert abs(s["predicted_train_bytes"] - s["peak_train_bytes"]) <= 0.05 * s["peak_train_bytes"]
    assert abs(s["predicted_eval_bytes"] - s["peak_eval_bytes"]) <= 0.05 * s["peak_eval_bytes"]
    assert s["tokens_per_second"] > 0
    for name in ("config.toml", "train.log", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file()
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 6, 12]
    assert sum(r["kind"] == "train" for r in recs) == 12
    ckpt = load_checkpoint(run_dir)
    assert ckpt["step"] == 12 and ckpt["config"]["model"]["n_embd"] == 32


def test_val_loss_does_not_depend_on_eval_batch_size(shard_dir):
    """The validation windows are fixed: batch size 1, 3 or 8 gives the same loss (1e-6)."""
    cfg = tiny_config(shard_dir, "unused")
    model = build_model(cfg, torch.device("cpu"))
    _, val_files = find_splits(shard_dir)
    val = ValWindows(val_files, 32, 20)
    rt = Runtime(torch.device("cpu"), torch.float32)
    losses = [evaluate(model, val, b, rt).loss for b in (1, 3, 8)]
    assert max(losses) - min(losses) <= 1e-6 * abs(losses[0])
    assert evaluate(model, val, 3, rt).tokens == 20 * 32


def test_resume_continues_exactly(shard_dir, tmp_path):
    """Stopping after 3 of 6 steps and resuming gives the same parameters and losses as a run
    of 6 steps (same sampler position, RNG and optimizer state)."""
    common = dict(train__max_steps=6, train__lr_decay_steps=6, eval__interval=3)
    full = run(tiny_config(shard_dir, tmp_path / "a", **common))
    half = tiny_config(shard_dir, tmp_path / "b", **{**common, "train__max_steps": 3})
    run(half)
    cfg, ckpt, run_dir = resume_config(str(tmp_path / "b" / "run"), None,
                                       ["--train.max_steps=6"], [])
    resumed = run(cfg, ckpt=ckpt, run_dir=run_dir)
    assert resumed["val_loss"] == full["val_loss"]
    a = load_checkpoint(tmp_path / "a" / "run")["model"]
    b = load_checkpoint(run_dir)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def losses(d):
        lines = (d / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]

    assert losses(tmp_path / "a" / "run") == losses(run_dir)


def test_resume_refuses_shape_change(shard_dir, tmp_path):
    """A resumed run may change eval or schedule settings, not the model's shape."""
    run(tiny_config(shard_dir, tmp_path, train__max_steps=2, eval__interval=2))
    notes: list[str] = []
    cfg, _, _ = resume_config(str(tmp_path / "run"), None, ["--eval.batch_size=2"], notes)
    assert cfg.eval.batch_size == 2 and any("eval.batch_size" in n for n in notes)
    with pytest.raises(ConfigError, match="model.n_embd"):
        resume_config(str(tmp_path / "run"), None, ["--model.n_embd=64"], [])


@pytest.mark.parametrize("which", ["block", "original"])
def test_seed_config_trains_on_cpu_with_smaller_sizes(which, shard_dir, tmp_path, capsys):
    """The seed's config block saved as a file (and the user's original 77M config), unchanged,
    train when their sizes are overridden on the command line in nanoGPT's flat form."""
    from test_config import SEED_BLOCK

    path = SEED
    if which == "block":
        path = tmp_path / "train_fineweb.py"
        path.write_text(SEED_BLOCK)
    args = ["train", str(path), "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=2", "--gradient_accumulation_steps=2", "--max_iters=3",
            "--eval_interval=3", "--eval_iters=2", "--vocab_size=256", "--device=cpu",
            f"--data.dir={shard_dir}", f"--out_dir={tmp_path}", "--log.run_name=seed"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "seed" / "summary.json").read_text())
    assert summary["dtype"] == ("float16" if which == "original" else "float32")
    assert summary["steps"] == 3
    assert math.isfinite(summary["val_loss"])
    out = capsys.readouterr().out
    assert "batches of 4" in out  # the seed's eval_batch_size


def test_eval_command_matches_training_eval(shard_dir, tmp_path, capsys):
    """`fitgpt eval --ckpt` reproduces the final val loss, at any eval batch size."""
    s = run(tiny_config(shard_dir, tmp_path, train__max_steps=3, eval__interval=3))
    capsys.readouterr()
    assert main(["eval", "--ckpt", s["run_dir"], "--eval.batch_size=1"]) == 0
    out = capsys.readouterr().out
    assert f"val loss {s['val_loss']:.4f}" in out


def test_end_of_run_sample_is_skipped_not_fatal(shard_dir, tmp_path, monkeypatch, capsys):
    """eval.sample_tokens with a vocabulary smaller than GPT-2's, or with no tokenizer files (an
    offline machine), skips the sample with a note; the run still completes and writes its
    summary. With the GPT-2 vocabulary and the tokenizer present, the sample is in the summary."""
    import fitgpt.data.tokenizer
    from fitgpt.errors import DataError

    s = run(tiny_config(shard_dir, tmp_path / "a", train__max_steps=2, eval__sample_tokens=4))
    assert s["status"] == "completed" and "sample" not in s
    assert "no sample: this model's vocabulary has 256 ids, fewer than GPT-2's" in capsys.readouterr().out
    assert json.loads((Path(s["run_dir"]) / "summary.json").read_text())["steps"] == 2

    big = dict(train__max_steps=1, eval__sample_tokens=4, model__vocab_size=50304)
    s = run(tiny_config(shard_dir, tmp_path / "b", **big))
    assert isinstance(s["sample"], str) and s["sample"]

    def offline():
        raise DataError("no GPT-2 tokenizer files")

    monkeypatch.setattr(fitgpt.data.tokenizer, "gpt2_encoding", offline)
    s = run(tiny_config(shard_dir, tmp_path / "c", **big))
    assert s["status"] == "completed" and "sample" not in s
    assert "no sample: no GPT-2 tokenizer files" in capsys.readouterr().out
    assert (Path(s["run_dir"]) / "summary.json").is_file()


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['BOOM_MARKER']}",))


def test_untrusted_checkpoint_is_refused_and_code_not_run(tmp_path, monkeypatch, capsys):
    """A pickle that would run code on load is refused with a clear message; nothing runs."""
    marker = tmp_path / "ran"
    monkeypatch.setenv("BOOM_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Boom()}, f)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)
    assert main(["eval", "--ckpt", str(path)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_lr_schedule():
    """Linear warm-up, cosine to min_lr at lr_decay_steps, flat after."""
    cfg = Config()
    t = cfg.train
    t.lr, t.min_lr, t.warmup_steps, t.max_steps = 1.0, 0.1, 10, 110
    assert lr_at(0, cfg) == pytest.approx(1 / 11) and lr_at(9, cfg) == pytest.approx(10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    t.decay_lr = False
    assert lr_at(3, cfg) == 1.0
