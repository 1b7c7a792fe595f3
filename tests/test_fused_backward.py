"""memory.fused_backward: the AdamW step fused into backward (fitgpt.train.fused).

It must learn exactly like the plain step (AdamW updates each tensor from its own gradient and
state, so per-parameter updates are the same arithmetic), keep the guard, the back-off, the
learning-rate schedule and checkpoints working, be refused with one line where it cannot work,
and be predicted by the planner within 3 % of the storage tracker (the `plan --verify` path).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, train_losses

from fitgpt.config.levers import fused_backward_refusal
from fitgpt.config.load import load_config
from fitgpt.config.schema import Config
from fitgpt.errors import ConfigError
from fitgpt.model.runtime import Runtime, build_model
from fitgpt.planner.estimate import estimate
from fitgpt.planner.verify import verify
from fitgpt.store.checkpoint import load_checkpoint
from fitgpt.store.resume import resume_config
from fitgpt.train.faults import Faults
from fitgpt.train.fused import FusedBackward
from fitgpt.train.step import train_step
from fitgpt.train.trainer import OutOfMemory, run

FUSED = dict(memory__fused_backward=True, train__grad_clip=0.0)


def small_cfg(accum: int = 1) -> Config:
    cfg = Config()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 2, 2, 32, 32, 256
    cfg.train.batch_size, cfg.train.grad_accum, cfg.memory.loss_chunk = 4, accum, 48
    return cfg


class Batches:
    """Seeded random token batches: both runs of a comparison draw the same ones."""

    def __init__(self, seed: int = 1, b: int = 4, T: int = 32):
        self.gen, self.b, self.T = torch.Generator().manual_seed(seed), b, T

    def next_batch(self):
        t = torch.randint(0, 256, (self.b, self.T + 1), generator=self.gen)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def train(fused: bool, steps: int, dtype=torch.float32, accum: int = 1, split: int = 1,
          optimizer_fused: bool | None = None):
    """`steps` steps of a tiny model with a changing learning rate and weight decay: (losses,
    model, optimizer)."""
    rt = Runtime(torch.device("cpu"), dtype)
    torch.manual_seed(0)
    model = build_model(small_cfg(accum), torch.device("cpu"))
    opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cpu")
    if optimizer_fused is not None:
        for g in opt.param_groups:
            g["fused"] = optimizer_fused
    hooks = FusedBackward(model, opt) if fused else None
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches, losses = Batches(), []
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * (s + 1) / steps  # the schedule reaches every per-parameter AdamW
        loss, _, skipped = train_step(model, opt, scaler, batches, accum, 0.0, rt, split=split,
                                      step=s, fused=hooks)
        assert not skipped
        losses.append(loss.item())
    return losses, model, opt


@pytest.mark.parametrize("dtype, accum, split", [(torch.float32, 1, 1), (torch.float32, 3, 1),
                                                 (torch.float32, 2, 2), (torch.bfloat16, 2, 1)])
def test_fused_step_learns_bit_for_bit_like_the_plain_step(dtype, accum, split):
    """Same losses and same weights and AdamW state, to the bit, after 5 steps: AdamW updates
    each tensor from its own gradient and state (the CPU's for-loop implementation, which both
    use), the gradients are the same tensors (the hooks run after autograd has accumulated a
    parameter's whole gradient, over micro-batches and the back-off's slices too), and the
    weight-decay groups and the learning-rate schedule reach every per-parameter AdamW. So the
    tolerance is zero: any difference is a bug (a hook firing early, a group's hyperparameters
    lost), not rounding."""
    a, ma, oa = train(False, 5, dtype, accum, split)
    b, mb, ob = train(True, 5, dtype, accum, split)
    assert a == b
    for (k, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(x, y), k
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]  # two groups, decay and no-decay, as without
    for i, st in sa["state"].items():
        assert all(torch.equal(v, sb["state"][i][k]) for k, v in st.items())
    assert all(p.grad is None for p in mb.parameters())  # every gradient freed in backward


def test_fused_kernel_variant_matches_to_rounding():
    """AdamW's fused kernel (CUDA's choice, also on the CPU) per parameter: the same run to float
    rounding (it orders the arithmetic differently from the for-loop)."""
    a, *_ = train(False, 4)
    b, *_ = train(True, 4, optimizer_fused=True)
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5 * max(a)


def _one_step(fault: str | None, optimizer_fused: bool | None, poison_late: bool = False):
    """A step after a first one (AdamW state exists) with a fault: (skipped, which parameters
    changed, whether each AdamW state is unchanged)."""
    rt = Runtime(torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    model = build_model(small_cfg(), torch.device("cpu"))
    opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cpu")
    for g in opt.param_groups:
        g["fused"] = optimizer_fused
    hooks = FusedBackward(model, opt)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = [Batches().next_batch()]
    train_step(model, opt, scaler, None, 1, 0.0, rt, data=data, step=0, fused=hooks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    if poison_late:  # the first block's qkv weight: late in backward, after the last block's
        model.transformer.h[0].attn.c_attn.weight.register_hook(lambda g: g + float("inf"))
    faults = Faults.from_env(env={"FITGPT_FAULT": fault}) if fault else Faults()
    _, norm, skipped = train_step(model, opt, scaler, None, 1, 0.0, rt, data=data, step=1,
                                  fused=hooks, faults=faults)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    kept = {n for n, p in model.named_parameters()
            if all(torch.equal(v, opt.state[p][k]) for k, v in state[n].items())}
    assert all(p.grad is None for p in model.parameters())
    return skipped, changed, kept, norm


@pytest.mark.parametrize("optimizer_fused", [None, True])
@pytest.mark.parametrize("fault", ["nan:1", "infgrad:1"])
def test_nonfinite_loss_or_first_gradient_skips_the_whole_step(fault, optimizer_fused):
    """A NaN loss, or an infinite first gradient with a finite loss, skips every update and
    leaves AdamW's state (moments and step counts) as it was, as the plain step does: the guard
    starts at 0 x loss and runs in backward order. Both ways of checking: a host read for the
    for-loop AdamW, the kernel's found_inf for the fused one."""
    skipped, changed, kept, norm = _one_step(fault, optimizer_fused)
    assert skipped and not torch.isfinite(norm)
    assert changed == set()
    assert len(kept) == 15  # every parameter


