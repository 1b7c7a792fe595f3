"""What the activation levers cost in time, for the planner's speed model. Pure Python: no torch.

- Selective checkpointing (`memory.checkpoint_every=k`): backward runs the forward of the
  checkpointed blocks again, ceil(L / k) of L. `recompute_fraction` is the share of the forward
  pass's FLOPs that this repeats, so a training step costs `(1 + recompute_fraction / 3)` times
  its FLOPs without checkpointing (forward 1/3, backward 2/3 of them).
- Activation offload (`memory.activation_offload`): what the saving blocks save goes to pinned
  host memory in forward and comes back in backward over the card's PCIe link
  (`fitgpt.planner.gpus.host_link`). `offloaded_bytes` replays the blocks' forward on the
  planner's timeline, so it counts exactly the tensors the hooks move (`fitgpt.model.offload`).
  The copies run on the compute stream (as `torch.autograd.graph.save_on_cpu` does), so they
  add to the step rather than hide behind the arithmetic: `offload_seconds`.
docs/memory.md works both out for GPT-2 124M and 350M on an RTX 4070.
"""

from __future__ import annotations

from fitgpt.config.schema import Config
from fitgpt.model.shape import ModelShape
from fitgpt.planner.gpus import Gpu, host_link
from fitgpt.planner.stack import Stack, checkpointed_blocks, runs
from fitgpt.planner.timeline import Timeline


def recomputed_blocks(cfg: Config) -> int:
    """How many blocks backward recomputes (checkpointed ones)."""
    m = cfg.memory
    return sum(checkpointed_blocks(cfg.model.n_layer, m.checkpoint_every)) if m.checkpointing else 0


def recompute_fraction(cfg: Config) -> float:
    """The fraction of the forward pass's FLOPs that backward runs again: the recomputed blocks'
    share of `ModelShape.flops_per_token` (a block's forward is a third of its training FLOPs,
    as the whole forward is of the step's). The lm_head and the loss are never recomputed."""
    n = recomputed_blocks(cfg)
    if not n:
        return 0.0
    shape = ModelShape.of(cfg.model)
    per_block = 6 * shape.block_params() + 12 * shape.n_embd * shape.block_size  # attention's 12 L h s
    return n * per_block / shape.flops_per_token()


def recompute_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token that recomputation adds: recompute_fraction x forward FLOPs."""
    return recompute_fraction(cfg) * ModelShape.of(cfg.model).flops_per_token() / 3


def offloaded_bytes(cfg: Config, dtype: str = "bfloat16") -> int:
    """Bytes one micro-batch slice sends to host memory in forward (the same come back in
    backward) with memory.activation_offload on CUDA; 0 with the lever off."""
    if not cfg.memory.activation_offload:
        return 0
    s = ModelShape.of(cfg.model)
    b, T = -(-cfg.train.batch_size // cfg.memory.micro_split), cfg.model.block_size
    a = 4 if dtype == "float32" else 2
    tl = Timeline()
    stack = Stack(tl, s, b, T, a, dropout=cfg.model.dropout > 0, cpu=False, offload=True)
    x = tl.alloc("activations", 4 * b * T * s.n_embd)
    stack.forward_train(x, runs(s.n_layer, cfg.memory.checkpointing, cfg.memory.checkpoint_every))
    return tl.moved


def offload_seconds(cfg: Config, gpu: Gpu | None = None, dtype: str = "bfloat16") -> float:
    """Seconds per optimizer step that activation offload adds on this process: each of its
    micro-batch slices copies `offloaded_bytes` to the host and back, not overlapped with the
    arithmetic (copies on the compute stream)."""
    world = max(1, cfg.parallel.nproc)
    slices = max(1, cfg.train.grad_accum // world) * cfg.memory.micro_split
    return slices * 2 * offloaded_bytes(cfg, dtype) / host_link(gpu)
