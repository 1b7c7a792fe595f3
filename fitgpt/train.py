"""The training loop, as plain functions.

`run(cfg)` sets up (runtime, data, model, optimizer), then loops: evaluate at every
`eval.interval` and at the last step (then checkpoint), take one optimizer step of `grad_accum`
micro-batches, log every `log.interval`. A `last_step` flag makes the final evaluation and save
always happen. Memory of training and evaluation is measured per phase: on CUDA with
`max_memory_allocated`, on CPU with the storage tracker (first two steps, first evaluation after training began).
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fitgpt import __version__
from fitgpt.checkpoint import save_checkpoint
from fitgpt.config import Config
from fitgpt.configio import summary_lines, to_dict, to_toml
from fitgpt.data import TrainBatches, ValWindows, find_splits
from fitgpt.evaluate import EvalResult, evaluate
from fitgpt.log import RunLog, fmt_bytes, fmt_count, say
from fitgpt.memory.tracker import StorageTracker
from fitgpt.parallelize import maybe_compile
from fitgpt.runtime import Runtime, build_model, clean_state_dict, resolve_data_dir, resolve_runtime


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to train.lr, then cosine down to train.min_lr at lr_decay_steps."""
    t = cfg.train
    if not t.decay_lr:
        return t.lr
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    decay = cfg.lr_decay_steps
    if step >= decay:
        return t.min_lr
    ratio = (step - t.warmup_steps) / max(1, decay - t.warmup_steps)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


def train_step(model, optimizer, scaler, batches: TrainBatches, grad_accum: int,
               grad_clip: float, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over grad_accum micro-batches. Returns (mean loss, grad norm) as
    device tensors; nothing else from the step survives the call."""
    loss_sum = torch.zeros((), device=rt.device)
    for _ in range(grad_accum):
        x, y = rt.to_device(*batches.next_batch())
        with rt.autocast():
            loss = model(x, y)
        scaler.scale(loss / grad_accum).backward()
        loss_sum += loss.detach()
        del x, y, loss
    norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / grad_accum, norm


@dataclass
class PhasePeaks:
    """Peak allocated bytes of training and evaluation, and how they were measured."""

    train: int | None = None
    eval: int | None = None
    how: str = ""
    train_reserved: int | None = None
    eval_reserved: int | None = None


class Meter:
    """Measures one phase's peak: CUDA allocator statistics, or the CPU storage tracker."""

    def __init__(self, rt: Runtime, track_cpu: bool):
        self.rt = rt
        self.cuda = rt.device_type == "cuda"
        self.track_cpu = track_cpu and rt.device_type == "cpu"

    def measure(self, fn, model, optimizer, enabled: bool) -> tuple[Any, int | None, int | None]:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.rt.device)
            out = fn()
            return (out, torch.cuda.max_memory_allocated(self.rt.device),
                    torch.cuda.max_memory_reserved(self.rt.device))
        if not (self.track_cpu and enabled):
            return fn(), None, None
        tracker = StorageTracker("cpu")
        tracker.add(model)
        if optimizer is not None:
            tracker.add(optimizer)
        with tracker:
            out = fn()
        return out, tracker.peak, None


@dataclass
class State:
    step: int = 0
    tokens: int = 0
    best_val: float = float("inf")
    last_val: float | None = None
    first_val: float | None = None
    train_seconds: float = 0.0
    train_tokens_timed: int = 0
    peaks: PhasePeaks = field(default_factory=PhasePeaks)
    stop_requested: bool = False


