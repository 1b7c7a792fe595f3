"""AdamW's state and fp32 master weights in host memory, the step on the CPU
(`memory.offload_optimizer`, CUDA).

The card keeps the weights and their gradients in bfloat16: 4 bytes per parameter instead of
16 + 2 (fp32 weights, fp32 gradients, fp32 moments, autocast's 16-bit copies). The host keeps,
per parameter tensor, an fp32 master copy and its AdamW state (torch's fused CPU AdamW, or the
8-bit format with `memory.optimizer_state = "8bit"`), and one bfloat16 staging buffer for all
tensors, page-locked so that copies run asynchronously. A step: every gradient is queued for
copying to its staging slice on a side stream; the CPU then takes the tensors in order, each as
soon as its copy has landed (so the copies of the later ones overlap the CPU's arithmetic on
the earlier ones): fp32 gradient from the slice, AdamW on the master, the master rounded to
bfloat16 into the same slice, queued back to the card; the next forward waits for the last copy.

Why not a library: torchao's `CPUOffloadOptimizer` keeps the host copy in the parameter's own
dtype (bfloat16 weights on the card would mean bfloat16 masters: updates smaller than a
bfloat16 step are lost) and leaves fp32 weights and gradients on the card otherwise; DeepSpeed's
ZeRO-Offload does this split but owns the training loop. `fitgpt.planner.optstate` counts these
bytes; docs/memory.md says what it costs.

The class runs on any device (on the CPU, "card" and host are the same memory: the tests use
that to check the arithmetic and the checkpoints); `memory.offload_optimizer` refuses anything
but one CUDA process in bfloat16 (fitgpt.config.levers.optimizer_refusal).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

CARD_DTYPE = torch.bfloat16


@dataclass
class _Slot:
    """One parameter tensor: on the card, its host master and optimizer, its staging slice."""

    name: str
    param: torch.Tensor
    master: torch.Tensor
    opt: torch.optim.Optimizer
    stage: torch.Tensor
    group: int


def _page_locked(numel: int, dtype: torch.dtype, cuda: bool) -> torch.Tensor:
    """A host tensor; on CUDA page-locked by registering exactly its bytes (PyTorch's pinned
    allocator would round each request up to a power of two: up to twice the bytes). If the
    registration is refused, ordinary memory: the copies are then synchronous, still correct."""
    t = torch.empty(numel, dtype=dtype)
    if not cuda or numel == 0:
        return t
    try:
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(t.data_ptr(), numel * t.element_size(), 0)) == 0:
            weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    except (RuntimeError, AttributeError, TypeError):
        pass
    return t


class HostOffloadAdamW(torch.optim.Optimizer):
    """AdamW over fp32 master weights in host memory for a model whose weights it turns to
    bfloat16. Like torchao's CPUOffloadOptimizer it is an `Optimizer` for isinstance checks
    without calling its __init__: `param_groups` and `state` are its host optimizers'."""

    def __init__(self, model: torch.nn.Module, groups: list[dict[str, Any]],
                 host_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]):
        params = [p for g in groups for p in g["params"]]
        self.device = params[0].device
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        names = {p: n for n, p in model.named_parameters()}
        self.staging = _page_locked(sum(p.numel() for p in params), CARD_DTYPE, self.cuda)
        self.slots: list[_Slot] = []
        offset = 0
        for gi, group in enumerate(groups):
            hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                master = p.detach().to("cpu", torch.float32, copy=True)
                stage = self.staging[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
                self.slots.append(_Slot(names[p], p, master, host_optimizer([{"params": [master], **hyper}]),
                                        stage, gi))
                p.data = p.data.to(CARD_DTYPE)
        self.defaults = self.slots[0].opt.defaults if self.slots else {}

    # ------------------------------------------------------------------ what callers read

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """One group per tensor (each host optimizer's): `Training.set_lr` sets each lr."""
        return [s.opt.param_groups[0] for s in self.slots]

    @property
    def state(self) -> dict:
        return {s.master: s.opt.state[s.master] for s in self.slots if s.opt.state.get(s.master)}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for s in self.slots:
            s.param.grad = None

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        live = [s for s in self.slots if s.param.grad is not None]
        side = torch.cuda.stream(self.stream) if self.cuda else nullcontext()
        events = []
        if self.cuda:  # the copies start once backward has written the gradients
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with side:
            for s in live:
                s.stage.copy_(s.param.grad, non_blocking=self.cuda)
                events.append(self.stream.record_event() if self.cuda else None)
        for s, done in zip(live, events):
            if done is not None:
                done.synchronize()
            s.master.grad = s.stage.float()
            s.opt.step()
            s.master.grad = None
            s.stage.copy_(s.master)
            with side:
                s.param.copy_(s.stage, non_blocking=self.cuda)
        if self.cuda:  # the next forward reads the weights after their copies
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return None

    # ------------------------------------------------------------------ checkpoints

    def master_weights(self) -> dict[torch.Tensor, torch.Tensor]:
        """{card parameter: fp32 master}: the checkpoint saves the masters as the weights."""
        return {s.param: s.master for s in self.slots}

    def load_masters(self, weights: dict[str, torch.Tensor]) -> None:
        """Masters from a checkpoint's fp32 weights (by name), and the card's copies from them."""
        with torch.no_grad():
            for s in self.slots:
                s.master.copy_(weights[s.name])
                s.param.copy_(s.master)

    def state_dict(self) -> dict[str, Any]:
        """Keyed by parameter name, in the layout of `distributed.full_optimizer_state` (each
        tensor's state as its optimizer saves it), so that a checkpoint resumes with or without
        offloading."""
        state, groups = {}, {}
        for s in self.slots:
            sd = s.opt.state_dict()
            if 0 in sd["state"]:
                state[s.name] = sd["state"][0]
            groups.setdefault(s.group, {k: v for k, v in sd["param_groups"][0].items() if k != "params"})
            groups[s.group].setdefault("params", []).append(s.name)
        return {"state": state, "param_groups": [groups[k] for k in sorted(groups)]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """By name; or nanoGPT's index-keyed layout, whose indices count the parameters in the
        order of the same two groups (decay, no decay) that the slots follow."""
        saved = state_dict["state"]
        order = [n for g in state_dict["param_groups"] for n in g["params"]]
        if order and all(isinstance(n, int) for n in order):
            if len(order) != len(self.slots):
                raise ValueError(f"optimizer state for {len(order)} tensors, the model has {len(self.slots)}")
            rename = {i: s.name for i, s in zip(order, self.slots)}
            saved = {rename[i]: v for i, v in saved.items()}
            state_dict = {"state": saved, "param_groups": [
                {**g, "params": [rename[i] for i in g["params"]]} for g in state_dict["param_groups"]]}
        hyper = {n: {k: v for k, v in g.items() if k != "params"}
                 for g in state_dict["param_groups"] for n in g["params"]}
        for s in self.slots:
            if s.name in saved:
                group = {**s.opt.param_groups[0], **hyper.get(s.name, {}), "params": [0]}
                s.opt.load_state_dict({"state": {0: saved[s.name]}, "param_groups": [group]})
