"""Applied to a built model from outside it, for speed: compile. (Activation checkpointing and
the loss are part of how the model is built: `fitgpt.model.runtime.build_model`.)"""

from __future__ import annotations

import torch


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile when asked; the caller keeps the plain model for saving state dicts."""
    return torch.compile(model) if enabled else model
