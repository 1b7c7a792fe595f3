"""The run's optimizer, as the `memory` section asks: AdamW with fp32 or 8-bit state, on the
device or offloaded to host memory, or (train.optimizer=muon) Muon for the blocks' matrices with
AdamW for the rest (fitgpt.train.optim_muon); and what a checkpoint saves of it.

- `make_optimizer`: torch's AdamW (fused on CUDA; `GPT.configure_optimizer`, unchanged) for
  `optimizer_state = "fp32"`; bitsandbytes' AdamW8bit for "8bit" (fitgpt.train.optim_8bit);
  either one on fp32 master weights in host memory with `offload_optimizer`
  (fitgpt.train.optim_offload). Weight decay on matrices only, as always. What cannot run here
  is refused with one line (fitgpt.config.levers.optimizer_refusal).
- The checkpoint: `optimizer_state` (AdamW's state keyed by parameter name, in its format),
  `model_state` (fp32 weights: with offloading, the host's masters, not the card's bfloat16
  copies), `FORMAT_KEY` (the state's format: "fp32", "8bit" or "muon", so that a resume in
  another format or with another optimizer is refused with one line instead of loading bytes
  that mean something else), and `load_model_extra` (after the
  weights are loaded: the masters follow them).

bitsandbytes is optional (`pip install 'fitgpt[lowbit]'`); it is imported only when the 8-bit
format is asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from fitgpt.config.levers import optimizer_refusal
from fitgpt.config.schema import Config
from fitgpt.errors import ConfigError
from fitgpt.model.runtime import Runtime
from fitgpt.train import distributed

FORMAT_KEY = "optimizer_format"  # in the checkpoint: "fp32", "8bit" or "muon" (absent: fp32, as before)

__all__ = ["FORMAT_KEY", "check_format", "load_model_extra", "load_optimizer_state", "make_optimizer",
           "model_state", "optimizer_state", "param_groups", "state_format"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices (and embeddings) decay, vectors (LayerNorm, biases) do not: the groups of
    `GPT.configure_optimizer`, for the optimizers it does not make."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _adamw8bit():
    try:
        from fitgpt.train.optim_8bit import AdamW8bit
    except ImportError as e:
        raise ConfigError(f"memory.optimizer_state=8bit needs bitsandbytes ({e}): pip install "
                          f"'fitgpt[lowbit]' (or --memory.optimizer_state=fp32)") from None
    return AdamW8bit


def _host_factory(fmt: str, lr: float, betas: tuple[float, float]):
    """Builds the host optimizer of one offloaded tensor: fused AdamW on the CPU, or 8-bit."""
    if fmt == "8bit":
        cls = _adamw8bit()
        return lambda groups: cls(groups, lr=lr, betas=betas)
    return lambda groups: torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def make_optimizer(cfg: Config, model: torch.nn.Module, rt: Runtime, processes: int = 1):
    """The optimizer of `model` (already on its device, after DDP/FSDP2 wrapping) as the
    config's `memory` section asks; ConfigError (one line) for what cannot run here."""
    t, mem = cfg.train, cfg.memory
    why = optimizer_refusal(cfg, rt.device_type, str(rt.dtype).replace("torch.", ""), processes)
    if why:
        raise ConfigError(why)
    betas = (t.beta1, t.beta2)
    if t.optimizer == "muon":
        return _muon(cfg, model, rt)
    if mem.offload_optimizer:
        from fitgpt.train.optim_offload import HostOffloadAdamW

        return HostOffloadAdamW(model, param_groups(model, t.weight_decay),
                                _host_factory(mem.optimizer_state, t.lr, betas))
    if mem.optimizer_state == "8bit":
        return _adamw8bit()(param_groups(model, t.weight_decay), lr=t.lr, betas=betas)
    return model.configure_optimizer(t.weight_decay, t.lr, betas, rt.device_type)


def _muon(cfg: Config, model: torch.nn.Module, rt: Runtime):
    """Muon for the blocks' 2-D matrices, AdamW (fused on CUDA, train.weight_decay on its
    matrices only) for the rest (fitgpt.train.optim_muon says why each setting)."""
    from fitgpt.train.optim_muon import MuonAdamW, muon_param_names
    from fitgpt.train.step import momentum_at

    t = cfg.train
    names = set(muon_param_names(model))
    rest = [p for n, p in model.named_parameters() if p.requires_grad and n not in names]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    muon = [p for n, p in model.named_parameters() if n in names]
    return MuonAdamW(muon, groups, lr=t.lr, muon_lr=t.muon_lr, momentum=momentum_at(0, cfg),
                     betas=(t.beta1, t.beta2), fused=rt.device_type == "cuda")


# ----------------------------------------------------------------------------- checkpoints


def state_format(cfg: Config) -> str:
    """What the checkpoint's optimizer state is: AdamW's in memory.optimizer_state's format, or
    "muon" (Muon's momentum for the matrices, fp32 AdamW for the rest)."""
    return "muon" if cfg.train.optimizer == "muon" else cfg.memory.optimizer_state


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """AdamW's state keyed by parameter name (gathered whole under FSDP: a collective)."""
    if hasattr(optimizer, "master_weights"):
        return optimizer.state_dict()  # offloaded: already by name, on the host
    return distributed.full_optimizer_state(model, optimizer)


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> bool:
    """Load a saved AdamW state (by name, or nanoGPT's by index); False when it cannot be used
    (fitgpt.train.distributed.load_optimizer_state)."""
    if hasattr(optimizer, "master_weights"):
        optimizer.load_state_dict(state)
        return True
    return distributed.load_optimizer_state(model, optimizer, state)


def model_state(model: torch.nn.Module, optimizer, fsdp: bool) -> dict:
    """The weights a checkpoint saves: in fp32 always (with offloading the host's masters, not
    the card's bfloat16 copies), so that eval, sample, export and a resume without offloading
    read the same file."""
    sd = distributed.full_model_state(model, fsdp)
    if hasattr(optimizer, "master_weights"):
        masters = optimizer.master_weights()
        for name, p in model.named_parameters(remove_duplicate=False):
            if p in masters:
                sd[name] = masters[p]
    return sd


def load_model_extra(optimizer, weights: dict) -> None:
    """After the checkpoint's weights are loaded into the model: offloaded masters from the
    same fp32 weights (the card's bfloat16 copies have lost their low bits)."""
    if hasattr(optimizer, "load_masters"):
        optimizer.load_masters(weights)


def check_format(saved: dict, cfg: Config) -> None:
    """Refuse (one line) a checkpoint whose optimizer state is in another format than the run
    asks for: 8-bit codes and fp32 moments are different tensors under different keys, and a
    conversion would not be the state the saved run had."""
    have, want = saved.get(FORMAT_KEY, "fp32"), state_format(cfg)
    if have != want and "muon" in (have, want):
        was = "muon" if have == "muon" else "adamw"
        raise ConfigError(f"the checkpoint's optimizer state is train.optimizer={was}'s and this run asks "
                          f"for train.optimizer={cfg.train.optimizer}: the optimizer cannot change within "
                          f"a run (its state means something else); resume with --train.optimizer={was}")
    if have != want:
        raise ConfigError(f"the checkpoint's AdamW state is {have} and this run asks for "
                          f"memory.optimizer_state={want}: the format cannot change within a run; "
                          f"resume with --memory.optimizer_state={have}")
