"""Predict the peak memory of a training step and of an evaluation pass, before allocating.

The estimate replays fitgpt's own code paths as a timeline of allocations and frees (every size
rounded up to 512 bytes, as the CUDA caching allocator and the CPU tracker round): the forward
pass block by block with what autograd saves, the loss (full or chunked), the backward pass,
gradient accumulation, gradient clipping and the AdamW step, then evaluation under no_grad.
The peak of that timeline is the prediction of `torch.cuda.max_memory_allocated` (or of the CPU
storage tracker); what is alive at the peak, grouped by kind, is the breakdown. On CUDA the
framework overhead outside PyTorch's accounting is added on top. Pure Python: no torch import.

Device differences followed (see ../shared/notes/memory.md): the loss casts explicitly, so its
memory does not depend on the device's autocast policy; CUDA uses fused AdamW (no temporaries),
the CPU the per-tensor loop (two temporaries of the largest parameter); both use a fused
attention kernel that saves the output and a log-sum-exp, not the attention matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from fitgpt.config import Config
from fitgpt.memory.timeline import Estimate, Part, PhaseEstimate, Timeline, r

CUDA_CONTEXT = 500 * 2**20  # CUDA context + kernels, lazy loading (0.3-0.6 GiB)
CUBLAS_WORKSPACE = 2 * 32 * 2**20  # cuBLAS + cuBLASLt workspaces, one stream
FRAGMENTATION = 0.05  # reserved above allocated with expandable segments


@dataclass
class Shape:
    L: int
    H: int
    C: int
    V: int  # padded vocab
    block: int
    bias: bool

    def param_sizes(self) -> list[int]:
        """Element counts of every parameter tensor (tied lm_head counted once)."""
        C, b = self.C, self.bias
        sizes = [self.V * C, self.block * C]
        for _ in range(self.L):
            sizes += [C] + [C] * b + [3 * C * C] + [3 * C] * b + [C * C] + [C] * b
            sizes += [C] + [C] * b + [4 * C * C] + [4 * C] * b + [4 * C * C] + [C] * b
        return sizes + [C] + [C] * b

    def matrices(self) -> list[int]:
        """Weights autocast casts for a matmul, per block."""
        C = self.C
        return [3 * C * C, C * C, 4 * C * C, 4 * C * C]


def _shape(cfg: Config) -> Shape:
    m = cfg.model
    V = (m.vocab_size + m.vocab_multiple - 1) // m.vocab_multiple * m.vocab_multiple
    return Shape(m.n_layer, m.n_head, m.n_embd, V, m.block_size, m.bias)


def _block_forward(tl: Timeline, s: Shape, N: int, b: int, T: int, a: int, grad: bool,
                   x_in) -> tuple[dict, list, tuple]:
    """One block's forward. Returns (what autograd saves, by name; autocast weight copies cached
    in no-grad mode; the output). In no-grad mode only the output and the cache survive."""
    C, act, cast = s.C, "activations", "autocast weight copies"
    sv: dict = {"x_in": x_in}
    ws: list = []
    # attention half: ln_1 (fp32 out + mean + rstd), qkv matmul, fused attention, projection
    ln = tl.alloc(act, 4 * N * C)
    sv["ln1_stats"] = [tl.alloc(act, 4 * N), tl.alloc(act, 4 * N)]
    if not grad:
        tl.free(*sv["ln1_stats"])
    if a == 2:
        ws.append(tl.alloc(cast, 3 * C * C * a))
        sv["xin"] = tl.alloc(act, N * C * a)  # ln output cast for the matmul
    else:
        sv["xin"] = ln
    sv["qkv"] = tl.alloc(act, 3 * N * C * a)
    if a == 2 and not grad:
        tl.free(sv["xin"])
    sv["out"] = tl.alloc(act, N * C * a)
    sv["lse"] = tl.alloc(act, 4 * b * s.H * T)
    if not grad:
        tl.free(sv["qkv"])
    if a == 2:
        ws.append(tl.alloc(cast, C * C * a))
    proj = tl.alloc(act, N * C * a)
    if not grad:
        tl.free(sv["out"], sv["lse"])
    if a == 2:
        tl.free(ln)  # the fp32 ln output is not saved when a cast copy feeds the matmul
    elif not grad:
        tl.free(ln)
    sv["x_mid"] = tl.alloc(act, 4 * N * C)
    tl.free(proj)
    # MLP half
    ln2 = tl.alloc(act, 4 * N * C)
    sv["ln2_stats"] = [tl.alloc(act, 4 * N), tl.alloc(act, 4 * N)]
    if not grad:
        tl.free(*sv["ln2_stats"])
    if a == 2:
        ws.append(tl.alloc(cast, 4 * C * C * a))
        sv["xin2"] = tl.alloc(act, N * C * a)
    else:
        sv["xin2"] = ln2
    sv["fc"] = tl.alloc(act, 4 * N * C * a)
    if a == 2 and not grad:
        tl.free(sv["xin2"])
    sv["gelu"] = tl.alloc(act, 4 * N * C * a)
    if not grad:
        tl.free(sv["fc"])
    if a == 2:
        ws.append(tl.alloc(cast, 4 * C * C * a))
    proj2 = tl.alloc(act, N * C * a)
    if not grad:
        tl.free(sv["gelu"])
    if a == 2 or not grad:
        tl.free(ln2)
    x_out = tl.alloc(act, 4 * N * C)
    tl.free(proj2)
    if not grad:
        tl.free(sv["x_mid"])
        return {}, ws, x_out
    sv["w"] = ws
    return sv, [], x_out


def _weight_grad(tl: Timeline, n: int, a: int, grads: list, exist: bool) -> None:
    """A weight's gradient: computed in the compute dtype, cast to fp32, accumulated."""
    h16 = tl.alloc("gradients", n * a) if a == 2 else None
    g = tl.alloc("gradients", 4 * n)
    if h16:
        tl.free(h16)
    if exist:
        tl.free(g)  # added in place to the existing .grad
    else:
        grads.append(g)


