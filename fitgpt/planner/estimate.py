"""Predict the peak memory of a training step and of an evaluation pass, before allocating.

The estimate replays fitgpt's own code paths as a timeline of allocations and frees (every size
rounded up to 512 bytes, as the CUDA caching allocator and the CPU tracker round): the forward
pass block by block with what autograd saves, the loss (full or chunked), the backward pass,
gradient accumulation, gradient clipping and the AdamW step (or Muon's and AdamW's with
train.optimizer=muon, fitgpt.planner.optstate; with memory.fused_backward: inside
the last backward, one parameter at a time, `FusedTimeline`), then evaluation under no_grad.
The peak of that timeline is the prediction of `torch.cuda.max_memory_allocated` (or of the CPU
storage tracker); what is alive at the peak, grouped by kind, is the breakdown. On CUDA the
framework overhead outside PyTorch's accounting is added on top. Pure Python: no torch import.

Device differences followed (see ../shared/notes/memory.md): the loss casts explicitly, so its
memory does not depend on the device's autocast policy; CUDA uses fused AdamW (no temporaries),
the CPU the per-tensor loop (two temporaries of the largest parameter); attention and dropout
differ by device (see `fitgpt.planner.blocks`). On CUDA, PyTorch's cuBLAS workspaces come from
the caching allocator, one per thread that runs matmuls (the forward thread, and autograd's
for backward), and stay allocated: they are inside the allocated peak. An eval-only run holds
no AdamW state and has run no backward (one workspace).
"""

from __future__ import annotations

from fitgpt.config.levers import activation_refusal, optimizer_refusal
from fitgpt.config.schema import Config
from fitgpt.console import fmt_bytes
from fitgpt.errors import ConfigError
from fitgpt.model.shape import ModelShape
from fitgpt.planner import optstate
from fitgpt.planner.blocks import OFFLOAD_MIN_BYTES
from fitgpt.planner.gpus import Gpu, cublas_workspace
from fitgpt.planner.lossplan import _loss, _loss_backward
from fitgpt.planner.stack import Stack, runs
from fitgpt.planner.timeline import Estimate, Part, PhaseEstimate, Timeline, r

CUDA_CONTEXT = 500 * 2**20  # CUDA context + kernels, lazy loading (0.3-0.6 GiB)
FRAGMENTATION = 0.05  # reserved above allocated with expandable segments
WORKSPACES = "cuBLAS workspaces"


def _optimizer_state(tl: Timeline, s: ModelShape, fmt: str, muon: bool = False) -> None:
    """AdamW's state in format `fmt` (fitgpt.planner.optstate): per tensor, then shared. With
    `muon` (train.optimizer=muon) the blocks' matrices keep Muon's fp32 momentum instead."""
    counts = s.param_counts()
    if muon:
        matrices, counts = optstate.muon_split(counts, s.block_matrices(), s.n_layer)
        for n, k in matrices.items():
            tl.alloc("optimizer state", 4 * n, k)  # Muon's momentum_buffer
    for n, k in counts.items():
        for nbytes in optstate.tensor_state(n, fmt):  # fp32: exp_avg, exp_avg_sq, step
            tl.alloc("optimizer state", nbytes, k)
    for nbytes in optstate.shared_state(counts, fmt):  # 8bit: the two quantisation maps
        tl.alloc("optimizer state", nbytes)


def _weights(tl: Timeline, s: ModelShape) -> None:
    for n, k in s.param_counts().items():
        tl.alloc("weights", 4 * n, k)


def _adamw_loop_temporaries(s: ModelShape, fmt: str = "fp32") -> int:
    """The CPU's per-tensor AdamW loop: each parameter's update computes sqrt(exp_avg_sq) and
    the denominator, while the previous parameter's denominator (the loop's `denom`) is still
    alive. The most alive at once, over the matrices' group in order: wte, wpe, then per block
    qkv, attention projection, MLP up, MLP down (the LayerNorm and bias group is smaller).
    The 8-bit format frees each tensor's temporaries before the next (optstate)."""
    if fmt == "8bit":
        return optstate.cpu_step_temporaries(s.param_counts(), fmt, r)
    C = s.n_embd
    wpe = [s.position_rows * C] if s.position_rows else []  # rotary: none
    head = [s.head_params()] if s.head_params() else []  # an untied lm_head: the group's last
    return _loop_most([s.padded_vocab * C] + wpe + s.block_matrices() * min(s.n_layer, 2) + head)


