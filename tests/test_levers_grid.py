"""The memory levers together: on the CPU, `fitgpt plan --verify`'s measured peaks (the storage
tracker around the step `fitgpt train` runs) agree with the planner within 3 % for training and
evaluation on a grid that combines the levers that run on a CPU (8-bit AdamW state, the step
fused into backward, every-k-th-block checkpointing) with each other and with the cheaper
settings (dtype, loss, micro-batch slices, accumulation, dropout). Each lever's own grid is in its
test file; this one checks that they compose in the planner as they do in the run."""

from __future__ import annotations

import pytest

from fitgpt.config.load import check
from fitgpt.config.schema import Config
from fitgpt.planner.verify import verify

# (name, settings): each a combination of levers
GRID = [
    ("8bit+every2", {"memory.optimizer_state": "8bit", "memory.checkpointing": True, "memory.checkpoint_every": 2}),
    ("8bit+full+slices", {"memory.optimizer_state": "8bit", "memory.loss": "full", "memory.micro_split": 2}),
    ("8bit+every3+dropout", {"memory.optimizer_state": "8bit", "memory.checkpointing": True,
                             "memory.checkpoint_every": 3, "model.dropout": 0.1}),
    ("fused+every2", {"memory.fused_backward": True, "train.grad_clip": 0.0, "memory.checkpointing": True,
                      "memory.checkpoint_every": 2}),
    ("fused+accum2+full", {"memory.fused_backward": True, "train.grad_clip": 0.0, "train.grad_accum": 2,
                           "memory.loss": "full"}),
    ("fused+every1+slices", {"memory.fused_backward": True, "train.grad_clip": 0.0, "memory.checkpointing": True,
                             "memory.micro_split": 2}),
]


def config(settings: dict, dtype: str) -> Config:
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 4, 4, 64, 64, 512
    t.device, t.dtype, t.batch_size, t.grad_accum = "cpu", dtype, 4, 1
    cfg.eval.batch_size = 4
    for key, value in settings.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    check(cfg)
    return cfg


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name,settings", GRID, ids=[g[0] for g in GRID])
def test_levers_together_are_predicted_within_3_percent(name, settings, dtype):
    r = verify(config(settings, dtype), steps=3)
    for phase in ("train", "eval"):
        err = r[phase]["error_allocated_pct"]
        assert err is not None and abs(err) <= 3.0, (name, dtype, phase, r[phase])


def test_the_grid_can_fail_a_lever_changes_the_measured_peak():
    """The levers move the measured training peak (so agreement above is not a constant)."""
    plain = verify(config({}, "float32"), steps=3)["train"]["measured_allocated"]
    low = verify(config(GRID[0][1], "float32"), steps=3)["train"]["measured_allocated"]
    assert low < 0.95 * plain
