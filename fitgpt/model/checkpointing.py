"""Activation checkpointing and activation offloading, applied to a built GPT from outside its
code. `build_model` applies them when the config's `memory` section asks:
- `memory.checkpointing` with `memory.checkpoint_every = k`: blocks 0, k, 2k, ... keep only their
  input in the forward pass and are recomputed in backward (k = 1: every block, ~25% slower);
  the blocks in between save their activations as usual. The planner replays the same rule
  (`fitgpt.planner.blocks.checkpointed_blocks`; tests/test_selective_ckpt.py checks they agree).
- `memory.activation_offload` (CUDA): the blocks that are not checkpointed send what they save
  for backward to pinned host memory (`fitgpt.model.offload`).
A block's forward is wrapped in place, so parameter names and state dicts do not change.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from fitgpt.model.offload import PinnedHost, offloading


def checkpointed(n_layer: int, every: int) -> list[bool]:
    """Which blocks are checkpointed: every `every`-th, starting with the first."""
    return [i % every == 0 for i in range(n_layer)]


def _checkpointed(forward, module: torch.nn.Module, *args):
    if module.training and torch.is_grad_enabled():
        # non-reentrant; preserve_rng_state (the default) replays dropout's random numbers
        return checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)


def _offloaded(forward, module: torch.nn.Module, hooks, *args):
    if module.training and torch.is_grad_enabled():
        with hooks():
            return forward(*args)
    return forward(*args)


def _wrap(block: torch.nn.Module, how, *extra) -> None:
    if getattr(block, "_fitgpt_wrapped", None) is None:
        block.forward = functools.partial(how, block.forward, block, *extra)
        block._fitgpt_wrapped = how.__name__


def apply_activation_checkpointing(model, every: int = 1) -> None:
    """Keep only the input of every `every`-th block in the forward pass; recompute those blocks
    in backward."""
    for block, ckpt in zip(model.transformer.h, checkpointed(len(model.transformer.h), every)):
        if ckpt:
            _wrap(block, _checkpointed)


def apply_activation_offload(model, host=None, min_bytes: int | None = None) -> None:
    """Send what the blocks that are not checkpointed save for backward to `host` (default:
    pinned CUDA host memory), each tensor of at least `min_bytes` that is not a weight.
    Checkpointed blocks already save only their input, which stays on the device."""
    host = host if host is not None else PinnedHost()
    hooks = functools.partial(offloading, host, min_bytes)
    for block in model.transformer.h:
        _wrap(block, _offloaded, hooks)
