"""Cross-entropy of the lm_head without the full (N, V) logits.

The usual loss materialises logits for every token (N x V, N = batch x block) and cross-entropy
adds fp32 copies of them: at batch 16, block 1024 and V = 50304 that is about 9 GiB, more than the
rest of a small model's training step. `chunked_cross_entropy` computes the lm_head matmul,
the log-sum-exp and the gradient over `chunk` rows at a time: the gradient with respect to the
hidden states and the lm_head weight is formed during the forward pass (softmax minus one-hot is
known there), so backward only scales it, and the extra memory is O(chunk x V) plus one gradient
of the hidden states and one of the weight. The matmul count equals the full path's (three per
row chunk), so it costs no extra compute.

Both functions cast explicitly (matmul in the autocast dtype, softmax in fp32), so the memory they
use is the same on every device whatever the autocast policy for cross-entropy is there.
Targets equal to -1 are ignored.

With a soft cap c (model.logit_softcap > 0) the cross-entropy is of c * tanh(z / c), z the
logits, computed in fp32 in both paths. The chunked path keeps tanh(z / c) of a chunk in a second
(c, V) fp32 buffer: the gradient with respect to z is the capped one times 1 - tanh^2, formed in
the forward pass like the rest.

In float16 the chunked path must not overflow where the full path does not. The full path
divides by the token count (and multiplies by GradScaler's scale) before its 16-bit backward
matmuls; the chunked one forms its gradients in the forward pass, before either is known. So it
keeps them as sums (softmax minus one-hot, each entry within [-1, 1], is well represented in
16 bits), never rounds a sum over rows to 16 bits (the lm_head weight gradient is summed in
fp32), and applies 1/count and the loss scale once, in fp32, in backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


def compute_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    """The dtype autocast would use for a matmul here, or the tensors' own dtype without it."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return fallback


def full_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       reduction: str = "mean", softcap: float = 0.0) -> torch.Tensor:
    """The usual way: logits (N, V) in the compute dtype, an fp32 copy (capped: c * tanh(z / c),
    tanh's output saved for backward), then cross-entropy."""
    logits = F.linear(h, weight)  # (N, V)
    acc = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(acc)
    if softcap:  # the 16-bit logits freed first; divided in place; tanh's output is saved
        del logits
        t = torch.tanh(z.div_(softcap))  # (N, V) fp32
        del z
        z = t * softcap
        del t
    return F.cross_entropy(z, targets, ignore_index=-1, reduction=reduction)


def _chunks(h, weight, targets, chunk, dtype, grads, softcap=0.0):
    """Sum of token losses over row chunks; with grads, also d(sum)/dh and d(sum)/dweight.

    Per chunk of c rows: one matmul for the logits, a fused log-softmax (its value at the target
    is the loss; exponentiated in place it is the softmax), the one-hot subtracted at c
    positions, and two matmuls for the gradients, written into their outputs. Ignored rows
    (target -1) are zeroed through (c, C) factors, never with a pass over the (c, V) block.
    The log-softmax overwrites the fp32 logits (CPU and CUDA kernels read a row before writing
    it). When the logits are already fp32 (no autocast), one (c, V) buffer serves every chunk:
    on the CPU a fresh large tensor costs a page fault per 4 KiB on first touch, as much time as
    the matmuls on a small model. With 16-bit logits, the fp32 copy is made per chunk as before.
    With softcap (and grads), tanh(z / c) is kept in a second buffer of the same kind."""
    n, dev = h.size(0), h.device
    w = weight.to(dtype)  # (V, C)
    acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 (fp64 for fp64)
    inplace = dev.type in ("cpu", "cuda")  # their log-softmax kernels read a row before writing it
    reuse = inplace and dtype == acc
    c = max(1, min(chunk, n))
    buf = torch.empty(c, w.size(0), dtype=acc, device=dev) if reuse else None  # (c, V)
    tbuf = torch.empty_like(buf) if reuse and softcap and grads else None  # (c, V): tanh(z / c)
    total = torch.zeros((), dtype=acc, device=dev)
    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grads else None
    for s in range(0, n, c):
        e = min(s + c, n)
        hc = h[s:e].to(dtype)  # (c, C)
        tc = targets[s:e]
        keep = (tc != -1).unsqueeze(1)  # (c, 1)
        tsafe = tc.clamp(min=0).unsqueeze(1)  # (c, 1)
        if reuse:
            logits = torch.mm(hc, w.t(), out=buf[:e - s])  # (c, V) fp32
        else:
            logits = (hc @ w.t()).to(acc)  # (c, V): 16-bit logits, cast to fp32
        th = _cap(logits, softcap, grads, None if tbuf is None else tbuf[:e - s])
        logp = torch.log_softmax(logits, 1, out=logits) if inplace else torch.log_softmax(logits, 1)
        del logits
        total -= logp.gather(1, tsafe).mul_(keep).sum()  # minus log-probability of the target
        if not grads:
            del logp
            continue
        probs = logp.exp_()  # softmax, in the log-softmax's memory
        probs.scatter_add_(1, tsafe, keep.to(acc).neg_())  # minus one-hot (kept rows only)
        if th is not None:  # through the cap: d(c tanh(z/c))/dz = 1 - tanh^2
            probs.mul_(th.square_().neg_().add_(1))
            del th
        g = probs.to(dtype)  # (c, V); the same tensor in fp32
        gh = grad_h[s:e]
        if gh.dtype == dtype:
            torch.mm(g, w, out=gh)
        else:
            gh.copy_(g @ w)
        gh.mul_(keep)
        hk = hc * keep
        _add_weight_grad(grad_w, g, probs, hk)
        del logp, probs, g, hk  # free this chunk before the next one is allocated
    return total, grad_h, grad_w