def _loop_most(order: list[int]) -> int:
    """The CPU AdamW loop's most alive over tensors of these sizes, in the order it visits them."""
    most = 2 * r(4 * order[0])
    for prev, cur in zip(order, order[1:]):
        most = max(most, r(4 * prev) + 2 * r(4 * cur))
    return most


def _step_temporaries(cfg: Config, s: ModelShape, device_type: str) -> int:
    """The optimizer step's most alive at once, after clipping. AdamW: the CPU loop's (CUDA's
    fused kernels, torch's and bitsandbytes', need none). train.optimizer=muon: Muon's
    Newton-Schulz temporaries (on every device; the matrices' smaller side is n_embd), then
    AdamW on the rest (matrices in model order: wte, a learned wpe, an untied lm_head; the
    vectors' group is smaller)."""
    cpu = device_type != "cuda"
    if cfg.train.optimizer != "muon":
        return _adamw_loop_temporaries(s, cfg.memory.optimizer_state) if cpu else 0
    most = optstate.muon_step_temporaries(s.block_matrices(), s.n_embd, r)
    rest = [n for n in (s.padded_vocab * s.n_embd, s.position_rows * s.n_embd, s.head_params()) if n]
    return max(most, _loop_most(rest)) if cpu else most


def _gathered(s: ModelShape, a: int) -> float:
    """FSDP2: the root's parameters and two blocks' gathered, in the compute dtype."""
    root = s.embedding_params() + 2 * s.n_embd + s.head_params()
    rest = s.params(embeddings=False) - s.head_params()  # the blocks and ln_f
    return a * (root + 2 * rest / s.n_layer)


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


def _model_state(tl: Timeline, s: ModelShape, mode: str, optimizer: bool, mem=None, muon: bool = False) -> None:
    """Weights, AdamW state (not in an eval-only run) and DDP's gradient buckets. With
    memory.offload_optimizer the card holds bfloat16 weights and gradients (the timeline's
    scale from here on) and no AdamW state: that is host memory (`optstate.host_parts`)."""
    offload = mem is not None and mem.offload_optimizer
    tl.scale.update(optstate.card_scale(offload))
    _weights(tl, s)
    if optimizer and not offload:
        _optimizer_state(tl, s, mem.optimizer_state if mem is not None else "fp32", muon)
    if mode == "ddp":  # gradients live in DDP's buckets (gradient_as_bucket_view)
        tl.alloc("DDP gradient buckets", 4 * s.params())


def _embed(tl: Timeline, s: ModelShape, N: int, T: int, kind: str) -> tuple:
    """Token ids (x, y), positions, and the embeddings' sum: (batch handles, pos, x). With
    model.position=rotary: pos is the cos and sin tables (fitgpt.model.rotary.tables) and x the
    token embeddings alone."""
    batch = [tl.alloc(kind, 8 * N), tl.alloc(kind, 8 * N)]
    if s.position == "rotary":
        return batch, _rope_tables(tl, s, T, kind), tl.alloc("activations", 4 * N * s.n_embd)
    pos = tl.alloc(kind, 8 * T)
    tl.transient("activations", 4 * N * s.n_embd, 4 * T * s.n_embd)
    return batch, pos, tl.alloc("activations", 4 * N * s.n_embd)


def _rope_tables(tl: Timeline, s: ModelShape, T: int, kind: str):
    """cos and sin (T, head_size/2), made in fp32 (from the frequencies and the positions'
    angles) and kept in the compute dtype (fp32 here: a 16-bit copy is smaller still)."""
    half = s.n_embd // s.n_head // 2
    tl.transient(kind, 4 * half, 4 * half, 4 * half, 4 * T, 4 * T * half)
    return tl.alloc(kind, 4 * T * half, 2)


def _workspaces(tl: Timeline, device_type: str, workspace: int, count: int) -> None:
    """PyTorch's cuBLAS workspaces: allocated at the first matmul of each thread, kept."""
    if device_type == "cuda":
        tl.alloc(WORKSPACES, workspace, count)


