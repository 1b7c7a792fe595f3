"""The trainer's checkpointable state, its fault injection and its world, in isolation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fitgpt.store.checkpoint import find_checkpoint
from fitgpt.train import distributed
from fitgpt.train.build import build_training
from fitgpt.train.faults import NO_FAULTS, Faults
from fitgpt.train.state import TrainState
from fitgpt.train.trainer import run


def _state(tr, cfg, **fields) -> TrainState:
    return TrainState(tr.model, tr.optimizer, tr.scaler, tr.batches, cfg, tr.fsdp, **fields)


def _draws() -> tuple:
    return torch.rand(3), random.random(), np.random.rand()


def test_train_state_round_trips(shard_dir, tmp_path):
    """Guards resume's exactness at its source: a TrainState saved and loaded into a freshly
    built one gives the same step, tokens, best loss, back-off, sampler position, random state,
    weights and AdamW state; the back-off never grows back to what the new config asks."""
    cfg = tiny_config(shard_dir, tmp_path)
    tr = build_training(cfg)
    for _ in range(2):  # AdamW state exists after the first step
        tr.step()
    saved = _state(tr, cfg, step=2, tokens=512, best_val=4.5, micro_split=2, eval_batch_size=3)
    d = saved.state_dict()
    draws, batch = _draws(), tr.batches.next_batch()

    fresh = build_training(cfg, resuming=True)
    state = _state(fresh, cfg, micro_split=1, eval_batch_size=5)
    assert state.load_state_dict(d) == []
    assert (state.step, state.tokens, state.best_val) == (2, 512, 4.5)
    assert (state.micro_split, state.eval_batch_size) == (2, 3)
    again = _draws()
    assert torch.equal(again[0], draws[0]) and again[1:] == draws[1:]
    nxt = fresh.batches.next_batch()
    assert all(torch.equal(a, b) for a, b in zip(nxt, batch))
    for (name, a), b in zip(tr.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), name
    old, new = tr.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert old.keys() == new.keys() and len(old) > 0
    for i in old:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(old[i][key], new[i][key]), (i, key)


def test_nanogpt_style_checkpoint_counts_iter_num(shard_dir, tmp_path):
    """A checkpoint without fitgpt's own entries (nanoGPT's: iter_num, no tokens, sampler,
    random state or back-off) resumes at iter_num with the config's back-off."""
    cfg = tiny_config(shard_dir, tmp_path)
    tr = build_training(cfg)
    d = _state(tr, cfg).state_dict()
    for key in ("step", "tokens", "sampler", "rng", "backoff", "scaler"):
        del d[key]
    d["iter_num"] = 7
    state = _state(build_training(cfg, resuming=True), cfg, micro_split=2, eval_batch_size=4)
    state.load_state_dict(d)
    assert (state.step, state.tokens, state.micro_split, state.eval_batch_size) == (7, 0, 2, 4)
    assert TrainState.step_of(d) is None  # only fitgpt's own checkpoints name their step


def test_checkpoint_file_is_the_train_state_dict(shard_dir, tmp_path):
    """The file `fitgpt train` saves holds exactly TrainState.state_dict()'s entries, in order:
    nothing else writes a checkpoint key."""
    s = run(tiny_config(shard_dir, tmp_path, train__max_steps=2, eval__interval=2))
    raw = torch.load(find_checkpoint(s["run_dir"]), map_location="cpu", weights_only=True)
    cfg = tiny_config(shard_dir, tmp_path)
    expected = _state(build_training(cfg), cfg).state_dict()
    assert list(raw) == list(expected)
    assert raw["step"] == 2 and raw["backoff"] == {"micro_split": 1, "eval_batch_size": 5}


def test_faults_are_read_once_and_none_by_default():
    """FITGPT_FAULT is parsed into one object (per process: the rank filters) and an empty or
    missing variable gives the no-op NO_FAULTS."""
    assert Faults.from_env(0, {}) is NO_FAULTS and Faults.from_env(0, {"FITGPT_FAULT": " , "}) is NO_FAULTS
    spec = {"FITGPT_FAULT": "stop:1:2, raise:0:3,nan:4,oom:eval:5:2:1"}
    one, zero = Faults.from_env(1, spec), Faults.from_env(0, spec)
    assert one.stop_at(2) and not zero.stop_at(2) and one.nan_at(4) and not one.nan_at(3)
    one.maybe_raise(3)  # rank 0's fault
    with pytest.raises(RuntimeError, match="injected failure in rank 0 at step 3"):
        zero.maybe_raise(3)
    zero.maybe_oom("eval", 5, 4)  # rank 1's fault
    with pytest.raises(torch.OutOfMemoryError):
        one.maybe_oom("eval", 5, 2)
    one.maybe_oom("eval", 5, 1)  # a batch below the size named
    NO_FAULTS.maybe_oom("eval", 5, 100)


def test_world_outside_torchrun_is_one_process(monkeypatch):
    """Without torchrun's variables the world is one main process on the config's device."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    w = distributed.init("cpu")
    assert (w.rank, w.size, w.device, w.is_main, w.active) == (0, 1, "cpu", True, False)
