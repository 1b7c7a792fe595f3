"""What a checkpoint must hold, checked before anything is built from it.

A checkpoint that unpickles is not yet a checkpoint that can be used: a model entry that is a
list, a tensor of the wrong shape, a step that is a string, an rng state of the wrong size or a
config asking for a 12 TB model would otherwise surface as a traceback (or an allocation) deep
inside PyTorch. Two passes, both one-line CheckpointErrors naming the file and the entry:

- `check_entries` (right after loading): every entry fitgpt reads has the type it must have, and
  the rng states are tried on throwaway generators (never on the process's own).
- `check_fits` (once the config is known, before any model exists): the weights and AdamW's
  moments have exactly the names and shapes the config's model has. The expected shapes come from
  a one-layer model on the meta device, extended to n_layer by name, so a config claiming
  billions of layers or a huge width costs nothing to check, and it cannot match the tensors a
  real file holds.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

from fitgpt.errors import CheckpointError

_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


def _fail(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; the file is damaged or was not written by fitgpt or "
                           f"nanoGPT")


def _kind(v: Any) -> str:
    return type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_complex()
    return isinstance(v, Real) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- entries

def check_entries(state: dict[str, Any], path: str) -> None:
    """The types of every entry resume, eval and sample read (see the module docstring)."""
    _check_model(state["model"], path)
    for key in ("step", "tokens", "iter_num"):
        if key in state and not (_is_int(state[key]) and state[key] >= 0):
            raise _fail(path, f"'{key}' is {state[key]!r:.60}, not a whole number >= 0")
    if "best_val_loss" in state and not _is_number(state["best_val_loss"]):
        raise _fail(path, f"'best_val_loss' is a {_kind(state['best_val_loss'])}, not a number")
    for key in ("config", "model_args", "optimizer", "rng", "scaler", "sampler", "backoff"):
        if key in state and not isinstance(state[key], Mapping):
            raise _fail(path, f"'{key}' is a {_kind(state[key])}, not a table")
    _check_config(state, path)
    if "optimizer" in state:
        _check_optimizer_layout(state["optimizer"], path)
    if "rng" in state:
        _check_rng(state["rng"], path)
    if "scaler" in state:
        bad = [k for k, v in state["scaler"].items() if not _is_number(v)]
        if bad:
            raise _fail(path, f"scaler entry {bad[0]!r} is not a number")
        if not state["scaler"]:  # saved without float16: the same as no scaler state
            del state["scaler"]
    for key, v in state.get("backoff", {}).items():
        if not (_is_int(v) and v > 0):
            raise _fail(path, f"backoff entry {key!r} is {v!r:.40}, not a positive whole number")


def _check_model(model: Any, path: str) -> None:
    if not isinstance(model, Mapping):
        raise _fail(path, f"'model' is a {_kind(model)}, not a table of named tensors")
    if not model:
        raise _fail(path, "'model' holds no tensors")
    for k, v in model.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise _fail(path, f"'model' entry {k!r:.80} is a {_kind(v)}, not a named tensor")
        if not v.is_floating_point() and k.endswith("weight"):
            raise _fail(path, f"'model' entry {k!r:.80} holds {v.dtype}, not floating-point weights")


def _check_config(state: dict[str, Any], path: str) -> None:
    cfg = state.get("config")
    if isinstance(cfg, Mapping) and "model" in cfg:  # fitgpt's: sections of settings
        for sec, table in cfg.items():
            if sec == "name":
                if not isinstance(table, str):
                    raise _fail(path, f"config name is a {_kind(table)}, not text")
            elif not isinstance(table, Mapping):
                raise _fail(path, f"config section {sec!r:.40} is a {_kind(table)}, not a table")
    args = state.get("model_args")
    if args is not None:
        for k, v in args.items():
            if k == "bias":
                ok = isinstance(v, bool)
            elif k == "dropout":
                ok = _is_number(v)
            else:
                ok = _is_int(v)
            if not ok:
                raise _fail(path, f"model_args {k!r:.40} is {v!r:.40}, not a "
                                  + ("boolean" if k == "bias" else "number"))


def _check_optimizer_layout(sd: Mapping, path: str) -> None:
    groups, st = sd.get("param_groups"), sd.get("state")
    if not isinstance(groups, list) or not isinstance(st, Mapping):
        raise _fail(path, "optimizer state lacks its 'param_groups' list or 'state' table")
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping) or not isinstance(g.get("params"), list):
            raise _fail(path, f"optimizer param group {i} has no 'params' list")
        for key in ("lr", "weight_decay", "eps"):
            if key in g and not _is_number(g[key]):
                raise _fail(path, f"optimizer param group {i}: {key} is {g[key]!r:.40}, not a number")
        betas = g.get("betas", (0.9, 0.95))
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(map(_is_number, betas))):
            raise _fail(path, f"optimizer param group {i}: betas is {betas!r:.40}, not two numbers")
    for name, s in st.items():
        if not isinstance(s, Mapping):
            raise _fail(path, f"optimizer state of {name!r:.80} is a {_kind(s)}, not a table")
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s and not isinstance(s[key], torch.Tensor):
                raise _fail(path, f"optimizer {key} of {name!r:.80} is a {_kind(s[key])}, not a tensor")
        if "step" in s and not _is_number(s["step"]):
            raise _fail(path, f"optimizer step of {name!r:.80} is not a number")


def _check_rng(rng: Mapping, path: str) -> None:
    """Each saved generator state is tried on a new generator of its kind."""
    try:
        if "python" in rng:
            py = rng["python"]
            random.Random().setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in py))
        if "torch" in rng:
            torch.Generator().set_state(rng["torch"])
        if "numpy" in rng:
            n = rng["numpy"]
            np.random.RandomState().set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        cuda = rng.get("cuda", [])
        if not (isinstance(cuda, (list, tuple)) and all(isinstance(t, torch.Tensor)
                                                        and t.dtype == torch.uint8 for t in cuda)):
            raise TypeError("cuda: not a list of byte tensors")
    except Exception as e:  # noqa: BLE001 - any failure means the saved state cannot be restored
        text = (str(e).strip() or type(e).__name__).splitlines()[0][:100]
        raise _fail(path, f"its random-generator state cannot be restored ({text})") from None


def saved_config(ckpt: dict[str, Any]):
    """The Config a fitgpt checkpoint recorded; a missing or unusable one is a CheckpointError
    naming the file (not a ConfigError about some setting of unknown origin)."""
    from fitgpt.config.load import check, from_dict, normalise
    from fitgpt.config.names import check_name
    from fitgpt.errors import ConfigError

    path = ckpt.get("_path", "checkpoint")
    if not isinstance(ckpt.get("config"), Mapping) or "model" not in ckpt["config"]:
        raise CheckpointError(f"{path}: has neither a fitgpt config nor nanoGPT's model_args; "
                              f"cannot tell the model's shape")
    try:
        cfg = from_dict(ckpt["config"])
        if cfg.log.run_name is not None:
            try:
                check_name("log.run_name", cfg.log.run_name)
            except ConfigError:  # saved before names were checked; resume knows its folder anyway
                cfg.log.run_name = None
        normalise(cfg)
        check(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its saved config is not usable: {e}") from None
    return cfg


# ----------------------------------------------------------------------------- shapes

class ExpectedShapes:
    """Names and shapes of the config's model, for any n_layer, from a one-layer meta model."""

    def __init__(self, model_cfg, path: str):
        from fitgpt.model.gpt import GPT
        from fitgpt.model.shape import ModelShape

        one = copy.deepcopy(model_cfg)
        one.n_layer = 1
        try:
            with torch.device("meta"):
                meta = GPT(ModelShape.of(one), one.dropout)
        except (RuntimeError, ValueError, OverflowError, TypeError, AssertionError) as e:
            raise _fail(path, f"its config describes a model that cannot be built ({e})") from None
        self.n_layer = model_cfg.n_layer
        self.top, self.block, self.top_params, self.block_params = {}, {}, set(), set()
        params = {n for n, _ in meta.named_parameters()}
        for name, t in meta.state_dict().items():
            m = _LAYER.match(name)
            (self.block if m else self.top)[m.group(2) if m else name] = tuple(t.shape)
            if name in params:
                (self.block_params if m else self.top_params).add(m.group(2) if m else name)

    def shape(self, name: str) -> tuple[int, ...] | None:
        m = _LAYER.match(name)
        if m is None:
            return self.top.get(name)
        return self.block.get(m.group(2)) if int(m.group(1)) < self.n_layer else None

    def is_param(self, name: str) -> bool:
        m = _LAYER.match(name)
        return (m is not None and m.group(2) in self.block_params) or name in self.top_params

    def n_keys(self) -> int:
        return len(self.top) + self.n_layer * len(self.block)

    def n_params(self) -> int:
        return len(self.top_params) + self.n_layer * len(self.block_params)

    def missing(self, have: set[str], limit: int = 3) -> list[str]:
        """Up to `limit` expected names not in `have` (without listing every layer)."""
        out = [k for k in self.top if k not in have][:limit]
        for i in range(self.n_layer):
            out += [f"transformer.h.{i}.{k}" for k in self.block if f"transformer.h.{i}.{k}" not in have]
            if len(out) >= limit:
                break
        return out[:limit]


