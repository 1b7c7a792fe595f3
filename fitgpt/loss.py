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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    """The dtype autocast would use for a matmul here, or the tensors' own dtype without it."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return fallback


def full_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """The usual way: logits (N, V) in the compute dtype, an fp32 copy, then cross-entropy."""
    logits = F.linear(h, weight)  # (N, V)
    acc = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(acc), targets, ignore_index=-1, reduction=reduction)


def _chunks(h, weight, targets, chunk, dtype, grads):
    """Sum of token losses over row chunks; with grads, also d(sum)/dh and d(sum)/dweight."""
    n = h.size(0)
    w = weight.to(dtype)  # (V, C)
    acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 (fp64 for fp64)
    total = torch.zeros((), dtype=acc, device=h.device)
    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grads else None
    for s in range(0, n, chunk):
        hc = h[s:s + chunk].to(dtype)  # (c, C)
        tc = targets[s:s + chunk]
        keep = tc != -1
        tsafe = tc.clamp(min=0).unsqueeze(1)  # (c, 1)
        logits = (hc @ w.t()).to(acc)  # (c, V) fp32
        picked = logits.gather(1, tsafe).squeeze(1)  # logit of the target
        top = logits.amax(dim=1, keepdim=True)
        expd = logits.sub_(top).exp_()  # in place: exp(logit - max)
        sums = expd.sum(dim=1)
        lse = top.squeeze(1) + sums.log()  # (c,) log-sum-exp
        total += ((lse - picked) * keep).sum()
        if not grads:
            del logits, expd, picked
            continue
        probs = expd.div_(sums.unsqueeze(1))  # softmax, still in the logits' memory
        probs.scatter_add_(1, tsafe, -torch.ones_like(tsafe, dtype=probs.dtype))  # minus one-hot
        probs.mul_(keep.unsqueeze(1))
        g = probs.to(dtype)  # (c, V)
        grad_h[s:s + chunk] = g @ w
        if dtype == acc:
            grad_w.addmm_(g.t(), hc)
        else:
            grad_w += (g.t() @ hc).to(acc)
        del logits, expd, picked, probs, g  # free this chunk before the next one is allocated
    return total, grad_h, grad_w


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype, mean):
        total, grad_h, grad_w = _chunks(h, weight, targets, chunk, dtype, grads=True)
        if mean:
            count = (targets != -1).sum().clamp(min=1).to(total.dtype)
            total = total / count
            grad_h.div_(count)
            grad_w.div_(count)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.weight_dtype),
                None, None, None, None)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 2048, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `h @ weight.T` against targets, `chunk` rows at a time.

    h: (N, C) hidden states; weight: (V, C); targets: (N,) with -1 for ignored positions.
    reduction: 'mean' over non-ignored tokens, or 'sum'. Gradients are exact.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = compute_dtype(h.device.type, h.dtype)
    with torch.autocast(h.device.type, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _ChunkedCrossEntropy.apply(h, weight, targets, chunk, dtype, reduction == "mean")
        total, _, _ = _chunks(h, weight, targets, chunk, dtype, grads=False)
        if reduction == "mean":
            total = total / (targets != -1).sum().clamp(min=1)
        return total
