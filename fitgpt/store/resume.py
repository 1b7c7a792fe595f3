"""Continuing and evaluating saved runs: which config, which checkpoint, which run folder.

A run continues with `fitgpt train --resume RUN` or, nanoGPT's way, with `init_from='resume'` in
the config file or on the command line (`--init_from=resume`), which looks in `log.out_dir`
(fitgpt.store.locate says how a folder is searched). The config is the checkpoint's; on top of it go
the config file's own settings, when a file is given, then the command line. A file's shape
settings that differ from the checkpoint's are ignored with a note (nanoGPT does the same: it
takes the shape from the checkpoint); a shape change asked on the command line is refused.
"""

from __future__ import annotations

import copy
from pathlib import Path

from fitgpt.config.load import (
    NANOGPT_DEFAULTS,
    NANOGPT_KEYS,
    check,
    file_settings,
    normalise,
    parse_overrides,
    resolve_path,
    set_value,
    to_dict,
)
from fitgpt.config.schema import SECTIONS, Config
from fitgpt.errors import CheckpointError, ConfigError
from fitgpt.store.checkpoint import CKPT_DIR, load_checkpoint

# Fields that change the model's parameters: a resumed run may not change them.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_multiple", "bias")


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


def apply_overrides(cfg: Config, overrides: list[str]) -> list[str]:
    """Command-line overrides on top of a saved config; returns the keys changed."""
    from fitgpt.config.load import NANOGPT_KEYS, field_types

    changed = []
    for key, text in parse_overrides(overrides):
        full = NANOGPT_KEYS.get(key, key)
        if text is None:
            text = "true" if field_types().get(full) is bool else None
            if text is None:
                raise ConfigError(f"--{key}: needs a value")
        set_value(cfg, key, text, where="command line", from_text=True)
        changed.append(full)
    normalise(cfg)
    check(cfg)
    return changed


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


def load_model(where: str, overrides: list[str], notes: list[str]):
    """(config, model in eval mode, runtime) of a checkpoint, fitgpt's or nanoGPT's, with
    command-line overrides; the device is chosen afresh (`auto`) unless overridden."""
    from fitgpt.model.runtime import build_model, clean_state_dict, resolve_runtime

    ckpt = load_checkpoint(where)
    cfg = config_of(ckpt, notes)
    cfg.train.device = "auto"
    apply_overrides(cfg, overrides)
    rt = resolve_runtime(cfg.train.device, cfg.train.dtype)
    model = build_model(cfg, rt.device, init=False)
    model.load_state_dict(clean_state_dict(ckpt.pop("model")))
    model.eval()
    return cfg, model, rt


def eval_checkpoint(where: str, overrides: list[str]) -> dict:
    """`fitgpt eval`: the checkpoint's model on its (or the overridden) validation windows."""
    import torch

    from fitgpt.console import fmt_bytes, say
    from fitgpt.data.shards import ValWindows, find_splits
    from fitgpt.data.tokenizer import find_meta
    from fitgpt.eval.evaluate import evaluate
    from fitgpt.model.runtime import resolve_data_dir
    from fitgpt.planner.tracker import StorageTracker

    notes: list[str] = []
    cfg, model, rt = load_model(where, overrides, notes)
    for note in notes:
        say(f"note: {note}")
    _, val_files = find_splits(resolve_data_dir(cfg.data.dir))
    val = ValWindows(val_files, cfg.eval_block_size, cfg.eval_windows)
    vocab = cfg.model.vocab_size
    meta = find_meta(cfg.data.dir)  # a character-level nanoGPT dataset: bytes per id for bpb
    table = meta.byte_table(2**16) if meta is not None else None
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
        res = evaluate(model, val, cfg.eval_batch_size, rt, vocab=vocab, byte_table=table)
        peak = torch.cuda.max_memory_allocated(rt.device)
    else:
        tracker = StorageTracker(rt.device_type)
        tracker.add(model)
        with tracker:
            res = evaluate(model, val, cfg.eval_batch_size, rt, vocab=vocab, byte_table=table)
        peak = tracker.peak
    bpb = f" | {res.bpb:.4f} bits per byte" if res.bpb is not None else ""
    say(f"val loss {res.loss:.4f}{bpb} | {res.tokens:,} tokens ({val.n_windows} windows of "
        f"{cfg.eval_block_size}, batch {cfg.eval_batch_size}) | {res.seconds:.1f}s | "
        f"peak {fmt_bytes(peak)}")
    return {"val_loss": res.loss, "val_bpb": res.bpb, "tokens": res.tokens, "peak_bytes": peak}
