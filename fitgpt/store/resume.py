"""Continuing a saved run: which config, which checkpoint, which run folder.

A run continues with `fitgpt train --resume RUN` or, nanoGPT's way, with `init_from='resume'` in
the config file or on the command line (`--init_from=resume`), which looks in `log.out_dir`
(fitgpt.store.locate says how a folder is searched). The config is the checkpoint's; on top of it go
the config file's own settings, when a file is given, then the command line. A file's shape
settings that differ from the checkpoint's are ignored with a note (nanoGPT does the same: it
takes the shape from the checkpoint); a shape change asked on the command line is refused.
The command line is read as for a new run (fitgpt.config.load.apply_overrides). Opening a run
only to use its model (sample, eval, export) is fitgpt.store.load.
"""

from __future__ import annotations

import copy
from pathlib import Path

from fitgpt.config.load import (
    NANOGPT_DEFAULTS,
    NANOGPT_KEYS,
    apply_overrides,
    file_settings,
    parse_overrides,
    resolve_path,
    set_value,
    to_dict,
)
from fitgpt.config.schema import SECTIONS, Config
from fitgpt.errors import CheckpointError, ConfigError
from fitgpt.store.checkpoint import CKPT_DIR, load_checkpoint
from fitgpt.store.load import config_of

# Fields that change the model's parameters: a resumed run may not change them.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_multiple", "bias")
# The MLP, norm and head options change the function the weights were trained for (zero_init:
# how they started): switching one on resume is refused as well.
SHAPE_FIELDS += ("mlp", "norm", "tie_embeddings", "zero_init", "logit_softcap")
SHAPE_FIELDS += ("position", "qk_norm")  # rotary has no wpe; qk_norm changes the attention


def _last(config: str | None, overrides: list[str], field: str):
    """The value the config file, then the command line, gives `field` (dotted), or None."""
    value = None
    if config is not None:
        for key, v in file_settings(resolve_path(config), []):
            if NANOGPT_KEYS.get(key, key) == field:
                value = v
    for key, text in parse_overrides(overrides):
        if NANOGPT_KEYS.get(key, key) == field and text is not None:
            value = text
    return value


def resume_wanted(config: str | None, overrides: list[str]) -> bool:
    """nanoGPT's way to continue: init_from='resume' in the file or on the command line."""
    return _last(config, overrides, "train.init_from") == "resume"


def resume_out_dir(config: str | None, overrides: list[str]) -> Path:
    """Where init_from='resume' looks: log.out_dir from the command line or the file, else the
    default of the file's kind (nanoGPT's 'out' for a .py file, fitgpt's 'runs')."""
    out = _last(config, overrides, "log.out_dir")
    if out is None and config is not None and resolve_path(config).suffix == ".py":
        out = NANOGPT_DEFAULTS["out_dir"]
    return Path(out if isinstance(out, str) else Config().log.out_dir)


def apply_file_on_saved(cfg: Config, config: str, notes: list[str]) -> None:
    """A config file's own settings on top of a checkpoint's config; shape settings that differ
    from the checkpoint's (and init_from, which is 'resume') are ignored, with a note."""
    path = resolve_path(config)
    ignored, kept = [], []
    for key, value in file_settings(path, notes):
        full = NANOGPT_KEYS.get(key, key)
        if key == "name" or full == "train.init_from":
            continue
        sec, name = full.split(".", 1) if "." in full else ("", full)
        if sec == "model" and name in SHAPE_FIELDS:
            trial = copy.deepcopy(cfg)
            set_value(trial, key, value, where=str(path), from_text=False)
            if getattr(trial.model, name) != getattr(cfg.model, name):
                ignored.append(f"{key}={value!r}")
                kept.append(f"{name}={getattr(cfg.model, name)!r}")
            continue
        set_value(cfg, key, value, where=str(path), from_text=False, notes=notes)
    if ignored:
        notes.append(f"{path}: {', '.join(ignored)} not applied: a resumed run keeps its "
                     f"checkpoint's model shape ({', '.join(kept)})")


def changed_settings(before: Config, after: Config) -> list[str]:
    a, b = to_dict(before), to_dict(after)
    return [f"{sec}.{k} {a[sec][k]!r} -> {b[sec][k]!r}" for sec in SECTIONS for k in a[sec]
            if a[sec][k] != b[sec][k] and f"{sec}.{k}" != "train.init_from"]


def resume_config(where: str, config: str | None, overrides: list[str],
                  notes: list[str]) -> tuple[Config, dict, Path]:
    """The saved run's config, then the config file's settings, then the command line's; where
    'auto' means the run in log.out_dir that was written last (see the module docstring)."""
    if where == "auto":
        out_dir = resume_out_dir(config, overrides)
        try:
            ckpt = load_checkpoint(out_dir)
        except CheckpointError as e:
            raise CheckpointError(f"nothing to resume in log.out_dir={out_dir}: {e}") from None
    else:
        ckpt = load_checkpoint(where)
    saved = config_of(ckpt, notes)
    cfg = copy.deepcopy(saved)
    if config is not None:
        apply_file_on_saved(cfg, config, notes)
    apply_overrides(cfg, overrides)
    bad = [f"model.{f}" for f in SHAPE_FIELDS
           if getattr(cfg.model, f) != getattr(saved.model, f)]
    if bad:
        raise ConfigError(f"cannot resume with a different model shape: {', '.join(bad)} changed; "
                          f"start a new run instead")
    changed = changed_settings(saved, cfg)
    if changed:
        notes.append(f"resumed with changed settings: {', '.join(changed)}")
    cfg.train.init_from = "resume"
    path = Path(ckpt["_path"])
    run_dir = path.parent.parent if path.parent.name == CKPT_DIR else path.parent
    notes.append(f"resuming {path} at step {ckpt.get('step', 0)}")
    return cfg, ckpt, run_dir
