"""One factory for the training step, so that what is verified and timed is what trains.

`build_training(cfg, world)` makes the runtime, the model (seeded), its DDP/FSDP2 wrapper and
compiled forward, the optimizer, the float16 GradScaler and the training batches, and returns
them with the step that runs on them (and the evaluation pass). `fitgpt train`
(fitgpt.train.trainer), `fitgpt plan --verify` (fitgpt.planner.verify) and `fitgpt bench`
(fitgpt.train.bench) all build their step here; the last two pass synthetic batches in (no data
files needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fitgpt.config.levers import fused_backward_refusal
from fitgpt.config.schema import Config
from fitgpt.data.manifest import check_token_ids
from fitgpt.data.shards import TrainBatches, find_splits
from fitgpt.errors import ConfigError
from fitgpt.eval.evaluate import EvalResult, evaluate
from fitgpt.model.gpt import GPT
from fitgpt.model.runtime import Runtime, build_model, enable_tf32, resolve_data_dir, resolve_runtime
from fitgpt.train import distributed
from fitgpt.train.distributed import World
from fitgpt.train.faults import NO_FAULTS, Faults
from fitgpt.train.fused import FusedBackward
from fitgpt.train.optim import make_optimizer
from fitgpt.train.parallelize import maybe_compile
from fitgpt.train.step import train_step


@dataclass
class DataFiles:
    """The shards of a prepared data folder."""

    dir: Path
    train: list[Path]
    val: list[Path]


def find_data(cfg: Config, world: World, resuming: bool) -> DataFiles:
    """The config's data folder (the demo is prepared once, by rank 0), with every shard's
    largest id checked (cached), so that a bad id stops the run before step 0, not at a random
    step."""
    data_dir = resolve_data_dir(cfg.data.dir) if world.is_main else None
    data_dir = distributed.broadcast_object(data_dir, world)
    train_files, val_files = find_splits(data_dir)
    check_token_ids(train_files + val_files, cfg.model.vocab_size, resuming=resuming)
    return DataFiles(data_dir, train_files, val_files)


@dataclass
class Training:
    """What a training step runs on, built once by `build_training`."""

    cfg: Config
    world: World
    rt: Runtime
    model: GPT  # the plain model: parameter names and state dicts
    forward: torch.nn.Module  # what the step calls: the model wrapped (DDP, FSDP2) and compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: Any  # TrainBatches, or synthetic batches with its next_batch()
    data: DataFiles | None = None  # where the batches come from; None when they were passed in
    faults: Faults = NO_FAULTS
    fused: FusedBackward | None = None  # memory.fused_backward: the updates made in backward

    @property
    def fsdp(self) -> bool:
        return self.world.active and self.cfg.parallel.mode == "fsdp"

    @property
    def eval_model(self) -> torch.nn.Module:
        """What evaluation calls: under DDP the plain model (no collectives in evaluation, whose
        windows each process splits itself), else the same forward as training."""
        return self.model if self.world.active and not self.fsdp else self.forward

    def set_lr(self, lr: float) -> None:
        """The scheduled learning rate; with train.optimizer=muon, Muon's groups get it scaled by
        muon_lr / lr (fitgpt.train.optim_muon)."""
        if hasattr(self.optimizer, "set_lr"):
            self.optimizer.set_lr(lr)
            return
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def set_momentum(self, momentum: float) -> None:
        """Muon's momentum this step (train.muon_momentum_warmup); nothing for AdamW."""
        if hasattr(self.optimizer, "set_momentum"):
            self.optimizer.set_momentum(momentum)

    def evaluate(self, val, batch_size: int, step: int = 0, vocab: int | None = None) -> EvalResult:
        """One pass over the validation windows `val` (fitgpt.eval.evaluate) with `eval_model`."""
        return evaluate(self.eval_model, val, batch_size, self.rt, step=step, vocab=vocab, faults=self.faults)

    def step(self, data: list | None = None, *, accum: int | None = None, split: int = 1,
             step: int = 0, exchange: dict | None = None):
        """One optimizer step (fitgpt.train.step.train_step): over `data`, this process's
        micro-batches, or else `accum` (default train.grad_accum) drawn from the batches."""
        t = self.cfg.train
        return train_step(self.forward, self.optimizer, self.scaler, self.batches,
                          accum if accum is not None else t.grad_accum, t.grad_clip, self.rt,
                          split, data, step, exchange, self.faults, self.fused)


def build_training(cfg: Config, world: World | None = None, batches: Any = None, *,
                   resuming: bool = False, compile: bool | None = None,
                   faults: Faults = NO_FAULTS, rt: Runtime | None = None) -> Training:
    """Everything one training step needs, for this process of `world` (default: one process).
    batches: None reads the config's data folder; verify and bench pass synthetic ones.
    resuming: the weights will come from a checkpoint (TrainState.load_state_dict), so they
    are not initialised. compile: None follows train.compile. rt: a runtime already resolved."""
    world = world if world is not None else World()
    rt = rt if rt is not None else resolve_runtime(world.device or cfg.train.device, cfg.train.dtype)
    enable_tf32(rt)
    check_fused_backward(cfg, world, rt)
    data = None
    if batches is None:
        data = find_data(cfg, world, resuming)
        batches = TrainBatches(data.train, cfg.model.block_size, cfg.train.batch_size, cfg.data.seed)
    fsdp = world.active and cfg.parallel.mode == "fsdp"
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, rt.device, init=not resuming)
    wrapped = distributed.wrap(model, cfg.parallel.mode, world, rt)
    t = cfg.train
    optimizer = make_optimizer(cfg, model, rt, world.size)  # memory.optimizer_state, offload_optimizer
    scaler = distributed.grad_scaler(rt, fsdp)  # float16 only; sharded under FSDP2
    forward = maybe_compile(wrapped, t.compile if compile is None else compile)
    fused = FusedBackward(model, optimizer) if cfg.memory.fused_backward else None  # its hooks
    return Training(cfg, world, rt, model, forward, optimizer, scaler, batches, data, faults, fused)


def check_fused_backward(cfg: Config, world: World, rt: Runtime) -> None:
    """memory.fused_backward refused, before anything is built, for what only the run knows
    (train.dtype=auto resolved to float16; processes started by torchrun)."""
    why = fused_backward_refusal(cfg, str(rt.dtype).replace("torch.", ""), world.size)
    if why:
        raise ConfigError(why)