class FusedTimeline(Timeline):
    """A timeline for memory.fused_backward (fitgpt.train.fused): in the step's last backward
    (`armed`) each parameter is updated as soon as its gradient is complete, then the gradient
    is freed. Autograd runs a parameter's AccumulateGrad node (and so the hook) right after the
    node that completed the gradient has released what it saved and its incoming gradient, so
    a gradient reported complete (`grad_done`) is updated at the timeline's next free."""

    def __init__(self, scale: dict[str, float] | None = None, cpu: bool = True):
        super().__init__(scale)
        self.cpu = cpu
        self.armed = False
        self.pending: list[int] = []

    def grad_done(self, n: int) -> None:
        """A gradient of n elements is complete (`Blocks.on_grad`): it is updated and freed at
        the next free."""
        if self.armed:
            self.pending.append(n)

    def free(self, *handles) -> None:
        super().free(*handles)
        while self.pending:
            self.update(self.pending.pop(0))

    def update(self, n: int) -> None:
        """One parameter's update in its hook: the gradient's norm (alive through the update),
        then AdamW: the CPU's for-loop computes sqrt(exp_avg_sq) and the denominator, one
        parameter's size each; CUDA's fused kernel needs none, only the found-inf flag and its
        temporaries. Then the gradient (fp32, n elements) is freed."""
        self.transient("optimizer step", 4, *((4 * n, 4 * n) if self.cpu else (4, 4)))
        Timeline.free(self, ("gradients", r(4 * n * self.scale.get("gradients", 1)) * self.times))


def _micro_step(tl: Timeline, cfg: Config, blk: Stack, device_type: str, grads: list,
                have_grads: bool, fused: bool = False) -> None:
    """One micro-batch's forward and backward; gradients land in `grads` (or are added to
    existing ones when have_grads). fused: the step's last backward under
    memory.fused_backward (`tl` a FusedTimeline): each gradient is updated and freed as soon as
    it is complete, so none is left in `grads` when it returns."""
    s, N, T, a = blk.s, blk.N, blk.T, blk.a
    chunked, mem = cfg.memory.loss == "chunked", cfg.memory
    batch, pos, x = _embed(tl, s, N, T, "batch")
    mask = None
    if blk.dropout:  # the embeddings' dropout, outside the blocks (and their levers)
        x, mask = blk.drop(x, N * s.n_embd, 4, grad=True)
    # checkpointed blocks keep only their input (and cache their autocast weight copies)
    blocks, cache, x = blk.forward_train(x, runs(s.n_layer, mem.checkpointing, mem.checkpoint_every))
    ln_f, stats = blk.norm_forward(grad=True)
    kept = _loss(tl, s, N, a, chunked, cfg.memory.chunk_rows(device_type), grad=True,
                 cuda=device_type == "cuda")
    tl.free(pos, *cache)  # the autocast region ends with the forward
    if a == 2 or chunked:
        tl.free(ln_f)  # only the cast copy (or nothing) was saved by the loss
    if fused:  # armed with the step's summed loss; 0 x it starts the running sum of squared norms
        sums = [tl.alloc("optimizer step", 4), tl.alloc("optimizer step", 4)]
        sq = tl.alloc("optimizer step", 4)
        tl.free(*sums)
        tl.armed = True
    # backward: loss, lm_head, ln_f
    g_h, g_w = _loss_backward(tl, s, N, a, chunked, kept)
    if not have_grads:
        grads.append(("gradients", g_w[1]))  # lm_head (tied to wte) keeps this tensor
        tl.free(g_w)
        tl.alloc("gradients", g_w[1])
    elif s.head_params():  # an untied lm_head's gradient is added to its .grad at once
        tl.free(g_w)
    if fused and s.head_params():  # an untied lm_head's gradient is complete
        tl.grad_done(s.head_params())
    g_res = _ln_f_backward(tl, blk, g_h, stats, x, grads, have_grads, fused)
    if a != 2 and not chunked:
        tl.free(ln_f)
    g_x = blk.backward_train(blocks, g_res, grads, have_grads)
    if mask:
        g_d = tl.alloc("activations", 4 * N * s.n_embd)
        tl.free(g_x, mask)
        g_x = g_d
    tl.free(g_x)
    _embedding_grads(tl, s, grads, have_grads, g_w, sq if fused else None)
    tl.free(*batch)


