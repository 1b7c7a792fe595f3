"""Activation checkpointing, applied to a built GPT from outside its code: each block keeps
only its input in the forward pass and is recomputed in backward (less memory, ~25% slower).
`build_model` applies it when the config's `memory.checkpointing` asks."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, module: torch.nn.Module, *args):
    if module.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)


def apply_activation_checkpointing(model) -> None:
    """Keep only each block's input in the forward pass; recompute the block in backward.
    The block's forward is wrapped in place, so parameter names and state dicts do not change."""
    for block in model.transformer.h:
        if not getattr(block, "_fitgpt_checkpointed", False):
            block.forward = functools.partial(_checkpointed, block.forward, block)
            block._fitgpt_checkpointed = True
