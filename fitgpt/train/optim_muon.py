"""train.optimizer = "muon": torch.optim.Muon for the blocks' 2-D weight matrices (attention's
qkv and projection, the MLP's up and down matrices), torch's AdamW for everything else (the
token and position embeddings, an untied lm_head, the norms' weights, biases), as one optimizer
object, so that the training step, the GradScaler, `Training.set_lr`, the storage tracker and
the checkpoint (by parameter name, through torch.distributed.checkpoint) see one optimizer.

The recipe (Keller Jordan's Muon and modded-nanogpt's records; nanochat's base training):
- Muon at train.muon_lr (0.02), Nesterov momentum train.muon_momentum (0.95), 5 Newton-Schulz
  steps in bfloat16 (torch's defaults), the learning rate scaled by sqrt(max(1, rows/cols)) per
  matrix (torch's adjust_lr_fn="original", Keller's): 0.02 is the rate those sources tuned for it.
- No weight decay on Muon's matrices (MUON_WEIGHT_DECAY): modded-nanogpt's records and nanochat
  train them without it. torch's Muon decays by lr x weight_decay per step, so GPT-2's
  train.weight_decay=0.1 at lr 0.02 would shrink them 33 times faster per step than AdamW does
  at lr 6e-4: a different regulariser, not the same one. AdamW keeps train.weight_decay on its
  matrices (the embeddings, an untied head) and none on vectors, as with train.optimizer=adamw.
- One schedule shape: `set_lr(lr)` gives AdamW lr and Muon lr x muon_lr / train.lr, so both warm
  up and decay together (to train.min_lr's fraction). Muon's momentum is constant unless
  train.muon_momentum_warmup > 0: then `set_momentum` (each step, from
  fitgpt.train.step.momentum_at) raises it from 0.85, as modded-nanogpt and nanochat do over
  their first 300 steps.

The two optimizers share this object's `state` (disjoint parameters) and `param_groups` (the
same dicts, Muon's first): `step` runs Muon, then AdamW.
"""

from __future__ import annotations

from typing import Any

import torch

MUON_WEIGHT_DECAY = 0.0
ADJUST_LR = "original"  # torch.optim.Muon: lr x sqrt(max(1, rows / cols)), Keller Jordan's
BLOCKS = "transformer.h."  # the hidden matrices: 2-D parameters inside the blocks

__all__ = ["MuonAdamW", "muon_param_names"]


def muon_param_names(model: torch.nn.Module) -> list[str]:
    """The parameters Muon updates: every 2-D matrix in the transformer blocks (torch's Muon
    takes 2-D parameters only; the embeddings and the head are not hidden matrices)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and n.startswith(BLOCKS)]


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on `muon_params` and torch.optim.AdamW on `adamw_groups`, stepped
    together; `ratios` scale the one scheduled learning rate per group (`set_lr`)."""

    def __init__(self, muon_params: list, adamw_groups: list[dict[str, Any]], *, lr: float,
                 muon_lr: float, momentum: float, betas: tuple[float, float], fused: bool = False):
        self.muon = torch.optim.Muon(muon_params, lr=muon_lr, momentum=momentum,
                                     weight_decay=MUON_WEIGHT_DECAY, adjust_lr_fn=ADJUST_LR)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self.ratios = ([muon_lr / lr] * len(self.muon.param_groups)
                       + [1.0] * len(self.adamw.param_groups))
        self._link()

    def _link(self) -> None:
        """Point both optimizers at this object's groups and state (after loading replaced them)."""
        k = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:k], self.param_groups[k:]
        self.muon.state = self.adamw.state = self.state

    def set_lr(self, lr: float) -> None:
        """The scheduled learning rate: AdamW's groups get lr, Muon's lr x muon_lr / train.lr."""
        for g, ratio in zip(self.param_groups, self.ratios):
            g["lr"] = lr * ratio

    def set_momentum(self, momentum: float) -> None:
        """Muon's momentum this step (its groups only; AdamW's betas stay)."""
        for g in self.muon.param_groups:
            g["momentum"] = momentum

    @torch.no_grad()
    def step(self, closure=None):
        """Muon's step (momentum, Newton-Schulz, update; one matrix at a time), then AdamW's."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts and state: link them again
        self._link()
