"""What a run reports: the run folder, log lines, metrics records, the summary, a sample.

Each record goes to metrics.jsonl and, when asked, to Weights & Biases and TensorBoard
(`start_trackers`). Training records carry MFU (model FLOPs utilisation: training FLOPs per
token x tokens/s over the card's dense 16-bit peak; None off CUDA or on a card without a known
peak); evaluation records carry bits per byte. `finish_plots` draws plots.png at the end.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from fitgpt import __version__, fileio
from fitgpt.config.load import to_dict
from fitgpt.config.schema import Config
from fitgpt.console import fmt_bytes, fmt_count, say
from fitgpt.errors import ConfigError
from fitgpt.eval.evaluate import EvalResult
from fitgpt.model.runtime import Runtime
from fitgpt.model.shape import ModelShape


def loss_status(stats) -> str:
    return "" if stats.last_val is None else f"val {stats.last_val:.3f}"


@functools.lru_cache(maxsize=8)
def peak_flops(device: str) -> float | None:
    """Dense 16-bit FLOP/s of the CUDA card `device` ('auto', 'cuda', 'cuda:1') resolves to;
    None for the CPU, MPS, or a card without a known figure (fitgpt.planner.gpus)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    from fitgpt.planner.gpus import current_gpu

    dev = torch.device(device)
    gpu = current_gpu(dev.index if dev.index is not None else torch.cuda.current_device())
    return gpu.tflops * 1e12 if gpu.tflops else None


def mfu(cfg: Config, tok_s: float, cards: int = 1) -> float | None:
    """Model FLOPs utilisation (0..1) at tok_s training tokens per second (all processes
    together, over all their `cards`: the world size); None off CUDA."""
    peak = peak_flops(cfg.train.device)
    return ModelShape.of(cfg.model).flops_per_token() * tok_s / (peak * cards) if peak else None


def record_train(state, stats, loss_v, norm, lr, dt, cfg, log, wandb_run, cards: int = 1) -> None:
    """A training record: the TrainState's step and tokens, the RunStats' peak (fitgpt.train.state)."""
    tok_s = cfg.tokens_per_step / dt
    peak = stats.peaks.train
    util = mfu(cfg, tok_s, cards)
    log.info(f"step {state.step:>6} | loss {loss_v:.4f} | lr {lr:.2e} | "
             f"{fmt_count(tok_s)} tok/s | {dt * 1000:.0f} ms/step"
             + (f" | mfu {util * 100:.1f}%" if util is not None else "")
             + (f" | peak {fmt_bytes(peak)}" if peak else ""))
    rec = {"kind": "train", "step": state.step, "tokens": state.tokens, "loss": loss_v, "lr": lr,
           "grad_norm": None if norm is None else float(norm), "tok_s": tok_s,
           "ms_step": dt * 1000, "mfu": util, "peak_train_bytes": peak}
    log.metrics(rec)
    if wandb_run is not None:
        wandb_run.log(rec, step=state.step)


def record_eval(state, stats, res: EvalResult, log, wandb_run) -> None:
    """An evaluation record; keeps the TrainState's best and the RunStats' first and last loss."""
    stats.last_val = res.loss
    stats.first_val = res.loss if stats.first_val is None else stats.first_val
    state.best_val = min(state.best_val, res.loss)
    log.info(f"eval step {state.step:>6} | val loss {res.loss:.4f}"
             + (f" | bpb {res.bpb:.4f}" if res.bpb is not None else "")
             + f" | {res.tokens:,} tokens in {res.seconds:.1f}s"
             + (f" | peak {fmt_bytes(stats.peaks.eval)}" if stats.peaks.eval else ""))
    rec = {"kind": "eval", "step": state.step, "tokens": state.tokens, "val_loss": res.loss,
           "val_bpb": res.bpb, "eval_seconds": res.seconds, "peak_eval_bytes": stats.peaks.eval}
    log.metrics(rec)
    if wandb_run is not None:
        wandb_run.log(rec, step=state.step)