def _settings(m) -> str:
    """The sizes, and the norm and head options that change the weights' names when not GPT-2's."""
    opts = "".join(f", {k}={getattr(m, k)}" for k, gpt2 in (("norm", "layernorm"), ("tie_embeddings", True))
                   if getattr(m, k, gpt2) != gpt2)
    return (f"n_layer={m.n_layer}, n_head={m.n_head}, n_embd={m.n_embd}, "
            f"block_size={m.block_size}, vocab_size={m.vocab_size}{opts}")


def check_model_fits(model: Mapping, cfg, path: str) -> ExpectedShapes:
    """The weights are exactly the config's model: same names, same shapes."""
    from fitgpt.model.runtime import clean_state_dict

    want = ExpectedShapes(cfg.model, path)
    sd = clean_state_dict(dict(model))
    where = f"the saved config's model ({_settings(cfg.model)})"
    for name, t in sd.items():
        shape = want.shape(name)
        if shape is None:
            raise _fail(path, f"weight {name!r:.80} is not part of {where}")
        if tuple(t.shape) != shape:
            raise _fail(path, f"weight {name!r:.80} has shape {tuple(t.shape)}, but {where} needs {shape}")
    if len(sd) != want.n_keys():
        gone = want.missing(set(sd))
        raise _fail(path, f"weights missing for {where}: {', '.join(gone)}")
    return want


