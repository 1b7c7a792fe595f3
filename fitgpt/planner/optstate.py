"""Bytes of AdamW's state in each format of `memory.optimizer_state`, and where the model state
lives with `memory.offload_optimizer` (the card or the host). Pure Python: no torch import.

The formats, as the libraries allocate them (fitgpt.train.optim builds the optimizers):
- fp32: torch.optim.AdamW. Per parameter tensor of n elements: exp_avg and exp_avg_sq in fp32
  (4n bytes each) and a 4-byte fp32 `step` tensor.
- 8bit: bitsandbytes' AdamW8bit, block-wise dynamic quantisation (Dettmers et al. 2022,
  "8-bit Optimizers via Block-wise Quantization"). A tensor of at least MIN_8BIT elements keeps
  each moment as n uint8 codes plus one fp32 absmax per block of BLOCK elements (the last block
  may be partial: ceil(n / BLOCK) scales); a smaller tensor keeps both moments in fp32
  (bitsandbytes' `min_8bit_size`; every size counts, divisible by BLOCK or not). The two
  256-entry fp32 quantisation maps (signed for exp_avg, unsigned for exp_avg_sq) are one pair
  shared by every tensor; the step count is a Python int, not a tensor.

With `memory.offload_optimizer` (CUDA; fitgpt.train.optim_offload) the card keeps the weights
and their gradients in bfloat16 (2 + 2 bytes per parameter, and autocast has nothing to copy)
and no optimizer state; the host keeps, per tensor, an fp32 master copy of the weights, the
optimizer state in the format above, and one bfloat16 staging buffer (all tensors in one
page-locked block of 2 bytes per parameter) through which gradients go down and weights come
back; during the step one fp32 gradient of the tensor being updated (the largest: 4n bytes).

With `train.optimizer = "muon"` (fitgpt.train.optim_muon) the blocks' 2-D matrices are
torch.optim.Muon's: one fp32 momentum buffer each (4n bytes; no step tensor, no second moment),
and every other tensor keeps fp32 AdamW state as above. Muon's step (torch's single-tensor loop,
one matrix at a time, on every device) makes the Nesterov update in fp32, a bfloat16 copy of it,
and runs five Newton-Schulz steps in bfloat16 on it and two m x m Gram matrices (m the smaller
side): `muon_step_temporaries`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

BLOCK = 256  # bitsandbytes' block size for 8-bit block-wise optimizer state
MIN_8BIT = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 moments
QMAP = 256 * 4  # one quantisation map: 256 fp32 values
CARD_DTYPE_BYTES = 2  # offload: bfloat16 weights and gradients on the card


def quantised(n: int, fmt: str) -> bool:
    """Whether a tensor of n elements keeps 8-bit moments in format `fmt`."""
    return fmt == "8bit" and n >= MIN_8BIT


def blocks(n: int) -> int:
    return -(-n // BLOCK)


def tensor_state(n: int, fmt: str) -> list[int]:
    """The state tensors (bytes each, unrounded) that AdamW keeps for one parameter tensor of n
    elements in format `fmt`, shared tensors excluded (`shared_state`)."""
    if fmt == "fp32":
        return [4 * n, 4 * n, 4]  # exp_avg, exp_avg_sq, step
    if fmt != "8bit":
        raise ValueError(f"unknown optimizer-state format {fmt!r}")
    if quantised(n, fmt):
        return [n, n, 4 * blocks(n), 4 * blocks(n)]  # codes of both moments, their absmax
    return [4 * n, 4 * n]  # fp32 moments; bitsandbytes' step is a Python int


def shared_state(counts: Mapping[int, int], fmt: str) -> list[int]:
    """State shared by every tensor: the 8-bit format's two quantisation maps, present once
    any tensor is quantised."""
    return [QMAP, QMAP] if any(quantised(n, fmt) for n in counts) else []


def state_bytes(counts: Mapping[int, int], fmt: str, rnd=lambda n: n) -> int:
    """All of the optimizer state of a model whose tensors are `counts` ({elements: how many}),
    each tensor's bytes passed through `rnd` (the allocator's rounding; none by default)."""
    per = sum(k * sum(rnd(b) for b in tensor_state(n, fmt)) for n, k in counts.items())
    return per + sum(rnd(b) for b in shared_state(counts, fmt))


def bytes_per_param(counts: Mapping[int, int], fmt: str) -> float:
    """Optimizer-state bytes per parameter, unrounded: 8 (+ the step tensors) for fp32, about
    2.03 for 8bit on a GPT-2-sized model (the small tensors keep fp32)."""
    return state_bytes(counts, fmt) / sum(n * k for n, k in counts.items())


def cpu_step_temporaries(counts: Mapping[int, int], fmt: str, rnd=lambda n: n) -> int:
    """The 8-bit format's step on the CPU (fitgpt.train.optim_8bit, bitsandbytes' CPU
    arithmetic), tensor by tensor, so the most alive at once is one tensor's: a quantised one
    dequantises both moments to fp32 and computes the denominator (three fp32 tensors of its
    size; re-quantising afterwards needs less); an fp32-state one holds sqrt(exp_avg_sq) + eps
    and the update (two). On CUDA the fused kernel needs none."""
    most = 0
    for n in counts:
        k = 3 if quantised(n, fmt) else 2
        most = max(most, k * rnd(4 * n))
    return most


def host_parts(counts: Mapping[int, int], fmt: str) -> list[tuple[str, int, str]]:
    """Host memory of `memory.offload_optimizer` as (name, bytes, note): what stays allocated
    for the whole run, then the step's largest transient."""
    P = sum(n * k for n, k in counts.items())
    largest = max(counts)
    state = state_bytes(counts, fmt)
    what = "AdamW exp_avg + exp_avg_sq, fp32" if fmt == "fp32" else "AdamW moments, 8-bit block-wise"
    parts = [("fp32 master weights", 4 * P, "4 B/param, updated by the CPU"),
             ("optimizer state", state, f"{what}: {state / P:.2f} B/param"),
             ("gradient and weight staging", CARD_DTYPE_BYTES * P,
              "bfloat16, page-locked: gradients down, weights back up (2 B/param)"),
             ("optimizer step", 4 * largest + (cpu_step_temporaries(counts, fmt) if fmt == "8bit" else 0),
              "fp32 gradient of the tensor being updated" + (" + 8-bit step temporaries" if fmt == "8bit" else ""))]
    return parts


