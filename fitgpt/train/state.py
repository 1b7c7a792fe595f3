"""What a run carries from step to step: the state a checkpoint holds, and what it reports.

`TrainState` is the checkpoint: `state_dict()` is the dict saved to disk and `load_state_dict`
reads it back (also nanoGPT's `ckpt.pt`, which counts `iter_num` and keys AdamW's state by
index). No other module of fitgpt.train spells a checkpoint key. `RunStats` is what this
process measured and reports (validation losses, timing, peaks, back-off events); it is not
saved, since a resumed run measures afresh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fitgpt import __version__
from fitgpt.config.load import to_dict
from fitgpt.config.schema import Config
from fitgpt.model.runtime import clean_state_dict
from fitgpt.train import distributed, optim
from fitgpt.train.measure import PhasePeaks
from fitgpt.train.rng import rng_state, set_rng_state


@dataclass
class TrainState:
    """Progress and back-off, and the objects whose state a checkpoint saves with them."""

    model: Any = None  # the plain GPT (not the DDP or compiled wrapper): its parameter names
    optimizer: Any = None
    scaler: Any = None  # the float16 GradScaler (disabled, and still saved, for other dtypes)
    batches: Any = None  # the training sampler: its position is saved
    config: Config | None = None  # the resolved config, saved so that a resume knows the run
    fsdp: bool = False  # the model is sharded: saving gathers it, loading shards it
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # training tokens seen
    best_val: float = math.inf
    micro_split: int = 1  # slices per micro-batch (out-of-memory back-off)
    eval_batch_size: int = 1  # evaluation batch (out-of-memory back-off)
    saved: str | None = None  # the newest checkpoint, saved or resumed from (finite weights)
    saved_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint. Under FSDP the model and optimizer state are gathered whole (a
        collective: every process calls this), and AdamW's state is keyed by parameter name, so
        that a run saved in one mode or world size resumes in another. The weights are fp32
        and AdamW's state is tagged with its format (fitgpt.train.optim)."""
        return {"model": optim.model_state(self.model, self.optimizer, self.fsdp),
                "optimizer": optim.optimizer_state(self.model, self.optimizer),
                optim.FORMAT_KEY: optim.state_format(self.config),
                "scaler": self.scaler.state_dict(), "step": self.step, "tokens": self.tokens,
                "best_val_loss": self.best_val, "config": to_dict(self.config),
                "sampler": self.batches.state_dict(), "rng": rng_state(), "version": __version__,
                "backoff": {"micro_split": self.micro_split, "eval_batch_size": self.eval_batch_size}}

    def load_state_dict(self, d: dict[str, Any], optimizer: bool = True) -> list[str]:
        """Continue from checkpoint `d` (fitgpt's or nanoGPT's); returns notes for the log.
        Without `optimizer` (an eval-only run never steps), AdamW's state is not loaded: its
        moments would be memory the plan omits. The back-off only ever shrinks what the config
        asks for: a run that needed smaller pieces keeps them."""
        notes = []
        if optimizer and "optimizer" in d and self.config is not None:
            optim.check_format(d, self.config)  # another format: refused, never reinterpreted
        weights = clean_state_dict(d["model"])
        distributed.load_full_model_state(self.model, weights, self.fsdp)
        optim.load_model_extra(self.optimizer, weights)  # offloaded fp32 masters
        if (optimizer and "optimizer" in d
                and not optim.load_optimizer_state(self.model, self.optimizer, d["optimizer"])):
            notes.append("the checkpoint's optimizer state is index-keyed (nanoGPT): FSDP starts "
                         "with a fresh AdamW state")
        for obj, key in ((self.scaler, "scaler"), (self.batches, "sampler")):
            if key in d:
                obj.load_state_dict(d[key])
        if "rng" in d:
            set_rng_state(d["rng"])
        self.step = int(d.get("step", d.get("iter_num", 0)))
        self.tokens = int(d.get("tokens", 0))
        self.best_val = float(d.get("best_val_loss", math.inf))
        back = d.get("backoff", {})
        self.micro_split = max(self.micro_split, int(back.get("micro_split", 1)))
        self.eval_batch_size = min(self.eval_batch_size,
                                   int(back.get("eval_batch_size", self.eval_batch_size)))
        self.saved, self.saved_step = d.get("_path"), self.step  # `_path`: set by the loader
        return notes

    @staticmethod
    def step_of(d: dict[str, Any]) -> int | None:
        """The step a fitgpt checkpoint was saved at; None for nanoGPT's (it counts iter_num)."""
        return d.get("step")

    def last_saved(self) -> str:
        return (f"the last checkpoint is {self.saved} (step {self.saved_step})" if self.saved
                else "no checkpoint was saved")


@dataclass
class RunStats:
    """What this process measured and reports (fitgpt.report.metrics); not saved."""

    last_val: float | None = None
    first_val: float | None = None
    train_seconds: float = 0.0  # timed training (first step and evaluations excluded)
    train_tokens_timed: int = 0
    peaks: PhasePeaks = field(default_factory=PhasePeaks)
    backoffs: list = field(default_factory=list)  # one dict per out-of-memory back-off
    nonfinite: int = 0  # consecutive skipped steps (non-finite loss or gradient norm)
    stop_requested: bool = False
    stop_shared: bool = False  # some process asked to stop (known after each step's all-reduce)
