"""Never lose a run: out-of-memory back-off, exact resume after SIGKILL, polite stops,
non-finite losses, and one clear line for each bad input (faults injected on the CPU)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tokens, tiny_config

from fitgpt.checkpoint import load_checkpoint
from fitgpt.cli import main
from fitgpt.configio import to_toml
from fitgpt.data import write_shard
from fitgpt.resume import resume_config
from fitgpt.train import run

ROOT = Path(__file__).parent.parent


def params(run_dir):
    return load_checkpoint(run_dir)["model"]


def assert_params_close(a, b, rel=1e-6):
    for k in a:
        scale = a[k].abs().max().clamp(min=1e-12)
        assert ((a[k] - b[k]).abs().max() / scale).item() <= rel, k


def losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_train_oom_backs_off_to_the_same_result(shard_dir, tmp_path, monkeypatch):
    """An injected out-of-memory at micro-batch 4 retries the same data as 2 slices of 2: loss
    and parameters equal a run that used slices of 2 from the start; the back-off is recorded
    in the summary and the checkpoint, and a resumed run starts at the size that worked."""
    monkeypatch.setenv("FITGPT_FAULT", "oom:train:0:4")
    a = run(tiny_config(shard_dir, tmp_path / "a", train__max_steps=3))
    monkeypatch.delenv("FITGPT_FAULT")
    b = run(tiny_config(shard_dir, tmp_path / "b", train__max_steps=3, memory__micro_split=2))
    assert a["backoff"]["micro_split"] == 2 and a["backoff"]["events"][0]["phase"] == "training"
    assert load_checkpoint(a["run_dir"])["backoff"]["micro_split"] == 2
    np.testing.assert_allclose(losses(a["run_dir"]), losses(b["run_dir"]), rtol=1e-6)
    assert_params_close(params(a["run_dir"]), params(b["run_dir"]))
    cfg, ckpt, run_dir = resume_config(a["run_dir"], None, ["--train.max_steps=4"], [])
    again = run(cfg, ckpt=ckpt, run_dir=run_dir)
    assert again["backoff"]["micro_split"] == 2 and again["backoff"]["events"] == []


def test_eval_oom_halves_eval_batch_with_identical_loss(shard_dir, tmp_path, monkeypatch):
    """Evaluation out of memory at eval batch >= 3 retries with 5 -> 2: the fixed windows give
    the same val loss as an evaluation that never failed."""
    clean = run(tiny_config(shard_dir, tmp_path / "a", train__max_steps=2, eval__interval=2))
    monkeypatch.setenv("FITGPT_FAULT", "oom:eval:0:3")
    hit = run(tiny_config(shard_dir, tmp_path / "b", train__max_steps=2, eval__interval=2))
    assert hit["backoff"]["eval_batch_size"] == 2
    assert hit["first_val_loss"] == pytest.approx(clean["first_val_loss"], rel=1e-6)
    assert hit["val_loss"] == pytest.approx(clean["val_loss"], rel=1e-6)


def test_oom_at_micro_batch_one_stops_with_checkpoint(shard_dir, tmp_path, monkeypatch, capsys):
    """Out of memory even at micro-batch 1: a checkpoint, one line, exit code 2."""
    cfg = tiny_config(shard_dir, tmp_path, train__max_steps=4, eval__interval=1)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    monkeypatch.setenv("FITGPT_FAULT", "oom:train:2:1")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory in training even at micro-batch 1" in err[0]
    assert load_checkpoint(tmp_path / "run")["step"] == 2


def _cli_args(cfg_path, *extra):
    return [sys.executable, "-m", "fitgpt", "train", str(cfg_path), *extra]


def _start(cfg_path):
    return subprocess.Popen(_cli_args(cfg_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(proc, text: str, seen: str = "", timeout: float = 60) -> str:
    """Read the process's output until `text` appears; return all that was read."""
    deadline = time.time() + timeout
    while text not in seen and time.time() < deadline:
        seen += proc.stdout.readline()
    return seen


