"""A saved run opened again: its config, and its model ready to use.

`config_of` reads the Config a checkpoint recorded (a nanoGPT ckpt.pt is converted, see
fitgpt.store.nanogpt) and checks the weights against that shape before anything is built.
`load_model` goes on to build the model with those weights, for every command that uses a
trained model without training it: `fitgpt sample`, `fitgpt eval` (with HellaSwag) and, through
config_of, `fitgpt export`. Which file a path means is fitgpt.store.locate's business; continuing
a run is fitgpt.store.resume's.
"""

from __future__ import annotations

from fitgpt.config.load import apply_overrides
from fitgpt.config.schema import Config
from fitgpt.store.checkpoint import load_checkpoint


def config_of(ckpt: dict, notes: list[str] | None = None) -> Config:
    """The run's Config. A nanoGPT ckpt.pt is converted in place (see fitgpt.store.nanogpt)."""
    from fitgpt.store.ckptcheck import check_fits, saved_config
    from fitgpt.store.nanogpt import convert, is_nanogpt

    if ckpt.get("_note") and notes is not None:  # which of several checkpoints was taken
        notes.append(ckpt.pop("_note"))
    if is_nanogpt(ckpt):
        cfg = convert(ckpt, notes if notes is not None else [])
    else:
        cfg = saved_config(ckpt)
    check_fits(ckpt, cfg)  # weights and optimizer state against the shape, before any building
    return cfg


def load_model(where: str, overrides: list[str], notes: list[str]):
    """(config, model in eval mode, runtime) of a checkpoint, fitgpt's or nanoGPT's, with
    command-line overrides; the device is chosen afresh (`auto`) unless overridden."""
    from fitgpt.model.runtime import build_model, clean_state_dict, enable_tf32, resolve_runtime

    ckpt = load_checkpoint(where)
    cfg = config_of(ckpt, notes)
    cfg.train.device = "auto"
    apply_overrides(cfg, overrides)
    cfg.memory.activation_offload = False  # a training lever (nothing saved for backward here)
    rt = resolve_runtime(cfg.train.device, cfg.train.dtype)
    enable_tf32(rt)  # eval and sample compute as training did
    model = build_model(cfg, rt.device, init=False)
    model.load_state_dict(clean_state_dict(ckpt.pop("model")))
    model.eval()
    return cfg, model, rt