def card_scale(offload: bool) -> dict[str, float]:
    """How offloading scales each kind of the card's timeline: 16-bit weights and gradients
    (half of fp32), and no autocast copies (the weights are already 16-bit)."""
    if not offload:
        return {}
    half = CARD_DTYPE_BYTES / 4
    return {"weights": half, "gradients": half, "autocast weight copies": 0}


# ----------------------------------------------------------------------------- Muon


def muon_split(counts: Mapping[int, int], matrices: list[int], n_layer: int) -> tuple[Counter, Counter]:
    """The tensors Muon updates (each block's `matrices`, n_layer times) and those AdamW updates
    (the rest of `counts`), both as {elements: how many}."""
    muon = Counter()
    for n in matrices:
        muon[n] += n_layer
    return muon, Counter(counts) - muon


def muon_state_bytes(counts: Mapping[int, int], matrices: list[int], n_layer: int, rnd=lambda n: n) -> int:
    """Muon's momentum (fp32, 4n per matrix) plus fp32 AdamW state for the other tensors."""
    muon, rest = muon_split(counts, matrices, n_layer)
    return sum(k * rnd(4 * n) for n, k in muon.items()) + state_bytes(rest, "fp32", rnd)


def muon_step_temporaries(matrices: list[int], side: int, rnd=lambda n: n) -> int:
    """The most alive at once in Muon's step, one matrix of n elements at a time (m = `side`,
    its smaller side): the fp32 Nesterov update (4n) and its bfloat16 copy (2n); then each
    Newton-Schulz step makes the Gram matrix and its polynomial (2m^2 bytes each) and the next
    iterate (2n) while the previous ones are still referenced: at the step's end the old and
    the new iterate with both Gram matrices, and at the next step's start three Gram matrices."""
    most = 0
    for n in matrices:
        x, g = rnd(2 * n), rnd(2 * side * side)
        most = max(most, rnd(4 * n) + max(2 * x + 2 * g, x + 3 * g))
    return most
