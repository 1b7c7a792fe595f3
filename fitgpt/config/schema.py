"""Run configuration: one dataclass per concern, every field documented.

Precedence: defaults < config file (TOML, or a nanoGPT-style Python file) < command line.
The string literal under each field is its documentation; `fitgpt train --help` shows it.
Loading, overrides and checks live in `fitgpt.config.load`.

Each field's valid values sit in its annotation, so that a field is one edit: a numeric field is
`Annotated[type, Range(...)]` (checked, with every float also required to be finite, by
`fitgpt.config.load.check`), a field with a few fixed choices is a `Literal[...]`, with a `Choice`
beside it when it also takes other spellings or needs its choices described (checked as it is
set, by `fitgpt.config.load.choose`). The checks, `--help` and the error messages read the
choices from the annotation: a new choice is one edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal


@dataclass(frozen=True)
class Range:
    """The valid interval of a numeric field: lo <= v (lo < v when lo_open), v <= hi (v < hi
    when hi_open); None leaves that side unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


@dataclass(frozen=True)
class Choice:
    """What a choice field accepts beyond its Literal's exact values, and how its error names
    them. Without a Choice, a Literal field takes exactly its values and any other is refused as
    a wrong type ("expected one of a, b, got 'x'"); with one, the message is "expected TEXT;
    got 'x'"."""

    text: str = "one of {}"
    """The valid values in words; `{}` stands for the Literal's values, comma-separated."""
    aliases: tuple[tuple[str, str], ...] = ()
    """Other spellings, each stored as the value it names (fp32 -> float32)."""
    any_case: bool = False
    """Accept the values and aliases in any case (BF16)."""
    pattern: str = ""
    """A regular expression a whole value may match instead, for a field whose values are a
    form rather than a list (cuda:N)."""


POSITIVE = Range(1)  # counts and sizes
NON_NEGATIVE = Range(0)
ABOVE_ZERO = Range(0, lo_open=True)  # a float that must be > 0
FRACTION = Range(0, 1, hi_open=True)  # [0, 1)
SEED = Range(0, 2**64 - 1)  # what numpy's and torch's generators accept


@dataclass
class ModelConfig:
    """The GPT-2 architecture."""

    n_layer: Annotated[int, POSITIVE] = 12
    """Number of transformer blocks."""
    n_head: Annotated[int, POSITIVE] = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: Annotated[int, POSITIVE] = 768
    """Width of the residual stream."""
    block_size: Annotated[int, POSITIVE] = 1024
    """Context length in tokens (training windows and position embeddings)."""
    vocab_size: Annotated[int, POSITIVE] = 50257
    """Tokenizer vocabulary; the embedding is padded up to a multiple of vocab_multiple."""
    vocab_multiple: Annotated[int, POSITIVE] = 64
    """Pad the vocabulary to a multiple of this (50257 -> 50304) for faster matmuls."""
    dropout: Annotated[float, FRACTION] = 0.0
    """Dropout probability (0 for pretraining)."""
    bias: bool = False
    """Bias in Linear and LayerNorm layers (GPT-2 had them; False is a little better and faster)."""
    position: Literal["learned", "rotary"] = "learned"
    """Positions: learned (GPT-2's position embedding) or rotary (RoPE on each head's queries and keys,
    rotate-half form, base 10000, no parameters; needs an even head size; not exportable to HF GPT-2)."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys before attention (and before the rotation), no
    parameters, as modded-nanogpt and nanochat do (not exportable to HF GPT-2)."""
    mlp: Literal["gelu", "relu2"] = "gelu"
    """MLP activation: gelu (GPT-2) or relu2 (ReLU squared)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation: layernorm (GPT-2, with a weight) or rmsnorm (RMS, no parameters)."""
    tie_embeddings: bool = True
    """Share the token embedding with the lm_head (GPT-2); false: a separate head matrix."""
    zero_init: bool = False
    """Initialise the output projections of attention and MLP (and an untied head) to zero."""
    logit_softcap: Annotated[float, NON_NEGATIVE] = 0.0
    """Cap the logits smoothly at +-this with c*tanh(z/c) (0: no cap)."""


@dataclass
class DataConfig:
    """Where the token shards are."""

    dir: str = "demo"
    """Folder of token shards (llm.c *_train[_N].bin and *_val[_N].bin, nanoGPT train.bin and val.bin); 'demo': KJV."""
    seed: Annotated[int, SEED] = 1337
    """Seed of the random training windows."""


