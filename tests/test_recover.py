"""Never lose a run: out-of-memory back-off, exact resume after SIGKILL, polite stops,
non-finite losses, and one clear line for each bad input (faults injected on the CPU)."""

from __future__ import annotations

import errno
import json
import math
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
from conftest import train_losses as losses

from fitgpt.cli.main import main
from fitgpt.config.load import to_toml
from fitgpt.data.shards import write_shard
from fitgpt.store.checkpoint import load_checkpoint
from fitgpt.store.resume import resume_config
from fitgpt.train.trainer import run

ROOT = Path(__file__).parent.parent


def params(run_dir):
    return load_checkpoint(run_dir)["model"]


def assert_params_close(a, b, rel=1e-6):
    for k in a:
        scale = a[k].abs().max().clamp(min=1e-12)
        assert ((a[k] - b[k]).abs().max() / scale).item() <= rel, k


# The modern recipe and every other speedrun option (docs/performance.md, "Recipes").
MODERN = dict(model__position="rotary", model__qk_norm=True, model__tie_embeddings=False, model__mlp="relu2",
              model__norm="rmsnorm", model__zero_init=True, model__logit_softcap=15.0,
              train__optimizer="muon", train__muon_momentum_warmup=2)


@pytest.mark.parametrize("recipe", [{}, MODERN], ids=["gpt2", "modern"])
def test_train_oom_backs_off_to_the_same_result(shard_dir, tmp_path, monkeypatch, recipe):
    """An injected out-of-memory at micro-batch 4 retries the same data as 2 slices of 2: loss
    and parameters equal a run that used slices of 2 from the start; the back-off is recorded
    in the summary and the checkpoint, and a resumed run starts at the size that worked."""
    monkeypatch.setenv("FITGPT_FAULT", "oom:train:0:4")
    a = run(tiny_config(shard_dir, tmp_path / "a", train__max_steps=3, **recipe))
    monkeypatch.delenv("FITGPT_FAULT")
    b = run(tiny_config(shard_dir, tmp_path / "b", train__max_steps=3, memory__micro_split=2, **recipe))
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
    from fitgpt.config.load import load_config
    from fitgpt.train.recover import best_suggestion

    cfg = load_config("seed-77m", ["--memory.loss=full", "--eval.batch_size=16",
                                   "--memory.budget=12GB"])
    assert best_suggestion(cfg) == "the planner suggests: chunked loss (--memory.loss=chunked)"
    cfg.memory.budget = None
    assert best_suggestion(cfg) == ""  # no card and no budget: nothing to plan for


def finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_nonfinite_gradient_norm_skips_the_step(shard_dir, tmp_path, monkeypatch):
    """An infinite gradient with a finite loss (a diverging run's overflow) skips its optimizer
    step, with clipping off too: the weights equal a run that stopped before it (before the fix,
    AdamW turned the inf into NaN in every weight it touched)."""
    common = dict(eval__interval=100, train__grad_clip=0.0)
    good = run(tiny_config(shard_dir, tmp_path / "good", train__max_steps=2, **common))
    monkeypatch.setenv("FITGPT_FAULT", "infgrad:2")
    bad = run(tiny_config(shard_dir, tmp_path / "bad", train__max_steps=3, **common))
    assert bad["status"] == "completed"
    a, b = params(good["run_dir"]), params(bad["run_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (Path(bad["run_dir"]) / "train.log").read_text()
    assert "step 3: non-finite gradient norm, optimizer step skipped" in log


@pytest.mark.parametrize("fault, steps", [("nanweights:2", 4), ("nanweights:3", 4),
                                          ("nanweights:2,stop:0:3", 3)])
def test_weights_that_become_nonfinite_stop_the_run_keeping_the_last_good_checkpoint(
        fault, steps, shard_dir, tmp_path, monkeypatch):
    """An optimizer step that makes the weights NaN (as an infinite learning rate does, with a
    finite gradient) stops the run, without saving them, at the next step's NaN loss, at the
    next evaluation, or at a requested stop's save: the step-2 checkpoint stays `latest` and
    finite, and the message names it. Before the fix, always_save wrote NaN checkpoints and
    keep=2 pruned the good one."""
    monkeypatch.setenv("FITGPT_FAULT", fault)
    s = run(tiny_config(shard_dir, tmp_path, train__max_steps=8, eval__interval=2))
    assert s["status"] == "diverged" and s["steps"] == steps
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["step"] == 2 and finite(ckpt["model"])
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert names == ["step_00000002.pt"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "the weights are no longer finite, so they are not saved; the last checkpoint is " \
           f"{tmp_path / 'run' / 'checkpoints' / 'step_00000002.pt'} (step 2)" in log


def test_diverging_learning_rate_keeps_finite_checkpoints(shard_dir, tmp_path):
    """The reported run, for real: lr=1e3 with always_save and keep=2. The gradient norm
    overflows to inf while the loss stays finite; those steps are skipped, so every checkpoint
    kept holds finite weights that give a finite val loss (before the fix, both kept checkpoints
    gave NaN and the last finite one had been deleted)."""
    s = run(tiny_config(shard_dir, tmp_path, train__max_steps=6, eval__interval=2, train__lr=1e3,
                        train__warmup_steps=0))
    assert math.isfinite(s["val_loss"])
    for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt"):
        assert finite(load_checkpoint(p)["model"]), p.name
    assert "non-finite gradient norm, optimizer step skipped" in (tmp_path / "run" / "train.log").read_text()


def test_oom_retry_with_dropout_equals_a_resume_at_the_smaller_split(shard_dir, tmp_path, monkeypatch):
    """With dropout 0.1, out of memory in a backward (after the forward drew its dropout masks)
    at step 2: the retry starts from the random state the failed attempt started from, so the
    run equals, bit for bit, one stopped at step 2 and resumed with --memory.micro_split=2.
    (Slices draw other masks than the whole micro-batch: what is equal is stated in the README.)"""
    common = dict(model__dropout=0.1, train__max_steps=4, train__lr_decay_steps=4, eval__interval=2)
    monkeypatch.setenv("FITGPT_FAULT", "oom:backward:2:4")
    a = run(tiny_config(shard_dir, tmp_path / "a", **common))
    monkeypatch.delenv("FITGPT_FAULT")
    assert [e["step"] for e in a["backoff"]["events"]] == [2]
    run(tiny_config(shard_dir, tmp_path / "b", **{**common, "train__max_steps": 2}))
    cfg, ckpt, run_dir = resume_config(str(tmp_path / "b" / "run"), None,
                                       ["--train.max_steps=4", "--memory.micro_split=2"], [])
    run(cfg, ckpt=ckpt, run_dir=run_dir)
    assert losses(a["run_dir"]) == losses(run_dir)
    pa, pb = params(a["run_dir"]), params(run_dir)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def records(run_dir) -> list[tuple]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["kind"], r["step"], r.get("loss", r.get("val_loss"))) for r in map(json.loads, lines)]


def test_resume_after_sigkill_writes_each_step_once(shard_dir, tmp_path):
    """SIGKILL after step 5, two steps past the step-3 checkpoint; the resumed run redoes steps
    4 and 5. metrics.jsonl then holds each record once, equal to an uninterrupted run's (before
    the fix: the killed run's steps 4, 5 and its step-3 evaluation appeared twice)."""
    full = run(tiny_config(shard_dir, tmp_path / "full", train__max_steps=6, eval__interval=3))
    path = tmp_path / "k.toml"
    path.write_text(to_toml(tiny_config(shard_dir, tmp_path / "killed", train__max_steps=6,
                                        eval__interval=3)))
    env = {**os.environ, "FITGPT_FAULT": "killafter:5"}
    proc = subprocess.run(_cli_args(path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_dir = tmp_path / "killed" / "run"
    assert ("train", 5) in [r[:2] for r in records(run_dir)]
    assert load_checkpoint(run_dir)["step"] == 3
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert records(run_dir) == records(full["run_dir"])


def _file_size_limit(limit: int):
    """For preexec_fn: a real limit on the size of every file the child writes (RLIMIT_FSIZE,
    as `ulimit -f`); with SIGXFSZ ignored, a write past it fails with EFBIG like a full disk."""
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _resume_limited(run_dir: Path, limit: int, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "fitgpt", "train", "--resume", str(run_dir), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(limit))


@pytest.mark.parametrize("frac", [0.5, 0.6])
def test_checkpoint_too_large_for_the_disk_is_one_line(frac, shard_dir, tmp_path):
    """A real write failure inside torch.save: the resumed run's step-4 checkpoint exceeds the
    file size limit. Where the write fails decides what torch raises: OSError at half the size,
    a RuntimeError from its zip writer at 0.6 (torch 2.13). Either way: one line, exit 2, no
    partial file, and the step-2 checkpoint intact and still `latest`."""
    run(tiny_config(shard_dir, tmp_path, train__max_steps=2, eval__interval=2))
    ckdir = tmp_path / "run" / "checkpoints"
    size = (ckdir / "step_00000002.pt").stat().st_size
    proc = _resume_limited(tmp_path / "run", int(size * frac), "--train.max_steps=4")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "step_00000004.pt: File too large" in err[0] and "step_00000002.pt is intact" in err[0]
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_00000002.pt"]
    assert load_checkpoint(tmp_path / "run")["step"] == 2


@pytest.mark.parametrize("room", [True, False])
def test_log_that_cannot_grow_stops_with_a_checkpoint(room, shard_dir, tmp_path):
    """train.log hits a real file size limit a few steps into a resumed run. With room for a
    checkpoint (room=True) the run saves at the step it reached and says so; without (a limit
    below a checkpoint's size) it says that too and the step-2 checkpoint stays `latest`.
    Either way: one line, exit 2 (before the fix: a chained traceback, exit 1, no save)."""
    run(tiny_config(shard_dir, tmp_path, train__max_steps=2, eval__interval=2))
    run_dir = tmp_path / "run"
    size = (run_dir / "checkpoints" / "step_00000002.pt").stat().st_size
    limit = 2 * size if room else size // 2
    with open(run_dir / "train.log", "a") as f:  # the start lines fit (~1.5 kB), a few steps more
        f.write("#" * (limit - 2000 - (run_dir / "train.log").stat().st_size) + "\n")
    proc = _resume_limited(run_dir, limit, "--train.max_steps=1000", "--eval.interval=1000")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith(f"fitgpt: error: could not write {run_dir / 'train.log'}: File too large")
    step = load_checkpoint(run_dir)["step"]
    if room:
        assert step > 2 and f"stopped at step {step}: the last checkpoint is " in err[0]
    else:
        assert step == 2 and "step_00000002.pt is intact" in err[0]