def summary(cfg, state, stats, rt: Runtime, run_dir: Path, status: str,
            untracked: bool = False) -> dict[str, Any]:
    """summary.json's content, and the closing lines, from the TrainState (progress, back-off,
    the model) and the RunStats (losses, timing, peaks); `untracked`: FSDP on the CPU, which the
    storage tracker cannot measure."""
    from fitgpt.planner.estimate import estimate

    tok_s = stats.train_tokens_timed / stats.train_seconds if stats.train_seconds else None
    dtype = str(rt.dtype).replace("torch.", "")
    card = None
    if rt.device_type == "cuda":  # its architecture sizes the cuBLAS workspaces in the plan
        from fitgpt.planner.gpus import current_gpu

        card = current_gpu(rt.device.index)
    est = estimate(cfg, rt.device_type, dtype, card)
    how = "cuda max_memory_allocated" if rt.device_type == "cuda" else (
        "not measured: the CPU storage tracker cannot follow FSDP2's storage resizes" if untracked else
        "storage tracker (first two steps, first evaluation)" if cfg.memory.track else "not measured")
    out = {
        "status": status, "steps": state.step, "tokens": state.tokens,
        "params": state.model.num_params(), "first_val_loss": stats.first_val,
        "val_loss": stats.last_val, "best_val_loss": state.best_val if stats.first_val else None,
        "tokens_per_second": tok_s, "peak_train_bytes": stats.peaks.train,
        "peak_eval_bytes": stats.peaks.eval, "peak_train_reserved_bytes": stats.peaks.train_reserved,
        "peak_eval_reserved_bytes": stats.peaks.eval_reserved, "memory_measured_by": how,
        "predicted_train_bytes": est.train.allocated, "predicted_eval_bytes": est.eval.allocated,
        "device": str(rt.device), "dtype": dtype,
        "run_dir": str(run_dir), "version": __version__,
        "backoff": {"micro_split": state.micro_split, "eval_batch_size": state.eval_batch_size,
                    "events": stats.backoffs},
    }
    say("")
    say(f"done: {status} at step {state.step} | val loss {stats.first_val or float('nan'):.3f} -> "
        f"{stats.last_val or float('nan'):.3f} | "
        + (f"{fmt_count(tok_s)} tok/s" if tok_s else "tok/s n/a"))
    say(f"peak memory ({how}): training {fmt_bytes(stats.peaks.train)}, evaluation "
        f"{fmt_bytes(stats.peaks.eval)} | predicted: training {fmt_bytes(est.train.allocated)}, "
        f"evaluation {fmt_bytes(est.eval.allocated)}")
    say(f"run folder: {run_dir} (config.toml, train.log, metrics.jsonl, summary.json, plots.png, "
        f"checkpoints/)")
    return out


def sample_text(model, cfg: Config, rt: Runtime) -> str | None:
    """A short generated text after training (seeded, temperature 0.8, top-k 200), decoded with
    the data folder's meta.pkl for a character-level nanoGPT dataset, else GPT-2's BPE; None,
    with a note, when it cannot be made (no vocabulary to decode with, no tokenizer files)."""
    from fitgpt.errors import FitError
    from fitgpt.eval.sample import generate_texts, text_vocab

    model.eval()  # no dropout in the sample
    try:
        vocab = text_vocab(cfg)
        texts, _ = generate_texts(model, vocab, cfg.eval.sample_prompt,
                                  max_new_tokens=cfg.eval.sample_tokens, temperature=0.8, top_k=200,
                                  top_p=None, seed=cfg.train.seed, num_samples=1, rt=rt,
                                  vocab_limit=cfg.model.vocab_size)
    except FitError as e:
        say(f"no sample: {e}")
        return None
    say("sample:")
    say(texts[0].strip())
    return texts[0]


def start_wandb(cfg: Config, run_dir: Path):
    """A W&B run. WANDB_MODE (e.g. offline) and the other WANDB_* variables are wandb's own
    and are left as the user set them."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.wandb=true needs the wandb package: pip install wandb") from None
    return wandb.init(project=cfg.log.wandb_project, name=cfg.log.wandb_run_name or run_dir.name,
                      config=to_dict(cfg), dir=str(run_dir))


class TensorBoard:
    """Event files in <run folder>/tensorboard: every number of a record as `kind/key`."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log.tensorboard=true needs the tensorboard package: "
                              "pip install 'fitgpt[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, rec: dict[str, Any], step: int) -> None:
        kind = rec.get("kind", "metrics")
        for key, value in rec.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def finish(self) -> None:
        self.writer.close()


class Trackers:
    """W&B and TensorBoard behind the one `log(rec, step=)` / `finish()` a wandb run has."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, rec: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(rec, step=step)

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish()


def start_trackers(cfg: Config, run_dir: Path) -> Trackers | None:
    """What log.wandb and log.tensorboard ask for, or None; a missing package is a ConfigError."""
    sinks = []
    if cfg.log.tensorboard:
        sinks.append(TensorBoard(run_dir))
    if cfg.log.wandb:
        sinks.append(start_wandb(cfg, run_dir))
    return Trackers(sinks) if sinks else None


def finish_plots(run_dir: Path) -> Path | None:
    """At the end of a run: <run folder>/plots.png (losses against tokens, each phase's peak
    memory against its prediction; see fitgpt.report.plots). A plot that fails, matplotlib missing
    from a broken install included, is a note, never a failed run."""
    from fitgpt.errors import FitError
    from fitgpt.report.runs import plot_runs

    try:
        return plot_runs([Path(run_dir)], Path(run_dir) / "plots.png")
    except FitError as e:
        say(f"note: no plots.png: {e}")
    except Exception as e:  # noqa: BLE001 - the run itself is done and saved
        say(f"note: no plots.png ({type(e).__name__}: {e})")
    return None


def write_json(path: Path, obj: Any) -> None:
    """Atomically and fsynced (fitgpt.fileio); values JSON cannot hold are written as text."""
    fileio.write_json(path, obj, default=str)
