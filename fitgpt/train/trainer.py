"""The training loop: a `Trainer` whose run reads as its phases.

`Trainer.run` sets up (the run folder; the model, optimizer and step from `build_training`; the
`TrainState`, resumed from a checkpoint when there is one; the log), then loops: evaluate at every
`eval.interval` and at the last step (then checkpoint), take one optimizer step of `grad_accum`
micro-batches, log every `log.interval`. A `last_step` flag makes the final evaluation and save
always happen. Then it finishes: summary, sample, plots.

Memory of training and evaluation is measured per phase: on CUDA with `max_memory_allocated`,
on CPU with the storage tracker (first two steps, first evaluation after training began). Out
of memory in either phase backs off and retries the same data.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fitgpt import __version__
from fitgpt.config.load import summary_lines, to_toml
from fitgpt.config.schema import Config
from fitgpt.data.shards import ValWindows
from fitgpt.errors import CheckpointError, DataError, FitError
from fitgpt.eval.evaluate import EvalResult, bits_per_byte
from fitgpt.fileio import write_text
from fitgpt.report import metrics as report
from fitgpt.report.log import RunLog, drop_superseded
from fitgpt.store import rundir
from fitgpt.store.checkpoint import save_checkpoint
from fitgpt.train import distributed
from fitgpt.train.build import build_training
from fitgpt.train.distributed import World
from fitgpt.train.faults import NO_FAULTS, Faults
from fitgpt.train.guard import weights_finite
from fitgpt.train.measure import Meter
from fitgpt.train.recover import attempt, best_suggestion, release
from fitgpt.train.rng import rng_restore, rng_snapshot
from fitgpt.train.state import RunStats, TrainState
from fitgpt.train.step import lr_at, momentum_at

__all__ = ["OutOfMemory", "Trainer", "run"]


class OutOfMemory(FitError):
    """Out of memory even at the smallest size: the run stopped with a checkpoint."""


def run(cfg: Config, ckpt: dict | None = None, run_dir: Path | None = None,
        world: World | None = None, faults: Faults | None = None) -> dict[str, Any]:
    """Train (or, with train.eval_only, evaluate) and return the run summary. world: this
    process's place among torchrun's (default: read from the environment); faults: those
    FITGPT_FAULT asks for (default: read from the environment, once)."""
    world = distributed.init(cfg.train.device, cfg.parallel.backend, world)
    faults = faults if faults is not None else Faults.from_env(world.rank)
    return Trainer(cfg, world, faults).run(ckpt, run_dir)


def check_tokens(data: list, vocab: int, where: str) -> None:
    top = max(int(t.max()) for pair in data for t in pair)
    if top >= vocab:
        raise DataError(f"{where}: token id {top} >= model.vocab_size {vocab}; the shards were made "
                        f"with a larger vocabulary: set --model.vocab_size={top + 1} or re-prepare them")


class _StopFlag:
    """SIGINT/SIGTERM: finish the current step, save, exit; a second Ctrl-C stops at once."""

    def __init__(self, stats: RunStats, log: RunLog):
        self.stats, self.log, self.old = stats, log, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.stats.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stats.stop_requested = True
        self.log.info("stop requested: finishing this step, then saving a checkpoint "
                      "(Ctrl-C again to quit at once)")

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


class _Clock:
    """Training time per step, timed apart from evaluations and from the first step (warm-up,
    compilation and the memory measurement)."""

    def __init__(self):
        self.first = 0.0  # the first step's seconds
        self.restart()

    def restart(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def lap(self, stats: RunStats, tokens_per_step: int) -> float:
        """Seconds per step since the last lap (the first step's, when no step was timed since),
        added to the run's timed training."""
        now = time.perf_counter()
        dt = (now - self.t0) / self.steps if self.steps else self.first
        if self.steps:
            stats.train_seconds += now - self.t0
            stats.train_tokens_timed += self.steps * tokens_per_step
        self.t0, self.steps = now, 0
        return dt


class Trainer:
    """One run of `fitgpt train` in this process: `run()` is set-up, then the loop of
    evaluate / checkpoint / step, then finish."""

    def __init__(self, cfg: Config, world: World, faults: Faults = NO_FAULTS):
        self.cfg, self.world, self.faults = cfg, world, faults
        self.stats = RunStats()
        self.clock = _Clock()
        self.trained_steps = 0  # steps this process took (not counting those before a resume)

    def run(self, ckpt: dict | None = None, run_dir: Path | None = None) -> dict[str, Any]:
        """Set up, then evaluate, checkpoint and step until the last step, then finish."""
        self.setup(ckpt, run_dir)
        try:
            with _StopFlag(self.stats, self.log):
                status = self.loop()
        finally:
            self.log.close()
        return self.finish(status)

    def loop(self) -> str:
        """Stop when asked (with a checkpoint), evaluate when due, else take a step; returns the
        status: completed, stopped, or diverged (the weights or losses are no longer finite)."""
        cfg, state, stats = self.cfg, self.state, self.stats
        while True:
            if self.faults.stop_at(state.step) or self.log.write_error is not None:  # disk full: save, stop
                stats.stop_requested = True
            # with several processes, the wish to stop travels with each step's loss, so that
            # all stop before the same step (one stopping alone would hang the others)
            stop = stats.stop_shared if self.world.active else stats.stop_requested
            if stop and not cfg.train.eval_only:
                return "stopped" if self.stop_save() else "diverged"
            last_step = state.step >= cfg.train.max_steps or cfg.train.eval_only
            if (state.step % cfg.eval.interval == 0 or last_step) and not self.evaluate(last_step):
                return "diverged"
            if last_step:
                return "completed"
            if not self.step():
                return "diverged"

    # ----------------------------------------------------------------------------- set-up

    def setup(self, ckpt: dict | None, run_dir: Path | None) -> None:
        """The run folder, the training step (fitgpt.train.build) and its state, resumed from
        ckpt when given; the validation windows, the log and its opening lines."""
        cfg, world = self.cfg, self.world
        if world.active:
            distributed.check_divisible(cfg.train.grad_accum, world)
            cfg.parallel.nproc = world.size  # the planner's per-process figures follow the real world
        self.run_dir, self.lock = self._open_run_dir(ckpt, run_dir)
        tr = self.training = build_training(cfg, world, resuming=ckpt is not None, faults=self.faults)
        self.rt = tr.rt
        self.state = TrainState(tr.model, tr.optimizer, tr.scaler, tr.batches, cfg, tr.fsdp,
                                micro_split=cfg.memory.micro_split, eval_batch_size=cfg.eval_batch_size)
        # an eval-only run never steps or saves: AdamW's moments would be memory the plan omits
        notes = [] if ckpt is None else self.state.load_state_dict(ckpt, optimizer=not cfg.train.eval_only)
        self.start_step = self.state.step
        self.val = ValWindows(tr.data.val, cfg.eval_block_size, cfg.eval_windows)
        self.val_share = self.val.shard(world.rank, world.size) if world.active and not tr.fsdp else self.val
        self._open_log()
        self._log_header(notes)

    def _open_run_dir(self, ckpt: dict | None, run_dir: Path | None) -> tuple[Path, Any]:
        """Only rank 0 writes the run folder, so only rank 0 locks it (fitgpt.store.rundir)."""
        lock = None
        if self.world.is_main:
            run_dir, lock = rundir.open_run_dir(self.cfg, run_dir)
            if ckpt is not None:
                rundir.check_not_moved(run_dir, TrainState.step_of(ckpt), lock)
        return distributed.broadcast_object(run_dir, self.world), lock

    def _open_log(self) -> None:
        """config.toml, the log (a resumed run first drops the killed run's later records), the
        trackers and the memory meter."""
        cfg, state, main = self.cfg, self.state, self.world.is_main
        if main:
            write_text(self.run_dir / "config.toml", to_toml(cfg))
        if state.saved is not None and main:  # resumed: the killed run's later records go
            evals_again = (state.step % cfg.eval.interval == 0 or state.step >= cfg.train.max_steps
                           or cfg.train.eval_only)
            drop_superseded(self.run_dir / "metrics.jsonl", state.step, evals_again)
        self.log = RunLog(self.run_dir, max(0, cfg.train.max_steps - state.step), cfg.log.progress)
        self.wandb_run = report.start_trackers(cfg, self.run_dir) if main else None
        # FSDP2 allocates and frees its gathered parameters by resizing storages in place, which the
        # CPU storage tracker cannot see: on the CPU, FSDP runs are not measured rather than mismeasured
        self.cpu_fsdp = self.training.fsdp and self.rt.device_type != "cuda"
        self.meter = Meter(self.rt, cfg.memory.track and not self.cpu_fsdp)

    def _log_header(self, notes: list[str]) -> None:
        cfg, rt, model, world = self.cfg, self.rt, self.training.model, self.world
        split, val = self.state.micro_split, self.val
        for line in summary_lines(cfg):
            self.log.info(line)
        self.log.info(f"fitgpt {__version__} | {rt.device} {str(rt.dtype).replace('torch.', '')} | "
                      f"{model.num_params() / 1e6:.2f}M parameters ({model.num_params(False) / 1e6:.2f}M "
                      f"without embeddings) | run folder {self.run_dir}")
        self.log.info(f"tokens per step {cfg.tokens_per_step:,} = batch {cfg.train.batch_size} x accum "
                      f"{cfg.train.grad_accum} x block {cfg.model.block_size} | eval: {val.n_windows} "
                      f"windows of {cfg.eval_block_size} ({val.n_tokens:,} tokens) in batches of "
                      f"{self.state.eval_batch_size} | loss {cfg.memory.loss}"
                      + (f" (chunk {cfg.memory.chunk_rows(rt.device_type)})" if cfg.memory.loss == "chunked" else "")
                      + (" | activation checkpointing" if cfg.memory.checkpointing else "")
                      + (f" | micro-batch split in {split}" if split > 1 else "")
                      + (f" | {world.size} processes, {cfg.parallel.mode}" if world.active else ""))
        for note in notes:
            self.log.info(f"note: {note}")

    # ----------------------------------------------------------------------------- step

    def step(self) -> bool:
        """One optimizer step at the scheduled learning rate, and its records. False when the
        run must stop (see after_skip)."""
        cfg, state = self.cfg, self.state
        lr = lr_at(state.step, cfg)
        self.training.set_lr(lr)
        if cfg.train.muon_momentum_warmup:
            self.training.set_momentum(momentum_at(state.step, cfg))
        t0 = time.perf_counter()
        loss, norm, skipped = self._step_with_backoff()
        state.step += 1
        state.tokens += cfg.tokens_per_step
        self.trained_steps += 1
        self.clock.steps += 1
        self.stats.nonfinite = self.stats.nonfinite + 1 if skipped else 0
        if skipped and not self.after_skip(loss):
            return False
        if self.trained_steps == 1:  # warm-up and measurement: timed apart
            self.rt.synchronize()
            self.clock.first = time.perf_counter() - t0
            self.clock.restart()
        if state.step % cfg.log.interval == 0 or state.step == cfg.train.max_steps:
            loss_v = loss.item()
            dt = self.clock.lap(self.stats, cfg.tokens_per_step)
            report.record_train(state, self.stats, loss_v, norm, lr, dt, cfg, self.log, self.wandb_run,
                                cards=self.world.size)
        self.log.advance(state.step - self.start_step, report.loss_status(self.stats))
        self.faults.maybe_kill(state.step, "killafter")
        return True

    def _step_with_backoff(self):
        """The step's micro-batches, drawn once and kept: out of memory releases the attempt,
        doubles memory.micro_split and retries the same tokens with the same dropout masks."""
        cfg, state, tr, world = self.cfg, self.state, self.training, self.world
        data = [tr.batches.next_batch() for _ in range(cfg.train.grad_accum)]  # kept for retries
        data = data[world.rank::world.size]  # this process's share of the global stream
        check_tokens(data, cfg.model.vocab_size, f"training data in {tr.data.dir}")
        exchange: dict = {}  # what train_step shares with the other processes (see there)
        rng = rng_snapshot(self.rt)  # a retry draws the dropout masks the failed attempt drew
        while True:
            exchange.clear()
            if world.active:
                exchange["want_stop"] = self.stats.stop_requested
            ok, out = attempt(lambda: self.meter.measure(
                lambda: tr.step(data, split=state.micro_split, step=state.step, exchange=exchange),
                tr.model, tr.optimizer, self.trained_steps < 2), cfg.memory.recover)  # step 2 has AdamW state
            if ok:
                self.stats.peaks.record("train", *out[1:])
                self.stats.stop_shared = exchange.get("stop", False)
                return out[0]
            if exchange.get("updated"):  # memory.fused_backward: a retry would update those twice
                raise OutOfMemory(
                    f"out of memory in training at step {state.step} after the fused backward had "
                    f"updated some weights, so the step cannot be retried; resume from the last "
                    f"checkpoint in smaller pieces: fitgpt train --resume {self.run_dir} "
                    f"--memory.micro_split={state.micro_split * 2} (or see `fitgpt plan`)")
            # FSDP2 gathers parameters once per slice: a process that alone used more slices
            # would make more collectives than the others, so it cannot back off alone either
            if exchange.get("began") or tr.fsdp:
                why = ("under FSDP2 every slice gathers parameters with the others" if tr.fsdp else
                       "it had begun the gradient all-reduce with the others")
                self.stranded("training", why, f"--memory.micro_split={state.micro_split * 2}")
            if -(-cfg.train.batch_size // state.micro_split) <= 1:
                self.give_up("training", "micro-batch 1")
            self.backoff("training", "micro_split", state.micro_split, state.micro_split * 2)
            state.micro_split *= 2
            rng_restore(self.rt, rng)

    # ----------------------------------------------------------------------------- evaluate

    def evaluate(self, last_step: bool) -> bool:
        """Evaluate, record, and save after it (see after_eval). False when the run must stop."""
        self.clock.lap(self.stats, self.cfg.tokens_per_step)  # steps since the last log line count
        res = self._eval_with_backoff(measure=self.trained_steps > 0 or self.cfg.train.eval_only)
        report.record_eval(self.state, self.stats, res, self.log, self.wandb_run)
        if not self.after_eval(res, last_step):
            return False
        self.clock.restart()  # timing excludes evaluation
        return True

    def _eval_with_backoff(self, measure: bool) -> EvalResult:
        """Out of memory halves the evaluation batch and retries: the windows, and so the loss,
        stay the same."""
        state, tr = self.state, self.training
        while True:
            ok, out = attempt(lambda: self.meter.measure(
                lambda: tr.evaluate(self.val_share, state.eval_batch_size, step=state.step,
                                    vocab=self.cfg.model.vocab_size),
                tr.model, tr.optimizer, measure), self.cfg.memory.recover)
            if ok:
                self.stats.peaks.record("eval", *out[1:])
                return self._all_windows(out[0])
            if tr.fsdp:  # every forward gathers parameters with the other processes
                self.stranded("evaluation", "under FSDP2 every forward gathers parameters with the others",
                              f"--eval.batch_size={max(1, state.eval_batch_size // 2)}")
            if state.eval_batch_size == 1:
                self.give_up("evaluation", "eval batch size 1")
            self.backoff("evaluation", "eval_batch_size", state.eval_batch_size, state.eval_batch_size // 2)
            state.eval_batch_size //= 2

    def _all_windows(self, res: EvalResult) -> EvalResult:
        """This process's result, or, when the processes split the windows, their sums."""
        if self.val_share is self.val:
            return res
        nats, tokens, nbytes = distributed.all_reduce_sum(
            [res.loss * res.tokens, res.tokens, res.target_bytes or 0], self.rt.device)
        bpb = bits_per_byte(nats, int(nbytes)) if res.bpb is not None else None
        return dataclasses.replace(res, loss=nats / tokens, tokens=int(tokens), bpb=bpb,
                                   target_bytes=int(nbytes) or None)

    # ----------------------------------------------------------------------------- checkpoint

    def checkpoint(self) -> bool:
        """Save the TrainState; refused (False: the run must stop) when the weights are not
        finite, so that a run never saves them nor prunes a good checkpoint to make room for them."""
        if not weights_finite(self.training.model, self.rt.device):
            return self.weights_gone()
        state = self.state
        sd = state.state_dict()  # every process: FSDP gathers
        if self.world.is_main:
            path = save_checkpoint(self.run_dir, sd, state.step, self.cfg.log.keep)
            state.saved, state.saved_step = str(path), state.step
            self.log.info(f"saved {path}")
        distributed.barrier(self.world)
        return True

    def after_eval(self, res: EvalResult, last_step: bool) -> bool:
        """Save after an evaluation (always, or when val loss improved), never when val loss is
        not finite. False when the run must stop: its weights are no longer finite."""
        cfg, state = self.cfg, self.state
        if cfg.train.eval_only:
            return True
        if not math.isfinite(res.loss):
            if not weights_finite(self.training.model, self.rt.device):
                return self.weights_gone()
            self.log.info(f"val loss is not finite at step {state.step}: no checkpoint; {state.last_saved()}")
        elif (cfg.log.always_save or res.loss <= state.best_val) and (state.step > self.start_step or last_step):
            if not self.checkpoint():
                return False
            self.faults.maybe_kill(state.step)
        return True

    def after_skip(self, loss: torch.Tensor) -> bool:
        """A skipped step: say why. False when the run must stop: its weights are no longer finite
        (not saved), or train.max_nonfinite steps in a row were skipped (saved: they are finite)."""
        cfg, state, skipped = self.cfg, self.state, self.stats.nonfinite
        what = "loss" if not math.isfinite(loss.item()) else "gradient norm"
        self.log.info(f"step {state.step}: non-finite {what}, optimizer step skipped "
                      f"({skipped} in a row, limit {cfg.train.max_nonfinite})")
        if not weights_finite(self.training.model, self.rt.device):
            return self.weights_gone()
        if skipped < cfg.train.max_nonfinite:
            return True
        self.checkpoint()
        self.log.info(f"stopping: {skipped} optimizer steps in a row skipped; the weights, "
                      f"unchanged since step {state.step - skipped}, are in the checkpoint of step "
                      f"{state.step}. {self.advice()}")
        return False

    def advice(self) -> str:
        t = self.cfg.train
        return (f"Lower --train.lr (now {t.lr:g}), keep --train.grad_clip above 0 (now "
                f"{t.grad_clip:g}), or try --train.dtype=bfloat16")

    def weights_gone(self) -> bool:
        self.log.info(f"stopping at step {self.state.step}: the weights are no longer finite, so they "
                      f"are not saved; {self.state.last_saved()}. {self.advice()}")
        return False

    def stop_save(self) -> bool:
        """The checkpoint of a stop; after a failed log write, one line that says both."""
        try:
            return self.checkpoint()
        except CheckpointError as e:
            if self.log.write_error is None:
                raise
            raise FitError(f"{self.write_failure()}; {e}") from None

    def write_failure(self) -> str:
        name, err = self.log.write_error
        return f"could not write {self.run_dir / name}: {err.strerror or err}"

    # ----------------------------------------------------------------------------- out of memory

    def backoff(self, phase: str, what: str, old: int, new: int) -> None:
        release(self.training.model, self.training.optimizer, self.rt)  # outside the except block: the frames are gone
        self.stats.backoffs.append({"step": self.state.step, "phase": phase, what: [old, new]})
        msg = f"out of memory in {phase} at step {self.state.step}: {what} {old} -> {new}, retrying"
        if self.world.is_main:
            self.log.info(msg)
        else:  # only rank 0 logs; a back-off elsewhere is still worth a line
            print(f"[process {self.world.rank}] {msg}", file=sys.stderr, flush=True)

    def stranded(self, phase: str, why: str, setting: str) -> None:
        """Out of memory in one process where retrying alone would break the collectives with
        the others (they would wait in one forever), so this process stops the job."""
        w = self.world
        raise OutOfMemory(
            f"out of memory in {phase} at step {self.state.step} in process {w.rank} of {w.size}; "
            f"{why}, so one process cannot retry it alone and the job stops; resume from the last "
            f"checkpoint with less memory per process: fitgpt train --resume {self.run_dir} {setting} "
            f"(or see `fitgpt plan`)")

    def give_up(self, phase: str, size: str) -> None:
        hint = best_suggestion(self.cfg)
        hint = f"; {hint}" if hint else "; see `fitgpt plan`"
        w, run_dir = self.world, self.run_dir
        if w.active:  # the others may wait in a collective: no checkpoint (its barrier would hang)
            raise OutOfMemory(f"out of memory in {phase} even at {size} in process {w.rank} of "
                              f"{w.size}; the job stops, its last checkpoint is in {run_dir}" + hint)
        saved = self.checkpoint()
        raise OutOfMemory(f"out of memory in {phase} even at {size}; stopped with a checkpoint in "
                          f"{run_dir}" + hint if saved else
                          f"out of memory in {phase} even at {size}; stopped; {self.state.last_saved()}" + hint)

    # ----------------------------------------------------------------------------- finish

    def finish(self, status: str) -> dict[str, Any]:
        """The closing lines, summary.json, the sample and plots; the lock released."""
        cfg, state, run_dir = self.cfg, self.state, self.run_dir
        if self.log.write_error is not None:
            raise FitError(f"{self.write_failure()}; stopped at step {state.step}: {state.last_saved()}; "
                           f"free space, then resume with: fitgpt train --resume {run_dir}")
        if status == "stopped":
            self.log.info(f"stopped at step {state.step}; resume with: fitgpt train --resume {run_dir}")
        self.clock.lap(self.stats, cfg.tokens_per_step)  # steps after the last log line or evaluation
        summary = report.summary(cfg, state, self.stats, self.rt, run_dir, status, untracked=self.cpu_fsdp)
        if self.world.is_main:
            if cfg.eval.sample_tokens and status == "completed" and not self.training.fsdp:
                text = report.sample_text(self.training.model, cfg, self.rt)
                if text is not None:
                    summary["sample"] = text
            report.write_json(run_dir / "summary.json", summary)
            report.finish_plots(run_dir)
        if self.wandb_run is not None:
            self.wandb_run.finish()
        distributed.barrier(self.world)
        if self.lock is not None:
            self.lock.release()
        return summary