@dataclass
class TrainConfig:
    """The optimisation run."""

    batch_size: Annotated[int, POSITIVE] = 12
    """Micro-batch: sequences per forward/backward pass."""
    grad_accum: Annotated[int, POSITIVE] = 40
    """Micro-batches accumulated per optimizer step (tokens per step = batch x accum x block)."""
    max_steps: Annotated[int, NON_NEGATIVE] = 600000
    """Optimizer steps to train for."""
    lr: Annotated[float, ABOVE_ZERO] = 6e-4
    """Peak learning rate."""
    min_lr: Annotated[float, NON_NEGATIVE] = 6e-5
    """Learning rate at the end of the cosine decay (used only with decay_lr; then <= lr)."""
    warmup_steps: Annotated[int, NON_NEGATIVE] = 2000
    """Steps of linear warm-up from 0 to lr."""
    lr_decay_steps: Annotated[int | None, POSITIVE] = None
    """Step at which the cosine decay reaches min_lr (default: max_steps)."""
    decay_lr: bool = True
    """Use warm-up and cosine decay; False keeps lr constant."""
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.1
    """AdamW weight decay, applied to matrices only (not biases, LayerNorms)."""
    beta1: Annotated[float, FRACTION] = 0.9
    """AdamW beta1."""
    beta2: Annotated[float, FRACTION] = 0.95
    """AdamW beta2."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw for everything, or muon: Muon for the 2-D hidden matrices, AdamW for the rest."""
    muon_lr: Annotated[float, ABOVE_ZERO] = 0.02
    """Muon's learning rate (the hidden matrices; follows the same warm-up and decay as lr)."""
    muon_momentum: Annotated[float, FRACTION] = 0.95
    """Muon's Nesterov momentum (after muon_momentum_warmup steps, if any)."""
    muon_momentum_warmup: Annotated[int, NON_NEGATIVE] = 0
    """Steps over which Muon's momentum rises linearly from 0.85 to muon_momentum, as in
    modded-nanogpt and nanochat (300 there); 0: constant."""
    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    device: Annotated[str, Choice("auto, cpu, cuda, cuda:N or mps", pattern=r"auto|cpu|mps|cuda(:\d+)?")] = "auto"
    """cpu, cuda, cuda:N, mps, or auto (cuda when present)."""
    dtype: Annotated[Literal["float32", "bfloat16", "float16", "auto"], Choice(
        aliases=(("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")), any_case=True)] = "auto"
    """float32, bfloat16 or float16 autocast; auto: bfloat16 (float16 on old GPUs) on CUDA, float32 on CPU."""
    compile: bool = False
    """torch.compile the model."""
    seed: Annotated[int, SEED] = 1337
    """Seed of the model initialisation."""
    eval_only: bool = False
    """Evaluate once and exit without training."""
    max_nonfinite: Annotated[int, POSITIVE] = 10
    """Stop (with a checkpoint of the last good weights) after this many non-finite losses in a row."""
    init_from: Annotated[Literal["scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"], Choice(
        "scratch, resume or one of gpt2, gpt2-medium, gpt2-large, gpt2-xl (its shape, for planning)")] = "scratch"
    """scratch, or resume (continue the latest checkpoint in the run folder)."""


@dataclass
class EvalConfig:
    """Evaluation on the fixed validation windows."""

    interval: Annotated[int, POSITIVE] = 2000
    """Evaluate every this many optimizer steps (and always at the last step)."""
    iters: Annotated[int, POSITIVE] = 200
    """Validation size in training batches: iters x train.batch_size windows (unless tokens is set)."""
    tokens: Annotated[int | None, POSITIVE] = None
    """Validation size in tokens (overrides iters); the same windows whatever eval.batch_size is."""
    batch_size: Annotated[int | None, POSITIVE] = None
    """Sequences per evaluation forward pass (default: train.batch_size)."""
    block_size: Annotated[int | None, POSITIVE] = None
    """Window length for evaluation, <= model.block_size (default: model.block_size)."""
    sample_tokens: Annotated[int, NON_NEGATIVE] = 0
    """Tokens of text to generate after training (0: none)."""
    sample_prompt: str = "\n"
    """Prompt of that sample."""