def _ln_f_backward(tl: Timeline, blk: Stack, g_h, stats, x, grads: list, have_grads: bool, fused: bool):
    """ln_f's backward: RMS norm without parameters, or LayerNorm with its weight's gradient."""
    s = blk.s
    if s.norm == "rmsnorm":
        return blk.ln_backward(g_h, stats, x, grads, have_grads, cast=False)
    g_res = tl.alloc("activations", 4 * blk.N * s.n_embd)
    blk.weight_grad(s.n_embd, 1, grads, have_grads)
    if fused:
        tl.grad_done(s.n_embd)
    tl.free(g_h, *stats, x)
    return g_res


def _embedding_grads(tl: Timeline, s: ModelShape, grads: list, have_grads: bool, g_w, sq) -> None:
    """After the blocks: wpe's and the norms' gradients (first micro-batch), the token
    embedding's added to the tied lm_head's (or its own, untied); with fused backward (`sq`, the
    running sum of squared norms) the last updates, then that sum freed."""
    fused = sq is not None
    # embeddings: wpe grad, wte grad added to the lm_head's
    if not have_grads:
        if s.position_rows:  # wpe's (rotary: none)
            grads.append(tl.alloc("gradients", 4 * s.position_rows * s.n_embd))
        grads += [tl.alloc("gradients", 4 * s.n_embd) for _ in range(s.norm_tensors())]
    V, C = s.padded_vocab, s.n_embd
    for n in ([s.position_rows * C] * bool(s.position_rows) + [C] * s.norm_tensors() if fused else []):  # wpe, ln_f
        tl.update(n)
    if s.head_params():  # untied: the embedding's own gradient, kept (or added and freed)
        wte = tl.alloc("gradients", 4 * V * C)
        grads.append(wte) if not have_grads else tl.free(wte)
    else:
        tl.transient("gradients", 4 * V * C, 4 * V * C)
    if have_grads and not s.head_params():  # the lm_head's share waited for the tied embedding's
        tl.free(g_w)
    if fused:  # the token embedding (and lm_head) last; the norm of them all, the sum freed
        tl.update(V * C)
        tl.armed = False
        tl.alloc("optimizer step", 4)
        tl.free(sq)
        grads.clear()


