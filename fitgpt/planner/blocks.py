"""The transformer blocks' part of the planner's timeline: what one block allocates, saves for
backward and frees, node by node, and how a stack of identical blocks is replayed at a cost
that does not grow with the number of layers (first and last block one by one, the middle in
one go: see `fitgpt.planner.timeline`). Pure Python: no torch import.

What one block does depends on the device and on dropout (see ../shared/notes/memory.md):
- attention: a fused kernel (flash or memory-efficient) saves its output and a log-sum-exp.
  That holds on CUDA with or without dropout (the kernel draws the dropout mask itself from a
  Philox seed and offset, and backward draws it again). On the CPU, PyTorch's fused kernel
  takes no dropout, so with dropout > 0 in training SDPA runs its math path: it computes in
  fp32 (16-bit inputs are upcast), builds the causal mask, and saves the contiguous q and k,
  the softmax, the dropout noise, the dropped attention and v, each (b, heads, s, s) or (b, s, h).
- dropout on the residual branches and the embeddings: CUDA's fused kernel saves a bool mask
  (1 B per element); the CPU multiplies by a noise tensor of the input's dtype and saves it.
"""

from __future__ import annotations

from contextlib import nullcontext

from fitgpt.model.shape import ModelShape
from fitgpt.planner.timeline import Timeline, merge, split

EXPLICIT_LAYERS = 3  # up to this many blocks are replayed one by one; more: first, middle, last


def layout(L: int) -> list[int]:
    """How L identical blocks are replayed: one by one, or first, middle (L - 2 at once), last."""
    return [1] * L if L <= EXPLICIT_LAYERS else [1, L - 2, 1]