def check_fits(ckpt: dict[str, Any], cfg) -> None:
    """Weights, then AdamW's state (when kept), against the config's model."""
    path = str(ckpt.get("_path", "checkpoint"))
    want = check_model_fits(ckpt["model"], cfg, path)
    opt = ckpt.get("optimizer")
    if opt is None:
        return
    names = [p for g in opt["param_groups"] for p in g["params"]]
    if names and all(_is_int(p) for p in names):  # index-keyed (nanoGPT's layout)
        from fitgpt.store.nanogpt import optimizer_matches

        if not optimizer_matches(opt, cfg):
            raise _fail(path, "its optimizer state does not match the model's parameters")
        return
    for name in names:
        if not isinstance(name, str) or not want.is_param(name):
            raise _fail(path, f"optimizer state names {name!r:.80}, which is not a parameter of the model")
    if len(set(names)) != want.n_params():
        raise _fail(path, f"optimizer state covers {len(set(names))} parameters; the model has "
                          f"{want.n_params()}")
    for name, s in opt["state"].items():
        shape = want.shape(name) if isinstance(name, str) else None
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s and tuple(s[key].shape) != shape:
                raise _fail(path, f"optimizer {key} of {name!r:.80} has shape {tuple(s[key].shape)}, "
                                  f"the parameter has {shape}")
