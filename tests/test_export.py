"""Hugging Face export: transformers' GPT-2 computes the same logits as fitgpt's model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # in the dev extra, so tested for real

from fitgpt.cli.main import main
from fitgpt.config.load import to_dict
from fitgpt.config.schema import Config
from fitgpt.model.runtime import build_model
from fitgpt.report.export import ExportError, export_hf


def perturbed(vocab=250, bias=False, block=16, seed=0):
    """A tiny model whose biases and LayerNorms are not at their init values (ones, zeros)."""
    cfg = Config(name="tiny")
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.bias = 2, 2, 32, block, vocab, bias
    cfg.train.seed = seed
    model = build_model(cfg, torch.device("cpu")).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return cfg, model


def hf_logits(out_dir, x, **config_changes):
    model = transformers.GPT2LMHeadModel.from_pretrained(out_dir, **config_changes).eval()
    with torch.no_grad():
        return model(x).logits


def fitgpt_logits(model, x):
    with torch.no_grad():
        return model.lm_head(model.hidden(x))


@pytest.mark.parametrize("bias", [False, True])
def test_exported_model_has_the_same_logits(bias, tmp_path):
    """Guards the weight mapping (Conv1D transposes, zero biases for bias=False, the cropped
    padded vocabulary) and the activation: logits equal within 1e-4 on random inputs."""
    cfg, model = perturbed(bias=bias)
    assert model.transformer.wte.weight.shape[0] == 256  # padded; exported: the 250 real ids
    export_hf(cfg, model.state_dict(), tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["vocab_size"] == 250 and conf["activation_function"] == "gelu"
    x = torch.randint(0, 250, (3, 16), generator=torch.Generator().manual_seed(1))
    ref = fitgpt_logits(model, x)[..., :250]
    got = hf_logits(tmp_path / "hf", x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    # the check can fail: GPT-2's default tanh GELU is measurably different
    assert (hf_logits(tmp_path / "hf", x, activation_function="gelu_new") - ref).abs().max() > 1e-4


def test_export_command_writes_a_loadable_folder_with_tokenizer(tmp_path, capsys):
    """Guards `fitgpt export` end to end for a GPT-2-vocabulary model: model, config and
    tokenizer files load in transformers; the tokenizer gives tiktoken's ids."""
    from fitgpt.data.tokenizer import gpt2_encoding, offline_bpe_files

    cfg, model = perturbed(vocab=50257, block=32)
    ckpt = tmp_path / "m.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, ckpt)
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(ckpt), "--to", "hf", str(out)]) == 0
    assert "GPT2LMHeadModel.from_pretrained" in capsys.readouterr().out
    x = torch.randint(0, 50257, (2, 32))
    assert (hf_logits(out, x) - fitgpt_logits(model, x)[..., :50257]).abs().max() <= 1e-4
    if offline_bpe_files() is not None:
        tok = transformers.GPT2Tokenizer.from_pretrained(out)
        text = "Hello world, it's fitgpt.<|endoftext|>"
        assert tok(text)["input_ids"] == gpt2_encoding().encode(text, allowed_special="all")
    assert main(["export", "--ckpt", str(ckpt), "--to", "hf", str(out)]) == 2  # not empty
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(ckpt), "--to", "onnx", str(tmp_path / "x")]) == 2


def test_export_refuses_what_gpt2_cannot_express(tmp_path):
    """Guards silent wrong exports: an untied lm_head or unknown parameters are refused with
    the reason."""
    cfg, model = perturbed()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ExportError, match="ties them"):
        export_hf(cfg, sd, tmp_path / "a")
    sd = dict(model.state_dict())
    sd["transformer.h.0.attn.rotary.inv_freq"] = torch.ones(4)
    with pytest.raises(ExportError, match="unexpected transformer.h.0.attn.rotary"):
        export_hf(cfg, sd, tmp_path / "b")


def test_char_level_model_exports_with_its_vocabulary(tmp_path, capsys):
    """Guards exporting a character-level nanoGPT dataset's model: the weights load in
    transformers with the same logits, and char_vocab.json carries meta.pkl's itos (no GPT-2
    tokenizer files, which would decode its ids as the wrong text), with a note saying so."""
    from test_sample import write_char_dataset

    itos = write_char_dataset(tmp_path / "data")
    cfg, model = perturbed(vocab=len(itos), block=32)
    cfg.data.dir = str(tmp_path / "data")
    ckpt = tmp_path / "m.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, ckpt)
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(ckpt), "--to", "hf", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "character-level model" in printed and "char_vocab.json" in printed
    assert not (out / "vocab.json").exists() and not (out / "merges.txt").exists()
    chars = json.loads((out / "char_vocab.json").read_text())
    assert chars["itos"] == [itos[i] for i in range(len(itos))] and "\u00e9" in chars["itos"]
    x = torch.randint(0, len(itos), (2, 32))
    assert (hf_logits(out, x) - fitgpt_logits(model, x)[..., :len(itos)]).abs().max() <= 1e-4

    (tmp_path / "other").mkdir()  # a meta.pkl of more characters than the model has ids
    import pickle

    (tmp_path / "other" / "meta.pkl").write_bytes(pickle.dumps(
        {"vocab_size": 300, "stoi": {chr(i): i for i in range(300)}, "itos": {i: chr(i) for i in range(300)}}))
    assert main(["export", "--ckpt", str(ckpt), "--to", "hf", str(tmp_path / "hf2"),
                 f"--data.dir={tmp_path / 'other'}"]) == 2
    assert "more than this model's" in capsys.readouterr().err and not (tmp_path / "hf2").exists()
