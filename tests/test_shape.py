"""ModelShape, the one formula for the model's sizes, against numbers from outside fitgpt (GPT-2's
published parameter counts, nanoGPT's FLOPs per token worked out by hand) and against the
tensors of the model it describes."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import torch

from fitgpt.config.schema import Config
from fitgpt.model.gpt import GPT
from fitgpt.model.shape import ModelShape
from fitgpt.report.runs import params_of


@pytest.mark.parametrize("name, n_layer, n_head, n_embd, published", [
    ("gpt2", 12, 12, 768, 124_439_808),
    ("gpt2-medium", 24, 16, 1024, 354_823_168),
    ("gpt2-large", 36, 20, 1280, 774_030_080),
    ("gpt2-xl", 48, 25, 1600, 1_557_611_200),
])
def test_gpt2_parameter_counts(name, n_layer, n_head, n_embd, published):
    """OpenAI's GPT-2 checkpoints as Hugging Face counts them (GPT2LMHeadModel.num_parameters():
    vocab 50257 unpadded, context 1024, biases, lm_head tied to the token embedding)."""
    shape = ModelShape(n_layer, n_head, n_embd, 1024, 50257, vocab_multiple=1, bias=True)
    assert shape.padded_vocab == 50257
    assert shape.params() == published, name


def test_nanogpt_gpt2_124m_padded_to_50304():
    """nanoGPT's GPT-2 124M pads the vocabulary to 50304: 124,475,904 parameters in all, and
    its get_num_params() (position embeddings left out) prints 123.69M."""
    shape = ModelShape(12, 12, 768, 1024, 50257, vocab_multiple=64, bias=True)
    assert shape.padded_vocab == 50304
    assert shape.params() == 124_475_904
    assert shape.params() - 1024 * 768 == 123_689_472
    assert shape.params(embeddings=False) == 123_689_472 - 50304 * 768  # less wte too


def test_flops_per_token_is_nanogpts_for_gpt2_124m():
    """nanoGPT's estimate_mfu: flops_per_token = 6*N + 12*L*H*Q*T, with N its
    get_num_params(non_embedding=True), which subtracts only wpe (wte is the lm_head): the
    123.69M it prints for GPT-2 124M (bias, vocab 50304). 6 x 123,689,472 + 12 x 12 x 12 x 64 x
    1024 = 742,136,832 + 113,246,208. (Moved here from tests/test_plan.py.)"""
    cfg = Config()
    cfg.model.bias = True  # nanoGPT's default; n_layer 12, n_head 12, n_embd 768, block 1024
    assert ModelShape.of(cfg.model).flops_per_token() == 855_383_040
    assert ModelShape.of(cfg.model).flops_per_token(512) == 855_383_040 - 12 * 12 * 768 * 512


def test_padded_vocab():
    for vocab, multiple, padded in ((50257, 64, 50304), (256, 1, 256), (65, 64, 128), (128, 64, 128)):
        assert ModelShape(1, 1, 8, 8, vocab, multiple).padded_vocab == padded


@pytest.mark.parametrize("bias", [False, True])
def test_counts_are_the_built_models_tensors(bias):
    """Every count agrees with the model's own tensors (meta device): all parameters, without
    the embeddings, the tensors by size, one block, its matrices in order, and the FLOPs per
    token worked out from the tensors. (Replaces tests/test_plan.py's and tests/test_metrics.py's
    "the config's FLOPs match the model's": the model now takes them from the shape.)"""
    cfg = Config()
    cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.bias = 3, 96, 4, bias
    cfg.model.vocab_size, cfg.model.block_size = 1000, 64  # padded to 1024
    shape = ModelShape.of(cfg.model)
    with torch.device("meta"):
        model = GPT(shape)
    params = list(model.parameters())  # the tied lm_head once
    total = sum(p.numel() for p in params)
    emb = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    assert shape.params() == total and shape.params(embeddings=False) == total - emb
    assert shape.embedding_params() == emb and model.transformer.wte.weight.shape[0] == 1024
    assert shape.tensors() == len(params)
    assert shape.param_counts() == Counter(p.numel() for p in params)
    block = model.transformer.h[0]
    assert shape.block_params() == sum(p.numel() for p in block.parameters())
    assert shape.block_matrices() == [p.numel() for p in block.parameters() if p.dim() == 2]
    L, C, T = 3, 96, 64
    assert shape.flops_per_token() == 6 * (total - emb) + 6 * 1024 * C + 12 * L * C * T
    assert model.num_params() == total and model.num_params(False) == total - emb


def test_runs_count_from_a_saved_config_table():
    """`fitgpt runs` counts parameters from config.toml's model table with the same formula; a
    table that lacks a field that counts gives no count."""
    table = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50257,
             "vocab_multiple": 1, "bias": True}
    assert params_of(table) == 124_439_808
    assert params_of({**table, "vocab_multiple": 64}) == 124_475_904
    assert params_of({k: v for k, v in table.items() if k != "bias"}) is None


def test_shape_imports_no_torch():
    """The planner and `fitgpt runs` import the shape without torch."""
    code = "import sys, fitgpt.model.shape; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