def train_timeline(cfg: Config, a: int, device_type: str, workspace: int = 0) -> Timeline:
    """A steady-state training step: the first two micro-batches (the second adds to every
    gradient the first created), clipping and the AdamW step. `workspace`: the bytes of one
    cuBLAS workspace (CUDA). With memory.fused_backward the AdamW step happens in the last
    backward instead: the first micro-batch, one in the middle (every gradient alive, as
    before) and the last, whose backward updates and frees each gradient (FusedTimeline)."""
    s = ModelShape.of(cfg.model)
    split = cfg.memory.micro_split
    b, T = -(-cfg.train.batch_size // split), cfg.model.block_size  # the largest slice
    world, mode, scale = _parallel(cfg, a)
    fused = cfg.memory.fused_backward
    tl = FusedTimeline(scale, cpu=device_type != "cuda") if fused else Timeline(scale)
    _workspaces(tl, device_type, workspace, 2)  # the forward's thread and autograd's
    _model_state(tl, s, mode, optimizer=True, mem=cfg.memory, muon=cfg.train.optimizer == "muon")
    tl.alloc("batch", 4)  # loss_sum
    blk = Stack(tl, s, b, T, a, dropout=cfg.model.dropout > 0, cpu=device_type != "cuda",
                offload=cfg.memory.activation_offload)
    grads: list = []
    if fused:
        blk.on_grad = tl.grad_done
    micros = min(cfg.train.grad_accum // world * split, 3 if fused else 2)
    for micro in range(micros):
        if mode == "fsdp":
            gathered = tl.alloc("FSDP gathered parameters", _gathered(s, a))
        _micro_step(tl, cfg, blk, device_type, grads, have_grads=micro > 0 or mode == "ddp",
                    fused=fused and micro == micros - 1)
        if mode == "fsdp":
            tl.free(gathered)
    if fused:
        return tl  # updated in backward
    # clip_grad_norm_: one norm per tensor, stacked
    tl.free(tl.alloc("optimizer step", 4, s.tensors() + 4))
    step = _step_temporaries(cfg, s, device_type)  # offload: on the host
    if step:
        tl.free(tl.alloc("optimizer step", step))
    tl.free(*grads)
    return tl


def eval_rows(cfg: Config) -> int:
    """Sequences per evaluation batch: the eval batch, or fewer when this process's validation
    windows are fewer (under DDP each process scores every world-th window; FSDP2 all of them)."""
    world, mode = max(1, cfg.parallel.nproc), cfg.parallel.mode
    windows = -(-cfg.eval_windows // world) if world > 1 and mode == "ddp" else cfg.eval_windows
    return max(1, min(cfg.eval_batch_size, windows))


def eval_timeline(cfg: Config, a: int, device_type: str, workspace: int = 0) -> Timeline:
    """An evaluation pass: in a training run with the model and AdamW state alive (and both
    threads' cuBLAS workspaces); in an eval-only run with the weights alone."""
    s = ModelShape.of(cfg.model)
    b, T = eval_rows(cfg), cfg.eval_block_size
    N = b * T
    world, mode, scale = _parallel(cfg, a)
    tl = Timeline(scale)
    only = cfg.train.eval_only
    _workspaces(tl, device_type, workspace, 1 if only else 2)
    _model_state(tl, s, mode, optimizer=not only, mem=cfg.memory, muon=cfg.train.optimizer == "muon")
    if mode == "fsdp":
        tl.alloc("FSDP gathered parameters", _gathered(s, a))
    tl.alloc("eval buffers", 8)  # the loss sum
    batch, pos, x = _embed(tl, s, N, T, "eval buffers")
    blk = Stack(tl, s, b, T, a)
    cached, x = blk.forward_no_grad(x)
    ln_f, stats = blk.norm_forward(grad=False)  # its statistics freed
    tl.free(x)
    kept = _loss(tl, s, N, a, cfg.memory.loss == "chunked", cfg.memory.chunk_rows(device_type),
                 grad=False)
    tl.free(ln_f, pos, *kept, *cached, *batch)
    return tl


def _parts(tl: Timeline, notes: dict[str, str]) -> list[Part]:
    return [Part(k, v, notes.get(k, "")) for k, v in tl.at_peak.items() if v > 0]


def _notes(cfg: Config, s: ModelShape, device_type: str, dtype: str, workspace: int) -> tuple[dict, dict]:
    """What each part of the training and the evaluation breakdown counts."""
    b, T, C, L, V = cfg.train.batch_size, cfg.model.block_size, s.n_embd, s.n_layer, s.padded_vocab
    eb, eT = eval_rows(cfg), cfg.eval_block_size
    per_block = "checkpointed: block inputs only" if cfg.memory.checkpointing else "saved for backward"
    k = cfg.memory.checkpoint_every
    if cfg.memory.checkpointing and k > 1:
        n = -(-L // k)
        per_block = f"{n} of {L} blocks checkpointed (every {k}-th: input only), the others saved for backward"
    if cfg.memory.activation_offload:
        per_block += f"; saved tensors >= {fmt_bytes(OFFLOAD_MIN_BYTES)} offloaded to host memory"
    if cfg.model.dropout > 0:
        per_block += f", with dropout {cfg.model.dropout:g}'s masks"
    chunk = cfg.memory.chunk_rows(device_type)
    notes = {
        "weights": f"{s.params() / 1e6:.1f}M params x 4 B (fp32)",
        "optimizer state": "AdamW exp_avg + exp_avg_sq, fp32: 8 B/param",
        "gradients": "fp32: 4 B/param",
        "autocast weight copies": f"16-bit copies of the matmul weights ({dtype})",
        "batch": "token ids, int64",
        "optimizer step": "clip-norm and AdamW temporaries",
        "DDP gradient buckets": "fp32 gradients in DDP's all-reduce buckets: 4 B/param",
        "FSDP gathered parameters": "the root's and two blocks' parameters, gathered (approximate)",
    }
    fmt, counts = cfg.memory.optimizer_state, s.param_counts()
    if fmt == "8bit":
        notes["optimizer state"] = (f"AdamW moments in 8 bits: uint8 codes + an fp32 scale per {optstate.BLOCK} "
                                    f"(tensors under {optstate.MIN_8BIT} elements: fp32), "
                                    f"{optstate.bytes_per_param(counts, fmt):.2f} B/param")
    if cfg.train.optimizer == "muon":
        mb = optstate.muon_state_bytes(counts, s.block_matrices(), s.n_layer) / s.params()
        notes["optimizer state"] = (f"Muon momentum (fp32, 4 B) for the blocks' matrices, AdamW exp_avg + "
                                    f"exp_avg_sq (fp32, 8 B) for the rest: {mb:.2f} B/param")
        notes["optimizer step"] = "clip-norm, Muon's Newton-Schulz (bfloat16) and AdamW temporaries"
    if cfg.memory.offload_optimizer:
        notes["weights"] = f"{s.params() / 1e6:.1f}M params x 2 B (bfloat16; fp32 masters in host memory)"
        notes["gradients"] = "bfloat16: 2 B/param (AdamW steps on the host)"
    if cfg.memory.fused_backward:  # the last backward updates and frees each gradient in turn
        notes["gradients"] = "fp32, 4 B/param; in the last backward only those not yet updated"
        notes["optimizer step"] = "AdamW in backward: one tensor's temporaries and the guard's norms"
    world, mode, _ = _parallel(cfg, 4)
    if mode == "fsdp":
        for k in ("weights", "optimizer state", "gradients"):
            notes[k] += f", sharded over {world} processes"
    tn, en = dict(notes), dict(notes)
    tn["activations"] = f"{L} layers x b={b} x s={T} x h={C}, {per_block}"
    tn["logits and loss"] = (f"chunks of {chunk} rows x V={V} + grads of h and lm_head"
                             if cfg.memory.loss == "chunked" else f"full logits: b x s x V = {b}x{T}x{V}")
    tn[WORKSPACES] = f"2 x {fmt_bytes(workspace)}: the forward's thread and autograd's"
    en["activations"] = f"one block at a time, b={eb} x s={eT} x h={C} (no_grad)"
    en["logits and loss"] = (f"chunks of {chunk} rows x V={V}" if cfg.memory.loss == "chunked"
                             else f"full logits: b x s x V = {eb}x{eT}x{V}")
    en["eval buffers"] = "token ids and the loss sum"
    en[WORKSPACES] = (f"1 x {fmt_bytes(workspace)}: no backward has run" if cfg.train.eval_only
                      else tn[WORKSPACES] + " (from training)")
    return tn, en


def estimate(cfg: Config, device_type: str = "cuda", dtype: str | None = None,
             gpu: Gpu | None = None) -> Estimate:
    """Predicted peak allocated bytes of a training step and an evaluation pass (only the
    evaluation counts for a run with train.eval_only). On CUDA, `gpu` gives the architecture
    that sizes the cuBLAS workspaces (unknown: the larger size)."""
    if cfg.memory.activation_offload and device_type != "cuda":
        raise ConfigError(activation_refusal(cfg, device_type) or "activation offload needs CUDA")
    dtype = dtype or cfg.train.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    why = optimizer_refusal(cfg, device_type, dtype)  # e.g. offloading the optimizer off CUDA
    if why:
        raise ConfigError(why)
    a = 4 if dtype == "float32" else 2
    s = ModelShape.of(cfg.model)
    workspace = cublas_workspace(gpu) if device_type == "cuda" else 0
    tn, en = _notes(cfg, s, device_type, dtype, workspace)
    ttl = train_timeline(cfg, a, device_type, workspace)
    etl = eval_timeline(cfg, a, device_type, workspace)
    train = PhaseEstimate("train", _parts(ttl, tn), ttl.peak, host=ttl.host_peak)
    ev = PhaseEstimate("eval", _parts(etl, en), etl.peak)
    if device_type == "cuda":
        for ph in (train, ev):
            ph.overhead = [
                Part("CUDA context", CUDA_CONTEXT, "outside PyTorch's accounting (nvidia-smi shows it)"),
                Part("fragmentation allowance", int(ph.allocated * FRAGMENTATION),
                     f"{FRAGMENTATION:.0%} of allocated (reserved above allocated)"),
            ]
    host = [Part(*part) for part in optstate.host_parts(s.param_counts(), cfg.memory.optimizer_state)
            ] if cfg.memory.offload_optimizer else []
    return Estimate(train, ev, device_type, dtype, s.params(), cfg.train.eval_only, host=host)
