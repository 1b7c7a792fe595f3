"""Continuing and evaluating saved runs: which config, which checkpoint, which run folder."""

from __future__ import annotations

import copy
from pathlib import Path

from fitgpt.checkpoint import CKPT_DIR, load_checkpoint
from fitgpt.config import Config
from fitgpt.configio import check, from_dict, normalise, parse_overrides, set_value
from fitgpt.errors import CheckpointError, ConfigError

# Fields that change the model's parameters: a resumed run may not change them.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_multiple", "bias")


def latest_run(out_dir: Path) -> Path:
    runs = [p for p in out_dir.glob("*") if (p / CKPT_DIR / "latest").is_file()]
    if not runs:
        raise CheckpointError(f"--resume auto: no run with a checkpoint under {out_dir}/")
    return max(runs, key=lambda p: (p / CKPT_DIR / "latest").stat().st_mtime)


def config_of(ckpt: dict, notes: list[str] | None = None) -> Config:
    """The run's Config. A nanoGPT ckpt.pt is converted in place (see fitgpt.nanogpt)."""
    from fitgpt.nanogpt import convert, is_nanogpt

    if is_nanogpt(ckpt):
        return convert(ckpt, notes if notes is not None else [])
    if "config" not in ckpt or "model" not in ckpt["config"]:
        raise CheckpointError(f"{ckpt['_path']}: has neither a fitgpt config nor nanoGPT's "
                              f"model_args; cannot tell the model's shape")
    return from_dict(ckpt["config"])


def apply_overrides(cfg: Config, overrides: list[str]) -> list[str]:
    """Command-line overrides on top of a saved config; returns the keys changed."""
    from fitgpt.configio import NANOGPT_KEYS, field_types

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


def resume_config(where: str, config: str | None, overrides: list[str],
                  notes: list[str]) -> tuple[Config, dict, Path]:
    """The saved run's config with command-line overrides; shape changes are refused."""
    if config is not None:
        raise ConfigError("--resume takes the run's saved config; change settings with "
                          "--section.key=value overrides instead of a config file")
    if where == "auto":
        out_dir = Path("runs")
        for key, text in parse_overrides(overrides):
            if key in ("log.out_dir", "out_dir") and text:
                out_dir = Path(text)
        where = str(latest_run(out_dir))
    ckpt = load_checkpoint(where)
    saved = config_of(ckpt, notes)
    cfg = copy.deepcopy(saved)
    changed = apply_overrides(cfg, overrides)
    bad = [f"model.{f}" for f in SHAPE_FIELDS
           if getattr(cfg.model, f) != getattr(saved.model, f)]
    if bad:
        raise ConfigError(f"cannot resume with a different model shape: {', '.join(bad)} changed; "
                          f"start a new run instead")
    if changed:
        notes.append(f"resumed with changed settings: {', '.join(sorted(set(changed)))}")
    cfg.train.init_from = "resume"
    path = Path(ckpt["_path"])
    run_dir = path.parent.parent if path.parent.name == CKPT_DIR else path.parent
    notes.append(f"resuming {path} at step {ckpt.get('step', 0)}")
    return cfg, ckpt, run_dir


def load_model(where: str, overrides: list[str], notes: list[str]):
    """(config, model in eval mode, runtime) of a checkpoint, fitgpt's or nanoGPT's, with
    command-line overrides; the device is chosen afresh (`auto`) unless overridden."""
    from fitgpt.runtime import build_model, clean_state_dict, resolve_runtime

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

    from fitgpt.data import ValWindows, find_splits
    from fitgpt.evaluate import evaluate
    from fitgpt.log import fmt_bytes, say
    from fitgpt.memory.tracker import StorageTracker
    from fitgpt.runtime import resolve_data_dir

    notes: list[str] = []
    cfg, model, rt = load_model(where, overrides, notes)
    for note in notes:
        say(f"note: {note}")
    _, val_files = find_splits(resolve_data_dir(cfg.data.dir))
    val = ValWindows(val_files, cfg.eval_block_size, cfg.eval_windows)
    vocab = cfg.model.vocab_size
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
        res = evaluate(model, val, cfg.eval_batch_size, rt, vocab=vocab)
        peak = torch.cuda.max_memory_allocated(rt.device)
    else:
        tracker = StorageTracker(rt.device_type)
        tracker.add(model)
        with tracker:
            res = evaluate(model, val, cfg.eval_batch_size, rt, vocab=vocab)
        peak = tracker.peak
    bpb = f" | {res.bpb:.4f} bits per byte" if res.bpb is not None else ""
    say(f"val loss {res.loss:.4f}{bpb} | {res.tokens:,} tokens ({val.n_windows} windows of "
        f"{cfg.eval_block_size}, batch {cfg.eval_batch_size}) | {res.seconds:.1f}s | "
        f"peak {fmt_bytes(peak)}")
    return {"val_loss": res.loss, "val_bpb": res.bpb, "tokens": res.tokens, "peak_bytes": peak}