@dataclass
class MemoryConfig:
    """How the run uses memory."""

    loss: Literal["chunked", "full"] = "chunked"
    """chunked: lm_head + cross-entropy over row chunks, never the full logits; full: the usual way."""
    loss_chunk: Annotated[int, NON_NEGATIVE] = 0
    """Rows (tokens) per chunk of the chunked loss; 0: automatic, 256 on a CPU and 2048 on a GPU."""
    checkpointing: bool = False
    """Activation checkpointing per block: recompute activations in backward (less memory, ~25% slower)."""
    checkpoint_every: Annotated[int, POSITIVE] = 1
    """With checkpointing, k: checkpoint blocks 0, k, 2k, ... (1: every block, 2: every other one)."""
    activation_offload: bool = False
    """CUDA: keep what the blocks not checkpointed save for backward (tensors >= 1 MiB) in pinned host memory."""
    optimizer_state: Literal["fp32", "8bit"] = "fp32"
    """AdamW's two moments: fp32 (8 B per parameter) or 8bit (bitsandbytes, block-wise, ~2 B; small tensors fp32)."""
    offload_optimizer: bool = False
    """CUDA, bfloat16, 1 process: AdamW state, fp32 master weights and the step on the host; 16-bit on the card."""
    fused_backward: bool = False
    """Update each parameter inside backward as soon as its gradient is ready, then free the gradient."""
    budget: str | None = None
    """Memory the run may use, e.g. 12GB or 11.5GiB (default: the whole device)."""
    fit: Literal["off", "auto"] = "off"
    """off, or auto: pick micro-batch, accumulation, checkpointing, eval batch (then levers) to fit budget."""
    headroom: Annotated[float, Range(0, 0.9, hi_open=True)] = 0.1
    """Fraction of the budget kept free for the allocator and the unexpected."""
    micro_split: Annotated[int, POSITIVE] = 1
    """Process each micro-batch in this many slices, one after another (same tokens per step, lower peak)."""
    recover: bool = True
    """On out-of-memory, retry the same data with the micro-batch (or eval batch) halved."""
    track: bool = True
    """On CPU, measure peak memory of the first step and first evaluation with the storage tracker."""

    def chunk_rows(self, device_type: str) -> int:
        """`loss_chunk` made concrete: the setting itself, or for 0 (automatic) the fastest size
        measured on the device type: 256 rows on a CPU (as fast as any size from 128 to 2048, with
        the smallest peak), 2048 on a GPU (a few large GEMMs per micro-batch, few kernel launches).
        docs/performance.md has the sweep."""
        if self.loss_chunk > 0:
            return self.loss_chunk
        return 256 if device_type == "cpu" else 2048


@dataclass
class LogConfig:
    """Output, logging and checkpoints."""

    out_dir: str = "runs"
    """Folder that holds the run folders."""
    run_name: str | None = None
    """Run folder name under out_dir (default: config name and time)."""
    interval: Annotated[int, POSITIVE] = 10
    """Log a line every this many optimizer steps."""
    progress: bool = True
    """Show a live progress bar when the output is a terminal."""
    always_save: bool = True
    """Save a checkpoint at every evaluation, not only when val loss improves."""
    keep: Annotated[int, POSITIVE] = 2
    """Checkpoints kept in the run folder (the newest ones)."""
    wandb: bool = False
    """Log to Weights & Biases (needs the wandb package)."""
    wandb_project: str = "fitgpt"
    """Weights & Biases project."""
    wandb_run_name: str | None = None
    """Weights & Biases run name (default: the run folder name)."""
    tensorboard: bool = False
    """Write TensorBoard event files to <run folder>/tensorboard (needs: pip install 'fitgpt[tensorboard]')."""


@dataclass
class ParallelConfig:
    """More than one process (torchrun)."""

    nproc: Annotated[int, POSITIVE] = 1
    """Processes on this machine: above 1, `fitgpt train` relaunches itself under torchrun."""
    mode: Literal["ddp", "fsdp"] = "ddp"
    """ddp: a whole model per process, gradients all-reduced; fsdp: weights, grads, AdamW state sharded (FSDP2)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo (nccl on a CPU run: gloo, with a note)."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "memory": MemoryConfig,
    "log": LogConfig,
    "parallel": ParallelConfig,
}


@dataclass
class Config:
    """A whole run: one instance of each section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    name: str = "default"
    """Where this configuration came from (file stem), used in run names."""

    # Derived values: computed once, used everywhere.
    @property
    def eval_batch_size(self) -> int:
        return self.eval.batch_size or self.train.batch_size

    @property
    def eval_block_size(self) -> int:
        return self.eval.block_size or self.model.block_size

    @property
    def eval_windows(self) -> int:
        if self.eval.tokens is not None:
            return max(1, self.eval.tokens // self.eval_block_size)
        return self.eval.iters * self.train.batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.model.block_size

    @property
    def lr_decay_steps(self) -> int:
        return self.train.lr_decay_steps or self.train.max_steps
