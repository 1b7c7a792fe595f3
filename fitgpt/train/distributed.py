"""More than one process: torchrun's environment, DDP and FSDP2, applied from outside the model.

`torchrun --nproc_per_node=N -m fitgpt train ...` sets RANK, LOCAL_RANK and WORLD_SIZE; fitgpt
reads them, joins the process group (NCCL on CUDA, gloo on CPU), and splits the work:
- training: every rank draws the same global stream of micro-batches and takes every
  world-th one, so the optimizer sees exactly the tokens a single process would (and a run
  saved on N ranks resumes on M);
- evaluation: every rank scores every world-th validation window; sums are all-reduced;
- only rank 0 logs, writes metrics and saves checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from fitgpt.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run, made once (`world_from_env`, then
    `init`) and passed to what needs it, instead of each module reading the environment."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: str | None = None  # this process's device (set by `init`); None: the config's train.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes the run folder and saves checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """torchrun's RANK, LOCAL_RANK and WORLD_SIZE (one process without them)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("WORLD_SIZE", 1)))


def init(device: str, backend: str = "auto", world: World | None = None) -> World:
    """Join the process group torchrun describes (world: `world_from_env()` when not given);
    returns the world with this process's device."""
    world = world if world is not None else world_from_env()
    if not world.active:
        return replace(world, device=device)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        n = torch.cuda.device_count()
        if world.local_rank >= n:
            raise ConfigError(f"process {world.rank} needs GPU cuda:{world.local_rank}, but {n} GPU(s) are "
                              f"visible; start at most {n} processes per machine "
                              f"(--parallel.nproc={n}, or torchrun --nproc_per_node={n})")
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(world.local_rank)
    elif device == "auto":
        device = "cpu"
    backend = backend if backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:  # nanoGPT's default `backend = 'nccl'`, on a CPU run
        from fitgpt.console import say

        say("note: parallel.backend=nccl needs CUDA devices and this run is on the CPU: using gloo, "
            "the CPU's backend (--parallel.backend=auto picks it without this note)")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return replace(world, device=device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_divisible(grad_accum: int, world: World) -> None:
    if grad_accum % world.size:
        raise ConfigError(
            f"train.grad_accum={grad_accum} is not divisible by the {world.size} processes: each "
            f"takes grad_accum / processes micro-batches of every optimizer step; use "
            f"--train.grad_accum={max(world.size, grad_accum // world.size * world.size)} "
            f"(the tokens per step change with it) or another --nproc_per_node")


def wrap(model: torch.nn.Module, mode: str, world: World, rt) -> torch.nn.Module:
    """DDP or FSDP2 around the plain model (the plain model keeps the parameters' names)."""
    if not world.active or mode == "single":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [world.local_rank] if rt.device_type == "cuda" else None
        return DDP(model, device_ids=ids, gradient_as_bucket_view=True)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise ConfigError(f"parallel.mode: expected single, ddp or fsdp, got {mode!r}")


def grad_scaler(rt, fsdp: bool) -> torch.amp.GradScaler:
    """float16's loss scaler (disabled for other dtypes). Under FSDP2 each process holds only
    its own shards of the gradients, and the processes must agree on skipping an overflowing
    step, or their shards and scales part. ShardedGradScaler, PyTorch's scaler for FSDP,
    all-reduces what each process found. (In torch 2.13 DTensor's inf check already reduces it
    for a plain GradScaler too, through a private dispatch rule; the sharded scaler does not
    depend on that.) tests/test_fsdp_fp16.py runs it with 2 processes."""
    enabled = rt.dtype == torch.float16
    if fsdp and enabled:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(rt.device_type)
    return torch.amp.GradScaler(rt.device_type, enabled=enabled)


def is_ddp(model: torch.nn.Module) -> bool:
    """Whether model is DDP-wrapped (under torch.compile's wrapper or not)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return isinstance(getattr(model, "_orig_mod", model), DDP)


def grads_live_in_buckets(model: torch.nn.Module) -> bool:
    """True under DDP with gradient_as_bucket_view (as `wrap` makes it): each gradient is a view
    of DDP's all-reduce buckets, which live as long as the DDP module whatever zero_grad does.
    Keeping the views (zero_grad(set_to_none=False)) costs no memory, lets backward accumulate in
    place, and lets the CPU storage tracker see the buckets through the parameters' .grad."""
    return is_ddp(model) and bool(getattr(model, "_orig_mod", model).gradient_as_bucket_view)


def no_sync(model: torch.nn.Module, last: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last
    micro-step of an optimizer step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def mean_across(t: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all processes (identity in one process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def full_model_state(model: torch.nn.Module, fsdp: bool) -> dict:
    """The whole model's state dict (gathered to every rank under FSDP: a collective)."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, state: dict, fsdp: bool) -> None:
    """Load a whole model's state dict (as `full_model_state` gathers it) into the plain model,
    or, under FSDP, into this process's shards of it."""
    if not fsdp:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """AdamW's state keyed by parameter name, whole (gathered under FSDP: a collective), so
    that a run saved in one mode or world size resumes in another."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> bool:
    """Load a saved AdamW state: by parameter name (fitgpt), or by index (nanoGPT's layout,
    single process or DDP only). Returns False when it cannot be used."""
    keys = list(state.get("state", {}))
    if keys and isinstance(keys[0], int):
        if any(hasattr(p, "device_mesh") for p in model.parameters()):
            return False  # index-keyed state cannot be sharded for FSDP
        optimizer.load_state_dict(state)
        return True
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    return True


def all_reduce_sum(values: list[float], device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, world: World):
    if not world.active:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """torchrun running `fitgpt ARGV` in nproc processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "fitgpt", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """`fitgpt train --nproc N ...`: run the same command under torchrun on this machine."""
    import subprocess

    return subprocess.call(torchrun_command(nproc, argv))
