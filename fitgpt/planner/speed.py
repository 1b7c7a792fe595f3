"""How fast a configuration trains on a card: the planner's speed model, levers included.

A model, not a measurement: it ranks the ways to run one model on one card, and says what a
memory lever costs in time. An optimizer step is
- the card's arithmetic: FLOPs per token (recomputed blocks included) over the card's peak
  16-bit FLOP/s times a utilisation that falls with the micro-batch (`utilisation`);
- for activation offloading, the saved activations' trip to host memory and back over the card's
  PCIe link, on the compute stream, so not hidden (`fitgpt.planner.activations.offload_seconds`);
- for the offloaded optimizer, once per optimizer step, the AdamW step on the CPU or the 16-bit
  gradients down and 16-bit weights up the same link, whichever is longer: `HostOffloadAdamW`
  (fitgpt.train.optim_offload) updates each tensor as soon as its gradient has landed, so the
  copies overlap the CPU's arithmetic; the next forward waits for the last weights.
The AdamW step on the card, kernel launches and data loading are left out: for GPT-2 sizes at
0.5M tokens per step they are well under 1 % of a step. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from fitgpt.config.schema import Config
from fitgpt.model.shape import ModelShape
from fitgpt.planner.activations import offload_seconds, recomputed_blocks
from fitgpt.planner.gpus import Gpu, host_link

SATURATION_TOKENS = 16384  # rows per matmul at which the utilisation model saturates
CHUNKED_COST = 1.02  # chunked loss: ~2 % slower than the full one (more, smaller kernels)
UNKNOWN_TFLOPS = 100.0  # a card without a TFLOP/s figure

# The optimizer step on the CPU (memory.offload_optimizer) is memory-bound: fused AdamW reads
# weight, gradient and both moments and writes weight and moments back, 28 B per parameter in
# fp32. `python bench/size_card_table.py --measure-host-adamw` times one step (after a warm-up,
# 3 steps) on CPU tensors. On this project's 2-core build machine (torch 2.13), shared with four
# other jobs, over six runs: torch.optim.AdamW(fused=True), which HostOffloadAdamW uses, 670M
# to 856M parameters/s (50M parameters; ~24 GB/s of memory traffic at best); torch's for-each
# AdamW 99M to 124M/s (7x slower, as DeepSpeed reports for PyTorch's CPU Adam against its own);
# fitgpt.train.optim_8bit.AdamW8bit's CPU step for 8-bit state (PyTorch operators around
# bitsandbytes' block-wise quantisation) 14M to 59M/s (20M parameters). The model takes each
# one's fastest run, the least disturbed by the other jobs; a desktop with dual-channel DDR5
# (~60 GB/s) and more cores should do better.
HOST_ADAMW_PARAMS_PER_S = {"fp32": 8.5e8, "8bit": 5.9e7}


def utilisation(tokens_per_micro_batch: int) -> float:
    """Fraction of the card's peak a micro-batch of this many tokens reaches (a model, not a
    measurement): min(1, tokens / 16384) ** 0.25. Matmuls with fewer rows than that leave
    tensor cores idle; the fourth root says the loss is gentle (a micro-batch of 4 x 1024 tokens
    runs at ~71 %, of 1 x 1024 at 50 %). Kernel-launch and optimizer costs are left out."""
    return min(1.0, tokens_per_micro_batch / SATURATION_TOKENS) ** 0.25


def recomputed_share(cfg: Config) -> float:
    """The share of the blocks whose forward backward runs again: 0 without checkpointing, 1
    with every block checkpointed, ceil(L / k) / L with `memory.checkpoint_every=k`
    (`fitgpt.planner.activations.recomputed_blocks`, the rule the model applies)."""
    return recomputed_blocks(cfg) / cfg.model.n_layer


@dataclass
class Speed:
    """Predicted seconds of one optimizer step, by what takes them, and the tokens/s they make."""

    tokens_per_s: float
    compute_s: float  # the card's arithmetic, recomputation included
    transfer_s: float = 0.0  # activation offload: the copies to the host and back (not hidden)
    host_s: float = 0.0  # optimizer offload: the CPU's AdamW step and its PCIe copies

    @property
    def step_s(self) -> float:
        return self.compute_s + self.transfer_s + self.host_s


def _tokens_per_s(cfg: Config, gpu: Gpu | None) -> float:
    """The card's arithmetic alone: peak FLOP/s x utilisation / FLOPs per token. Checkpointing
    recomputes a block's forward (2 of its 6 FLOPs per parameter), so the recomputed blocks'
    share costs 4/3 as much; the lm_head is never recomputed. The chunked loss costs ~2 %."""
    shape = ModelShape.of(cfg.model)
    f = shape.flops_per_token()
    lm_head = shape.lm_head_flops_per_token()
    blocks = f - lm_head
    if cfg.memory.checkpointing:
        share = recomputed_share(cfg)
        blocks = blocks * 4 / 3 if share == 1.0 else blocks * (1 + share / 3)
    cost = (blocks + lm_head) * (CHUNKED_COST if cfg.memory.loss == "chunked" else 1.0)
    tflops = gpu.tflops if gpu is not None and gpu.tflops else UNKNOWN_TFLOPS
    return tflops * 1e12 * utilisation(cfg.train.batch_size * cfg.model.block_size) / cost


def host_step_seconds(cfg: Config, gpu: Gpu | None) -> float:
    """memory.offload_optimizer, per optimizer step: the CPU's AdamW over every parameter, or
    the 16-bit gradients to the host and the 16-bit weights back over the PCIe link, whichever
    takes longer (they overlap tensor by tensor)."""
    if not cfg.memory.offload_optimizer:
        return 0.0
    params = ModelShape.of(cfg.model).params()
    cpu = params / HOST_ADAMW_PARAMS_PER_S[cfg.memory.optimizer_state]
    return max(cpu, 2 * (2 * params) / host_link(gpu))


def speed(cfg: Config, gpu: Gpu | None = None) -> Speed:
    """The predicted optimizer step of cfg on gpu (None: a card of 100 TFLOP/s), for one
    process: its share of the step's tokens, tokens/s per card."""
    base = _tokens_per_s(cfg, gpu)
    tokens = cfg.tokens_per_step // max(1, cfg.parallel.nproc)
    compute = tokens / base
    # activation offload: every slice's saved activations to the host and back, on the compute
    # stream (not hidden); 16-bit unless the run computes in fp32
    dtype = "float32" if cfg.train.dtype == "float32" else "bfloat16"
    transfer = offload_seconds(cfg, gpu, dtype) if cfg.memory.activation_offload else 0.0
    host = host_step_seconds(cfg, gpu)
    if not transfer and not host:
        return Speed(base, compute)
    return Speed(tokens / (compute + transfer + host), compute, transfer, host)


def predicted_throughput(cfg: Config, gpu: Gpu | None = None) -> float:
    """Idealised training tokens/s (`speed`). Only ratios between configurations on the same card
    mean much: a real run reaches some fraction of it (its MFU)."""
    return speed(cfg, gpu).tokens_per_s
