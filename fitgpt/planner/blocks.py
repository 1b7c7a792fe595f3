"""The transformer blocks' part of the planner's timeline: what one block allocates, saves for
backward and frees, node by node (the stack of blocks, replayed at a cost that does not grow
with the number of layers, is `fitgpt.planner.stack`). Pure Python: no torch import.

What one block does depends on the device and on dropout (see ../shared/notes/memory.md):
- attention: a fused kernel (flash or memory-efficient) saves its output and a log-sum-exp.
  That holds on CUDA with or without dropout (the kernel draws the dropout mask itself from a
  Philox seed and offset, and backward draws it again). On the CPU, PyTorch's fused kernel
  takes no dropout, so with dropout > 0 in training SDPA runs its math path: it computes in
  fp32 (16-bit inputs are upcast), builds the causal mask, and saves the contiguous q and k,
  the softmax, the dropout noise, the dropped attention and v, each (b, heads, s, s) or (b, s, h).
- dropout on the residual branches and the embeddings: CUDA's fused kernel saves a bool mask
  (1 B per element); the CPU multiplies by a noise tensor of the input's dtype and saves it.
- model.qk_norm and model.position=rotary (fitgpt.model.rotary) give q and k tensors of their
  own, which attention saves beside qkv (v stays a view of it). F.rms_norm is replayed as the
  CPU's composite (an fp32 copy of a 16-bit input and 1/rms saved; in fp32 it saves views of
  qkv, which then lives until q's norm backward); the rotation saves only the small cos and sin
  tables; their backward passes are replayed op by op (tests/test_rotary_qknorm.py checks them
  against the CPU tracker; CUDA's fused rms_norm, if it is taken, allocates less).

The activation levers (`fitgpt.model.checkpointing`) change what survives the forward pass:
- checkpointing every k-th block: those blocks run without saving (their input kept) and are
  replayed with saving in backward, one at a time; the blocks in between save as usual. The
  stack is then a run of identical periods (one checkpointed block, k - 1 saving ones), each
  replayed like a run of identical blocks (`fitgpt.planner.stack`).
- activation offload (CUDA): a saving block's saved tensors of at least OFFLOAD_MIN_BYTES that
  are not weights leave the device where the forward pass is done with them (where a no-grad
  forward frees them) and come back, one backward node at a time, where the node runs. Host
  memory counts each copy rounded up to a power of two (PyTorch's caching host allocator).
"""

from __future__ import annotations

from dataclasses import dataclass

from fitgpt.model.shape import ModelShape
from fitgpt.planner.qk import QK
from fitgpt.planner.timeline import Timeline, r

EXPLICIT_LAYERS = 3  # up to this many blocks are replayed one by one; more: first, middle, last
OFFLOAD_MIN_BYTES = 2**20  # fitgpt.model.offload.MIN_BYTES: smaller saved tensors stay


def pow2(n: int) -> int:
    """n rounded up to a power of two: what the caching host allocator reserves for n bytes."""
    return 1 << max(0, n - 1).bit_length()


@dataclass
class Host:
    """A saved tensor (or `count` alike) waiting in host memory: `nbytes` each."""

    nbytes: int
    count: int = 1


