"""Applied to a plain GPT from outside the model: activation checkpointing, loss choice, compile."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from fitgpt.model.gpt import GPT


def _checkpointed(forward, module: torch.nn.Module, *args):
    if module.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)


def apply_activation_checkpointing(model: GPT) -> None:
    """Keep only each block's input in the forward pass; recompute the block in backward.
    The block's forward is wrapped in place, so parameter names and state dicts do not change."""
    for block in model.transformer.h:
        if not getattr(block, "_fitgpt_checkpointed", False):
            block.forward = functools.partial(_checkpointed, block.forward, block)
            block._fitgpt_checkpointed = True


def apply_memory_options(model: GPT, memory_cfg, device_type: str) -> GPT:
    """Loss implementation and activation checkpointing from the `memory` config section."""
    model.loss_impl = memory_cfg.loss
    model.loss_chunk = memory_cfg.chunk_rows(device_type)
    if memory_cfg.checkpointing:
        apply_activation_checkpointing(model)
    return model


def maybe_compile(model: GPT, enabled: bool) -> torch.nn.Module:
    """torch.compile when asked; the caller keeps the plain model for saving state dicts."""
    return torch.compile(model) if enabled else model
