"""train.optimizer=muon (issue 16): torch.optim.Muon for the blocks' 2-D matrices, AdamW for the
rest. Which parameters go where and at which learning rate, that a tiny run learns, that a save
and resume is bit-identical on the CPU and a resume with the other optimizer is refused, the
refusals of the levers it cannot run with, two DDP processes against one, and the planner
(Muon's one fp32 moment, its Newton-Schulz temporaries) against the storage tracker within 3 %."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, train_losses

from fitgpt.cli.main import main
from fitgpt.config.levers import fused_backward_refusal, optimizer_refusal
from fitgpt.config.load import check, to_toml
from fitgpt.config.schema import Config
from fitgpt.errors import ConfigError
from fitgpt.model.shape import ModelShape
from fitgpt.planner import optstate
from fitgpt.planner.estimate import estimate
from fitgpt.planner.timeline import r
from fitgpt.planner.tracker import StorageTracker
from fitgpt.planner.verify import SyntheticBatches, verify
from fitgpt.store.checkpoint import load_checkpoint
from fitgpt.store.resume import resume_config
from fitgpt.train import optim
from fitgpt.train.build import build_training
from fitgpt.train.optim_muon import MuonAdamW
from fitgpt.train.step import lr_at, momentum_at
from fitgpt.train.trainer import run

MUON = {"train__optimizer": "muon"}


def parts(ph) -> dict[str, int]:
    return {p.name: p.bytes for p in ph.parts}


def _cfg(dtype: str = "float32", loss: str = "chunked", ckpt: bool = False, C: int = 64, V: int = 512,
         b: int = 4, T: int = 64, L: int = 2) -> Config:
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = L, 4, C, T, V
    t.batch_size, t.grad_accum, t.device, t.dtype, t.optimizer = b, 1, "cpu", dtype, "muon"
    cfg.memory.loss, cfg.memory.checkpointing = loss, ckpt
    cfg.eval.batch_size = 4
    check(cfg)
    return cfg



# ----------------------------------------------------------------------------- the optimizer


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    """Muon: exactly the blocks' 2-D weights, at muon_lr x the schedule's fraction, no weight
    decay; AdamW: the embeddings (weight decay) and the vectors (none), at the scheduled lr."""
    cfg = _cfg()
    tr = build_training(cfg, batches=SyntheticBatches(512, 4, 64, 0), compile=False)
    opt = tr.optimizer
    assert isinstance(opt, MuonAdamW) and isinstance(opt, torch.optim.Optimizer)
    names = {id(p): n for n, p in tr.model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    assert muon == sorted(n for n, p in tr.model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert len(muon) == 4 * cfg.model.n_layer  # qkv, attention projection, MLP up and down
    decay, vectors = opt.adamw.param_groups
    assert {names[id(p)] for p in decay["params"]} >= {"transformer.wte.weight"}
    assert decay["weight_decay"] == cfg.train.weight_decay and vectors["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in vectors["params"])
    assert opt.muon.param_groups[0]["weight_decay"] == 0.0
    step = cfg.train.warmup_steps // 2
    tr.set_lr(lr_at(step, cfg))
    frac = lr_at(step, cfg) / cfg.train.lr
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(cfg.train.muon_lr * frac)
    assert decay["lr"] == vectors["lr"] == lr_at(step, cfg)
    tr.step()  # both took a step, into one shared state: Muon's momentum, AdamW's two moments
    buf = opt.state[tr.model.transformer.h[0].mlp.c_fc.weight]
    assert set(buf) == {"momentum_buffer"} and buf["momentum_buffer"].dtype == torch.float32
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(opt.state[tr.model.transformer.wte.weight])


def test_a_tiny_muon_run_learns(shard_dir, tmp_path):
    """30 steps on the tiny shards: the validation loss falls by more than a nat, and not to
    AdamW's value (Muon's updates were used)."""
    common = dict(train__max_steps=30, train__lr_decay_steps=30, eval__interval=30, memory__track=False)
    muon = run(tiny_config(shard_dir, tmp_path / "m", **common, **MUON))
    adamw = run(tiny_config(shard_dir, tmp_path / "a", **common))
    assert muon["first_val_loss"] - muon["val_loss"] > 1.0
    assert muon["val_loss"] != adamw["val_loss"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_muon_learns_in_16_bit(shard_dir, tmp_path, dtype):
    """float16 (the seed's dtype, so seed-77m-modern's) trains through the gradient scaler, whose
    unscale and inf check cover Muon's matrices and AdamW's parameters alike (one optimizer
    object holds both groups); bfloat16 without it. Both learn."""
    s = run(tiny_config(shard_dir, tmp_path / dtype, train__max_steps=20, train__lr_decay_steps=20,
                        eval__interval=20, memory__track=False, train__dtype=dtype, **MUON))
    assert s["status"] == "completed" and s["steps"] == 20
    assert s["first_val_loss"] - s["val_loss"] > 0.8, s


def test_momentum_warmup_rises_to_muon_momentum_and_resumes_bit_identically(shard_dir, tmp_path):
    """train.muon_momentum_warmup=4: momentum 0.85, 0.875, ... 0.95 from step 4 on, in Muon's
    groups only; a run stopped at step 3 and resumed equals the uninterrupted one to the bit,
    and differs from a run with constant momentum (the schedule was applied)."""
    common = dict(train__max_steps=6, train__lr_decay_steps=6, eval__interval=3, memory__track=False,
                  train__muon_momentum_warmup=4, **MUON)
    cfg = tiny_config(shard_dir, tmp_path / "x", **common)
    assert [momentum_at(s, cfg) for s in range(6)] == pytest.approx([0.85, 0.875, 0.9, 0.925, 0.95, 0.95])
    full = run(cfg)
    run(tiny_config(shard_dir, tmp_path / "b", **{**common, "train__max_steps": 3}))
    again, ckpt, run_dir = resume_config(str(tmp_path / "b" / "run"), None, ["--train.max_steps=6"], [])
    assert run(again, ckpt=ckpt, run_dir=run_dir)["val_loss"] == full["val_loss"]
    assert train_losses(tmp_path / "x" / "run") == train_losses(run_dir)
    groups = load_checkpoint(run_dir)["optimizer"]["param_groups"]
    assert [g.get("momentum") for g in groups][:1] == [0.95] and "momentum" not in groups[-1]
    flat = run(tiny_config(shard_dir, tmp_path / "c", **{**common, "train__muon_momentum_warmup": 0}))
    assert flat["val_loss"] != full["val_loss"]


# ----------------------------------------------------------------------------- checkpoints


def test_muon_resume_is_bit_identical_and_the_other_optimizer_is_refused(shard_dir, tmp_path, capsys):
    """3 + 3 steps equal 6 uninterrupted ones to the bit (weights, losses, Muon's momentum and
    AdamW's moments, saved by parameter name); resuming with train.optimizer=adamw (or an AdamW
    checkpoint with muon) is refused with one line, exit 2, and trains nothing."""
    common = dict(train__max_steps=6, train__lr_decay_steps=6, eval__interval=3, **MUON)
    full = run(tiny_config(shard_dir, tmp_path / "a", **common))
    run(tiny_config(shard_dir, tmp_path / "b", **{**common, "train__max_steps": 3}))
    cfg, ckpt, run_dir = resume_config(str(tmp_path / "b" / "run"), None, ["--train.max_steps=6"], [])
    assert cfg.train.optimizer == "muon" and ckpt[optim.FORMAT_KEY] == "muon"
    resumed = run(cfg, ckpt=ckpt, run_dir=run_dir)
    assert resumed["val_loss"] == full["val_loss"]
    a, b = load_checkpoint(tmp_path / "a" / "run"), load_checkpoint(run_dir)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert set(sa["transformer.h.1.attn.c_attn.weight"]) == {"momentum_buffer"}
    assert set(sa["transformer.wte.weight"]) == {"exp_avg", "exp_avg_sq", "step"}
    for name in sa:
        for key in sa[name]:
            assert torch.equal(sa[name][key], sb[name][key]), (name, key)
    assert train_losses(tmp_path / "a" / "run") == train_losses(run_dir)

    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "a" / "run"), "--train.max_steps=8",
                 "--train.optimizer=adamw"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.optimizer=muon's" in err[0] and "--train.optimizer=muon" in err[0]
    plain = tiny_config(shard_dir, tmp_path / "c", train__max_steps=2, eval__interval=2, memory__track=False)
    toml = tmp_path / "c.toml"
    toml.write_text(to_toml(plain))
    assert main(["train", str(toml)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "c" / "run"), "--train.max_steps=4",
                 "--train.optimizer=muon"]) == 2
    assert "--train.optimizer=adamw" in capsys.readouterr().err
    assert max(json.loads(x)["step"] for x in (tmp_path / "c" / "run" / "metrics.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("setting, word", [
    ({"memory.optimizer_state": "8bit"}, "memory.optimizer_state=8bit"),
    ({"memory.offload_optimizer": True, "train.device": "cuda", "train.dtype": "bfloat16"},
     "memory.offload_optimizer=true"),
    ({"memory.fused_backward": True, "train.grad_clip": 0.0}, "train.optimizer=muon is not supported"),
    ({"parallel.nproc": 2, "parallel.mode": "fsdp"}, "Newton-Schulz"),
])
def test_muon_refuses_what_it_cannot_run_with_in_one_line(setting, word):
    """8-bit state, optimizer offload, fused backward and FSDP2 with Muon: `check` stops the
    config with one line naming the clash and the way out; DDP is accepted."""
    cfg = Config()
    cfg.train.optimizer = "muon"
    for key, value in setting.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError) as e:
        check(cfg)
    msg = str(e.value)
    assert "\n" not in msg and word in msg and ("--train.optimizer=adamw" in msg or "fused_backward=false" in msg)
    ddp = Config()
    ddp.train.optimizer, ddp.parallel.nproc, ddp.parallel.mode = "muon", 2, "ddp"
    assert optimizer_refusal(ddp, "cpu", "float32", 2) is None and fused_backward_refusal(ddp) is None
    fsdp = Config()
    fsdp.train.optimizer, fsdp.parallel.mode = "muon", "fsdp"  # torchrun's world, known at run time
    assert "Newton-Schulz" in optimizer_refusal(fsdp, "cpu", "float32", 2)


# ----------------------------------------------------------------------------- the planner


def test_muon_state_is_one_fp32_moment_for_the_matrices():
    """Muon's state as the tracker counts it (the optimizer's tensors after a step) is what the
    planner allocates: 4 B per Muon parameter, AdamW's 8 B + a step per other tensor; for
    GPT-2 124M (85M of its 124M parameters in the blocks' matrices) that is 324 MiB less than
    AdamW's."""
    cfg = _cfg()
    tr = build_training(cfg, batches=SyntheticBatches(512, 4, 64, 0), compile=False)
    tr.step()
    tracker = StorageTracker()
    tracker.add(tr.optimizer)
    s = ModelShape.of(cfg.model)
    assert tracker.current == optstate.muon_state_bytes(s.param_counts(), s.block_matrices(), s.n_layer, r)
    assert parts(estimate(cfg, "cpu", "float32").train)["optimizer state"] <= tracker.current
    big = ModelShape(12, 12, 768, 1024, 50257)
    counts = big.param_counts()
    saved = optstate.state_bytes(counts, "fp32") - optstate.muon_state_bytes(counts, big.block_matrices(), 12)
    assert saved == 4 * 12 * sum(big.block_matrices()) + 4 * 4 * 12  # 4 B/param and no step tensors
    assert 323 * 2**20 < saved < 325 * 2**20


GRID = [(d, lo, ck) for d in ("float32", "bfloat16") for lo in ("chunked", "full") for ck in (False, True)]


@pytest.mark.parametrize("dtype, loss, ckpt", GRID)
def test_muon_estimate_within_3_percent_of_tracker(dtype, loss, ckpt):
    """The planner's training and evaluation peaks with Muon against the storage tracker's
    (`fitgpt plan --verify`'s step), n_layer 2, n_embd 64, block 64. (Measured: within 1 %,
    the same bytes off as with AdamW.)"""
    res = verify(_cfg(dtype, loss, ckpt), steps=2)
    for ph in ("train", "eval"):
        assert abs(res[ph]["error_allocated_pct"]) <= 3.0, (ph, res[ph])


def test_newton_schulz_temporaries_where_the_step_is_the_peak():
    """A wide model with a tiny batch and vocabulary peaks in the optimizer step, and there in
    Muon's Newton-Schulz on an MLP matrix (4h x h): the fp32 update, its bfloat16 iterates and
    h x h Gram matrices. The planner counts them within 3 % of the tracker (and a planner that
    left them out would be more than 3 % under)."""
    cfg = _cfg("float32", "chunked", True, C=256, V=64, b=1, T=8, L=1)
    est = estimate(cfg, "cpu", "float32")
    step = parts(est.train)["optimizer step"]
    n = 4 * 256 * 256
    assert step >= optstate.muon_step_temporaries([n], 256, r) == r(4 * n) + 2 * r(2 * n) + 2 * r(2 * 256 * 256)
    res = verify(cfg, steps=2)
    for ph in ("train", "eval"):
        assert abs(res[ph]["error_allocated_pct"]) <= 3.0, (ph, res[ph])
    measured = res["train"]["measured_allocated"]
    assert (est.train.allocated - step) < 0.97 * measured


@pytest.mark.parametrize("dtype, wide", [("float32", False), ("bfloat16", True)])
def test_muon_with_the_modern_model_options_within_3_percent(dtype, wide):
    """With every modern model option (rotary: no wpe for AdamW; an untied head: a second
    vocab x n_embd matrix for AdamW; RMSNorm: no norm weights), Muon still takes the blocks'
    matrices and the planner stays within 3 %, also where Muon's step is the peak. (Measured:
    within 0.2 %.)"""
    cfg = _cfg(dtype, "chunked", True, C=256, V=64, b=1, T=8, L=1) if wide else _cfg(dtype)
    m = cfg.model
    m.position, m.qk_norm, m.mlp, m.norm = "rotary", True, "relu2", "rmsnorm"
    m.tie_embeddings, m.zero_init, m.logit_softcap = False, True, 15.0
    check(cfg)
    res = verify(cfg, steps=2)
    for ph in ("train", "eval"):
        assert abs(res[ph]["error_allocated_pct"]) <= 3.0, (ph, res[ph])


# ----------------------------------------------------------------------------- DDP


def test_muon_ddp_two_ranks_equal_one_process(shard_dir, tmp_path):
    """Muon orthogonalises the all-reduced (whole) gradient, which every DDP process holds, so 2
    gloo processes follow one process's losses. Tolerance 1e-4 relative, not AdamW's 1e-5: the
    Newton-Schulz iterations run in bfloat16, whose rounding can flip on the last fp32 bit of
    an all-reduced mean."""
    from test_distributed import records, torchrun

    common = dict(train__max_steps=4, train__lr_decay_steps=4, eval__interval=2, **MUON)
    single = run(tiny_config(shard_dir, tmp_path / "one", **common))
    path = tmp_path / "two.toml"
    path.write_text(to_toml(tiny_config(shard_dir, tmp_path / "two", **common)))
    proc = torchrun(["train", str(path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "run"
    np.testing.assert_allclose(records(two, "train", "loss"), records(Path(single["run_dir"]), "train", "loss"),
                               rtol=1e-4)
    np.testing.assert_allclose(records(two, "eval", "val_loss"),
                               records(Path(single["run_dir"]), "eval", "val_loss"), rtol=1e-4)
    assert load_checkpoint(two)[optim.FORMAT_KEY] == "muon"


def test_auto_fit_never_picks_a_lever_muon_refuses():
    """GPT-2 774M on a 12 GB card fits with AdamW only through optimizer offload; with Muon the
    planner must not pick it (the run would refuse it): it stops with one message that names
    each optimizer lever's refusal and suggests a smaller model."""
    from fitgpt.config.load import load_config
    from fitgpt.planner.fit import auto_fit
    from fitgpt.planner.gpus import GPUS

    card = next(g for g in GPUS if g.key == "rtx4070")
    adamw, _ = auto_fit(load_config("gpt2-774m", []), card.memory, 0.1, gpu=card)
    assert adamw.memory.offload_optimizer
    with pytest.raises(ConfigError) as e:
        auto_fit(load_config("gpt2-774m", ["--train.optimizer=muon"]), card.memory, 0.1, gpu=card)
    msg = str(e.value)
    assert "\n" not in msg and "nothing fits" in msg and "smaller model" in msg
    for lever in ("8-bit AdamW state not possible here: train.optimizer=muon",
                  "optimizer offload not possible here: train.optimizer=muon"):
        assert lever in msg
