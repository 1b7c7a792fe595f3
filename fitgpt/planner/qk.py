"""The planner's replay of model.qk_norm and model.position=rotary (fitgpt.model.rotary): what
they allocate and save in one block's attention, forward and backward. A part of
`fitgpt.planner.blocks.Blocks` (a mix-in, in its own file for size); see that module's
docstring for where q and k go. Pure Python: no torch import.
"""

from __future__ import annotations


class QK:
    """q and k through F.rms_norm (the CPU's composite) and the rotation, on `self.tl`, for
    `self.N` rows of `self.s.n_embd` at `self.a` bytes: the methods `Blocks` calls."""

    def _qk_forward(self, grad: bool, sv: dict) -> None:
        """model.qk_norm, then model.position=rotary, on q and k (fitgpt.model.rotary): sets
        sv["q"], sv["k"], the tensors attention gets instead of views of qkv, and sv["norms"],
        what each norm saves (its input's fp32 copy with 16-bit compute, and 1/rms)."""
        s, tl, NC, a, act = self.s, self.tl, self.N * self.s.n_embd, self.a, "activations"
        if not (s.qk_norm or s.position == "rotary"):
            return
        small = 4 * self.N * s.n_head  # one fp32 per head and row
        outs = []
        if s.qk_norm:  # F.rms_norm on the CPU: x.float(), pow, mean, rsqrt, mul, cast back
            sv["norms"] = []
            for _ in range(2):
                up = tl.alloc(act, 4 * NC) if a == 2 else None
                p, m = tl.alloc(act, 4 * NC), tl.alloc(act, small)
                rs = tl.alloc(act, small)
                tl.free(m, p)
                y = tl.alloc(act, 4 * NC)
                if a == 2:
                    y16 = tl.alloc(act, NC * a)
                    tl.free(y)
                    y = y16
                sv["norms"].append((self.done(grad, up, 4 * NC) if up else None, self.done(grad, rs, small)))
                outs.append(y)
        if s.position == "rotary":
            rotated = [self._rotate(NC * a) for _ in range(2)]
            tl.free(*outs)
            outs = rotated
        sv["q"], sv["k"] = outs

    def _rotate(self, n: int):
        """rotary.rotate of one tensor of n bytes: two halves, each two products and a sum,
        concatenated; saves only the (tiny) cos and sin tables."""
        tl, act = self.tl, "activations"
        halves = []
        for _ in range(2):
            m1, m2 = tl.alloc(act, n / 2), tl.alloc(act, n / 2)
            halves.append(tl.alloc(act, n / 2))
            tl.free(m1, m2)
        out = tl.alloc(act, n)
        tl.free(*halves)
        return out

    def _qk_attention_backward(self, sv: dict, g_out):
        """The fused attention's backward when q and k are tensors of their own (rotary or
        qk_norm), then k's and q's rotation and norm backward (autograd runs them in the
        reverse of their creation). Returns the qkv gradient."""
        tl, NC, a, act, u = self.tl, self.N * self.s.n_embd, self.a, "activations", self.unpack
        saved = [u(sv["out"]), u(sv["lse"]), u(sv["q"]), u(sv["k"])]
        gq, gk, gv = [tl.alloc(act, NC * a) for _ in range(3)]
        qkv = u(sv["qkv"])  # v is a view of it; so are the inputs an fp32 qk_norm saves
        tl.free(g_out, *saved)
        views = self.s.qk_norm and a == 4
        if not views:
            tl.free(qkv)
        gq, gk = self._qk_backward(sv, gq, gk, qkv if views else None)
        g_qkv = tl.alloc(act, 3 * NC * a)  # concatenated
        tl.free(gq, gk, gv)
        return g_qkv

    def _qk_backward(self, sv: dict, gq, gk, qkv):
        """k's, then q's rotation backward, then their norms' (autograd runs them in the reverse
        of their creation), from attention's gradients of q and k (n bytes each when
        16-bit, fp32 on the math path in fp32). qkv: the tensor fp32 norms saved views of
        (freed by q's, the last to use it), or None. Returns the gradients of q and k."""
        n = self.N * self.s.n_embd * self.a
        if self.s.position == "rotary":
            gk, gq = self._rotate_backward(gk, n), self._rotate_backward(gq, n)
        if self.s.qk_norm:
            (q_up, q_rs), (k_up, k_rs) = [(x and self.unpack(x), self.unpack(rs)) for x, rs in sv["norms"]]
            gk = self._norm_backward(gk, k_up, k_rs)
            gq = self._norm_backward(gq, q_up or qkv, q_rs)
        return gq, gk

    def _rotate_backward(self, g, n: int):
        """rotary.rotate's backward from g (n bytes, freed): the halves' gradients through the
        products and sums, each half scattered into a zero tensor of n bytes, the two added."""
        tl, act, h = self.tl, "activations", n / 2
        neg = tl.alloc(act, h)
        g1a = tl.alloc(act, h)
        tl.free(neg)
        c, b = tl.alloc(act, h), tl.alloc(act, h)
        g2 = tl.alloc(act, h)
        tl.free(c, b)
        a1 = tl.alloc(act, h)
        tl.free(g)
        g1 = tl.alloc(act, h)
        tl.free(g1a, a1)
        s2 = tl.alloc(act, n)
        tl.free(g2)
        s1 = tl.alloc(act, n)
        tl.free(g1)
        out = tl.alloc(act, n)
        tl.free(s2, s1)
        return out

    def _norm_backward(self, g, x, rs):
        """F.rms_norm's backward (the CPU's composite, in fp32) from g (freed), with what it
        saved: x (the fp32 input, freed here; None when it is a view of qkv) and 1/rms."""
        tl, NC, act = self.tl, self.N * self.s.n_embd, "activations"
        small = 4 * self.N * self.s.n_head
        if self.a == 2:
            g32 = tl.alloc(act, 4 * NC)
            tl.free(g)
            g = g32
        m1, m2, sm = tl.alloc(act, 4 * NC), tl.alloc(act, 4 * NC), tl.alloc(act, small)
        tl.free(m1, g)
        t = [tl.alloc(act, small) for _ in range(3)]
        tl.free(t[1], t[0], sm, rs)
        d = tl.alloc(act, 4 * NC)
        tl.free(t[2])
        t = [tl.alloc(act, 4 * NC) for _ in range(3)]
        tl.free(t[1], t[0], d, *([x] if x else []))
        out = tl.alloc(act, 4 * NC)
        tl.free(m2, t[2])
        if self.a == 2:
            o16 = tl.alloc(act, NC * self.a)
            tl.free(out)
            out = o16
        return out
