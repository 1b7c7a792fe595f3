"""The activation levers: selective checkpointing (memory.checkpoint_every) and activation
offloading (memory.activation_offload). The planner against the CPU storage tracker (within
3 %, measured as tests/test_estimate.py measures), the model and the planner choosing the same
blocks, training unchanged by either lever, and the CUDA-only offload's formulas by hand count
(and, on the CPU, through a stand-in host that the tracker does not see)."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import count_timeline_allocs, tiny_config, torchrun_train
from conftest import train_losses as losses
from test_estimate import DTYPES, make_cfg, measure

from fitgpt.config.load import check, to_toml
from fitgpt.errors import ConfigError
from fitgpt.model import checkpointing as ckpt_mod
from fitgpt.model.checkpointing import apply_activation_offload, checkpointed
from fitgpt.model.offload import MIN_BYTES, is_weight
from fitgpt.model.runtime import Runtime, build_model
from fitgpt.planner import blocks
from fitgpt.planner.activations import offload_seconds, offloaded_bytes, recompute_flops_per_token, recompute_fraction
from fitgpt.planner.blocks import pow2
from fitgpt.planner.estimate import estimate, train_timeline
from fitgpt.planner.gpus import find_gpu, host_link
from fitgpt.planner.stack import checkpointed_blocks, runs
from fitgpt.planner.tracker import StorageTracker
from fitgpt.planner.verify import SyntheticBatches
from fitgpt.train.step import train_step


def cfg_of(L, k, loss="chunked", dropout=0.0, C=64, V=2048, T=64, b=8, accum=1, ckpt=True):
    cfg = make_cfg(L, C, 4, V, T, b, accum, loss, ckpt, False, 4, None, dropout=dropout)
    cfg.memory.checkpoint_every = k
    return cfg


# ----------------------------------------------------------------------------- checkpoint_every

GRID = list(itertools.product(("float32", "bfloat16"), ((1, 3), (2, 3), (2, 4), (3, 4)),
                              ("chunked", "full"), (0.0, 0.1)))


@pytest.mark.parametrize("dtype,kL,loss,dropout", GRID, ids=lambda v: str(v))
def test_checkpoint_every_within_3_percent_of_tracker(dtype, kL, loss, dropout):
    """The planner's training and evaluation peaks with every k-th block checkpointed, against
    the storage tracker: fp32 and bf16 autocast, k = 1, 2, 3 with 3 or 4 layers (a period and
    a remainder), chunked and full loss, dropout 0 and 0.1 (the CPU's math attention path)."""
    k, L = kL
    cfg = cfg_of(L, k, loss, dropout)
    est = estimate(cfg, "cpu", dtype)
    train, ev = measure(cfg, dtype)
    assert abs(est.train.allocated - train) <= 0.03 * train, (est.train.allocated, train)
    assert abs(est.eval.allocated - ev) <= 0.03 * ev, (est.eval.allocated, ev)


def test_checkpoint_every_moves_the_measured_peak():
    """The grid above has teeth: on this model the measured training peak with every other block
    checkpointed lies between none and all, more than 3 % from each, and the planner agrees."""
    peaks, preds = [], []
    for ckpt, k in ((False, 1), (True, 2), (True, 1)):
        cfg = cfg_of(4, k, dropout=0.1, ckpt=ckpt)
        peaks.append(measure(cfg, "float32")[0])
        preds.append(estimate(cfg, "cpu", "float32").train.allocated)
    assert peaks[0] > 1.03 * peaks[1] and peaks[1] > 1.03 * peaks[2], peaks
    assert preds[0] > preds[1] > preds[2]


def test_model_and_planner_checkpoint_the_same_blocks():
    """The model wraps blocks 0, k, 2k, ... (fitgpt.model.checkpointing) and the planner replays
    the same blocks as checkpointed (its runs, flattened)."""
    def flat(plan):
        out = []
        for item, n in plan:
            out += (flat(item) if isinstance(item, list) else [item]) * n
        return out

    for L, k in itertools.product(range(1, 8), range(1, 6)):
        assert flat(runs(L, True, k)) == checkpointed_blocks(L, k) == checkpointed(L, k), (L, k)
        cfg = cfg_of(L, k, C=32, V=64, T=8)
        model = build_model(cfg, torch.device("cpu"))
        wrapped = [getattr(b, "_fitgpt_wrapped", None) == "_checkpointed" for b in model.transformer.h]
        assert wrapped == checkpointed(L, k)
    assert flat(runs(5, False)) == [False] * 5


def _variants():
    for L, k in ((5, 2), (9, 2), (10, 3), (13, 4), (26, 6), (30, 7)):
        for over in ({}, {"loss": "full"}, {"dropout": 0.1}, {"accum": 2}):
            yield cfg_of(L, k, C=32, V=512, T=32, b=2, **over)


@pytest.mark.parametrize("device,dtype,offload", [("cpu", "float32", False),
                                                  ("cuda", "bfloat16", False),
                                                  ("cuda", "bfloat16", True),
                                                  ("cuda", "float32", True)])
def test_periods_replayed_in_one_go_match_one_by_one(monkeypatch, device, dtype, offload):
    """Runs of identical periods, and runs of saving blocks inside a period, are replayed as
    first, middle in one go, last (nested repetitions): every part of both phases, and the host
    memory and bytes moved of the offload, equal the block-by-block replay."""
    monkeypatch.setattr(blocks, "OFFLOAD_MIN_BYTES", 0)  # every saved tensor moves
    for cfg in _variants():
        cfg.memory.activation_offload = offload
        grouped = estimate(cfg, device, dtype)
        moved = offloaded_bytes(cfg, dtype)
        monkeypatch.setattr(blocks, "EXPLICIT_LAYERS", 10**9)
        one_by_one = estimate(cfg, device, dtype)
        assert offloaded_bytes(cfg, dtype) == moved
        monkeypatch.setattr(blocks, "EXPLICIT_LAYERS", 3)
        assert grouped == one_by_one, (cfg.model.n_layer, cfg.memory.checkpoint_every)


def test_planner_cost_does_not_grow_with_checkpoint_every(monkeypatch):
    """A 40-layer model checkpointing every 8th block and a 10^7-layer one every 10^6-th cost
    the planner the same number of timeline operations (periods and the saving blocks inside
    them are each replayed as first, middle, last)."""
    calls = count_timeline_allocs(monkeypatch)
    counts = []
    for L, k in ((40, 8), (10**7, 10**6)):
        cfg = cfg_of(L, k, C=32, V=512, T=32, b=2)
        calls.clear()
        estimate(cfg, "cuda", "bfloat16")
        counts.append(len(calls))
    assert counts[0] == counts[1]


def _losses(cfg, steps=4, wrap=None):
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    if wrap:
        wrap(model)
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    batches = SyntheticBatches(cfg.model.vocab_size, cfg.train.batch_size, cfg.model.block_size, seed=1)

    rt, scaler = Runtime(torch.device("cpu"), torch.float32), torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(123)  # dropout's random numbers
    return [train_step(model, opt, scaler, batches, 1, 1.0, rt)[0].item() for _ in range(steps)]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpoint_every_trains_identically(dropout):
    """Checkpointing changes no number: the losses of 4 steps with every block, every other and
    every third block checkpointed equal those without checkpointing, bit for bit; with dropout
    because torch.utils.checkpoint restores the random state for the recomputation (its
    preserve_rng_state, on by default) and puts the outer one back afterwards."""
    base = _losses(cfg_of(4, 1, dropout=dropout, C=32, V=256, T=32, b=4, ckpt=False))
    for k in (1, 2, 3):
        assert _losses(cfg_of(4, k, dropout=dropout, C=32, V=256, T=32, b=4)) == base, k


def test_without_rng_replay_dropout_would_differ(monkeypatch):
    """The test above has teeth: recomputing without restoring the random state draws other
    dropout masks, and the losses part after the first step."""
    cfg = cfg_of(4, 2, dropout=0.1, C=32, V=256, T=32, b=4)
    base = _losses(cfg_of(4, 1, dropout=0.1, C=32, V=256, T=32, b=4, ckpt=False))
    monkeypatch.setattr(ckpt_mod, "checkpoint", functools.partial(ckpt_mod.checkpoint,
                                                                  preserve_rng_state=False))
    got = _losses(cfg)
    assert got[0] == base[0] and got[1:] != base[1:]


def test_recompute_fraction_counts_the_checkpointed_blocks():
    """Forward FLOPs recomputed: the checkpointed blocks' share of the training FLOPs per token
    (each block 6 x its parameters + 12 x width x context per token, the lm_head never)."""
    cfg = cfg_of(12, 1, C=768, V=50257, T=1024)
    cfg.model.n_head = 12
    C, T, L = 768, 1024, 12
    per_block = 6 * (12 * C * C + 2 * C) + 12 * C * T
    total = L * per_block + 6 * C + 6 * 50304 * C  # + ln_f's weight and the lm_head
    for k, n in ((1, 12), (2, 6), (3, 4), (5, 3), (12, 1), (100, 1)):
        cfg.memory.checkpoint_every = k
        assert recompute_fraction(cfg) == pytest.approx(n * per_block / total, rel=1e-12)
        assert recompute_flops_per_token(cfg) == pytest.approx(n * per_block / 3, rel=1e-12)
    cfg.memory.checkpointing = False
    assert recompute_fraction(cfg) == 0.0


def test_checkpoint_every_composes_with_the_oom_backoff(shard_dir, tmp_path, monkeypatch):
    """An injected out-of-memory with every other block checkpointed (3 layers, dropout)
    retries the same data in 2 slices: the same losses as a run sliced from the start."""
    from fitgpt.train.trainer import run

    over = dict(model__n_layer=3, model__dropout=0.1, memory__checkpointing=True,
                memory__checkpoint_every=2, train__max_steps=3)
    monkeypatch.setenv("FITGPT_FAULT", "oom:train:0:4")
    a = run(tiny_config(shard_dir, tmp_path / "a", **over))
    monkeypatch.delenv("FITGPT_FAULT")
    b = run(tiny_config(shard_dir, tmp_path / "b", memory__micro_split=2, **over))
    assert a["backoff"]["micro_split"] == 2

    def losses(r):
        lines = (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        return [x["loss"] for x in map(json.loads, lines) if x["kind"] == "train"]

    np.testing.assert_allclose(losses(a), losses(b), rtol=1e-6)


# ----------------------------------------------------------------------------- offload

class NumpyHost:
    """A stand-in for pinned host memory on the CPU: numpy copies, which the storage tracker
    does not count (only torch's own allocations are), so the tracker sees the device's side of
    the offload exactly as it would see a GPU's; a copy back is a new tensor (`clone`)."""

    def __init__(self):
        self.moved = 0

    def put(self, t):
        bf16 = t.dtype == torch.bfloat16
        arr = (t.detach().view(torch.int16) if bf16 else t.detach()).numpy().copy()
        self.moved += arr.nbytes
        return arr, bf16

    def get(self, stored, device):
        arr, bf16 = stored
        out = torch.from_numpy(arr).clone()
        return out.view(torch.bfloat16) if bf16 else out


def measure_offload(cfg, dtype, min_bytes):
    """Tracker peak of a steady-state training step (as test_estimate.measure) with the blocks'
    saved tensors sent to a NumpyHost, and the bytes sent in that step."""
    rt = Runtime(torch.device("cpu"), DTYPES[dtype])
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    host = NumpyHost()
    apply_activation_offload(model, host, min_bytes)
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    batches = SyntheticBatches(cfg.model.vocab_size, cfg.train.batch_size, cfg.model.block_size)

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(model, opt, scaler, batches, cfg.train.grad_accum, 1.0, rt)
    tracker = StorageTracker("cpu")
    tracker.add(model)
    tracker.add(opt)
    host.moved = 0
    with tracker:
        train_step(model, opt, scaler, batches, cfg.train.grad_accum, 1.0, rt)
    return tracker.peak, host.moved


OFFLOAD_GRID = [("float32", "chunked", False, 0), ("float32", "full", True, 16384),
                ("bfloat16", "chunked", True, 0), ("bfloat16", "full", False, 16384),
                ("float32", "chunked", False, 16384), ("bfloat16", "chunked", False, 0)]


@pytest.mark.parametrize("dtype,loss,every2,min_bytes", OFFLOAD_GRID, ids=lambda v: str(v))
def test_offload_device_side_within_3_percent_of_tracker(monkeypatch, dtype, loss, every2, min_bytes):
    """The offload's device side, run on the CPU with a stand-in host: the planner's training
    timeline (what stays: tensors under the threshold, weights and autocast's copies, each node's
    copies back while it runs) within 3 % of the tracker, and the bytes moved exactly; with
    every block offloading, or every other one checkpointed; the threshold at 0 (everything
    moves, LayerNorm statistics included) and at 16 KiB (they and the log-sum-exp stay)."""
    monkeypatch.setattr(blocks, "OFFLOAD_MIN_BYTES", min_bytes)
    cfg = cfg_of(4, 2 if every2 else 1, loss, ckpt=every2)
    a = 4 if dtype == "float32" else 2
    base = train_timeline(cfg, a, "cpu").peak
    cfg.memory.activation_offload = True
    tl = train_timeline(cfg, a, "cpu")
    cfg.memory.activation_offload = False
    peak, moved = measure_offload(cfg, dtype, min_bytes)
    assert abs(tl.peak - peak) <= 0.03 * peak, (tl.peak, peak)
    assert tl.moved == moved
    assert tl.peak < 0.9 * base  # the lever did something here


def test_offload_trains_identically():
    """Offloading moves tensors, not numbers: the losses of 4 steps through the stand-in host
    equal those without it, bit for bit."""
    cfg = cfg_of(3, 1, C=32, V=256, T=32, b=4, ckpt=False)
    base = _losses(cfg)
    assert _losses(cfg, wrap=lambda m: apply_activation_offload(m, NumpyHost(), 0)) == base


def test_offload_keeps_weights_on_the_device():
    """A linear layer saves its weight (fp32: a transposed view of the parameter; autocast: the
    16-bit copy of it): the hooks leave those, and move the activation."""
    lin = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(8, 64, requires_grad=True).mul(2)
    seen = []

    def pack(t):
        seen.append((tuple(t.shape), is_weight(t)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lin(x)
    assert sorted(seen) == sorted([((64, 64), True), ((8, 64), False)] * 2)
    assert is_weight(lin.weight) and MIN_BYTES == blocks.OFFLOAD_MIN_BYTES


def _cuda_cfg(L=4, k=1, ckpt=False, dropout=0.0, C=192, accum=1):
    """bf16 on CUDA, N = 8 x 1024 rows: every (N, C) tensor is at least 1 MiB and none is a power
    of two; LayerNorm statistics (32 KiB) and the log-sum-exp (4 x 8 x 4 x 1024 = 128 KiB) stay."""
    cfg = make_cfg(L, C, 4, 4096, 1024, 8, accum, "chunked", ckpt, False, None, None, dropout=dropout)
    cfg.memory.checkpoint_every, cfg.memory.activation_offload = k, True
    return cfg


def test_offloaded_bytes_by_hand():
    """What one saving block sends to the host in bf16 (N rows, width C): its input (fp32, 4),
    LayerNorm 1's output cast for the qkv matmul (2), q, k and v (2 each), the attention output
    twice (saved by attention and by the projection: 2 x 2), the residual (fp32, 4), LayerNorm
    2's cast output (2), the MLP's up-projection (8) and GELU output (8): 38 x N x C bytes; with
    dropout two bool masks more (1 each). Host memory rounds each copy up to a power of two."""
    N, C, L = 8 * 1024, 192, 4
    NC = N * C
    sizes = [4 * NC, 2 * NC, 2 * NC, 2 * NC, 2 * NC, 2 * NC, 2 * NC, 4 * NC, 2 * NC, 8 * NC, 8 * NC]
    assert sum(sizes) == 38 * NC
    cfg = _cuda_cfg(L)
    assert offloaded_bytes(cfg) == L * 38 * NC
    assert estimate(cfg, "cuda", "bfloat16").train.host == L * sum(pow2(n) for n in sizes)
    assert offloaded_bytes(_cuda_cfg(L, dropout=0.1)) == L * 40 * NC
    # every other block checkpointed: half the blocks save (and offload), the others keep inputs
    assert offloaded_bytes(_cuda_cfg(L, k=2, ckpt=True)) == L // 2 * 38 * NC
    # fp32: the LayerNorm outputs themselves (4 each), q, k, v, the output twice at 4 B
    assert offloaded_bytes(_cuda_cfg(L), "float32") == L * (4 + 4 + 12 + 8 + 4 + 4 + 16 + 16) * NC
    # accumulation: each micro-batch's copies come back in its backward; the host holds one
    assert estimate(_cuda_cfg(L, accum=2), "cuda", "bfloat16").train.host == L * sum(map(pow2, sizes))
    assert estimate(_cuda_cfg(L), "cuda", "bfloat16").eval.host == 0


def test_offload_activations_at_the_peak_do_not_grow_with_layers():
    """With every block offloading, the activations alive at the training peak do not grow with
    the number of layers: what stays per block (LayerNorm statistics, the log-sum-exp) is small,
    and the peak moves into backward, where a node's copies come back one node at a time.
    Without offload they grow by everything a block saves: 36 N C bytes and more (on the card
    the attention output is one tensor, saved by two nodes)."""
    N, C = 8 * 1024, 192

    def acts(L, offload=True):
        cfg = _cuda_cfg(L)
        cfg.memory.activation_offload = offload
        return {p.name: p.bytes for p in estimate(cfg, "cuda", "bfloat16").train.parts}["activations"]

    assert acts(8) == acts(4) < acts(4, False) / 5
    assert acts(8, False) - acts(4, False) > 4 * 36 * N * C


def test_offload_time_by_hand():
    """Per optimizer step: every micro-batch's bytes to the host and back over the card's link
    (PCIe 4.0 x16 on an RTX 4070: 0.8 x 16 x 1.969 GB/s each way), not overlapped."""
    gpu = find_gpu("rtx4070")
    cfg = _cuda_cfg(4, accum=3)
    assert host_link(gpu) == pytest.approx(25.2e9, rel=1e-3)
    assert offload_seconds(cfg, gpu) == pytest.approx(3 * 2 * 4 * 38 * 8 * 1024 * 192 / host_link(gpu))
    cfg.memory.activation_offload = False
    assert offload_seconds(cfg, gpu) == 0.0


def test_offload_refusals_are_one_line():
    """Offload needs a CUDA card, is a no-op with every block checkpointed, is refused under
    FSDP2 and torch.compile; checkpoint_every needs checkpointing. Each refusal names the fix."""
    cfg = _cuda_cfg(2)
    with pytest.raises(ConfigError, match="nothing to offload to.*--memory.activation_offload=false"):
        build_model(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="nothing to offload to"):
        estimate(cfg, "cpu", "float32")
    cases = [({"memory.checkpointing": True}, "every block is checkpointed.*checkpoint_every=2"),
             ({"parallel.nproc": 2, "parallel.mode": "fsdp"}, "fsdp.*--parallel.mode=ddp"),
             ({"train.compile": True}, "torch.compile.*--train.compile=false"),
             ({"memory.activation_offload": False, "memory.checkpoint_every": 2},
              "checkpointing is off; set --memory.checkpointing=true")]
    for changes, needle in cases:
        c = _cuda_cfg(2)
        for key, value in changes.items():
            sec, name = key.split(".")
            setattr(getattr(c, sec), name, value)
        with pytest.raises(ConfigError, match=needle):
            check(c)
    ok = _cuda_cfg(2, k=2, ckpt=True)
    ok.parallel.nproc, ok.parallel.mode = 2, "ddp"
    check(ok)  # every other block checkpointed, the rest offloaded, under DDP: fine


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_checkpoint_every_under_fsdp2_and_ddp(shard_dir, tmp_path, mode):
    """FSDP2 shards each block (fully_shard per block, then the root) around blocks whose forward
    checkpointing wrapped, and DDP reduces gradients that recomputed blocks produce late: with
    every other block checkpointed, 2 CPU ranks train with the losses of one process without
    checkpointing."""

    if mode == "fsdp":
        fsdp = pytest.importorskip("torch.distributed.fsdp")
        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("no FSDP2 (torch.distributed.fsdp.fully_shard) in this torch")
    from fitgpt.train.trainer import run

    common = dict(train__max_steps=2, train__lr_decay_steps=2, eval__interval=2, model__n_layer=3)
    single = run(tiny_config(shard_dir, tmp_path / "one", **common))
    cfg = tiny_config(shard_dir, tmp_path / "fsdp", memory__checkpointing=True,
                      memory__checkpoint_every=2, **common)
    cfg.parallel.mode = mode
    path = tmp_path / "fsdp.toml"
    path.write_text(to_toml(cfg))
    torchrun_train(path)

    np.testing.assert_allclose(losses(tmp_path / "fsdp" / "run"), losses(single["run_dir"]), rtol=1e-5)
