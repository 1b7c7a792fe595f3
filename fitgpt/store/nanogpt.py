"""nanoGPT checkpoints (`ckpt.pt`) read as fitgpt checkpoints.

A nanoGPT checkpoint is a dict with `model` (the state dict: the same parameter names as fitgpt's,
perhaps under torch.compile's `_orig_mod.` prefix and with `attn.bias` mask buffers), `model_args`
(n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout), `optimizer`, `iter_num`,
`best_val_loss` and `config` (the flat globals of nanoGPT's train.py). `convert` rewrites such a
dict in place into fitgpt's layout and returns its Config, so sampling, `fitgpt eval` and
`fitgpt train --resume` treat it like one of fitgpt's own.

What carries over:
- the shape from model_args. nanoGPT pads GPT-2's 50257 ids to 50304; a model_args vocab_size of
  50304 becomes vocab_size 50257 with vocab_multiple 64 (the same 50304 embedding rows), so
  sampling never produces a padding id and bits per byte are reported. Any other vocab_size is
  taken as it is, unpadded (vocab_multiple 1).
- the training settings of the flat config, through configio.NANOGPT_KEYS; `device`, `dtype`
  and `compile` are left to fitgpt's `auto` choices (nanoGPT's values assume a CUDA machine),
  `init_from` and `eval_only` describe how that run started, not this one; unknown keys are
  listed in a note and ignored.
- the optimizer state: nanoGPT's AdamW has the same two groups in the same order as
  `GPT.configure_optimizer` (matrices, then vectors, in `named_parameters()` order, which is
  `parameters()` order). The state is kept when every saved tensor has the shape of the
  parameter at its position; otherwise (older nanoGPT grouped by module type) the optimizer
  starts fresh, with a note.
- iter_num as the step, and tokens as iter_num x tokens per step.

Entries of the wrong type (`iter_num="x"`, a model_args value that is not a number) are refused
when the file is loaded (fitgpt.store.ckptcheck.check_entries); weights that do not have the shapes
model_args describes are refused here, before any model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fitgpt.config.load import NANOGPT_ACCEPTED, NANOGPT_KEYS, check, normalise, set_value, to_dict
from fitgpt.config.schema import Config
from fitgpt.errors import CheckpointError, ConfigError
from fitgpt.store.ckptcheck import check_model_fits

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
# Flat keys of nanoGPT's config that do not describe the run being continued.
NOT_CARRIED = {"device": "fitgpt picks the device (override with --train.device)",
               "dtype": "fitgpt picks the dtype (override with --train.dtype)",
               "compile": "off unless asked (--train.compile=true)",
               "init_from": "the checkpoint is the starting point",
               "eval_only": "a mode of that run, not a setting of this one"}
NANOGPT_PADDED_VOCAB = 50304


def is_nanogpt(ckpt: dict[str, Any]) -> bool:
    """A nanoGPT checkpoint: model_args and no fitgpt config (which has a `model` section)."""
    cfg = ckpt.get("config")
    return "model_args" in ckpt and not (isinstance(cfg, dict) and "model" in cfg)


def convert(ckpt: dict[str, Any], notes: list[str]) -> Config:
    """The Config of a loaded nanoGPT checkpoint; rewrites the dict into fitgpt's layout."""
    from fitgpt.model.runtime import clean_state_dict

    path = ckpt.get("_path", "ckpt.pt")
    args = ckpt["model_args"]
    missing = [k for k in MODEL_ARGS if k not in args]
    if missing:
        raise CheckpointError(f"{path}: nanoGPT model_args lacks {', '.join(missing)}")
    cfg = Config(name=Path(path).parent.name or "nanogpt")
    flat = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    ignored = []
    for key, value in flat.items():
        if key in NOT_CARRIED or not (key in NANOGPT_KEYS or key in NANOGPT_ACCEPTED):
            ignored.append(key)
            continue
        try:
            set_value(cfg, key, value, where=f"{path} config", from_text=False)
        except ConfigError:
            ignored.append(f"{key}={value!r}")
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd = int(args["n_layer"]), int(args["n_head"]), int(args["n_embd"])
    m.block_size, m.bias = int(args["block_size"]), bool(args["bias"])
    m.dropout = float(args.get("dropout", m.dropout))
    vocab = int(args["vocab_size"])
    if vocab == NANOGPT_PADDED_VOCAB:
        m.vocab_size, m.vocab_multiple = 50257, 64
        notes.append(f"{path}: vocab_size 50304 is GPT-2's 50257 padded: model.vocab_size=50257, "
                     f"vocab_multiple=64 (padding ids are never sampled)")
    else:
        m.vocab_size, m.vocab_multiple = vocab, 1
    if cfg.eval.block_size and cfg.eval.block_size > m.block_size:
        cfg.eval.block_size = None
    try:
        normalise(cfg)
        check(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its model_args describe no usable model: {e}") from None
    check_model_fits(ckpt["model"], cfg, path)  # before anything is built from the shape
    if ignored:
        notes.append(f"{path}: nanoGPT settings not carried over: {', '.join(sorted(ignored))}")

    step = int(ckpt.get("iter_num", 0))
    ckpt["model"] = clean_state_dict(ckpt["model"])
    ckpt["step"], ckpt["tokens"] = step, step * cfg.tokens_per_step
    ckpt["config"] = to_dict(cfg)
    if "optimizer" in ckpt and not optimizer_matches(ckpt["optimizer"], cfg):
        del ckpt["optimizer"]
        notes.append(f"{path}: its optimizer state does not match fitgpt's parameter groups "
                     f"(an older nanoGPT?); the optimizer starts fresh")
    notes.append(f"{path}: nanoGPT checkpoint at iter {step}, converted")
    return cfg


def param_group_shapes(cfg: Config) -> list[list[tuple[int, ...]]]:
    """Shapes of the parameters in `GPT.configure_optimizer`'s two groups, in order (meta
    device: nothing is allocated)."""
    import torch

    from fitgpt.model.gpt import GPT
    from fitgpt.model.shape import ModelShape

    with torch.device("meta"):
        model = GPT(ModelShape.of(cfg.model))
    params = list(model.parameters())
    return [[tuple(p.shape) for p in params if p.dim() >= 2],
            [tuple(p.shape) for p in params if p.dim() < 2]]


def optimizer_matches(sd: Any, cfg: Config) -> bool:
    """Whether a saved AdamW state dict fits fitgpt's groups position by position."""
    try:
        groups, state = sd["param_groups"], sd["state"]
        want = param_group_shapes(cfg)
        if len(groups) != len(want):
            return False
        for group, shapes in zip(groups, want):
            if len(group["params"]) != len(shapes):
                return False
            for idx, shape in zip(group["params"], shapes):
                s = state.get(idx)
                if s is not None and tuple(s["exp_avg"].shape) != shape:
                    return False
        return True
    except (KeyError, TypeError, AttributeError):
        return False