class Blocks(QK):
    """One block's forward and backward on a timeline, for N = b x T rows of width C."""

    def __init__(self, tl: Timeline, s: ModelShape, b: int, T: int, a: int, dropout: bool = False,
                 cpu: bool = False, offload: bool = False, min_bytes: int | None = None):
        self.tl, self.s, self.b, self.T, self.a = tl, s, b, T, a
        self.N = b * T
        self.dropout = dropout  # dropout > 0 and the model in training mode
        self.cpu = cpu
        self.math = dropout and cpu  # SDPA's math path: the CPU's fused kernel takes no dropout
        self.offload = offload  # memory.activation_offload: saving blocks offload
        self.min_bytes = OFFLOAD_MIN_BYTES if min_bytes is None else min_bytes
        self._offloading = False  # inside a saving block's forward with offload
        assert not (offload and self.math), "offload is CUDA's; the math path is the CPU's"

    # ------------------------------------------------------------------------- offload

    def done(self, grad: bool, h, nbytes: int, count: int = 1, packs: int = 1):
        """The forward pass is done with h (`count` tensors of nbytes, each saved `packs` times):
        without grad it is freed; with grad it stays for backward, or with offload (nbytes at
        least min_bytes) it leaves the device for host memory. Returns what backward gets."""
        if not grad:
            self.tl.free(h)
            return None
        if not self._offloading or nbytes < self.min_bytes:
            return h
        copies = round(h[1] / r(nbytes))  # count x the repetitions h stands for
        self.tl.free(h)
        self.tl.to_host(pow2(nbytes) * copies * packs, nbytes * copies * packs)
        return Host(nbytes, count)

    def unpack(self, h):
        """A saved tensor as a backward node gets it: from host memory, a new copy on the device
        (the node frees it when it ends); otherwise the tensor itself."""
        if not isinstance(h, Host):
            return h
        self.tl.from_host(pow2(h.nbytes) * h.count * self.tl.times)
        return self.tl.alloc("activations", h.nbytes, h.count)

    def _free(self, *handles) -> None:
        self.tl.free(*(h for h in handles if h))

    def drop(self, src, n: int, e: int, grad: bool):
        """Dropout of src (n elements of e bytes), which it frees: (output, what backward keeps,
        None without grad). The CPU draws a noise tensor of the input's dtype and multiplies;
        CUDA's fused kernel writes the output and a bool mask."""
        tl, act = self.tl, "activations"
        if self.cpu:
            mask = tl.alloc(act, n * e)
            out = tl.alloc(act, n * e)
        else:
            out = tl.alloc(act, n * e)
            mask = tl.alloc(act, n)
        mask = self.done(grad, mask, n * e if self.cpu else n)
        tl.free(src)
        return out, mask

    def drop_backward(self, g16, mask):
        """The gradient through a dropout (16-bit like its output), from g16: the incoming
        gradient (already cast to 16 bits when a == 2) or None (fp32: the residual's own)."""
        mask = self.unpack(mask)
        gd = self.tl.alloc("activations", self.N * self.s.n_embd * self.a)
        self._free(g16, mask)
        return gd

    # ------------------------------------------------------------------------- forward

    def forward(self, grad: bool, x_in, offload: bool = False) -> tuple[dict, list, tuple]:
        """One block's forward. Returns (what autograd saves, by name; autocast weight copies
        cached in no-grad mode; the output). In no-grad mode only the output and the cache
        survive. With offload, what it saves goes to host memory as the forward is done with
        it (the block input, by the caller, once the block has returned)."""
        tl, s, N, a = self.tl, self.s, self.N, self.a
        C, act, cast = s.n_embd, "activations", "autocast weight copies"
        self._offloading = offload and grad
        sv: dict = {"x_in": x_in}
        ws: list = []
        # attention half: ln_1 (fp32 out + mean + rstd), qkv matmul, fused attention, projection
        ln, sv["ln1_stats"] = self.norm_forward(grad)
        if a == 2:
            ws.append(tl.alloc(cast, 3 * C * C * a))
            sv["xin"] = tl.alloc(act, N * C * a)  # ln output cast for the matmul
        sv["qkv"] = tl.alloc(act, 3 * N * C * a)
        if a == 2:
            sv["xin"] = self.done(grad, sv["xin"], N * C * a)
        self._qk_forward(grad, sv)
        if self.math:
            proj = self._math_attention(grad, sv, ws)
        else:
            proj = self._fused_attention(grad, sv, ws)
        if a == 2:
            tl.free(ln)  # the fp32 ln output is not saved when a cast copy feeds the matmul
        else:
            sv["xin"] = self.done(grad, ln, 4 * N * C)
        sv["x_mid"] = tl.alloc(act, 4 * N * C)
        tl.free(proj)
        x_out = self._mlp_forward(grad, sv, ws)
        sv["x_mid"] = self.done(grad, sv["x_mid"], 4 * N * C)
        self._offloading = False
        if not grad:
            return {}, ws, x_out
        sv["w"] = ws
        return sv, [], x_out

    def norm_forward(self, grad: bool) -> tuple:
        """A norm of the fp32 residual stream: (its fp32 output, its saved statistics). LayerNorm
        saves the mean and the reciprocal std (N each); the RMSNorm (fitgpt.model.blockops)
        allocates its reciprocal RMS (N) first, then the output. (`ReLU^2` needs no replay of
        its own: it allocates and saves what GELU does.)"""
        tl, N, C, act = self.tl, self.N, self.s.n_embd, "activations"
        done = self.done  # outside a block's forward (ln_f) it offloads nothing
        if self.s.norm == "rmsnorm":
            rstd = tl.alloc(act, 4 * N)
            out = tl.alloc(act, 4 * N * C)
            return out, [done(grad, rstd, 4 * N)]
        out = tl.alloc(act, 4 * N * C)
        stats = [tl.alloc(act, 4 * N), tl.alloc(act, 4 * N)]
        return out, [done(grad, h, 4 * N) for h in stats]

    def _mlp_forward(self, grad: bool, sv: dict, ws: list):
        tl, N, C, a = self.tl, self.N, self.s.n_embd, self.a
        act, cast = "activations", "autocast weight copies"
        ln2, sv["ln2_stats"] = self.norm_forward(grad)
        if a == 2:
            ws.append(tl.alloc(cast, 4 * C * C * a))
            sv["xin2"] = tl.alloc(act, N * C * a)
        sv["fc"] = tl.alloc(act, 4 * N * C * a)
        if a == 2:
            sv["xin2"] = self.done(grad, sv["xin2"], N * C * a)
        sv["gelu"] = tl.alloc(act, 4 * N * C * a)
        sv["fc"] = self.done(grad, sv["fc"], 4 * N * C * a)
        if a == 2:
            ws.append(tl.alloc(cast, 4 * C * C * a))
        proj2 = tl.alloc(act, N * C * a)
        sv["gelu"] = self.done(grad, sv["gelu"], 4 * N * C * a)
        if self.dropout:
            proj2, sv["mlp_drop"] = self.drop(proj2, N * C, a, grad)
        if a == 2:
            tl.free(ln2)
        else:
            sv["xin2"] = self.done(grad, ln2, 4 * N * C)
        x_out = tl.alloc(act, 4 * N * C)
        tl.free(proj2)
        return x_out

    def _fused_attention(self, grad: bool, sv: dict, ws: list):
        """Flash or memory-efficient SDPA (saves q, k and v, its output and a log-sum-exp; with
        dropout the kernel draws the mask itself), the projection (saves the output again) and
        its dropout. Returns the branch's output (the residual adds it)."""
        tl, N, C, a, act = self.tl, self.N, self.s.n_embd, self.a, "activations"
        sv["out"] = tl.alloc(act, N * C * a)
        lse = 4 * self.b * self.s.n_head * self.T
        sv["lse"] = tl.alloc(act, lse)
        if self._offloading and not self.cpu and N * C * a >= self.min_bytes:
            # CUDA copies a strided tensor to the host through a contiguous device copy: q, k, v
            # and the output are strided views, packed one after another as attention saves them
            tl.transient(act, N * C * a)
        sv["qkv"] = self.done(grad, sv["qkv"], N * C * a, count=3)  # q, k, v: views of it
        for name in ("q", "k"):  # rotated or normalised: their own tensors, saved instead
            if name in sv:
                sv[name] = self.done(grad, sv[name], N * C * a)
        if a == 2:
            ws.append(tl.alloc("autocast weight copies", C * C * a))
        proj = tl.alloc(act, N * C * a)
        if self.dropout:
            proj, sv["attn_drop"] = self.drop(proj, N * C, a, grad)
        sv["out"] = self.done(grad, sv["out"], N * C * a, packs=2)
        if isinstance(sv["out"], Host):
            sv["proj_in"] = sv["out"]  # the projection's own copy
        sv["lse"] = self.done(grad, sv["lse"], lse)
        return proj

    def _math_attention(self, grad: bool, sv: dict, ws: list):
        """SDPA's math path (the CPU with dropout): in fp32 (16-bit q, k, v upcast first), q and
        k scaled, the causal mask as a float (s, s) tensor, scores, softmax, dropout noise and
        the dropped weights (b, heads, s, s each), v, the output; then the projection and its
        dropout. qkv itself is not saved: the contiguous copies are. Returns the branch's output."""
        tl, N, C, a, act = self.tl, self.N, self.s.n_embd, self.a, "activations"
        S, TT, NC = self.b * self.s.n_head * self.T * self.T, self.T * self.T, N * C
        up = [tl.alloc(act, 4 * NC) for _ in range(3)] if a == 2 else []
        q_s = tl.alloc(act, 4 * NC)
        ones = tl.alloc(act, TT)  # bool ones, then their lower triangle
        tril = tl.alloc(act, TT)
        tl.free(ones)
        scalars = [tl.alloc(act, 4), tl.alloc(act, 4)]
        where = tl.alloc(act, 4 * TT)
        tl.free(*scalars, tril)
        k_s = tl.alloc(act, 4 * NC)
        qc, kc = tl.alloc(act, 4 * NC), tl.alloc(act, 4 * NC)
        scores = tl.alloc(act, 4 * S)
        tl.free(k_s) if grad else tl.free(kc, qc, k_s)
        added = tl.alloc(act, 4 * S)
        tl.free(scores)
        sm = tl.alloc(act, 4 * S)
        tl.free(added)
        noise, dropped = tl.alloc(act, 4 * S), tl.alloc(act, 4 * S)
        if not grad:
            tl.free(noise, sm)
        a16 = [tl.alloc(act, 2 * S)] if a == 2 else []
        vc = tl.alloc(act, 4 * NC)
        o = tl.alloc(act, 4 * NC)
        if not grad:
            tl.free(vc)
        if a == 2:
            o16 = tl.alloc(act, NC * a)
            tl.free(o)
            o = o16
        tl.free(*([] if grad else [dropped]), q_s, where, *up, *a16)
        y = tl.alloc(act, NC * a)
        tl.free(o)
        if a == 2:
            ws.append(tl.alloc("autocast weight copies", C * C * a))
        proj = tl.alloc(act, NC * a)
        proj, drop = self.drop(proj, NC, a, grad)
        qkv = sv.pop("qkv")
        if grad and self.s.qk_norm and a == 4:
            sv["qkv_views"] = qkv  # what fp32 qk_norm saved: views of it
        else:
            tl.free(qkv)
        tl.free(*(sv.pop(n) for n in ("q", "k") if n in sv))  # rotated or normalised: not saved
        if grad:
            sv.update(qc=qc, kc=kc, sm=sm, noise=noise, dropped=dropped, vc=vc, y=y, attn_drop=drop)
        else:
            tl.free(y)
        return proj

    # ------------------------------------------------------------------------- backward

    on_grad = None  # memory.fused_backward's last backward: told the elements of each complete gradient

    def weight_grad(self, n: int, a: int, grads: list, exist: bool) -> None:
        """A weight's gradient: computed in the compute dtype, cast to fp32, accumulated."""
        tl = self.tl
        h16 = tl.alloc("gradients", n * a) if a == 2 else None
        g = tl.alloc("gradients", 4 * n)
        if h16:
            tl.free(h16)
        if exist:
            tl.free(g)  # added in place to the existing .grad
        else:
            grads.append(g)

    def param_grads(self, n_weight: int, n_bias: int, a: int, grads: list, exist: bool) -> None:
        """A layer's weight gradient (computed at `a` bytes per element) and, with bias, its bias's."""
        self.weight_grad(n_weight, a, grads, exist)
        if self.s.bias:
            self.weight_grad(n_bias, 1, grads, exist)
        if self.on_grad is not None:  # memory.fused_backward: both complete; the bias is updated first
            for n in ([n_bias] if self.s.bias else []) + [n_weight]:
                self.on_grad(n)

    def ln_backward(self, g_in, stats, x, grads: list, exist: bool, cast: bool = True):
        """A norm's backward, in fp32 (a 16-bit incoming gradient is cast first, unless `cast`
        is False: ln_f's comes from the loss in fp32); frees the incoming gradient, the saved
        statistics and the input. Returns the input's gradient."""
        tl, N, C = self.tl, self.N, self.s.n_embd
        if self.a == 2 and cast:
            g32 = tl.alloc("activations", 4 * N * C)
            tl.free(g_in)
            g_in = g32
        x, stats = self.unpack(x), [self.unpack(h) for h in stats]
        if self.s.norm == "rmsnorm":  # blockops: (g x).mean, times rstd^3, then g rstd + x coef
            gx = tl.alloc("activations", 4 * N * C)
            coef = tl.alloc("activations", 4 * N)
            tl.free(gx)
            tl.free(tl.alloc("activations", 4 * N))  # rstd^3
            g_ln = tl.alloc("activations", 4 * N * C)
            tl.free(coef)
        else:
            g_ln = tl.alloc("activations", 4 * N * C)
            self.param_grads(C, C, 1, grads, exist)
        tl.free(g_in, *stats, x)
        return g_ln

    def backward(self, sv: dict, g_res, grads: list, exist: bool):
        """Backward through one block, node by node: each node gets what it saved (`unpack`),
        allocates its outputs, then frees the incoming gradient and what it saved. Returns the
        gradient of the block input."""
        tl, N, C, a = self.tl, self.N, self.s.n_embd, self.a
        act, u = "activations", self.unpack
        w_attn, w_proj, w_fc, w_proj2 = sv["w"] if a == 2 else (None,) * 4
        # MLP projection: grad of the GELU output and of the weight
        g16 = tl.alloc(act, N * C * a) if a == 2 else None
        if "mlp_drop" in sv:
            g16 = self.drop_backward(g16, sv["mlp_drop"])
        gelu = u(sv["gelu"])
        g_gelu = tl.alloc(act, 4 * N * C * a)
        self.param_grads(4 * C * C, C, a, grads, exist)
        self._free(g16, gelu, w_proj2)
        fc = u(sv["fc"])
        g_fc = tl.alloc(act, 4 * N * C * a)  # GELU backward
        tl.free(g_gelu, fc)
        xin2 = u(sv["xin2"])
        g_in = tl.alloc(act, N * C * a)  # fc backward
        self.param_grads(4 * C * C, 4 * C, a, grads, exist)
        self._free(g_fc, xin2, w_fc)
        g_ln = self.ln_backward(g_in, sv["ln2_stats"], sv["x_mid"], grads, exist)
        g_mid = tl.alloc(act, 4 * N * C)  # residual add
        tl.free(g_res, g_ln)
        # attention projection, attention backward, qkv
        g16 = tl.alloc(act, N * C * a) if a == 2 else None
        if "attn_drop" in sv:
            g16 = self.drop_backward(g16, sv["attn_drop"])
        y = u(sv.get("proj_in"))  # offloaded: the projection's own copy of the attention output
        g_out = tl.alloc(act, N * C * a)
        self.param_grads(C * C, C, a, grads, exist)
        self._free(g16, w_proj, y)
        if self.math:
            g_qkv = self._math_attention_backward(sv, g_out)
        elif "q" in sv:  # rotary or qk_norm: q and k are tensors of their own
            g_qkv = self._qk_attention_backward(sv, g_out)
        else:
            saved = [u(sv["qkv"]), u(sv["out"]), u(sv["lse"])]
            dqkv = [tl.alloc(act, N * C * a) for _ in range(3)]
            tl.free(g_out, *saved)
            g_qkv = tl.alloc(act, 3 * N * C * a)  # concatenated
            tl.free(*dqkv)
        xin = u(sv["xin"])
        g_in = tl.alloc(act, N * C * a)
        self.param_grads(3 * C * C, 3 * C, a, grads, exist)
        self._free(g_qkv, xin, w_attn)
        g_ln = self.ln_backward(g_in, sv["ln1_stats"], sv["x_in"], grads, exist)
        g_x = tl.alloc(act, 4 * N * C)
        tl.free(g_mid, g_ln)
        return g_x

    def _math_attention_backward(self, sv: dict, g_y):
        """Backward of SDPA's math path, in fp32, from the gradient of its output (freed):
        through the dropped weights, the noise, the softmax, the scaled q and k; the three
        gradients are laid out as (b, s, 3h) and concatenated. Returns the qkv gradient."""
        tl, a, act = self.tl, self.a, "activations"
        NC, S = self.N * self.s.n_embd, self.b * self.s.n_head * self.T * self.T
        tl.free(sv["y"])
        src = g_y
        if a == 2:
            src = tl.alloc(act, 4 * NC)
            tl.free(g_y)
        gyc = tl.alloc(act, 4 * NC)
        tl.free(src)
        gv, gdr = tl.alloc(act, 4 * NC), tl.alloc(act, 4 * S)
        tl.free(gyc, sv["vc"], sv["dropped"])
        gsm = tl.alloc(act, 4 * S)  # through the dropout noise
        tl.free(gdr, sv["noise"])
        gsc = tl.alloc(act, 4 * S)  # softmax backward
        tl.free(gsm, sv["sm"])
        gk, gq = tl.alloc(act, 4 * NC), tl.alloc(act, 4 * NC)
        tl.free(gsc, sv["kc"], sv["qc"])
        gk_s = tl.alloc(act, 4 * NC)
        tl.free(gk)
        gq_s = tl.alloc(act, 4 * NC)
        tl.free(gq)
        if a == 2:  # each cast back to 16 bits, then laid out for the concatenation
            t1 = tl.alloc(act, NC * a)
            tl.free(gv)
            t2 = tl.alloc(act, NC * a)
            tl.free(gk_s)
            t3 = tl.alloc(act, NC * a)
            tl.free(gq_s)
            c1 = tl.alloc(act, NC * a)
            tl.free(t1)
            gq, gk = self._qk_backward(sv, t3, t2, None)
        else:
            c1 = tl.alloc(act, 4 * NC)
            tl.free(gv)
            gq, gk = self._qk_backward(sv, gq_s, gk_s, sv.pop("qkv_views", None))
        if self.s.position != "rotary":  # q's gradient laid out for the concatenation
            c2 = tl.alloc(act, NC * a)
            tl.free(gq)
            gq = c2
        g_qkv = tl.alloc(act, 3 * NC * a)
        tl.free(gq, gk, c1)
        return g_qkv
