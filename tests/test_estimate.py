"""The planner's estimate against the storage tracker's measurement on the CPU (within 3 %),
the CUDA-only terms against facts from PyTorch's source and hand counts, and the planner's
cost, which must not grow with the model or the batch."""

from __future__ import annotations

import pytest
import torch
from conftest import count_timeline_allocs

from fitgpt.config.schema import Config
from fitgpt.eval.evaluate import evaluate
from fitgpt.model.gpt import GPT
from fitgpt.model.runtime import Runtime, build_model
from fitgpt.model.shape import ModelShape
from fitgpt.planner import blocks
from fitgpt.planner.estimate import CUDA_CONTEXT, estimate
from fitgpt.planner.gpus import cublas_workspace, find_gpu
from fitgpt.planner.timeline import r
from fitgpt.planner.tracker import StorageTracker, rounded
from fitgpt.planner.verify import SyntheticBatches
from fitgpt.train.step import train_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MiB = 2**20


def make_cfg(L, C, H, V, T, b, accum, loss, ckpt, bias, eb, eT, dropout=0.0) -> Config:
    cfg = Config()
    m = cfg.model
    m.n_layer, m.n_embd, m.n_head, m.vocab_size, m.block_size, m.bias = L, C, H, V, T, bias
    m.dropout = dropout
    cfg.train.batch_size, cfg.train.grad_accum = b, accum
    cfg.memory.loss, cfg.memory.checkpointing, cfg.memory.loss_chunk = loss, ckpt, 256
    cfg.eval.batch_size, cfg.eval.block_size = eb, eT
    return cfg


def measure(cfg: Config, dtype: str) -> tuple[int, int]:
    """Tracker peaks of a steady-state training step (optimizer state exists) and of an
    evaluation pass with the training state alive, as `fitgpt train` measures them."""
    rt = Runtime(torch.device("cpu"), DTYPES[dtype])
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    batches = SyntheticBatches(cfg.model.vocab_size, cfg.train.batch_size, cfg.model.block_size)

    class Val:
        def batches(self, bs):
            for _ in range(2):
                shape = (bs, cfg.eval_block_size)
                yield (torch.randint(0, cfg.model.vocab_size, shape),
                       torch.randint(0, cfg.model.vocab_size, shape))

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(model, opt, scaler, batches, cfg.train.grad_accum, 1.0, rt)
    peaks = []
    for fn in (lambda: train_step(model, opt, scaler, batches, cfg.train.grad_accum, 1.0, rt),
               lambda: evaluate(model, Val(), cfg.eval_batch_size, rt)):
        tracker = StorageTracker("cpu")
        tracker.add(model)
        tracker.add(opt)
        with tracker:
            fn()
        peaks.append(tracker.peak)
    return peaks[0], peaks[1]


GRID = [  # L, C, H, V, T, b, accum, loss, checkpointing, bias, eval batch, eval block, dtype, dropout
    (2, 64, 4, 8192, 64, 8, 1, "chunked", False, False, None, None, "float32", 0.0),
    (2, 64, 4, 8192, 64, 8, 1, "full", False, False, None, None, "float32", 0.0),
    (2, 64, 4, 8192, 64, 8, 2, "chunked", True, False, 4, 32, "float32", 0.0),
    (3, 96, 4, 8192, 128, 4, 1, "full", True, True, 8, None, "float32", 0.0),
    (2, 64, 4, 8192, 64, 8, 1, "chunked", False, True, None, None, "bfloat16", 0.0),
    (2, 64, 4, 8192, 64, 8, 1, "full", False, False, 2, 64, "bfloat16", 0.0),
    (2, 64, 4, 4096, 64, 8, 2, "chunked", True, False, 16, 32, "bfloat16", 0.0),
    (3, 64, 8, 4096, 64, 8, 1, "full", True, True, None, 32, "bfloat16", 0.0),
    (2, 128, 4, 2048, 256, 16, 1, "chunked", False, False, 4, None, "float32", 0.0),
    (2, 64, 4, 2048, 128, 8, 3, "chunked", False, True, 4, None, "bfloat16", 0.0),
    # dropout: on the CPU, SDPA's math path saves (b, heads, s, s) tensors, and each dropout
    # a noise tensor; nanoGPT's train_shakespeare_char.py uses 0.2
    (2, 64, 4, 4096, 64, 8, 1, "chunked", False, False, None, None, "float32", 0.1),
    (2, 64, 4, 2048, 128, 8, 2, "full", False, True, 4, None, "bfloat16", 0.2),
    (4, 48, 4, 1024, 64, 4, 2, "chunked", True, True, 4, None, "float32", 0.1),
    (2, 64, 4, 2048, 64, 8, 1, "chunked", True, False, 8, 32, "bfloat16", 0.2),
    (4, 48, 6, 65, 64, 4, 1, "chunked", False, False, None, None, "float32", 0.2),
]