def test_gradient_turning_nonfinite_late_stops_the_updates_from_there():
    """An infinite gradient in the middle of backward: the parameters before it (ln_f, the last
    block) took the update, it and those after it (the first block, the embeddings) did not, and
    the step reports itself skipped (docs/memory.md: an update cannot wait for the global norm)."""
    skipped, changed, kept, _ = _one_step(None, None, poison_late=True)
    assert skipped
    assert "transformer.ln_f.weight" in changed and "transformer.h.1.mlp.c_fc.weight" in changed
    stopped = {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.ln_1.weight",
               "transformer.wte.weight", "transformer.wpe.weight"}
    assert not stopped & changed and stopped <= kept


@pytest.mark.parametrize("override, needle", [
    (["--train.grad_clip=1.0"], "--train.grad_clip=0"),
    (["--train.grad_clip=0", "--train.dtype=float16"], "--train.dtype=bfloat16 or float32"),
    (["--train.grad_clip=0", "--parallel.nproc=2"], "--parallel.nproc=1"),
    (["--train.grad_clip=0", "--memory.optimizer_state=8bit"], "--memory.optimizer_state=fp32"),
])
def test_invalid_combinations_are_refused_in_one_line(override, needle):
    """Clipping needs the global norm before any update, float16's GradScaler every gradient
    before any update, DDP the all-reduce before it: each is refused with the setting to change."""
    with pytest.raises(ConfigError) as e:
        load_config("demo-gpt2", ["--memory.fused_backward=true", *override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and "fused_backward" in msg
    load_config("demo-gpt2", ["--memory.fused_backward=true", "--train.grad_clip=0"])  # valid
    cfg = load_config("demo-gpt2", ["--memory.fused_backward=true", "--train.grad_clip=0"])
    assert "float16" in fused_backward_refusal(cfg, "float16", 1)  # dtype=auto resolved so
    assert "2 processes" in fused_backward_refusal(cfg, "bfloat16", 2)  # torchrun's world


def test_run_refuses_clipping_before_building(shard_dir, tmp_path):
    """A config made in code (not through load_config) is refused by build_training too."""
    with pytest.raises(ConfigError, match="grad_clip"):
        run(tiny_config(shard_dir, tmp_path, memory__fused_backward=True))



def test_training_run_reaches_the_same_val_loss(shard_dir, tmp_path):
    """Learning equivalence through `fitgpt train`'s own loop (schedule, accumulation 2,
    evaluation): the fused run's train losses and val loss equal the plain AdamW run's."""
    common = dict(train__max_steps=8, eval__interval=4, train__grad_clip=0.0)
    plain = run(tiny_config(shard_dir, tmp_path / "a", **common))
    fused = run(tiny_config(shard_dir, tmp_path / "b", **common, memory__fused_backward=True))
    assert fused["val_loss"] == plain["val_loss"] < plain["first_val_loss"] - 0.5
    assert train_losses(plain["run_dir"]) == train_losses(fused["run_dir"])


@pytest.mark.parametrize("first, second", [(False, True), (True, False)])
def test_resume_switching_fused_backward_is_exact(first, second, shard_dir, tmp_path):
    """A checkpoint saved with the lever on or off resumes with it switched: the run optimizer's
    state_dict has the same layout either way (two groups, state by parameter name), so 3 + 3
    steps equal 6 uninterrupted ones, weights and losses to the bit."""
    common = dict(train__max_steps=6, train__lr_decay_steps=6, eval__interval=3, train__grad_clip=0.0)
    full = run(tiny_config(shard_dir, tmp_path / "a", **common))
    half = tiny_config(shard_dir, tmp_path / "b", **{**common, "train__max_steps": 3},
                       memory__fused_backward=first)
    run(half)
    flag = f"--memory.fused_backward={str(second).lower()}"
    cfg, ckpt, run_dir = resume_config(str(tmp_path / "b" / "run"), None, ["--train.max_steps=6", flag], [])
    assert cfg.memory.fused_backward is second
    resumed = run(cfg, ckpt=ckpt, run_dir=run_dir)
    assert resumed["val_loss"] == full["val_loss"]
    a, b = load_checkpoint(tmp_path / "a" / "run"), load_checkpoint(run_dir)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    groups = [[{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}  # betas: a list once
               for g in d["optimizer"]["param_groups"]] for d in (a, b)]  # loaded (either way)
    assert groups[0] == groups[1]
    assert train_losses(tmp_path / "a" / "run") == train_losses(run_dir)


def test_oom_before_any_update_backs_off_exactly(shard_dir, tmp_path, monkeypatch):
    """Out of memory before the last backward began (nothing updated yet) is retried in slices,
    and the slices accumulate like micro-batches: the same result as micro_split=2 from the start."""
    monkeypatch.setenv("FITGPT_FAULT", "oom:backward:0:4")  # micro-batch 1 of 2: nothing updated yet
    a = run(tiny_config(shard_dir, tmp_path / "a", train__max_steps=3, **FUSED))
    monkeypatch.delenv("FITGPT_FAULT")
    b = run(tiny_config(shard_dir, tmp_path / "b", train__max_steps=3, memory__micro_split=2, **FUSED))
    assert a["backoff"]["micro_split"] == 2
    assert train_losses(a["run_dir"]) == train_losses(b["run_dir"])
    pa, pb = load_checkpoint(a["run_dir"])["model"], load_checkpoint(b["run_dir"])["model"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_oom_after_an_update_is_not_retried(shard_dir, tmp_path, monkeypatch):
    """Out of memory once some weights took the step cannot be retried (they would take it
    twice): the run stops with one line that says so and how to resume."""
    real = FusedBackward._update
    calls = {"n": 0}

    def update(self, p):
        calls["n"] += 1
        if calls["n"] == 15 + 3:  # step 1 (after step 0's 15 parameters), third parameter
            raise torch.OutOfMemoryError("injected")
        real(self, p)

    monkeypatch.setattr(FusedBackward, "_update", update)
    with pytest.raises(OutOfMemory, match="cannot be retried.*--memory.micro_split=2"):
        run(tiny_config(shard_dir, tmp_path, train__max_steps=3, **FUSED))


def verify_cfg(accum, loss, ckpt, bias, split=1, L=2, C=128, V=1024, T=32, b=2) -> Config:
    cfg = Config(name="fused")
    m = cfg.model
    m.n_layer, m.n_embd, m.n_head, m.vocab_size, m.block_size, m.bias = L, C, 4, V, T, bias
    t = cfg.train
    t.batch_size, t.grad_accum, t.device, t.grad_clip = b, accum, "cpu", 0.0
    cfg.memory.loss, cfg.memory.checkpointing, cfg.memory.loss_chunk = loss, ckpt, 64
    cfg.memory.micro_split, cfg.memory.fused_backward = split, True
    cfg.eval.batch_size, cfg.eval.tokens = 4, 512
    return cfg


GRID = [  # dtype, accumulation, loss, checkpointing, bias, micro_split, peak in the fused backward
    ("float32", 1, "chunked", False, False, 1, True),
    ("float32", 2, "full", False, True, 1, True),
    ("float32", 3, "chunked", True, True, 1, True),
    ("float32", 1, "full", True, False, 2, True),
    ("bfloat16", 1, "chunked", False, True, 1, False),
    ("bfloat16", 3, "full", False, False, 1, True),
    ("bfloat16", 2, "chunked", True, False, 1, False),
    ("bfloat16", 1, "full", True, True, 1, True),
]


@pytest.mark.parametrize("row", GRID, ids=lambda row: "-".join(map(str, row)))
def test_estimate_within_3_percent_of_tracker(row):
    """The planner against the storage tracker, measured the way `fitgpt plan --verify`
    measures (build_training's step): training and evaluation within 3 %, over float32 and
    bfloat16, chunked and full loss, checkpointing on and off, accumulation 1-3 and the
    back-off's slices. The model state is large against the activations here (b x T = 64
    rows), so in most rows the peak is in the fused backward itself, where the gradients come
    and go (an "optimizer step" part, the guard's running sum at least, is alive at the peak);
    in the others the lever moved the peak elsewhere (the forward, a middle micro-batch)."""
    dtype, accum, loss, ckpt, bias, split, in_backward = row
    cfg = verify_cfg(accum, loss, ckpt, bias, split)
    cfg.train.dtype = dtype
    parts = {p.name: p.bytes for p in estimate(cfg, "cpu", dtype).train.parts}
    assert (parts.get("optimizer step", 0) > 0) == in_backward
    r = verify(cfg, steps=2)
    assert abs(r["train"]["error_allocated_pct"]) <= 3, r["train"]
    assert abs(r["eval"]["error_allocated_pct"]) <= 3, r["eval"]


def test_the_saving_is_measured_and_predicted():
    """With accumulation 1 the fused step never holds every gradient: where the plain step's
    peak is its AdamW step (all gradients and the for-loop's temporaries), the measured and the
    predicted peak both drop, and by the same amount (within 3 % of the peak)."""
    fused = verify(verify_cfg(1, "chunked", False, False), steps=2)["train"]
    cfg = verify_cfg(1, "chunked", False, False)
    cfg.memory.fused_backward, cfg.train.grad_clip = False, 1.0
    plain = verify(cfg, steps=2)["train"]
    saved_meas = plain["measured_allocated"] - fused["measured_allocated"]
    saved_pred = plain["predicted_allocated"] - fused["predicted_allocated"]
    assert saved_meas > 0.05 * plain["measured_allocated"]
    assert abs(saved_pred - saved_meas) <= 0.03 * plain["measured_allocated"]


def test_cuda_prediction_has_no_per_parameter_temporaries():
    """On CUDA AdamW runs its fused kernel, in place: a fused-backward update adds only a few
    scalars (the gradient's norm, the found-inf flag), never a parameter-sized temporary, and
    the gradients alive at the peak are fewer than all of them (hand count: 4 B per parameter)."""
    cfg = verify_cfg(1, "chunked", False, False, L=4, C=256, V=8192, T=64, b=1)
    est = estimate(cfg, "cuda", "bfloat16")
    parts = {p.name: p.bytes for p in est.train.parts}
    assert parts.get("optimizer step", 0) <= 4 * 512
    assert parts.get("gradients", 0) < 4 * est.params
    cfg.memory.fused_backward = False
    plain = {p.name: p.bytes for p in estimate(cfg, "cuda", "bfloat16").train.parts}
    assert plain["gradients"] >= 4 * est.params - 512 * 64  # all of them (rounding aside)
