"""The chunked loss on every device it runs on: equal to the full-logits loss, in loss and in
gradients. The CUDA cases run where a GPU is present (they guard the in-place log-softmax and the
reused logits buffer there); on a CPU-only machine they are collected and show as skipped."""

from __future__ import annotations

import pytest
import torch

from fitgpt.model.loss import chunked_cross_entropy, full_cross_entropy

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def _both(device, dtype, chunk, n=300, c=64, v=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h0 = torch.randn(n, c, generator=gen)
    w0 = torch.randn(v, c, generator=gen) * 0.1
    t = torch.randint(0, v, (n,), generator=gen)
    t[:17] = -1
    out = []
    for fn in (full_cross_entropy, lambda h, w, t: chunked_cross_entropy(h, w, t, chunk)):
        h = h0.to(device).requires_grad_()
        w = w0.to(device).requires_grad_()
        ctx = (torch.autocast(device, dtype=dtype) if dtype != torch.float32
               else torch.autocast(device, enabled=False))
        with ctx:
            loss = fn(h, w, t.to(device))
        loss.backward()
        out.append((loss.detach().float().cpu(), h.grad.float().cpu(), w.grad.float().cpu()))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [64, 100, 4096])
def test_chunked_equals_full_fp32(device, chunk):
    (lf, hf, wf), (lc, hc, wc) = _both(device, torch.float32, chunk)
    torch.testing.assert_close(lc, lf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hc, hf, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wc, wf, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_close_to_full_bf16(device):
    """16-bit matmuls, fp32 softmax in both: equal within bf16 rounding."""
    (lf, hf, wf), (lc, hc, wc) = _both(device, torch.bfloat16, 128)
    assert abs(lc.item() - lf.item()) < 2e-2
    for a, b in ((hc, hf), (wc, wf)):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_sum_matches(device):
    gen = torch.Generator().manual_seed(3)
    h, w = torch.randn(77, 16, generator=gen), torch.randn(500, 16, generator=gen)
    t = torch.randint(0, 500, (77,), generator=gen)
    h, w, t = h.to(device), w.to(device), t.to(device)
    with torch.no_grad():
        a = chunked_cross_entropy(h, w, t, 20, "sum")
        b = full_cross_entropy(h, w, t, "sum")
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_sum_reduction_gradients_match(device):
    """reduction='sum' with gradients: backward scales the saved sums by grad_out alone."""
    gen = torch.Generator().manual_seed(4)
    h0, w0 = torch.randn(90, 16, generator=gen), torch.randn(300, 16, generator=gen)
    t = torch.randint(0, 300, (90,), generator=gen)
    t[:7] = -1
    out = []
    for fn in (full_cross_entropy, lambda h, w, t, r: chunked_cross_entropy(h, w, t, 32, r)):
        h, w = h0.to(device).requires_grad_(), w0.to(device).requires_grad_()
        (fn(h, w, t.to(device), "sum") * 3.0).backward()
        out.append((h.grad.cpu(), w.grad.cpu()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