@pytest.mark.parametrize("row", GRID, ids=lambda row: "-".join(map(str, row)))
def test_estimate_within_3_percent_of_tracker(row):
    """Guards the planner's accuracy: predicted train and eval peaks within 3 % of measured,
    over fp32 and bf16 autocast, chunked and full loss, checkpointing on and off, bias on and
    off, dropout 0, 0.1 and 0.2, accumulation, and eval batch and block different from
    training's. (Before dropout was modelled, the dropout rows were 26-40 % under.)"""
    *shape, dtype, dropout = row
    cfg = make_cfg(*shape, dropout=dropout)
    est = estimate(cfg, "cpu", dtype)
    train, ev = measure(cfg, dtype)
    assert abs(est.train.allocated - train) <= 0.03 * train, (est.train.allocated, train)
    assert abs(est.eval.allocated - ev) <= 0.03 * ev, (est.eval.allocated, ev)
    assert sum(p.bytes for p in est.train.parts) == est.train.allocated
    assert sum(p.bytes for p in est.eval.parts) == est.eval.allocated


def test_cublas_workspaces_are_inside_allocated_per_architecture():
    """PyTorch's cuBLAS workspaces come from the caching allocator, so max_memory_allocated
    counts them: one per thread that runs matmuls (forward, and autograd's for backward). Sizes
    from PyTorch's CublasHandlePool.cpp: ':4096:8' = 32 MiB on Hopper and Blackwell, else
    ':4096:2:16:8' = 2 x 4096 KiB + 8 x 16 KiB. Only the CUDA context stays outside."""
    cfg = make_cfg(2, 64, 4, 8192, 64, 8, 1, "chunked", False, False, None, None)
    h100, rtx4070 = find_gpu("h100"), find_gpu("rtx4070")
    hopper = estimate(cfg, "cuda", "bfloat16", h100)
    ada = estimate(cfg, "cuda", "bfloat16", rtx4070)
    for est, one in ((hopper, 32 * MiB), (ada, 2 * 4096 * 1024 + 8 * 16 * 1024)):
        parts = {p.name: p.bytes for p in est.train.parts}
        assert parts["cuBLAS workspaces"] == 2 * one
        assert {p.name: p.bytes for p in est.eval.parts}["cuBLAS workspaces"] == 2 * one
        names = [p.name for p in est.train.overhead]
        assert names == ["CUDA context", "fragmentation allowance"]
        assert est.train.total == est.train.allocated + sum(p.bytes for p in est.train.overhead)
    assert hopper.train.allocated - ada.train.allocated == 2 * (32 * MiB - 8519680)
    # the CUDA context (outside the allocator) is in the 0.3-0.6 GiB that notes/memory.md gives
    assert 0.3 * 2**30 <= CUDA_CONTEXT <= 0.6 * 2**30
    assert estimate(cfg, "cpu", "float32").train.overhead == []
    # CUBLAS_WORKSPACE_CONFIG, when set, sizes it as PyTorch parses it
    assert cublas_workspace(rtx4070, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}) == 32 * MiB
    assert cublas_workspace(h100, {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == 128 * 1024
    assert cublas_workspace(find_gpu("rtx5090"), {}) == 32 * MiB  # Blackwell, 12.0
    assert cublas_workspace(find_gpu("12GB"), {}) == 32 * MiB  # unknown: the larger


def test_cuda_dropout_adds_bool_masks_only():
    """On CUDA the fused attention kernel draws its dropout mask itself (it saves a Philox seed
    and offset, no (b, heads, s, s) tensor) and every other dropout saves a bool mask: dropout
    adds 2 masks per block and one after the embeddings, N x C bytes each (N = b x s), to what
    is alive when the chunked loss runs, where this config peaks."""
    cfg = make_cfg(4, 64, 4, 8192, 64, 8, 1, "chunked", False, False, None, None)
    base = estimate(cfg, "cuda", "bfloat16")
    cfg.model.dropout = 0.1
    drop = estimate(cfg, "cuda", "bfloat16")
    N, C, L = 8 * 64, 64, 4
    assert drop.train.allocated - base.train.allocated == (2 * L + 1) * N * C
    assert drop.eval.allocated == base.eval.allocated  # model.eval(): no dropout


def test_eval_only_plans_no_optimizer_state():
    """An eval-only run (nanoGPT's eval_only=True) never creates AdamW state: its evaluation is
    the training run's minus exactly the state of every parameter (exp_avg and exp_avg_sq in
    fp32 and a step scalar, each rounded to 512 B, counted here from the real model), and on
    CUDA one cuBLAS workspace fewer (no backward has run)."""
    cfg = make_cfg(2, 64, 4, 8192, 64, 8, 1, "chunked", False, False, 4, None)
    run_eval = estimate(cfg, "cpu", "float32").eval
    cfg.train.eval_only = True
    only = estimate(cfg, "cpu", "float32")
    with torch.device("meta"):
        model = GPT(ModelShape.of(cfg.model))
    state = sum(2 * rounded(4 * p.numel()) + rounded(4) for p in model.parameters())
    assert run_eval.allocated - only.eval.allocated == state
    assert "optimizer state" not in {p.name for p in only.eval.parts}
    assert only.peak == only.eval.total  # only the evaluation must fit
    gpu = find_gpu("rtx4070")
    with_train = estimate(make_cfg(2, 64, 4, 8192, 64, 8, 1, "chunked", False, False, 4, None),
                          "cuda", "bfloat16", gpu)
    cuda_only = estimate(cfg, "cuda", "bfloat16", gpu)
    spaces = {p.name: p.bytes for p in cuda_only.eval.parts}["cuBLAS workspaces"]
    assert spaces == 8519680 and {p.name: p.bytes for p in with_train.eval.parts}[
        "cuBLAS workspaces"] == 2 * 8519680


def test_cuda_fused_adamw_has_no_step_temporaries():
    """On CUDA fitgpt uses fused AdamW: no per-tensor temporaries. On the CPU the per-tensor
    loop computes sqrt(exp_avg_sq) and the denominator of each parameter while the previous
    one's denominator is still alive: here the MLP's up matrix, then its down matrix (4h x h
    each), three fp32 temporaries of that size, which makes the CPU's peak the optimizer step on
    this wide, tiny-batch model. (Measured: nanoGPT's Shakespeare config at batch 2 peaks on
    exactly those three; the planner counted two before, 1.3 % under.)"""
    cfg = make_cfg(1, 512, 4, 64, 8, 1, 1, "chunked", True, False, 1, None)
    cpu, cuda = estimate(cfg, "cpu", "float32"), estimate(cfg, "cuda", "float32")
    spaces = {p.name: p.bytes for p in cuda.train.parts}["cuBLAS workspaces"]
    three_temps = 3 * r(4 * 4 * 512 * 512)
    assert {p.name: p.bytes for p in cpu.train.parts}["optimizer step"] == three_temps
    assert 0.95 * three_temps <= cpu.train.allocated - (cuda.train.allocated - spaces) <= three_temps


def test_full_logits_loss_path_matches_memory_notes():
    """memory.md: training at the start of backward holds about 12 x b x s x V bytes for the
    full-logits loss path, and chunking removes nearly all of it."""
    b, T, V = 16, 1024, 50304
    full = make_cfg(12, 576, 12, 50257, T, b, 1, "full", False, False, None, None)
    chunked = make_cfg(12, 576, 12, 50257, T, b, 1, "chunked", False, False, None, None)
    chunked.memory.loss_chunk = 2048
    ef, ec = estimate(full, "cuda", "float16"), estimate(chunked, "cuda", "float16")
    loss_full = dict((p.name, p.bytes) for p in ef.train.parts)["logits and loss"]
    assert abs(loss_full - 12 * b * T * V) <= 0.01 * 12 * b * T * V
    assert ef.train.allocated - ec.train.allocated > 0.85 * loss_full


def test_parallel_modes_per_process():
    """Per-process memory under DDP keeps gradients in buckets; FSDP2 shards weights, gradients
    and AdamW state, so at GPT-2 124M on 4 processes it needs less than one process."""
    cfg = make_cfg(12, 768, 12, 50257, 1024, 8, 4, "chunked", False, False, None, None)
    single = estimate(cfg, "cuda", "bfloat16")
    cfg.parallel.nproc, cfg.parallel.mode = 4, "ddp"
    ddp = estimate(cfg, "cuda", "bfloat16")
    parts = {p.name: p.bytes for p in ddp.train.parts}
    assert parts["DDP gradient buckets"] == pytest.approx(4 * ddp.params, rel=1e-3)
    assert "gradients" not in parts or parts["gradients"] == 0
    cfg.parallel.mode = "fsdp"
    fsdp = estimate(cfg, "cuda", "bfloat16")
    fparts = {p.name: p.bytes for p in fsdp.train.parts}
    assert fparts["optimizer state"] == pytest.approx(8 * fsdp.params / 4, rel=0.01)
    # with accumulation a single process holds its gradients all step; DDP's buckets replace them
    assert abs(ddp.train.allocated - single.train.allocated) < 0.01 * single.train.allocated
    assert fsdp.train.allocated < 0.9 * single.train.allocated


def test_automatic_loss_chunk_is_per_device_and_the_planner_follows_it():
    """memory.loss_chunk=0 (the default) is 256 rows on a CPU and 2048 on a GPU; an explicit value
    wins. The model built on the CPU uses 256, and the planner's CPU estimate (within 3 % of the
    tracker) is the estimate for an explicit 256 and below the one for 2048; on CUDA, automatic
    is 2048's estimate."""
    cfg = make_cfg(2, 64, 4, 8192, 64, 8, 1, "chunked", False, False, None, None)
    cfg.memory.loss_chunk = 0
    assert Config().memory.loss_chunk == 0
    assert (cfg.memory.chunk_rows("cpu"), cfg.memory.chunk_rows("cuda")) == (256, 2048)
    assert build_model(cfg, torch.device("cpu")).loss.chunk_rows == 256
    auto_cpu, auto_cuda = estimate(cfg, "cpu", "float32"), estimate(cfg, "cuda", "float32")
    train, ev = measure(cfg, "float32")
    assert abs(auto_cpu.train.allocated - train) <= 0.03 * train
    assert abs(auto_cpu.eval.allocated - ev) <= 0.03 * ev
    for chunk, cpu_same, cuda_same in ((256, True, False), (2048, False, True)):
        cfg.memory.loss_chunk = chunk
        assert cfg.memory.chunk_rows("cuda") == chunk
        assert (estimate(cfg, "cpu", "float32").train.allocated == auto_cpu.train.allocated) is cpu_same
        assert (estimate(cfg, "cuda", "float32").train.allocated == auto_cuda.train.allocated) is cuda_same
    assert estimate(cfg, "cpu", "float32").train.allocated > auto_cpu.train.allocated


def test_eval_batch_is_capped_by_the_windows_a_process_scores():
    """Evaluation never holds more sequences than there are windows to score: a single process
    with 3 windows and eval batch 8 holds 3; under DDP on 2 processes each scores every 2nd of 6
    windows (3); FSDP2 scores all of them in every process."""
    cfg = make_cfg(2, 64, 4, 8192, 64, 8, 2, "chunked", False, False, 8, None)
    three = make_cfg(2, 64, 4, 8192, 64, 8, 2, "chunked", False, False, 3, None)
    cfg.eval.tokens = three.eval.tokens = 3 * 64
    assert estimate(cfg, "cpu", "float32").eval.allocated == estimate(three, "cpu", "float32").eval.allocated
    cfg.eval.tokens = 6 * 64
    cfg.parallel.nproc, cfg.parallel.mode = 2, "ddp"
    three.eval.tokens = 6 * 64
    three.parallel.nproc, three.parallel.mode = 2, "ddp"
    assert estimate(cfg, "cpu", "float32").eval.allocated == estimate(three, "cpu", "float32").eval.allocated
    cfg.parallel.mode = three.parallel.mode = "fsdp"
    assert estimate(cfg, "cpu", "float32").eval.allocated > estimate(three, "cpu", "float32").eval.allocated


def _variants():
    """Settings that change what a block or a step does (each with more layers than the
    planner replays one by one)."""
    base = dict(L=6, C=64, H=4, V=4096, T=64, b=8, accum=2, loss="chunked", ckpt=False, bias=False,
                eb=None, eT=None)
    for over in ({}, {"ckpt": True}, {"loss": "full", "bias": True}, {"accum": 1, "ckpt": True},
                 {"L": 4}, {"L": 5, "loss": "full"}):
        yield {**base, **over}


@pytest.mark.parametrize("device,dtype", [("cpu", "float32"), ("cpu", "bfloat16"),
                                          ("cuda", "bfloat16")])
@pytest.mark.parametrize("extra", ["", "dropout", "ddp", "fsdp", "eval_only", "split"])
def test_layers_replayed_in_one_go_match_one_by_one(monkeypatch, device, dtype, extra):
    """The planner replays the first and last of L identical blocks one by one and the L - 2
    in between in one go (their peak cannot be in the middle). Every part of both phases must
    equal the block-by-block replay."""
    for kw in _variants():
        cfg = make_cfg(*kw.values(), dropout=0.2 if extra == "dropout" else 0.0)
        if extra in ("ddp", "fsdp"):
            cfg.parallel.nproc, cfg.parallel.mode = 2, extra
        cfg.train.eval_only = extra == "eval_only"
        cfg.memory.micro_split = 2 if extra == "split" else 1
        grouped = estimate(cfg, device, dtype)
        monkeypatch.setattr(blocks, "EXPLICIT_LAYERS", 10**9)
        one_by_one = estimate(cfg, device, dtype)
        monkeypatch.undo()
        assert grouped == one_by_one, kw


def test_planner_cost_does_not_grow_with_the_model_or_the_batch(monkeypatch):
    """Closed forms, not loops over loss chunks, layers or parameters: a 4-layer model at
    micro-batch 8 and a 10^7-layer model at micro-batch 10^12 cost the planner the same number
    of timeline operations (before, --train.batch_size=10**12 looped over 10^12 x 4 chunks)."""
    calls = count_timeline_allocs(monkeypatch)
    counts = []
    for L, b in ((4, 8), (10**7, 10**12)):
        cfg = make_cfg(L, 64, 4, 8192, 64, b, 2, "chunked", True, True, 8, None, dropout=0.1)
        calls.clear()
        est = estimate(cfg, "cuda", "bfloat16")
        counts.append(len(calls))
    assert counts[0] == counts[1]
    assert est.train.allocated > 10**12 * 64 * 64 * 4  # at least one fp32 (N, C) tensor