def _param_grads(tl: Timeline, n_weight: int, n_bias: int, a: int, bias: bool, grads: list,
                 exist: bool) -> None:
    """A layer's weight gradient (computed at `a` bytes per element) and, with bias, its bias's."""
    _weight_grad(tl, n_weight, a, grads, exist)
    if bias:
        _weight_grad(tl, n_bias, 1, grads, exist)


def _ln_backward(tl: Timeline, N: int, C: int, a: int, g_in, stats, x, grads: list, exist: bool,
                 bias: bool):
    """A LayerNorm's backward, in fp32 (a 16-bit incoming gradient is cast first); frees the
    incoming gradient, the saved statistics and the input. Returns the input's gradient."""
    if a == 2:
        g32 = tl.alloc("activations", 4 * N * C)
        tl.free(g_in)
        g_in = g32
    g_ln = tl.alloc("activations", 4 * N * C)
    _param_grads(tl, C, C, 1, bias, grads, exist)
    tl.free(g_in, *stats, x)
    return g_ln


def _block_backward(tl: Timeline, s: Shape, N: int, a: int, sv: dict, g_res, grads: list,
                    exist: bool):
    """Backward through one block, node by node: each node allocates its outputs, then frees
    the incoming gradient and what it saved. Returns the gradient of the block input."""
    C, act = s.C, "activations"
    bias = s.bias
    w_attn, w_proj, w_fc, w_proj2 = sv["w"] if a == 2 else (None,) * 4
    # MLP projection: grad of the GELU output and of the weight
    g16 = tl.alloc(act, N * C * a) if a == 2 else None
    g_gelu = tl.alloc(act, 4 * N * C * a)
    _param_grads(tl, 4 * C * C, C, a, bias, grads, exist)
    tl.free(*(h for h in (g16, sv["gelu"], w_proj2) if h))
    g_fc = tl.alloc(act, 4 * N * C * a)  # GELU backward
    tl.free(g_gelu, sv["fc"])
    g_in = tl.alloc(act, N * C * a)  # fc backward
    _param_grads(tl, 4 * C * C, 4 * C, a, bias, grads, exist)
    tl.free(*(h for h in (g_fc, sv["xin2"], w_fc) if h))
    g_ln = _ln_backward(tl, N, C, a, g_in, sv["ln2_stats"], sv["x_mid"], grads, exist, bias)
    g_mid = tl.alloc(act, 4 * N * C)  # residual add
    tl.free(g_res, g_ln)
    # attention projection, fused attention backward, qkv
    g16 = tl.alloc(act, N * C * a) if a == 2 else None
    g_out = tl.alloc(act, N * C * a)
    _param_grads(tl, C * C, C, a, bias, grads, exist)
    tl.free(*(h for h in (g16, w_proj) if h))
    dqkv = [tl.alloc(act, N * C * a) for _ in range(3)]
    tl.free(g_out, sv["qkv"], sv["out"], sv["lse"])
    g_qkv = tl.alloc(act, 3 * N * C * a)  # concatenated
    tl.free(*dqkv)
    g_in = tl.alloc(act, N * C * a)
    _param_grads(tl, 3 * C * C, 3 * C, a, bias, grads, exist)
    tl.free(*(h for h in (g_qkv, sv["xin"], w_attn) if h))
    g_ln = _ln_backward(tl, N, C, a, g_in, sv["ln1_stats"], sv["x_in"], grads, exist, bias)
    g_x = tl.alloc(act, 4 * N * C)
    tl.free(g_mid, g_ln)
    return g_x


