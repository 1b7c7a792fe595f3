"""Device, dtype and model construction shared by training, evaluation and the planner."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from fitgpt.config.levers import activation_refusal
from fitgpt.config.schema import Config
from fitgpt.errors import ConfigError
from fitgpt.model.checkpointing import apply_activation_checkpointing, apply_activation_offload
from fitgpt.model.gpt import GPT
from fitgpt.model.loss import LossSpec
from fitgpt.model.shape import ModelShape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    """Where and in which precision the run computes."""

    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast

    @property
    def device_type(self) -> str:
        return self.device.type

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if self.device_type == "cuda":
            return [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        return [t.to(self.device) for t in tensors]

    def synchronize(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize(self.device)


def resolve_runtime(device: str, dtype: str) -> Runtime:
    """'auto' device and dtype made concrete; a device or dtype this machine lacks is an error.
    Switches nothing on: TF32 is `enable_tf32`'s, called by whoever sets up a run that computes."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"train.device: {device!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use --train.device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={device}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps but MPS is not available; use --train.device=cpu")
    if dtype == "auto":
        if dev.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dev.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.dtype=bfloat16 is not supported by this GPU; use --train.dtype=float16")
    note = slow_cpu_dtype(dev.type, dtype)
    if note and note not in _NOTED:  # once per process, however many runtimes are resolved
        _NOTED.add(note)
        from fitgpt.console import say

        say(f"note: {note}")
    return Runtime(dev, DTYPES[dtype])


def enable_tf32(rt: Runtime) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (as nanoGPT does).
    A process-wide setting: called by whoever sets up a run that computes (training, the bench,
    `plan --verify`, `fitgpt eval` and `sample`), never by merely resolving a runtime."""
    if rt.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


_NOTED: set[str] = set()
# CPU time of the demo model's training step against float32's (bench/cpu_dtype_speed.py, two
# runs each): float16 on an AVX-512 CPU without float16 instructions, bfloat16 with AVX-512 turned
# off (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2), standing in for a CPU without bfloat16.
SLOWDOWN = {"float16": "16-18", "bfloat16": "15-20"}


def slow_cpu_dtype(device_type: str, dtype: str) -> str | None:
    """A 16-bit dtype on a CPU without native instructions for it: autocast then runs its
    matmuls in emulated 16-bit arithmetic, many times slower than float32 (nanoGPT ignores
    dtype on a CPU, so a nanoGPT config with dtype='float16' did not pay this there)."""
    if device_type != "cpu" or dtype not in ("bfloat16", "float16"):
        return None
    native = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}[dtype]
    try:
        if getattr(torch.ops.mkldnn, native)():
            return None
    except (AttributeError, RuntimeError):
        pass  # cannot tell: say it
    return (f"train.dtype={dtype} on this CPU, which has no native {dtype} arithmetic, makes a step "
            f"about {SLOWDOWN[dtype]}x slower than float32 (measured on the demo model; nanoGPT ignores "
            f"dtype on a CPU); for float32 use --train.dtype=float32, or auto")


def build_model(cfg: Config, device: torch.device, init: bool = True) -> GPT:
    """Build on the meta device (free), materialise on `device`, initialise (seeded). The
    `memory` section decides how the model computes its loss (`LossSpec`), which of its blocks
    are recomputed in backward (activation checkpointing, every `checkpoint_every`-th block) and
    whether the others keep what they save for backward in host memory (activation offload,
    CUDA only: on another device there is no host memory apart from the device's own)."""
    mem = cfg.memory
    why = activation_refusal(cfg, device.type)
    if why:
        raise ConfigError(why)
    loss = LossSpec.of(cfg.memory, device.type)
    with torch.device("meta"):
        model = GPT(ModelShape.of(cfg.model), cfg.model.dropout, loss)
    model.to_empty(device=device)
    if model.shape.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # keep the tie explicit after to_empty
    if init:
        model.init_weights(cfg.train.seed)
    if mem.checkpointing:
        apply_activation_checkpointing(model, mem.checkpoint_every)
    if mem.activation_offload:
        apply_activation_offload(model)
    return model


def clean_state_dict(sd: dict) -> dict:
    """Strip the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes; drop nanoGPT's
    non-parameter attention-mask buffers."""
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.endswith(".attn.bias") and v.dim() == 4:  # nanoGPT's causal mask buffer
            continue
        out[k] = v
    return out


def resolve_data_dir(data_dir: str) -> Path:
    """'demo' -> the prepared demo corpus (built on first use); anything else is a folder."""
    if data_dir == "demo":
        from fitgpt.data.prepare.demo import demo_data_dir

        return demo_data_dir()
    return Path(data_dir).expanduser()
