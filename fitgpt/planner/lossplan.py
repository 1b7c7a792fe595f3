"""The loss in the planner's timeline: lm_head and cross-entropy, chunked or over the full logits,
with the logit soft-cap, forward and backward, allocation by allocation as `fitgpt.model.loss`
runs them. Split out of `estimate` (which calls these for every micro-batch). Pure Python."""

from __future__ import annotations

from fitgpt.model.shape import ModelShape
from fitgpt.planner.timeline import Timeline, r


def _loss(tl: Timeline, s: ModelShape, N: int, a: int, chunked: bool, chunk: int, grad: bool,
          cuda: bool = False) -> list:
    """lm_head + cross-entropy forward; returns what survives until backward. With
    model.logit_softcap the chunked loss keeps tanh(z / c) of a chunk in a second (c, V) fp32
    buffer until the gradient is formed (fitgpt.model.loss)."""
    V, C = s.padded_vocab, s.n_embd
    cap = bool(s.logit_softcap)
    kept: list = []
    if chunked:
        w = tl.alloc("logits and loss", V * C * a) if a == 2 else None
        tl.alloc("logits and loss", 4)  # total
        if grad:
            kept += [tl.alloc("logits and loss", 4 * N * C), tl.alloc("logits and loss", 4 * V * C)]
        # every full chunk does the same and leaves the timeline as it found it: one of each size
        for c in ([chunk] if N >= chunk else []) + ([N % chunk] if N % chunk else []):
            small = [tl.alloc("logits and loss", x) for x in (c * C * a if a == 2 else 0, c, 8 * c)]
            if a == 2:
                tl.transient("logits and loss", c * V * a, 4 * c * V)
            logits = tl.alloc("logits and loss", 4 * c * V)
            th = tl.alloc("logits and loss", 4 * c * V) if cap and grad else None  # tanh(z / c)
            stats = [tl.alloc("logits and loss", 4 * c) for _ in range(5)]
            if grad:
                tl.transient("logits and loss", 8 * c, 8 * c)
                if th and a == 2:  # a fresh copy per chunk, freed once applied
                    tl.free(th)
                    th = None
                g = tl.alloc("logits and loss", 2 * c * V) if a == 2 else None
                tl.transient("logits and loss", c * C * a)
                if a == 2:  # h of kept rows, then the weight gradient summed in fp32 (loss.py):
                    hk = tl.alloc("logits and loss", c * C * a)  # CUDA: the fp32-output GEMM's
                    tl.transient("logits and loss", 4 * V * C if cuda else 4 * c * C)  # CPU: hk
                    tl.free(g, hk)
            tl.free(logits, *([th] if th else []), *stats, *small)
        if grad:
            kept.append(tl.alloc("logits and loss", 4))  # the token count, for backward
        tl.free(("logits and loss", r(4)))
        if w:
            tl.free(w)
        return kept
    return _full_loss(tl, s, N, a, grad) if cap else _plain_full_loss(tl, s, N, a, grad)


def _full_loss(tl: Timeline, s: ModelShape, N: int, a: int, grad: bool) -> list:
    """The full loss with a soft cap: logits (N, V) in the compute dtype, an fp32 copy (the
    16-bit logits freed), divided in place, tanh (saved), times c, log-softmax. Returns what
    backward needs: [log-softmax, tanh] (+ the cast h and weight with a == 2)."""
    V, C = s.padded_vocab, s.n_embd
    kind = "logits and loss"
    hc = tl.alloc(kind, N * C * a) if a == 2 else None
    wc = tl.alloc("autocast weight copies", V * C * a) if a == 2 else None
    z = tl.alloc(kind, N * V * a)
    if a == 2:
        l32 = tl.alloc(kind, 4 * N * V)
        tl.free(z)
        z = l32
    t = tl.alloc(kind, 4 * N * V)  # tanh(z / c)
    tl.free(z)
    zc = tl.alloc(kind, 4 * N * V)  # c * tanh
    if not grad:
        tl.free(t)
    lsm = tl.alloc(kind, 4 * N * V)
    tl.transient(kind, 8)
    tl.free(zc)
    if grad:
        return [lsm] + ([hc, wc] if a == 2 else []) + [t]
    tl.free(lsm, *([hc] if hc else []))
    return [wc] if wc else []


def _plain_full_loss(tl: Timeline, s: ModelShape, N: int, a: int, grad: bool) -> list:
    """The full loss without a cap."""
    V, C = s.padded_vocab, s.n_embd
    kept: list = []
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


def _backward_full_loss(tl: Timeline, s: ModelShape, N: int, a: int, kept: list):
    """Returns the handles of the gradients of h (fp32) and of the lm_head weight (fp32)."""
    V, C = s.padded_vocab, s.n_embd
    g1 = tl.alloc("logits and loss", 4 * N * V)  # nll backward
    g2 = tl.alloc("logits and loss", 4 * N * V)  # log-softmax backward
    tl.free(g1, kept[0])
    if s.logit_softcap:  # through x c, tanh (frees its output) and / c: one (N, V) fp32 each
        *kept, t = kept
        for saved in (None, t, None):
            g = tl.alloc("logits and loss", 4 * N * V)
            tl.free(g2, *([saved] if saved else []))
            g2 = g
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


def _loss_backward(tl: Timeline, s: ModelShape, N: int, a: int, chunked: bool, kept: list):
    """The gradients of h and of the lm_head weight, from the loss."""
    if not chunked:
        return _backward_full_loss(tl, s, N, a, kept)
    factor = tl.alloc("logits and loss", 4)  # grad_out / count
    g_h = tl.alloc("logits and loss", 4 * N * s.n_embd)
    g_w = tl.alloc("logits and loss", 4 * s.padded_vocab * s.n_embd)
    tl.free(factor, *kept)
    return g_h, g_w
