"""The optimizer step fused into backward (`memory.fused_backward`): each parameter is updated,
and its gradient freed, as soon as autograd has finished accumulating it, so a training step
never holds every gradient at once (PyTorch's `Tensor.register_post_accumulate_grad_hook`; the
tutorial "How to save memory by fusing the optimizer step into the backward pass").

How it stays the run's AdamW:
- One AdamW per parameter (as in the tutorial), each a view of the run's optimizer: at every
  update it takes the hyperparameters of the run optimizer's group that holds the parameter
  (learning rate as scheduled, weight decay or none: the groups `configure_optimizer` makes) and
  reads and writes that optimizer's `state[p]`. The run's optimizer is never stepped, but it
  stays the one object for everything else: `Training.set_lr`, the checkpoint (its state_dict,
  the same layout as without the lever, so a resume may switch the lever on or off), the
  storage tracker, the out-of-memory release. AdamW updates each tensor on its own, so a
  per-parameter step is the same arithmetic as the whole step (the CPU's for-loop or CUDA's
  fused kernel, the implementation the run's optimizer chose).
- Accumulation (gradient accumulation and the out-of-memory back-off's slices of a micro-batch)
  stays exact: the hooks are armed only for the step's last backward, so gradients add up over
  the earlier ones and each parameter is updated once, from its whole gradient. The saving is
  then only partial: between micro-batches every gradient is alive, as without the lever.
- Non-finite numbers: the plain step skips the whole update when the loss or the global
  gradient norm is not finite. Here an update cannot wait for the global norm, so the guard is
  cumulative in backward order: a running sum of squared gradient norms starts as 0 x the
  step's loss (NaN when the loss is not finite, so then no parameter is updated: the whole step
  is skipped, as before) and each parameter is updated only while that sum is finite. A
  gradient that turns non-finite with a finite loss stops the updates from that parameter on;
  the parameters before it in backward order keep theirs (undoing them would need a copy of the
  weights, the memory this lever saves). The step still reports itself skipped. The check is
  on the device without a host sync for a fused optimizer (CUDA: AdamW's `found_inf`), a host
  read otherwise (free on the CPU).
"""

from __future__ import annotations

import math

import torch

from fitgpt.errors import ConfigError

__all__ = ["FusedBackward"]


class FusedBackward:
    """Post-accumulate-grad hooks that update each parameter with its own AdamW (sharing the run
    optimizer's state and hyperparameters) when armed, during the step's last backward."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        if type(optimizer) is not torch.optim.AdamW:
            raise ConfigError(f"memory.fused_backward=true updates with torch's AdamW, not "
                              f"{type(optimizer).__name__}; use --memory.optimizer_state=fp32 "
                              f"--memory.offload_optimizer=false, or --memory.fused_backward=false")
        self.optimizer = optimizer
        self.slots: dict[torch.Tensor, tuple[int, torch.optim.AdamW]] = {}
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                sub = torch.optim.AdamW([p], fused=group["fused"], foreach=group["foreach"])
                self.slots[p] = (gi, sub)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p not in self.slots]
        if missing:
            raise ConfigError(f"memory.fused_backward=true: parameters outside the optimizer: {missing[:3]}")
        for p in self.slots:  # the hooks live as long as the parameters
            p.register_post_accumulate_grad_hook(self._hook)
        self.armed = False
        self.poison = False
        self.sq: torch.Tensor | None = None  # running sum of squared gradient norms
        self.updated = 0  # parameters whose hook ran in this step (updated, or skipped by the guard)

    def arm(self, loss_sum: torch.Tensor, poison: bool = False) -> None:
        """Before the step's last backward: update from now on. loss_sum: the step's summed
        loss (a non-finite one skips every update); poison: make the first gradient infinite
        (fault injection, fitgpt.train.faults' infgrad)."""
        self.sq = loss_sum.detach().float() * 0.0
        self.armed, self.poison, self.updated = True, poison, 0

    def disarm(self) -> None:
        self.armed = False

    def _hook(self, p: torch.Tensor) -> None:
        if not self.armed:
            return  # an earlier micro-batch (or slice): its gradient waits in .grad for the rest
        if self.poison:
            p.grad.add_(float("inf"))
            self.poison = False
        self._update(p)

    def _update(self, p: torch.Tensor) -> None:
        """Update p from its gradient (unless the running guard is no longer finite), free it."""
        norm = torch.linalg.vector_norm(p.grad)
        self.sq.addcmul_(norm, norm)
        gi, sub = self.slots[p]
        group = self.optimizer.param_groups[gi]
        for k, v in group.items():  # the scheduled lr, this group's weight decay, ...
            if k != "params":
                sub.param_groups[0][k] = v
        sub.state = self.optimizer.state  # the run optimizer's (load_state_dict replaces it)
        if group["fused"]:  # the kernel skips the update (and the step count) when found_inf is 1
            sub.found_inf = (~torch.isfinite(self.sq)).float()
            sub.step()
            sub.found_inf = None
        elif math.isfinite(self.sq.item()):
            sub.step()
        p.grad = None
        self.updated += 1

    def finish(self) -> torch.Tensor:
        """After the last backward: disarm, update any parameter whose gradient arrived without
        its hook running (none in a GPT: every parameter is used by every forward), and return
        the gradient norm of the step (a device tensor, non-finite when an update was skipped)."""
        left = [p for p in self.slots if p.grad is not None] if self.armed else []
        for p in left:
            self._update(p)
        self.disarm()
        norm, self.sq = self.sq.sqrt(), None
        return norm
