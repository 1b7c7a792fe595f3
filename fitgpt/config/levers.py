"""The memory levers' refusals: for each lever of issue 15 (fused backward, the optimizer-state
formats and offload, activation offload) and for train.optimizer=muon with them, one line saying
why it cannot run with a config, or None. Torch-free, so `check` refuses before anything is
allocated, and the planner and auto-fit ask the same functions before they propose a lever; the
training code asks again with the resolved device, dtype and process count."""

from __future__ import annotations

from fitgpt.config.schema import Config


def fused_backward_refusal(cfg: Config, dtype: str | None = None, processes: int | None = None) -> str | None:
    """Why memory.fused_backward=true cannot run with cfg, as one line (None: it can). Each
    weight is updated inside backward, so nothing may need every gradient first. dtype and
    processes: the run's resolved ones (auto may become float16; torchrun may start several)."""
    t, mem, n = cfg.train, cfg.memory, processes or cfg.parallel.nproc
    head = "memory.fused_backward=true updates each weight inside backward"
    if not mem.fused_backward:
        return None
    if t.grad_clip > 0:
        return (f"{head}, before the global gradient norm that train.grad_clip={t.grad_clip:g} needs "
                f"exists; set --train.grad_clip=0 (or --memory.fused_backward=false)")
    if (dtype or t.dtype) == "float16":
        return (f"{head}, before float16's GradScaler has seen every gradient (unscale, inf check); "
                f"use --train.dtype=bfloat16 or float32 (or --memory.fused_backward=false)")
    if n > 1:
        return (f"{head}, in one process: under DDP before the all-reduce has combined the {n} processes' "
                f"gradients (FSDP2: not supported); set --parallel.nproc=1 (or --memory.fused_backward=false)")
    if mem.optimizer_state != "fp32" or mem.offload_optimizer:
        return (f"{head} with torch's AdamW and fp32 state on the device; set --memory.optimizer_state=fp32 "
                f"--memory.offload_optimizer=false (or --memory.fused_backward=false)")
    if t.optimizer != "adamw":
        return (f"{head} with torch's AdamW, one parameter at a time; train.optimizer={t.optimizer} is not "
                f"supported there; set --train.optimizer=adamw (or --memory.fused_backward=false)")
    return None


def muon_refusal(cfg: Config, processes: int | None = None) -> str | None:
    """Why train.optimizer=muon cannot run with cfg's memory levers or parallel mode, as one
    line (None: it can, or the optimizer is AdamW). processes: the run's resolved count."""
    t, mem, n = cfg.train, cfg.memory, processes or cfg.parallel.nproc
    head = "train.optimizer=muon"
    if t.optimizer != "muon":
        return None
    if n > 1 and cfg.parallel.mode == "fsdp":
        return (f"{head} does not run under parallel.mode=fsdp: Muon's Newton-Schulz step orthogonalises each "
                f"whole matrix, and FSDP2 keeps a shard of it per process (every step would gather every "
                f"matrix); use --parallel.mode=ddp (or --train.optimizer=adamw)")
    if mem.optimizer_state != "fp32":
        return (f"{head} keeps Muon's momentum and AdamW's moments in fp32; memory.optimizer_state="
                f"{mem.optimizer_state} (bitsandbytes' 8-bit AdamW) is not supported with it; use "
                f"--memory.optimizer_state=fp32 (or --train.optimizer=adamw)")
    if mem.offload_optimizer:
        return (f"{head} steps where the weights are; memory.offload_optimizer=true (AdamW on fp32 masters in "
                f"host memory) is not supported with it; use --memory.offload_optimizer=false "
                f"(or --train.optimizer=adamw)")
    return None