def _loss(tl: Timeline, s: Shape, N: int, a: int, chunked: bool, chunk: int, grad: bool) -> list:
    """lm_head + cross-entropy forward; returns what survives until backward."""
    V, C = s.V, s.C
    kept: list = []
    if chunked:
        w = tl.alloc("logits and loss", V * C * a) if a == 2 else None
        tl.alloc("logits and loss", 4)  # total
        if grad:
            kept += [tl.alloc("logits and loss", 4 * N * C), tl.alloc("logits and loss", 4 * V * C)]
        for start in range(0, N, chunk):
            c = min(chunk, N - start)
            small = [tl.alloc("logits and loss", x) for x in (c * C * a if a == 2 else 0, c, 8 * c)]
            if a == 2:
                tl.transient("logits and loss", c * V * a, 4 * c * V)
            logits = tl.alloc("logits and loss", 4 * c * V)
            stats = [tl.alloc("logits and loss", 4 * c) for _ in range(5)]
            if grad:
                tl.transient("logits and loss", 8 * c, 8 * c)
                g = tl.alloc("logits and loss", 2 * c * V) if a == 2 else None
                tl.transient("logits and loss", c * C * a)
                if a == 2:
                    tl.transient("logits and loss", V * C * a, 4 * V * C)
                    tl.free(g)
            tl.free(logits, *stats, *small)
        tl.free(("logits and loss", r(4)))
        if w:
            tl.free(w)
        return kept
    # full logits: (N, V) in the compute dtype, an fp32 copy, log-softmax
    hc = tl.alloc("logits and loss", N * C * a) if a == 2 else None
    wc = tl.alloc("autocast weight copies", V * C * a) if a == 2 else None
    logits = tl.alloc("logits and loss", N * V * a)
    l32 = tl.alloc("logits and loss", 4 * N * V) if a == 2 else logits
    lsm = tl.alloc("logits and loss", 4 * N * V)
    tl.transient("logits and loss", 8)
    tl.free(l32) if a == 2 else None
    tl.free(logits)
    if grad:
        kept = [lsm] + ([hc, wc] if a == 2 else [])
    else:
        tl.free(lsm, *([hc] if hc else []))
        kept = [wc] if wc else []
    return kept


