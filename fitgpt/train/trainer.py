"""The training loop, as plain functions.

`run(cfg)` sets up (runtime, data, model, optimizer), then loops: evaluate at every
`eval.interval` and at the last step (then checkpoint), take one optimizer step of `grad_accum`
micro-batches, log every `log.interval`. A `last_step` flag makes the final evaluation and save
always happen. Memory of training and evaluation is measured per phase: on CUDA with
`max_memory_allocated`, on CPU with the storage tracker (first two steps, first evaluation after
training began). Out of memory in either phase backs off and retries the same data.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fitgpt import __version__
from fitgpt.config.load import summary_lines, to_dict, to_toml
from fitgpt.config.schema import Config
from fitgpt.data.manifest import check_token_ids
from fitgpt.data.shards import TrainBatches, ValWindows, find_splits
from fitgpt.errors import CheckpointError, DataError, FitError
from fitgpt.eval.evaluate import EvalResult, bits_per_byte, evaluate
from fitgpt.fileio import write_text
from fitgpt.model.runtime import Runtime, build_model, clean_state_dict, resolve_data_dir, resolve_runtime
from fitgpt.report import metrics as report
from fitgpt.report.log import RunLog, drop_superseded
from fitgpt.store import rundir
from fitgpt.store.checkpoint import save_checkpoint
from fitgpt.train import distributed, faults
from fitgpt.train.guard import grad_norm, weights_finite
from fitgpt.train.measure import Meter, PhasePeaks
from fitgpt.train.parallelize import maybe_compile
from fitgpt.train.recover import attempt, best_suggestion, release
from fitgpt.train.rng import rng_restore, rng_snapshot, rng_state, set_rng_state

__all__ = ["Meter", "PhasePeaks", "lr_at", "run", "train_step"]


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


def host_values(t: torch.Tensor) -> list[float]:
    """The step's one device-to-host copy (a sync on CUDA); bench/gpu_speed.py's `sync` part
    replaces it to time a step without it."""
    return t.tolist()


def train_step(model, optimizer, scaler, batches, grad_accum: int, grad_clip: float, rt: Runtime,
               split: int = 1, data: list | None = None, step: int = 0, exchange: dict | None = None):
    """One optimizer step over grad_accum micro-batches, each processed as `split` slices (the
    out-of-memory back-off: the same tokens, a smaller peak). Returns (mean loss, grad norm,
    skipped) with the loss and norm as device tensors; nothing else survives the call.
    A non-finite loss or gradient norm skips the optimizer step (the GradScaler's own skip with
    float16); both are read in one host sync (fitgpt.train.guard).
    With several processes, `exchange` carries what the step shares besides the gradients:
    in, "want_stop" (this process's wish to stop, folded into the loss's all-reduce, so sharing
    it costs no extra sync); out, "stop" (any process's wish) and "began" (DDP's gradient
    all-reduce started: out of memory after it cannot be retried by one process alone)."""
    data = data if data is not None else [batches.next_batch() for _ in range(grad_accum)]
    grad_accum = len(data)  # this process's share of the step's micro-batches
    loss_sum = torch.zeros((), device=rt.device)
    pieces = [(i, xs, ys) for i, (xb, yb) in enumerate(data)
              for xs, ys in zip(xb.tensor_split(split), yb.tensor_split(split)) if xs.size(0)]
    for k, (i, xs, ys) in enumerate(pieces):
        n = data[i][0].size(0)
        faults.maybe_oom("train", step, xs.size(0))
        faults.maybe_raise(step)
        x, y = rt.to_device(xs, ys)
        last = k == len(pieces) - 1
        with distributed.no_sync(model, last=last):
            with rt.autocast():
                loss = model(x, y)
            if faults.nan_at(step):
                loss = loss * float("nan")
            weight = xs.size(0) / n / grad_accum  # slices of a micro-batch weigh by their size
            if exchange is not None and last and distributed.is_ddp(model):
                exchange["began"] = True
            faults.maybe_oom("backward", step, xs.size(0))
            scaler.scale(loss * weight).backward()
        loss_sum += loss.detach() * (xs.size(0) / n)
        del x, y, loss
    if faults.infgrad_at(step):
        next(p for p in model.parameters() if p.grad is not None).grad.add_(float("inf"))
    norm = grad_norm(model, optimizer, scaler, grad_clip)  # clipped in place when grad_clip > 0
    mean = loss_sum / grad_accum
    share_stop = exchange is not None and "want_stop" in exchange
    if share_stop:
        mean = torch.stack([mean, mean.new_tensor(float(exchange["want_stop"]))])
    mean = distributed.mean_across(mean)  # NaN on any process: NaN on all
    loss = mean[0] if share_stop else mean
    # one sync per optimizer step: the loss, the wish to stop and the gradient norm together
    host = host_values(torch.cat([mean.reshape(-1)] + ([norm.reshape(1).to(mean)] if norm is not None else [])))
    if share_stop:
        exchange["stop"] = host[1] > 0
    # with float16 a non-finite gradient is the GradScaler's routine overflow: it skips that step
    skipped = not math.isfinite(host[0]) or (
        norm is not None and not scaler.is_enabled() and not math.isfinite(host[-1]))
    to_none = not distributed.grads_live_in_buckets(model)
    if skipped and not scaler.is_enabled():
        optimizer.zero_grad(set_to_none=to_none)
        return loss, norm, True
    scaler.step(optimizer)  # with float16, skips steps whose gradients are not finite
    scaler.update()
    optimizer.zero_grad(set_to_none=to_none)
    if faults.nanweights_at(step):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    return loss, norm, skipped


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
    stop_shared: bool = False  # some process asked to stop (known after each step's all-reduce)
    split: int = 1  # slices per micro-batch (out-of-memory back-off)
    eval_batch: int = 1
    nonfinite: int = 0  # consecutive skipped steps (non-finite loss or gradient norm)
    backoffs: list = field(default_factory=list)
    saved: str | None = None  # the newest checkpoint (saved or resumed from): finite weights
    saved_step: int | None = None


def last_saved(state: State) -> str:
    return (f"the last checkpoint is {state.saved} (step {state.saved_step})" if state.saved
            else "no checkpoint was saved")


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


class OutOfMemory(FitError):
    """Out of memory even at the smallest size: the run stopped with a checkpoint."""


def check_tokens(data: list, vocab: int, where: str) -> None:
    top = max(int(t.max()) for pair in data for t in pair)
    if top >= vocab:
        raise DataError(f"{where}: token id {top} >= model.vocab_size {vocab}; the shards were made "
                        f"with a larger vocabulary: set --model.vocab_size={top + 1} or re-prepare them")


def run(cfg: Config, ckpt: dict | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """Train (or, with train.eval_only, evaluate) and return the run summary."""
    world, device = distributed.init(cfg.train.device, cfg.parallel.backend)
    if world.active:
        distributed.check_divisible(cfg.train.grad_accum, world)
        cfg.parallel.nproc = world.size  # the planner's per-process figures follow the real world
    lock = None
    if world.main:  # only rank 0 writes the run folder, so only rank 0 locks it (fitgpt.store.rundir)
        run_dir, lock = rundir.open_run_dir(cfg, run_dir)
        if ckpt is not None:
            rundir.check_not_moved(run_dir, ckpt.get("step"), lock)
    run_dir = distributed.broadcast_object(run_dir, world)
    rt = resolve_runtime(device, cfg.train.dtype)
    data_dir = resolve_data_dir(cfg.data.dir) if world.main else None
    data_dir = distributed.broadcast_object(data_dir, world)  # the demo is prepared once
    train_files, val_files = find_splits(data_dir)
    # every shard's largest id (cached), so a bad id stops the run before step 0, not at a random step
    check_token_ids(train_files + val_files, cfg.model.vocab_size, resuming=ckpt is not None)
    batches = TrainBatches(train_files, cfg.model.block_size, cfg.train.batch_size, cfg.data.seed)
    fsdp = world.active and cfg.parallel.mode == "fsdp"
    val = ValWindows(val_files, cfg.eval_block_size, cfg.eval_windows)
    val_share = val.shard(world.rank, world.size) if world.active and not fsdp else val

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, rt.device, init=ckpt is None)
    if ckpt is not None:
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    wrapped = distributed.wrap(model, cfg.parallel.mode, world, rt)
    optimizer = model.configure_optimizer(cfg.train.weight_decay, cfg.train.lr,
                                          (cfg.train.beta1, cfg.train.beta2), rt.device_type)
    scaler = distributed.grad_scaler(rt, fsdp)  # float16 only; sharded under FSDP2
    state = State(split=cfg.memory.micro_split, eval_batch=cfg.eval_batch_size)
    resume_notes = []
    if ckpt is not None:
        # an eval-only run never steps or saves: AdamW's moments would be memory the plan omits
        if ("optimizer" in ckpt and not cfg.train.eval_only
                and not distributed.load_optimizer_state(model, optimizer, ckpt["optimizer"])):
            resume_notes.append("the checkpoint's optimizer state is index-keyed (nanoGPT): FSDP "
                                "starts with a fresh AdamW state")
        for obj, key in ((scaler, "scaler"), (batches, "sampler")):
            if key in ckpt:
                obj.load_state_dict(ckpt[key])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        state.step = int(ckpt.get("step", ckpt.get("iter_num", 0)))
        state.tokens = int(ckpt.get("tokens", 0))
        state.best_val = float(ckpt.get("best_val_loss", float("inf")))
        back = ckpt.get("backoff", {})
        state.split = max(state.split, int(back.get("micro_split", 1)))
        state.eval_batch = min(state.eval_batch, int(back.get("eval_batch_size", state.eval_batch)))
        state.saved, state.saved_step = ckpt.get("_path"), state.step
        ckpt = None  # drop the references: the tensors now live in the model and optimizer
    fwd = maybe_compile(wrapped, cfg.train.compile)
    eval_model = model if world.active and not fsdp else fwd  # DDP: no collectives in eval

    if world.main:
        write_text(run_dir / "config.toml", to_toml(cfg))
    total = cfg.train.max_steps
    if state.saved is not None and world.main:  # resumed: the killed run's later records go
        evals_again = state.step % cfg.eval.interval == 0 or state.step >= total or cfg.train.eval_only
        drop_superseded(run_dir / "metrics.jsonl", state.step, evals_again)
    log = RunLog(run_dir, max(0, total - state.step), cfg.log.progress)
    wandb_run = report.start_trackers(cfg, run_dir) if world.main else None
    # FSDP2 allocates and frees its gathered parameters by resizing storages in place, which the
    # CPU storage tracker cannot see: on the CPU, FSDP runs are not measured rather than mismeasured
    cpu_fsdp = fsdp and rt.device_type != "cuda"
    meter = Meter(rt, cfg.memory.track and not cpu_fsdp)
    for line in summary_lines(cfg):
        log.info(line)
    log.info(f"fitgpt {__version__} | {rt.device} {str(rt.dtype).replace('torch.', '')} | "
             f"{model.num_params() / 1e6:.2f}M parameters ({model.num_params(False) / 1e6:.2f}M "
             f"without embeddings) | run folder {run_dir}")
    log.info(f"tokens per step {cfg.tokens_per_step:,} = batch {cfg.train.batch_size} x accum "
             f"{cfg.train.grad_accum} x block {cfg.model.block_size} | eval: {val.n_windows} "
             f"windows of {cfg.eval_block_size} ({val.n_tokens:,} tokens) in batches of "
             f"{state.eval_batch} | loss {cfg.memory.loss}"
             + (f" (chunk {cfg.memory.chunk_rows(rt.device_type)})" if cfg.memory.loss == "chunked" else "")
             + (" | activation checkpointing" if cfg.memory.checkpointing else "")
             + (f" | micro-batch split in {state.split}" if state.split > 1 else "")
             + (f" | {world.size} processes, {cfg.parallel.mode}" if world.active else ""))
    for note in resume_notes:
        log.info(f"note: {note}")

    def checkpoint() -> bool:
        """Save a checkpoint; refused (False: the run must stop) when the weights are not finite,
        so that a run never saves them nor prunes a good checkpoint to make room for them."""
        if not weights_finite(model, rt.device):
            return weights_gone()
        st = {"model": distributed.full_model_state(model, fsdp),
              "optimizer": distributed.full_optimizer_state(model, optimizer),
              "scaler": scaler.state_dict(), "step": state.step, "tokens": state.tokens,
              "best_val_loss": state.best_val, "config": to_dict(cfg),
              "sampler": batches.state_dict(), "rng": rng_state(), "version": __version__,
              "backoff": {"micro_split": state.split, "eval_batch_size": state.eval_batch}}
        if world.main:
            path = save_checkpoint(run_dir, st, state.step, cfg.log.keep)
            state.saved, state.saved_step = str(path), state.step
            log.info(f"saved {path}")
        distributed.barrier(world)
        return True

    def backoff(phase: str, what: str, old: int, new: int) -> None:
        release(model, optimizer, rt)  # called outside the except block: the frames are gone
        state.backoffs.append({"step": state.step, "phase": phase, what: [old, new]})
        msg = f"out of memory in {phase} at step {state.step}: {what} {old} -> {new}, retrying"
        if world.main:
            log.info(msg)
        else:  # only rank 0 logs; a back-off elsewhere is still worth a line
            print(f"[process {world.rank}] {msg}", file=sys.stderr, flush=True)

    def stranded(phase: str, why: str, setting: str) -> None:
        """Out of memory in one process where retrying alone would break the collectives with
        the others (they would wait in one forever), so this process stops the job."""
        raise OutOfMemory(
            f"out of memory in {phase} at step {state.step} in process {world.rank} of {world.size}; "
            f"{why}, so one process cannot retry it alone and the job stops; resume from the last "
            f"checkpoint with less memory per process: fitgpt train --resume {run_dir} {setting} "
            f"(or see `fitgpt plan`)")

    def give_up(phase: str, size: str) -> None:
        hint = best_suggestion(cfg)
        hint = f"; {hint}" if hint else "; see `fitgpt plan`"
        if world.active:  # the others may wait in a collective: no checkpoint (its barrier would hang)
            raise OutOfMemory(f"out of memory in {phase} even at {size} in process {world.rank} of "
                              f"{world.size}; the job stops, its last checkpoint is in {run_dir}" + hint)
        saved = checkpoint()
        raise OutOfMemory(f"out of memory in {phase} even at {size}; stopped with a checkpoint in "
                          f"{run_dir}" + hint if saved else
                          f"out of memory in {phase} even at {size}; stopped; {last_saved(state)}" + hint)

    def do_eval(measure: bool) -> EvalResult:
        while True:
            ok, out = attempt(lambda: meter.measure(
                lambda: evaluate(eval_model, val_share, state.eval_batch, rt, step=state.step,
                                 vocab=cfg.model.vocab_size), model, optimizer, measure),
                cfg.memory.recover)
            if ok:
                state.peaks.record("eval", *out[1:])
                res = out[0]
                if val_share is not val:  # sum the shares of all processes
                    nats, tokens, nbytes = distributed.all_reduce_sum(
                        [res.loss * res.tokens, res.tokens, res.target_bytes or 0], rt.device)
                    bpb = bits_per_byte(nats, int(nbytes)) if res.bpb is not None else None
                    res = dataclasses.replace(res, loss=nats / tokens, tokens=int(tokens), bpb=bpb,
                                              target_bytes=int(nbytes) or None)
                return res
            if fsdp:  # every forward gathers parameters with the other processes
                stranded("evaluation", "under FSDP2 every forward gathers parameters with the others",
                         f"--eval.batch_size={max(1, state.eval_batch // 2)}")
            if state.eval_batch == 1:
                give_up("evaluation", "eval batch size 1")
            backoff("evaluation", "eval_batch_size", state.eval_batch, state.eval_batch // 2)
            state.eval_batch //= 2

    def do_step():
        data = [batches.next_batch() for _ in range(cfg.train.grad_accum)]  # kept for retries
        data = data[world.rank::world.size]  # this process's share of the global stream
        check_tokens(data, cfg.model.vocab_size, f"training data in {data_dir}")
        exchange: dict = {}  # what train_step shares with the other processes (see there)
        rng = rng_snapshot(rt)  # a retry draws the dropout masks the failed attempt drew
        while True:
            exchange.clear()
            if world.active:
                exchange["want_stop"] = state.stop_requested
            ok, out = attempt(lambda: meter.measure(
                lambda: train_step(fwd, optimizer, scaler, batches, cfg.train.grad_accum,
                                   cfg.train.grad_clip, rt, state.split, data, state.step, exchange),
                model, optimizer, trained_steps < 2), cfg.memory.recover)  # step 2 has AdamW state
            if ok:
                state.peaks.record("train", *out[1:])
                state.stop_shared = exchange.get("stop", False)
                return out[0]
            # FSDP2 gathers parameters once per slice: a process that alone used more slices
            # would make more collectives than the others, so it cannot back off alone either
            if exchange.get("began") or fsdp:
                why = ("under FSDP2 every slice gathers parameters with the others" if fsdp else
                       "it had begun the gradient all-reduce with the others")
                stranded("training", why, f"--memory.micro_split={state.split * 2}")
            if -(-cfg.train.batch_size // state.split) <= 1:
                give_up("training", "micro-batch 1")
            backoff("training", "micro_split", state.split, state.split * 2)
            state.split *= 2
            rng_restore(rt, rng)

    advice = (f"Lower --train.lr (now {cfg.train.lr:g}), keep --train.grad_clip above 0 (now "
              f"{cfg.train.grad_clip:g}), or try --train.dtype=bfloat16")

    def weights_gone() -> bool:
        log.info(f"stopping at step {state.step}: the weights are no longer finite, so they are not "
                 f"saved; {last_saved(state)}. {advice}")
        return False

    def after_eval(res: EvalResult, last_step: bool) -> bool:
        """Save after an evaluation (always, or when val loss improved), never when val loss is
        not finite. False when the run must stop: its weights are no longer finite."""
        if cfg.train.eval_only:
            return True
        if not math.isfinite(res.loss):
            if not weights_finite(model, rt.device):
                return weights_gone()
            log.info(f"val loss is not finite at step {state.step}: no checkpoint; {last_saved(state)}")
        elif (cfg.log.always_save or res.loss <= state.best_val) and (state.step > start_step or last_step):
            if not checkpoint():
                return False
            faults.maybe_kill(state.step)
        return True

    def after_skip(loss: torch.Tensor) -> bool:
        """A skipped step: say why. False when the run must stop: its weights are no longer finite
        (not saved), or train.max_nonfinite steps in a row were skipped (saved: they are finite)."""
        what = "loss" if not math.isfinite(loss.item()) else "gradient norm"
        log.info(f"step {state.step}: non-finite {what}, optimizer step skipped "
                 f"({state.nonfinite} in a row, limit {cfg.train.max_nonfinite})")
        if not weights_finite(model, rt.device):
            return weights_gone()
        if state.nonfinite < cfg.train.max_nonfinite:
            return True
        checkpoint()
        log.info(f"stopping: {state.nonfinite} optimizer steps in a row skipped; the weights, "
                 f"unchanged since step {state.step - state.nonfinite}, are in the checkpoint of step "
                 f"{state.step}. {advice}")
        return False

    def write_failure() -> str:
        name, err = log.write_error
        return f"could not write {run_dir / name}: {err.strerror or err}"

    def stop_save() -> bool:
        """The checkpoint of a stop; after a failed log write, one line that says both."""
        try:
            return checkpoint()
        except CheckpointError as e:
            if log.write_error is None:
                raise
            raise FitError(f"{write_failure()}; {e}") from None

    trained_steps, start_step, status = 0, state.step, "completed"
    window_t0, window_steps, first_dt = time.perf_counter(), 0, 0.0
    tps = cfg.tokens_per_step
    try:
        with _StopFlag(state, log):
            while True:
                if faults.stop_at(state.step) or log.write_error is not None:  # disk full: save, stop
                    state.stop_requested = True
                # with several processes, the wish to stop travels with each step's loss, so that
                # all stop before the same step (one stopping alone would hang the others)
                stop = state.stop_shared if world.active else state.stop_requested
                if stop and not cfg.train.eval_only:
                    status = "stopped" if stop_save() else "diverged"
                    break
                last_step = state.step >= total or cfg.train.eval_only
                if state.step % cfg.eval.interval == 0 or last_step:
                    res = do_eval(measure=trained_steps > 0 or cfg.train.eval_only)
                    report.record_eval(state, res, log, wandb_run)
                    if not after_eval(res, last_step):
                        status = "diverged"
                        break
                    window_t0, window_steps = time.perf_counter(), 0  # timing excludes eval
                if last_step:
                    break
                lr = lr_at(state.step, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                t0 = time.perf_counter()
                loss, norm, skipped = do_step()
                state.step += 1
                state.tokens += tps
                trained_steps += 1
                window_steps += 1
                state.nonfinite = state.nonfinite + 1 if skipped else 0
                if skipped and not after_skip(loss):
                    status = "diverged"
                    break
                if trained_steps == 1:  # warm-up and measurement: timed apart
                    rt.synchronize()
                    first_dt = time.perf_counter() - t0
                    window_t0, window_steps = time.perf_counter(), 0
                if state.step % cfg.log.interval == 0 or state.step == total:
                    loss_v = loss.item()
                    now = time.perf_counter()
                    dt = (now - window_t0) / window_steps if window_steps else first_dt
                    if window_steps:
                        state.train_seconds += now - window_t0
                        state.train_tokens_timed += window_steps * tps
                    window_t0, window_steps = now, 0
                    report.record_train(state, loss_v, norm, lr, dt, cfg, log, wandb_run)
                log.advance(state.step - start_step, report.loss_status(state))
                faults.maybe_kill(state.step, "killafter")
    finally:
        log.close()
    if log.write_error is not None:
        raise FitError(f"{write_failure()}; stopped at step {state.step}: {last_saved(state)}; free "
                       f"space, then resume with: fitgpt train --resume {run_dir}")
    if status == "stopped":
        log.info(f"stopped at step {state.step}; resume with: fitgpt train --resume {run_dir}")
    summary = report.summary(cfg, state, model, rt, run_dir, status, untracked=cpu_fsdp)
    if world.main:
        if cfg.eval.sample_tokens and status == "completed" and not fsdp:
            text = report.sample_text(model, cfg, rt)
            if text is not None:
                summary["sample"] = text
        report.write_json(run_dir / "summary.json", summary)
        report.finish_plots(run_dir)
    if wandb_run is not None:
        wandb_run.finish()
    distributed.barrier(world)
    if lock is not None:
        lock.release()
    return summary