def _cap(logits, softcap, grads, out):
    """Cap the fp32 logits in place (c * tanh(z / c)); with grads, return tanh(z / c) (in `out`
    when given, else a new tensor) for the backward factor 1 - tanh^2. None without a cap."""
    if not softcap:
        return None
    logits.div_(softcap).tanh_()
    th = None
    if grads:
        th = torch.clone(logits) if out is None else out.copy_(logits)
    logits.mul_(softcap)
    return th


def _add_weight_grad(grad_w, g, probs, hk):
    """grad_w += g.T @ hk for one chunk, the sum over its rows never rounded to 16 bits.

    One entry of the product can reach rows x max|h| (4096 rows with |h| = 40 give 163840,
    beyond float16's 65504) where the full path, which divides by the token count first, gives
    40. On CUDA: one GEMM with 16-bit inputs and an fp32 output (`out_dtype`), the speed of the
    16-bit GEMM. Elsewhere (the CPU has no such GEMM): the fp32 GEMM from the fp32 softmax,
    which on a CPU is no slower than bfloat16's GEMM and many times faster than float16's."""
    if g.dtype == grad_w.dtype:  # fp32 (or fp64) without autocast
        grad_w.addmm_(g.t(), hk)
    elif g.is_cuda:
        grad_w += torch.mm(g.t(), hk, out_dtype=grad_w.dtype)
    else:
        grad_w.addmm_(probs.t(), hk.to(grad_w.dtype))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and the gradients of the summed loss; backward scales them.

    The gradients are saved as sums (not yet divided by the token count): backward multiplies
    them by grad_out / count in fp32, so the loss scale (GradScaler's 65536 is inf in float16)
    and 1/count (subnormal in float16 for large batches) never pass through 16 bits alone, and
    a 16-bit hidden-state gradient is rounded after the scaling, as the full path's is."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype, mean, softcap):
        total, grad_h, grad_w = _chunks(h, weight, targets, chunk, dtype, True, softcap)
        count = (targets != -1).sum().clamp(min=1).to(total.dtype) if mean else None
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.weight_dtype = weight.dtype
        return total / count if mean else total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, count = ctx.saved_tensors
        factor = grad_out / count if count is not None else grad_out  # fp32 (fp64 for fp64)
        if grad_h.dtype == factor.dtype:
            grad_h = grad_h * factor
        else:  # 16-bit h: scale in fp32, then round
            grad_h = grad_h.to(factor.dtype).mul_(factor).to(grad_h.dtype)
        return grad_h, (grad_w * factor).to(ctx.weight_dtype), None, None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 2048, reduction: str = "mean", softcap: float = 0.0) -> torch.Tensor:
    """Cross-entropy of `h @ weight.T` against targets, `chunk` rows at a time.

    h: (N, C) hidden states; weight: (V, C); targets: (N,) with -1 for ignored positions.
    reduction: 'mean' over non-ignored tokens, or 'sum'. softcap > 0: of c * tanh(logits / c).
    Gradients are exact.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = compute_dtype(h.device.type, h.dtype)
    with torch.autocast(h.device.type, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _ChunkedCrossEntropy.apply(h, weight, targets, chunk, dtype, reduction == "mean",
                                              softcap)
        total, _, _ = _chunks(h, weight, targets, chunk, dtype, False, softcap)
        if reduction == "mean":
            total = total / (targets != -1).sum().clamp(min=1)
        return total


@dataclass(frozen=True)
class LossSpec:
    """How the model computes its loss, given to it when it is built (`GPT(shape, loss=...)`):
    'chunked' (`chunk_rows` rows at a time, never the full logits) or 'full' (the usual way)."""

    kind: Literal["chunked", "full"] = "chunked"
    chunk_rows: int = 2048

    @classmethod
    def of(cls, memory_cfg, device_type: str) -> LossSpec:
        """From the config's `memory` section: its `loss`, and its chunk size on this device type."""
        return cls(memory_cfg.loss, memory_cfg.chunk_rows(device_type))

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 reduction: str = "mean", softcap: float = 0.0) -> torch.Tensor:
        """The cross-entropy of `h @ weight.T` (h: (N, C), weight: (V, C)) against targets (N,),
        of the logits capped at +-softcap when it is > 0 (the model's `logit_softcap`)."""
        if self.kind == "full":
            return full_cross_entropy(h, weight, targets, reduction, softcap)
        return chunked_cross_entropy(h, weight, targets, self.chunk_rows, reduction, softcap)