def test_sigkill_then_resume_is_bit_identical(shard_dir, tmp_path):
    """A run killed with SIGKILL right after its step-3 checkpoint and resumed gives the same
    losses and parameters, bit for bit, as a run of 6 steps."""
    full = run(tiny_config(shard_dir, tmp_path / "full", train__max_steps=6, eval__interval=3))
    cfg = tiny_config(shard_dir, tmp_path / "killed", train__max_steps=6, eval__interval=3)
    path = tmp_path / "k.toml"
    path.write_text(to_toml(cfg))
    env = {**os.environ, "FITGPT_FAULT": "kill:3"}
    proc = subprocess.run(_cli_args(path), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_dir = tmp_path / "killed" / "run"
    assert load_checkpoint(run_dir)["step"] == 3
    assert main(["train", "--resume", str(run_dir)]) == 0
    a, b = params(full["run_dir"]), params(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(full["run_dir"]) == losses(run_dir)


def test_sigterm_stops_politely_and_resumes(shard_dir, tmp_path):
    """SIGTERM finishes the step, saves, prints the resume command and exits 0."""
    cfg = tiny_config(shard_dir, tmp_path, train__max_steps=100000, eval__interval=100000)
    path = tmp_path / "t.toml"
    path.write_text(to_toml(cfg))
    proc = _start(path)
    seen = _wait_for(proc, "step      3")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, seen + out
    assert "resume with: fitgpt train --resume" in out
    step = load_checkpoint(tmp_path / "run")["step"]
    assert 3 <= step < 100000
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped"


def test_nonfinite_losses_skip_then_stop_with_last_good_weights(shard_dir, tmp_path, monkeypatch):
    """A NaN loss skips its optimizer step; K in a row stop the run with a checkpoint of the
    last good weights (equal to a run that stopped before the NaNs)."""
    good = run(tiny_config(shard_dir, tmp_path / "good", train__max_steps=2, eval__interval=100))
    monkeypatch.setenv("FITGPT_FAULT", "nan:2,nan:3,nan:4")
    bad = run(tiny_config(shard_dir, tmp_path / "bad", train__max_steps=10, eval__interval=100,
                          train__max_nonfinite=3))
    assert bad["status"] == "diverged" and bad["steps"] == 5
    a, b = params(good["run_dir"]), params(bad["run_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setenv("FITGPT_FAULT", "nan:2")
    once = run(tiny_config(shard_dir, tmp_path / "once", train__max_steps=4, eval__interval=100))
    assert once["status"] == "completed"
    assert "non-finite loss, optimizer step skipped" in (Path(once["run_dir"]) / "train.log").read_text()


def _break(kind: str, d: Path, tmp_path: Path) -> list[str]:
    """Damage the tiny shard folder (or the setup) in one way; return extra CLI arguments."""
    shard = d / "tiny_train_000001.bin"
    if kind == "empty_dir":
        for p in d.iterdir():
            p.unlink()
    elif kind == "wrong_version":
        raw = bytearray(shard.read_bytes())
        raw[4:8] = (7).to_bytes(4, "little")
        shard.write_bytes(bytes(raw))
    elif kind == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif kind == "count_mismatch":
        raw = bytearray(shard.read_bytes())
        raw[8:12] = (12).to_bytes(4, "little")
        shard.write_bytes(bytes(raw))
    elif kind == "token_too_large":
        write_shard(shard, np.full(5000, 300, dtype=np.uint16))  # model vocab is 256
        (d / "tiny_train_000002.bin").unlink()
    elif kind == "short_split":
        write_shard(d / "tiny_val_000000.bin", make_tokens(20, 256, 0))
    elif kind == "unwritable_out":
        (tmp_path / "afile").write_text("x")
        return [f"--log.out_dir={tmp_path / 'afile' / 'runs'}"]
    return []


@pytest.mark.parametrize("kind, needle", [
    ("empty_dir", "no train shards"),
    ("wrong_version", "version"),
    ("truncated", "tiny_train_000001.bin"),
    ("count_mismatch", "tiny_train_000001.bin"),
    ("token_too_large", "token id 300 >= model.vocab_size 256"),
    ("short_split", "block"),
    ("unwritable_out", "afile"),
])
def test_bad_inputs_are_one_line_exit_2(kind, needle, shard_dir, tmp_path, capsys):
    """Each bad input stops with one clear line and exit code 2, before training."""
    cfg = tiny_config(shard_dir, tmp_path / "runs", train__max_steps=2)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    extra = _break(kind, shard_dir, tmp_path)
    assert main(["train", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_damaged_checkpoint_is_one_line(tmp_path, capsys, content, shard_dir):
    """A truncated file, or a file that is not a checkpoint, is refused in one line."""
    path = tmp_path / "bad.pt"
    if content is None:  # a real checkpoint, truncated
        s = run(tiny_config(shard_dir, tmp_path / "r", train__max_steps=1, eval__interval=1))
        good = Path(load_checkpoint(s["run_dir"])["_path"]).read_bytes()
        content = good[: len(good) // 2]
    path.write_bytes(content)
    assert main(["eval", "--ckpt", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pt" in err[0]


def test_full_disk_during_save_keeps_previous_checkpoint(shard_dir, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing the second checkpoint: one line, exit 2, no partial file, and the
    first checkpoint intact, loadable and still `latest`."""
    cfg = tiny_config(shard_dir, tmp_path, train__max_steps=4, eval__interval=2)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "intact" in err[0]
    ckdir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_00000002.pt"]
    assert load_checkpoint(tmp_path / "run")["step"] == 2


def test_second_ctrl_c_exits_at_once_without_damage(shard_dir, tmp_path):
    """Two Ctrl-C in a row: the process quits at once (exit 130) and the last checkpoint on disk
    is still loadable."""
    cfg = tiny_config(shard_dir, tmp_path, train__max_steps=100000, eval__interval=2)
    path = tmp_path / "t.toml"
    path.write_text(to_toml(cfg))
    proc = _start(path)
    seen = _wait_for(proc, "saved")
    proc.send_signal(signal.SIGINT)
    seen = _wait_for(proc, "stop requested", seen)  # the first was handled
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + out
    assert load_checkpoint(tmp_path / "run")["step"] >= 2
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))


def test_out_of_memory_message_quotes_the_planner():
    """The give-up message carries the planner's best fitting change for the budget."""
    from fitgpt.configio import load_config
    from fitgpt.memory.recover import best_suggestion

    cfg = load_config("seed-77m", ["--memory.loss=full", "--eval.batch_size=16",
                                   "--memory.budget=12GB"])
    assert best_suggestion(cfg) == "the planner suggests: chunked loss (--memory.loss=chunked)"
    cfg.memory.budget = None
    assert best_suggestion(cfg) == ""  # no card and no budget: nothing to plan for