def optimizer_refusal(cfg: Config, device_type: str | None = None, dtype: str | None = None,
                      processes: int | None = None) -> str | None:
    """Why memory.optimizer_state / memory.offload_optimizer cannot run with cfg, as one line
    (None: they can). device_type, dtype, processes: the run's resolved ones; without them,
    what the config itself says (train.device and train.dtype may be auto)."""
    t, mem, n = cfg.train, cfg.memory, processes or cfg.parallel.nproc
    dev = device_type or (None if t.device == "auto" else t.device.split(":")[0])
    dtype = dtype or (None if t.dtype == "auto" else t.dtype)
    why = muon_refusal(cfg, processes)
    if why:
        return why
    if mem.optimizer_state == "8bit":
        if n > 1 and cfg.parallel.mode == "fsdp":
            return ("memory.optimizer_state=8bit does not run under parallel.mode=fsdp: bitsandbytes' 8-bit "
                    "AdamW takes plain tensors, not FSDP2's sharded parameters; use --parallel.mode=ddp "
                    "(or --memory.optimizer_state=fp32)")
        if dev not in (None, "cpu", "cuda"):
            return (f"memory.optimizer_state=8bit runs on a CPU or a CUDA device (bitsandbytes), not on "
                    f"{dev}; use --memory.optimizer_state=fp32")
    if not mem.offload_optimizer:
        return None
    head = "memory.offload_optimizer=true"
    if dev not in (None, "cuda"):
        return (f"{head} moves AdamW's state from a CUDA card to host memory, and this run computes on "
                f"{dev}, whose memory is the host's already (nothing to offload to); use "
                f"--memory.offload_optimizer=false")
    if n > 1:
        return (f"{head} runs in one process ({n} processes would each keep a whole fp32 copy of the "
                f"weights and AdamW's state in the same host memory); use --parallel.nproc=1 "
                f"(or --memory.offload_optimizer=false)")
    if dtype not in (None, "bfloat16"):
        return (f"{head} keeps bfloat16 weights and gradients on the card and fp32 master weights on the "
                f"host; train.dtype={dtype} cannot (float16 would need a loss scale the host step does not "
                f"apply; float32 has no 16-bit weights); use --train.dtype=bfloat16 "
                f"(or --memory.offload_optimizer=false)")
    return None


def activation_refusal(cfg: Config, device_type: str | None = None, processes: int | None = None) -> str | None:
    """Why memory.checkpoint_every / memory.activation_offload cannot work with cfg, as one line
    (None: they can). device_type, processes: the run's resolved ones; without them, what the
    config itself says (train.device may be auto)."""
    mem, n = cfg.memory, processes or cfg.parallel.nproc
    dev = device_type or (None if cfg.train.device == "auto" else cfg.train.device.split(":")[0])
    k, head = mem.checkpoint_every, "memory.activation_offload=true"
    if k > 1 and not mem.checkpointing:
        return (f"memory.checkpoint_every={k} says which blocks activation checkpointing recomputes, "
                f"and memory.checkpointing is off; set --memory.checkpointing=true "
                f"(or --memory.checkpoint_every=1)")
    if not mem.activation_offload:
        return None
    if dev not in (None, "cuda"):
        return (f"{head} sends what backward needs from a CUDA card to pinned host memory, and this run "
                f"computes on {dev}, whose memory is the host's already (nothing to offload to); use "
                f"--memory.activation_offload=false")
    if mem.checkpointing and k == 1:
        return (f"{head} has nothing to offload when every block is checkpointed (each keeps only its "
                f"input); checkpoint fewer with --memory.checkpoint_every=2 or more, or set "
                f"--memory.checkpointing=false")
    if n > 1 and cfg.parallel.mode == "fsdp":
        return (f"{head} is not supported under parallel.mode=fsdp (FSDP2 frees and gathers the "
                f"parameters that autograd saves; untested with the offload hooks); use "
                f"--parallel.mode=ddp (or --memory.activation_offload=false)")
    if cfg.train.compile:
        return (f"{head} works through autograd's saved-tensor hooks, which torch.compile does not "
                f"trace; set --train.compile=false (or --memory.activation_offload=false)")
    return None


# ----------------------------------------------------------------------------- output
