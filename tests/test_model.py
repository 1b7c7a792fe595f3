"""The model and its loss: the chunked loss is the full loss, exactly, without the full logits."""

from __future__ import annotations

import copy

import pytest
import torch

from fitgpt.config.load import load_config
from fitgpt.config.schema import Config
from fitgpt.model.checkpointing import apply_activation_checkpointing
from fitgpt.model.gpt import GPT
from fitgpt.model.loss import LossSpec, chunked_cross_entropy, full_cross_entropy
from fitgpt.model.runtime import Runtime, build_model, enable_tf32, resolve_runtime
from fitgpt.model.shape import ModelShape


def tiny_model(vocab=512, bias=False, dropout=0.0, seed=0, loss="chunked", chunk=0):
    cfg = Config()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.bias, m.dropout = (
        2, 2, 32, 16, vocab, bias, dropout)
    cfg.train.seed = seed
    cfg.memory.loss, cfg.memory.loss_chunk = loss, chunk
    return build_model(cfg, torch.device("cpu"))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_rel(a, b, rel):
    scale = b.abs().max().clamp(min=1e-12)
    assert ((a - b).abs().max() / scale).item() <= rel


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_gradients_equal_full(bias):
    """Guards the exactness of the chunked loss: same loss and gradients as full logits (fp32)."""
    torch.manual_seed(0)
    x = torch.randint(0, 500, (3, 16))
    y = torch.randint(0, 500, (3, 16))
    y[0, :5] = -1  # ignored positions count in neither
    out = {}
    for impl, chunk in (("full", 0), ("chunked", 7), ("chunked", 10_000)):
        model = tiny_model(bias=bias, loss=impl, chunk=chunk)  # the same seeded weights each time
        assert model.loss == LossSpec(impl, chunk or 256)  # 0: automatic, 256 rows on the CPU
        loss = model(x, y)
        loss.backward()
        out[(impl, chunk)] = (loss.detach(), grads(model))
    ref_loss, ref_grads = out[("full", 0)]
    for key in (("chunked", 7), ("chunked", 10_000)):
        loss, g = out[key]
        assert_close_rel(loss, ref_loss, 1e-5)
        assert g.keys() == ref_grads.keys()
        for name in g:
            assert_close_rel(g[name], ref_grads[name], 1e-5)


def test_chunked_sum_reduction_and_no_grad_path():
    """reduction='sum' (used by evaluation) and the no-grad path agree with the full loss."""
    torch.manual_seed(1)
    h, w = torch.randn(50, 8), torch.randn(300, 8)
    t = torch.randint(0, 300, (50,))
    with torch.no_grad():
        a = chunked_cross_entropy(h, w, t, 16, "sum")
        b = full_cross_entropy(h, w, t, "sum")
    assert_close_rel(a, b, 1e-6)


def test_chunked_under_bf16_autocast_matches_fp32_closely():
    """Under CPU bf16 autocast the chunked loss casts as the full path does."""
    torch.manual_seed(2)
    h, w = torch.randn(64, 32), torch.randn(256, 32) * 0.1
    t = torch.randint(0, 256, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = chunked_cross_entropy(h, w, t, 16)
        b = full_cross_entropy(h, w, t)
    assert abs(a.item() - b.item()) < 1e-2


def test_activation_checkpointing_gives_identical_gradients():
    """Checkpointing recomputes activations; gradients must not change, nor parameter names."""
    torch.manual_seed(0)
    a = tiny_model()
    b = copy.deepcopy(a)
    apply_activation_checkpointing(b)
    x, y = torch.randint(0, 500, (2, 16)), torch.randint(0, 500, (2, 16))
    a(x, y).backward()
    b(x, y).backward()
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and list(a.state_dict()) == list(b.state_dict())
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-6, atol=1e-7)


def test_parameter_counts_of_the_seed_model_on_meta():
    """The seed's model is 77.36M parameters with tied embeddings (mission.md); 124M for GPT-2."""
    for spec, expected in (("seed-77m", 77.36e6), ("gpt2-124m", 124.4e6)):
        cfg = load_config(spec, [])
        with torch.device("meta"):
            model = GPT(ModelShape.of(cfg.model))
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - expected) / expected < 0.002 and model.num_params() == n
        assert model.shape.padded_vocab == 50304 and model.transformer.wte.weight.shape[0] == 50304


def test_weights_tied_and_initialised_reproducibly():
    """lm_head is the token embedding; the same seed gives the same weights; GPT-2 init scale."""
    a, b = tiny_model(seed=5), tiny_model(seed=5)
    assert a.lm_head.weight is a.transformer.wte.weight
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    std = a.transformer.wte.weight.std().item()
    assert 0.015 < std < 0.025
    assert a.transformer.h[0].ln_1.weight.eq(1).all()


def test_generate_respects_context_and_vocab_limit():
    """Generation crops the context to block_size and never emits padding ids."""
    model = tiny_model(vocab=300)  # padded to 320
    idx = torch.zeros(1, 40, dtype=torch.long)  # longer than block 16
    out = model.generate(idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(0),
                         vocab_limit=300)
    assert out.shape == (1, 60) and int(out.max()) < 300


def test_the_loss_is_given_to_the_model_when_it_is_built():
    """The memory section's loss reaches the model through its constructor (a LossSpec), and
    evaluation's sum reduction uses it too; nothing sets loss attributes from outside."""
    model = tiny_model(loss="full", chunk=5)
    assert model.loss == LossSpec("full", 5)
    assert not hasattr(model, "loss_impl") and not hasattr(model, "loss_chunk")
    torch.manual_seed(3)
    x, y = torch.randint(0, 500, (2, 16)), torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        full = model(x, y, reduction="sum")
        h = model.hidden(x).reshape(-1, 32)
        chunked = LossSpec("chunked", 5)(h, model.lm_head.weight, y.reshape(-1), "sum")
    assert_close_rel(chunked, full, 1e-5)


def test_resolving_a_runtime_changes_no_global_setting():
    """resolve_runtime only resolves; TF32 is switched on by an explicit enable_tf32, which a
    run that computes on CUDA calls (training, bench, plan --verify, eval, sample) and which
    does nothing elsewhere."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        resolve_runtime("cpu", "float32")
        enable_tf32(Runtime(torch.device("cpu"), torch.float32))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        enable_tf32(Runtime(torch.device("cuda"), torch.bfloat16))  # sets flags only; needs no GPU
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