def _backward_full_loss(tl: Timeline, s: Shape, N: int, a: int, kept: list):
    """Returns the handles of the gradients of h (fp32) and of the lm_head weight (fp32)."""
    V, C = s.V, s.C
    g1 = tl.alloc("logits and loss", 4 * N * V)  # nll backward
    g2 = tl.alloc("logits and loss", 4 * N * V)  # log-softmax backward
    tl.free(g1, kept[0])
    if a == 2:
        g3 = tl.alloc("logits and loss", N * V * a)
        tl.free(g2)
        gw16 = tl.alloc("gradients", V * C * a)
        gh16 = tl.alloc("activations", N * C * a)
        tl.free(g3, *kept[1:])
        g_w = tl.alloc("gradients", 4 * V * C)
        tl.free(gw16)
        g_h = tl.alloc("activations", 4 * N * C)
        tl.free(gh16)
        return g_h, g_w
    g_w = tl.alloc("gradients", 4 * V * C)
    g_h = tl.alloc("activations", 4 * N * C)
    tl.free(g2)
    return g_h, g_w


def _optimizer_state(tl: Timeline, sizes: list[int]) -> None:
    for n in sizes:
        tl.alloc("optimizer state", 4 * n)
        tl.alloc("optimizer state", 4 * n)
        tl.alloc("optimizer state", 4)  # step


def _weights(tl: Timeline, sizes: list[int]) -> None:
    for n in sizes:
        tl.alloc("weights", 4 * n)


def _parallel(cfg: Config, a: int) -> tuple[int, str, dict[str, float]]:
    """Processes, mode, and how FSDP scales each kind of memory per process."""
    world, mode = max(1, cfg.parallel.nproc), cfg.parallel.mode
    if world == 1:
        return 1, "single", {}
    if mode == "ddp":
        return world, mode, {}
    # FSDP2: weights, gradients and AdamW state sharded; with 16-bit compute the gathered
    # parameters are already 16-bit, so autocast makes no copies
    return world, mode, {"weights": 1 / world, "optimizer state": 1 / world,
                         "gradients": 1 / world, "autocast weight copies": 0 if a == 2 else 1}