def rng_state() -> dict[str, Any]:
    st = np.random.get_state()
    out = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in st["python"]))
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def make_run_dir(cfg: Config) -> Path:
    base = Path(cfg.log.out_dir)
    name = cfg.log.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = base / name
    n = 1
    while cfg.log.run_name is None and run_dir.exists():
        n += 1
        run_dir = base / f"{name}-{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class _StopFlag:
    """SIGINT/SIGTERM: finish the current step, save, exit; a second Ctrl-C stops at once."""

    def __init__(self, state: State, log: RunLog):
        self.state, self.log, self.old = state, log, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.state.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.state.stop_requested = True
        self.log.info("stop requested: finishing this step, then saving a checkpoint "
                      "(Ctrl-C again to quit at once)")

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def run(cfg: Config, ckpt: dict | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """Train (or, with train.eval_only, evaluate) and return the run summary."""
    rt = resolve_runtime(cfg.train.device, cfg.train.dtype)
    train_files, val_files = find_splits(resolve_data_dir(cfg.data.dir))
    batches = TrainBatches(train_files, cfg.model.block_size, cfg.train.batch_size, cfg.data.seed)
    val = ValWindows(val_files, cfg.eval_block_size, cfg.eval_windows)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, rt.device, init=ckpt is None)
    optimizer = model.configure_optimizer(cfg.train.weight_decay, cfg.train.lr,
                                          (cfg.train.beta1, cfg.train.beta2), rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    state = State()
    if ckpt is not None:
        model.load_state_dict(clean_state_dict(ckpt["model"]))
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if "sampler" in ckpt:
            batches.load_state_dict(ckpt["sampler"])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        state.step = int(ckpt.get("step", ckpt.get("iter_num", 0)))
        state.tokens = int(ckpt.get("tokens", 0))
        state.best_val = float(ckpt.get("best_val_loss", float("inf")))
        ckpt = None  # drop the references: the tensors now live in the model and optimizer
    fwd = maybe_compile(model, cfg.train.compile)

    run_dir = run_dir or make_run_dir(cfg)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    total = cfg.train.max_steps
    log = RunLog(run_dir, max(0, total - state.step), cfg.log.progress)
    wandb_run = _start_wandb(cfg, run_dir) if cfg.log.wandb else None
    meter = Meter(rt, cfg.memory.track)
    n_params = model.num_params()
    for line in summary_lines(cfg):
        log.info(line)
    log.info(f"fitgpt {__version__} | {rt.device} {str(rt.dtype).replace('torch.', '')} | "
             f"{n_params / 1e6:.2f}M parameters ({model.num_params(False) / 1e6:.2f}M without "
             f"embeddings) | run folder {run_dir}")
    log.info(f"tokens per step {cfg.tokens_per_step:,} = batch {cfg.train.batch_size} x accum "
             f"{cfg.train.grad_accum} x block {cfg.model.block_size} | eval: {val.n_windows} "
             f"windows of {cfg.eval_block_size} ({val.n_tokens:,} tokens) in batches of "
             f"{cfg.eval_batch_size} | loss {cfg.memory.loss}"
             + (f" (chunk {cfg.memory.loss_chunk})" if cfg.memory.loss == "chunked" else "")
             + (" | activation checkpointing" if cfg.memory.checkpointing else ""))

    def do_eval(measure: bool) -> EvalResult:
        res, peak, reserved = meter.measure(
            lambda: evaluate(fwd, val, cfg.eval_batch_size, rt), model, optimizer, measure)
        if peak is not None:
            state.peaks.eval = max(state.peaks.eval or 0, peak)
        if reserved is not None:
            state.peaks.eval_reserved = max(state.peaks.eval_reserved or 0, reserved)
        return res

    def checkpoint() -> Path:
        st = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
              "scaler": scaler.state_dict(), "step": state.step, "tokens": state.tokens,
              "best_val_loss": state.best_val, "config": to_dict(cfg),
              "sampler": batches.state_dict(), "rng": rng_state(), "version": __version__}
        return save_checkpoint(run_dir, st, state.step, cfg.log.keep)

    trained_steps, start_step, status = 0, state.step, "completed"
    window_t0, window_steps, first_dt = time.perf_counter(), 0, 0.0
    tps = cfg.tokens_per_step
    try:
        with _StopFlag(state, log):
            while True:
                last_step = state.step >= total or cfg.train.eval_only or state.stop_requested
                if state.step % cfg.eval.interval == 0 or last_step:
                    res = do_eval(measure=trained_steps > 0 or cfg.train.eval_only)
                    _record_eval(state, res, log, wandb_run)
                    save = cfg.log.always_save or res.loss <= state.best_val
                    if not cfg.train.eval_only and save and (state.step > start_step or last_step):
                        log.info(f"saved {checkpoint()}")
                    window_t0, window_steps = time.perf_counter(), 0  # timing excludes eval
                if last_step:
                    if state.stop_requested and state.step < total:
                        status = "stopped"
                    break
                lr = lr_at(state.step, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                t0 = time.perf_counter()
                (loss, norm), peak, reserved = meter.measure(
                    lambda: train_step(fwd, optimizer, scaler, batches, cfg.train.grad_accum,
                                       cfg.train.grad_clip, rt),
                    model, optimizer, trained_steps < 2)  # the second step has optimizer state
                if peak is not None:
                    state.peaks.train = max(state.peaks.train or 0, peak)
                if reserved is not None:
                    state.peaks.train_reserved = max(state.peaks.train_reserved or 0, reserved)
                state.step += 1
                state.tokens += tps
                trained_steps += 1
                window_steps += 1
                if trained_steps == 1:  # warm-up and measurement: timed apart
                    rt.synchronize()
                    first_dt = time.perf_counter() - t0
                    window_t0, window_steps = time.perf_counter(), 0
                if state.step % cfg.log.interval == 0 or state.step == total:
                    loss_v = loss.item()  # the only host sync of a step, at log steps
                    now = time.perf_counter()
                    dt = (now - window_t0) / window_steps if window_steps else first_dt
                    if window_steps:
                        state.train_seconds += now - window_t0
                        state.train_tokens_timed += window_steps * tps
                    window_t0, window_steps = now, 0
                    if not math.isfinite(loss_v):
                        log.info(f"step {state.step}: loss is {loss_v}; stopping (lower train.lr, "
                                 f"or use bfloat16 / float32)")
                        status = "diverged"
                        break
                    _record_train(state, loss_v, norm, lr, dt, cfg, log, wandb_run)
                log.advance(state.step - start_step, loss_status(state))
    finally:
        log.close()
    if status == "stopped":
        log.info(f"stopped at step {state.step}; resume with: fitgpt train --resume {run_dir}")
    summary = _summary(cfg, state, model, rt, run_dir, status)
    if cfg.eval.sample_tokens and status != "diverged":
        summary["sample"] = sample_text(model, cfg, rt)
    _write_json(run_dir / "summary.json", summary)
    if wandb_run is not None:
        wandb_run.finish()
    return summary


def loss_status(state: State) -> str:
    return "" if state.last_val is None else f"val {state.last_val:.3f}"


def _record_train(state, loss_v, norm, lr, dt, cfg, log, wandb_run) -> None:
    tok_s = cfg.tokens_per_step / dt
    peak = state.peaks.train
    log.info(f"step {state.step:>6} | loss {loss_v:.4f} | lr {lr:.2e} | "
             f"{fmt_count(tok_s)} tok/s | {dt * 1000:.0f} ms/step"
             + (f" | peak {fmt_bytes(peak)}" if peak else ""))
    rec = {"kind": "train", "step": state.step, "tokens": state.tokens, "loss": loss_v, "lr": lr,
           "grad_norm": None if norm is None else float(norm), "tok_s": tok_s,
           "ms_step": dt * 1000, "peak_train_bytes": peak}
    log.metrics(rec)
    if wandb_run is not None:
        wandb_run.log(rec, step=state.step)


def _record_eval(state, res: EvalResult, log, wandb_run) -> None:
    state.last_val = res.loss
    state.first_val = res.loss if state.first_val is None else state.first_val
    state.best_val = min(state.best_val, res.loss)
    log.info(f"eval step {state.step:>6} | val loss {res.loss:.4f} | {res.tokens:,} tokens in "
             f"{res.seconds:.1f}s" + (f" | peak {fmt_bytes(state.peaks.eval)}" if state.peaks.eval else ""))
    rec = {"kind": "eval", "step": state.step, "tokens": state.tokens, "val_loss": res.loss,
           "eval_seconds": res.seconds, "peak_eval_bytes": state.peaks.eval}
    log.metrics(rec)
    if wandb_run is not None:
        wandb_run.log(rec, step=state.step)


def _summary(cfg, state: State, model, rt: Runtime, run_dir: Path, status: str) -> dict[str, Any]:
    from fitgpt.memory.estimate import estimate

    tok_s = state.train_tokens_timed / state.train_seconds if state.train_seconds else None
    dtype = str(rt.dtype).replace("torch.", "")
    est = estimate(cfg, rt.device_type, dtype)
    how = "cuda max_memory_allocated" if rt.device_type == "cuda" else (
        "storage tracker (first two steps, first evaluation)" if cfg.memory.track else "not measured")
    summary = {
        "status": status, "steps": state.step, "tokens": state.tokens,
        "params": model.num_params(), "first_val_loss": state.first_val,
        "val_loss": state.last_val, "best_val_loss": state.best_val if state.first_val else None,
        "tokens_per_second": tok_s, "peak_train_bytes": state.peaks.train,
        "peak_eval_bytes": state.peaks.eval, "peak_train_reserved_bytes": state.peaks.train_reserved,
        "peak_eval_reserved_bytes": state.peaks.eval_reserved, "memory_measured_by": how,
        "predicted_train_bytes": est.train.allocated, "predicted_eval_bytes": est.eval.allocated,
        "device": str(rt.device), "dtype": dtype,
        "run_dir": str(run_dir), "version": __version__,
    }
    say("")
    say(f"done: {status} at step {state.step} | val loss {state.first_val or float('nan'):.3f} -> "
        f"{state.last_val or float('nan'):.3f} | "
        + (f"{fmt_count(tok_s)} tok/s" if tok_s else "tok/s n/a"))
    say(f"peak memory ({how}): training {fmt_bytes(state.peaks.train)}, evaluation "
        f"{fmt_bytes(state.peaks.eval)} | predicted: training {fmt_bytes(est.train.allocated)}, "
        f"evaluation {fmt_bytes(est.eval.allocated)}")
    say(f"run folder: {run_dir} (config.toml, train.log, metrics.jsonl, summary.json, checkpoints/)")
    return summary


def sample_text(model, cfg: Config, rt: Runtime) -> str:
    """A short generated text after training (seeded, temperature 0.8, top-k 200)."""
    from fitgpt.tokenizer import gpt2_encoding

    enc = gpt2_encoding()
    prompt = enc.encode_ordinary(cfg.eval.sample_prompt) or [50256]
    idx = torch.tensor([prompt], dtype=torch.long, device=rt.device)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    model.eval()
    with rt.autocast():
        out = model.generate(idx, cfg.eval.sample_tokens, temperature=0.8, top_k=200,
                             generator=gen, vocab_limit=cfg.model.vocab_size)
    text = enc.decode([t for t in out[0].tolist() if t < enc.n_vocab])
    say("sample:")
    say(text.strip())
    return text


def _start_wandb(cfg: Config, run_dir: Path):
    try:
        import wandb
    except ImportError:
        from fitgpt.errors import ConfigError

        raise ConfigError("log.wandb=true needs the wandb package: pip install wandb") from None
    return wandb.init(project=cfg.log.wandb_project, name=cfg.log.wandb_run_name or run_dir.name,
                      config=to_dict(cfg), dir=str(run_dir))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