class Blocks:
    """One block's forward and backward on a timeline, for N = b x T rows of width C."""

    def __init__(self, tl: Timeline, s: ModelShape, b: int, T: int, a: int, dropout: bool = False,
                 cpu: bool = False):
        self.tl, self.s, self.b, self.T, self.a = tl, s, b, T, a
        self.N = b * T
        self.dropout = dropout  # dropout > 0 and the model in training mode
        self.cpu = cpu
        self.math = dropout and cpu  # SDPA's math path: the CPU's fused kernel takes no dropout

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
        if not grad:
            tl.free(mask)
        tl.free(src)
        return out, (mask if grad else None)

    def drop_backward(self, g16, mask):
        """The gradient through a dropout (16-bit like its output), from g16: the incoming
        gradient (already cast to 16 bits when a == 2) or None (fp32: the residual's own)."""
        tl = self.tl
        gd = tl.alloc("activations", self.N * self.s.n_embd * self.a)
        tl.free(*(h for h in (g16, mask) if h))
        return gd

    # ------------------------------------------------------------------------- forward

    def forward(self, grad: bool, x_in) -> tuple[dict, list, tuple]:
        """One block's forward. Returns (what autograd saves, by name; autocast weight copies
        cached in no-grad mode; the output). In no-grad mode only the output and the cache
        survive."""
        tl, s, N, a = self.tl, self.s, self.N, self.a
        C, act, cast = s.n_embd, "activations", "autocast weight copies"
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
        if self.math:
            proj = self._math_attention(grad, sv, ws)
        else:
            proj = self._fused_attention(grad, sv, ws)
        if a == 2:
            tl.free(ln)  # the fp32 ln output is not saved when a cast copy feeds the matmul
        elif not grad:
            tl.free(ln)
        sv["x_mid"] = tl.alloc(act, 4 * N * C)
        tl.free(proj)
        x_out = self._mlp_forward(grad, sv, ws)
        if not grad:
            tl.free(sv["x_mid"])
            return {}, ws, x_out
        sv["w"] = ws
        return sv, [], x_out

    def _mlp_forward(self, grad: bool, sv: dict, ws: list):
        tl, N, C, a = self.tl, self.N, self.s.n_embd, self.a
        act, cast = "activations", "autocast weight copies"
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
        if self.dropout:
            proj2, sv["mlp_drop"] = self.drop(proj2, N * C, a, grad)
        if a == 2 or not grad:
            tl.free(ln2)
        x_out = tl.alloc(act, 4 * N * C)
        tl.free(proj2)
        return x_out

    def _fused_attention(self, grad: bool, sv: dict, ws: list):
        """Flash or memory-efficient SDPA (saves its output and a log-sum-exp; with dropout the
        kernel draws the mask itself), the projection and its dropout. Returns the branch's
        output (the residual adds it)."""
        tl, N, C, a, act = self.tl, self.N, self.s.n_embd, self.a, "activations"
        sv["out"] = tl.alloc(act, N * C * a)
        sv["lse"] = tl.alloc(act, 4 * self.b * self.s.n_head * self.T)
        if not grad:
            tl.free(sv["qkv"])
        if a == 2:
            ws.append(tl.alloc("autocast weight copies", C * C * a))
        proj = tl.alloc(act, N * C * a)
        if self.dropout:
            proj, sv["attn_drop"] = self.drop(proj, N * C, a, grad)
        if not grad:
            tl.free(sv["out"], sv["lse"])
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
        tl.free(sv.pop("qkv"))
        if grad:
            sv.update(qc=qc, kc=kc, sm=sm, noise=noise, dropped=dropped, vc=vc, y=y, attn_drop=drop)
        else:
            tl.free(y)
        return proj

    # ------------------------------------------------------------------------- backward

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

    def ln_backward(self, g_in, stats, x, grads: list, exist: bool):
        """A LayerNorm's backward, in fp32 (a 16-bit incoming gradient is cast first); frees the
        incoming gradient, the saved statistics and the input. Returns the input's gradient."""
        tl, N, C = self.tl, self.N, self.s.n_embd
        if self.a == 2:
            g32 = tl.alloc("activations", 4 * N * C)
            tl.free(g_in)
            g_in = g32
        g_ln = tl.alloc("activations", 4 * N * C)
        self.param_grads(C, C, 1, grads, exist)
        tl.free(g_in, *stats, x)
        return g_ln

    def backward(self, sv: dict, g_res, grads: list, exist: bool):
        """Backward through one block, node by node: each node allocates its outputs, then frees
        the incoming gradient and what it saved. Returns the gradient of the block input."""
        tl, N, C, a = self.tl, self.N, self.s.n_embd, self.a
        act = "activations"
        w_attn, w_proj, w_fc, w_proj2 = sv["w"] if a == 2 else (None,) * 4
        # MLP projection: grad of the GELU output and of the weight
        g16 = tl.alloc(act, N * C * a) if a == 2 else None
        if "mlp_drop" in sv:
            g16 = self.drop_backward(g16, sv["mlp_drop"])
        g_gelu = tl.alloc(act, 4 * N * C * a)
        self.param_grads(4 * C * C, C, a, grads, exist)
        tl.free(*(h for h in (g16, sv["gelu"], w_proj2) if h))
        g_fc = tl.alloc(act, 4 * N * C * a)  # GELU backward
        tl.free(g_gelu, sv["fc"])
        g_in = tl.alloc(act, N * C * a)  # fc backward
        self.param_grads(4 * C * C, 4 * C, a, grads, exist)
        tl.free(*(h for h in (g_fc, sv["xin2"], w_fc) if h))
        g_ln = self.ln_backward(g_in, sv["ln2_stats"], sv["x_mid"], grads, exist)
        g_mid = tl.alloc(act, 4 * N * C)  # residual add
        tl.free(g_res, g_ln)
        # attention projection, attention backward, qkv
        g16 = tl.alloc(act, N * C * a) if a == 2 else None
        if "attn_drop" in sv:
            g16 = self.drop_backward(g16, sv["attn_drop"])
        g_out = tl.alloc(act, N * C * a)
        self.param_grads(C * C, C, a, grads, exist)
        tl.free(*(h for h in (g16, w_proj) if h))
        if self.math:
            g_qkv = self._math_attention_backward(sv, g_out)
        else:
            dqkv = [tl.alloc(act, N * C * a) for _ in range(3)]
            tl.free(g_out, sv["qkv"], sv["out"], sv["lse"])
            g_qkv = tl.alloc(act, 3 * N * C * a)  # concatenated
            tl.free(*dqkv)
        g_in = tl.alloc(act, N * C * a)
        self.param_grads(3 * C * C, 3 * C, a, grads, exist)
        tl.free(*(h for h in (g_qkv, sv["xin"], w_attn) if h))
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
            c2 = tl.alloc(act, NC * a)
            tl.free(t3)
            g_qkv = tl.alloc(act, 3 * NC * a)
            tl.free(c2, t2, c1)
            return g_qkv
        c1 = tl.alloc(act, 4 * NC)
        tl.free(gv)
        c2 = tl.alloc(act, 4 * NC)
        tl.free(gq_s)
        g_qkv = tl.alloc(act, 3 * NC * 4)
        tl.free(c2, gk_s, c1)
        return g_qkv

    # ------------------------------------------------------------------------- the stack

    def forward_saving(self, x) -> tuple[list, tuple]:
        """Every block's forward with autograd saving: ([(saved, how many blocks)], output)."""
        blocks = []
        for k in layout(self.s.n_layer):
            if k == 1:
                sv, _, out = self.forward(True, x)
            else:
                with self.tl.repeated(k):
                    sv, _, out = self.forward(True, x)
                out, rest = split(out, k)
                sv["x_in"] = merge(x, rest)  # the inputs of the k blocks
            blocks.append((sv, k))
            x = out
        return blocks, x

    def forward_no_grad(self, x, keep_inputs: bool) -> tuple[list, list, tuple]:
        """Every block's forward saving nothing: ([(kept inputs, how many)] when keep_inputs
        (checkpointing) else [], the autocast weight copies cached, the output). Without
        keep_inputs each block's input is freed after the block (evaluation)."""
        kept, cache = [], []
        for k in layout(self.s.n_layer):
            if k == 1:
                _, ws, out = self.forward(False, x)
                rest = None
            else:
                with self.tl.repeated(k):
                    _, ws, out = self.forward(False, x)
                out, rest = split(out, k)
            cache += ws
            if keep_inputs:
                kept.append((x if rest is None else merge(x, rest), k))
            else:
                self.tl.free(x, *([rest] if rest else []))
            x = out
        return kept, cache, x

    def backward_all(self, blocks: list, g_res, grads: list, exist: bool, recompute: bool):
        """Backward through every block, last first (with recompute, each block's forward is
        replayed with autograd first, from its kept input). Returns the input's gradient."""
        for item, k in reversed(blocks):
            with self.tl.repeated(k) if k > 1 else nullcontext():
                sv = item
                if recompute:
                    sv, _, out = self.forward(True, item)
                    self.tl.free(out)
                g = self.backward(sv, g_res, grads, exist)
            if k > 1:
                g, rest = split(g, k)
                self.tl.free(rest)
            g_res = g
        return g_res