def train_timeline(cfg: Config, a: int, device_type: str) -> Timeline:
    s = _shape(cfg)
    split = cfg.memory.micro_split
    b, T = -(-cfg.train.batch_size // split), cfg.model.block_size  # the largest slice
    N = b * T
    chunked = cfg.memory.loss == "chunked"
    chunk = cfg.memory.chunk_rows(device_type)
    sizes = s.param_sizes()
    world, mode, scale = _parallel(cfg, a)
    tl = Timeline(scale)
    _weights(tl, sizes)
    _optimizer_state(tl, sizes)
    if mode == "ddp":  # gradients live in DDP's buckets (gradient_as_bucket_view)
        tl.alloc("DDP gradient buckets", 4 * sum(sizes))
    tl.alloc("batch", 4)  # loss_sum
    grads: list = []
    for micro in range(min(cfg.train.grad_accum // world * split, 2)):
        have_grads = micro > 0 or mode == "ddp"
        if mode == "fsdp":  # the root's parameters and two blocks' gathered, in the compute dtype
            root = s.V * s.C + s.block * s.C + 2 * s.C
            gathered = tl.alloc("FSDP gathered parameters", a * (root + 2 * sum(sizes[2:]) / s.L))
        batch = [tl.alloc("batch", 8 * N), tl.alloc("batch", 8 * N)]
        pos = tl.alloc("batch", 8 * T)
        tl.transient("activations", 4 * N * s.C, 4 * T * s.C)
        x = tl.alloc("activations", 4 * N * s.C)
        blocks, cache = [], []
        for _ in range(s.L):
            if cfg.memory.checkpointing:  # forward without saving; only the input survives
                _, ws, out = _block_forward(tl, s, N, b, T, a, False, x)
                blocks.append(x)
                cache += ws
            else:
                sv, _, out = _block_forward(tl, s, N, b, T, a, True, x)
                blocks.append(sv)
            x = out
        ln_f = tl.alloc("activations", 4 * N * s.C)
        stats = [tl.alloc("activations", 4 * N), tl.alloc("activations", 4 * N)]
        kept = _loss(tl, s, N, a, chunked, chunk, grad=True)
        tl.free(pos, *cache)  # the autocast region ends with the forward
        if a == 2 or chunked:
            tl.free(ln_f)  # only the cast copy (or nothing) was saved by the loss
        # backward: loss, lm_head, ln_f
        if chunked:
            g_h = tl.alloc("logits and loss", 4 * N * s.C)
            g_w = tl.alloc("logits and loss", 4 * s.V * s.C)
            tl.free(*kept)
        else:
            g_h, g_w = _backward_full_loss(tl, s, N, a, kept)
        if have_grads:
            tl.free(g_w)
        else:
            grads.append(("gradients", g_w[1]))  # lm_head (tied to wte) keeps this tensor
            tl.free(g_w)
            tl.alloc("gradients", g_w[1])
        g_res = tl.alloc("activations", 4 * N * s.C)  # ln_f backward
        _weight_grad(tl, s.C, 1, grads, have_grads)
        tl.free(g_h, *stats, x)
        if a != 2 and not chunked:
            tl.free(ln_f)
        for sv in reversed(blocks):
            if cfg.memory.checkpointing:  # recompute this block with autograd, then back
                sv, _, out = _block_forward(tl, s, N, b, T, a, True, sv)
                tl.free(out)
            g_res = _block_backward(tl, s, N, a, sv, g_res, grads, have_grads)
        x = g_res
        tl.free(x)
        # embeddings: wpe grad, wte grad added to the lm_head's
        if not have_grads:
            grads.append(tl.alloc("gradients", 4 * s.block * s.C))
            grads += [tl.alloc("gradients", 4 * s.C) for _ in range(1 + s.bias)]
        tl.transient("gradients", 4 * s.V * s.C, 4 * s.V * s.C)
        tl.free(*batch)
        if mode == "fsdp":
            tl.free(gathered)
    # clip_grad_norm_: one norm per tensor, stacked
    tl.transient("optimizer step", *([4] * len(sizes)), 4, 4, 4, 4)
    if device_type != "cuda":
        tl.transient("optimizer step", 4 * max(sizes), 4 * max(sizes))  # per-tensor AdamW
    tl.free(*grads)
    return tl


def eval_rows(cfg: Config) -> int:
    """Sequences per evaluation batch: the eval batch, or fewer when this process's validation
    windows are fewer (under DDP each process scores every world-th window; FSDP2 all of them)."""
    world, mode = max(1, cfg.parallel.nproc), cfg.parallel.mode
    windows = -(-cfg.eval_windows // world) if world > 1 and mode == "ddp" else cfg.eval_windows
    return max(1, min(cfg.eval_batch_size, windows))


def eval_timeline(cfg: Config, a: int, device_type: str) -> Timeline:
    s = _shape(cfg)
    chunk = cfg.memory.chunk_rows(device_type)
    b, T = eval_rows(cfg), cfg.eval_block_size
    N = b * T
    sizes = s.param_sizes()
    world, mode, scale = _parallel(cfg, a)
    tl = Timeline(scale)
    _weights(tl, sizes)
    _optimizer_state(tl, sizes)
    if mode == "ddp":
        tl.alloc("DDP gradient buckets", 4 * sum(sizes))
    if mode == "fsdp":
        root = s.V * s.C + s.block * s.C + 2 * s.C
        tl.alloc("FSDP gathered parameters", a * (root + 2 * sum(sizes[2:]) / s.L))
    tl.alloc("eval buffers", 8)  # the loss sum
    batch = [tl.alloc("eval buffers", 8 * N), tl.alloc("eval buffers", 8 * N)]
    pos = tl.alloc("eval buffers", 8 * T)
    tl.transient("activations", 4 * N * s.C, 4 * T * s.C)
    x = tl.alloc("activations", 4 * N * s.C)
    cached: list = []
    for _ in range(s.L):
        _, ws, out = _block_forward(tl, s, N, b, T, a, False, x)
        cached += ws
        tl.free(x)
        x = out
    ln_f = tl.alloc("activations", 4 * N * s.C)
    stats = [tl.alloc("activations", 4 * N), tl.alloc("activations", 4 * N)]
    tl.free(*stats)
    tl.free(x)
    kept = _loss(tl, s, N, a, cfg.memory.loss == "chunked", chunk, grad=False)
    tl.free(ln_f, pos, *kept, *cached, *batch)
    return tl


def _parts(tl: Timeline, notes: dict[str, str]) -> list[Part]:
    return [Part(k, v, notes.get(k, "")) for k, v in tl.at_peak.items() if v > 0]


def estimate(cfg: Config, device_type: str = "cuda", dtype: str | None = None) -> Estimate:
    """Predicted peak allocated bytes of a training step and an evaluation pass."""
    dtype = dtype or cfg.train.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    a = 4 if dtype == "float32" else 2
    s = _shape(cfg)
    P = sum(s.param_sizes())
    b, T, C, L = cfg.train.batch_size, cfg.model.block_size, s.C, s.L
    eb, eT = eval_rows(cfg), cfg.eval_block_size
    per_block = "checkpointed: block inputs only" if cfg.memory.checkpointing else "saved for backward"
    chunk = cfg.memory.chunk_rows(device_type)
    notes = {
        "weights": f"{P / 1e6:.1f}M params x 4 B (fp32)",
        "optimizer state": "AdamW exp_avg + exp_avg_sq, fp32: 8 B/param",
        "gradients": "fp32: 4 B/param",
        "autocast weight copies": f"16-bit copies of the matmul weights ({dtype})",
        "batch": "token ids, int64",
        "optimizer step": "clip-norm and AdamW temporaries",
        "DDP gradient buckets": "fp32 gradients in DDP's all-reduce buckets: 4 B/param",
        "FSDP gathered parameters": "the root's and two blocks' parameters, gathered (approximate)",
    }
    world, mode, _ = _parallel(cfg, a)
    if mode == "fsdp":
        for k in ("weights", "optimizer state", "gradients"):
            notes[k] += f", sharded over {world} processes"
    tn = dict(notes)
    tn["activations"] = f"{L} layers x b={b} x s={T} x h={C}, {per_block}"
    tn["logits and loss"] = (f"chunks of {chunk} rows x V={s.V} + grads of h and lm_head"
                             if cfg.memory.loss == "chunked" else f"full logits: b x s x V = {b}x{T}x{s.V}")
    en = dict(notes)
    en["activations"] = f"one block at a time, b={eb} x s={eT} x h={C} (no_grad)"
    en["logits and loss"] = (f"chunks of {chunk} rows x V={s.V}" if cfg.memory.loss == "chunked"
                             else f"full logits: b x s x V = {eb}x{eT}x{s.V}")
    en["eval buffers"] = "token ids and the loss sum"
    ttl, etl = train_timeline(cfg, a, device_type), eval_timeline(cfg, a, device_type)
    train = PhaseEstimate("train", _parts(ttl, tn), ttl.peak)
    ev = PhaseEstimate("eval", _parts(etl, en), etl.peak)
    if device_type == "cuda":
        for ph in (train, ev):
            ph.overhead = [
                Part("CUDA context", CUDA_CONTEXT, "outside PyTorch's accounting (nvidia-smi shows it)"),
                Part("cuBLAS workspace", CUBLAS_WORKSPACE, "cuBLAS and cuBLASLt workspaces"),
                Part("fragmentation allowance", int(ph.allocated * FRAGMENTATION),
                     f"{FRAGMENTATION:.0%} of allocated (reserved above allocated)"),
            ]
    return Estimate(train, ev, device_type, dtype, P)
