"""The model's sizes, computed from its config without building it: padded vocabulary, the
parameter tensors (per block and in all), parameter counts, training FLOPs per token.

The model lays out its layers from this, the planner counts weights, gradients and AdamW state
with it, the bench and the metrics take FLOPs per token (MFU) from it, the logs and `fitgpt runs`
print its parameter count: one formula, so they cannot drift apart. Pure Python (no torch), so
the planner and the reports import it without torch. tests/test_shape.py checks it against
GPT-2's published parameter counts, nanoGPT's FLOPs formula and the built model's tensors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """A GPT-2 model's geometry (the `model` config section less dropout, which changes no size)."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    """The tokenizer's vocabulary; the embedding and the lm_head have `padded_vocab` rows."""
    vocab_multiple: int = 64
    bias: bool = False

    @classmethod
    def of(cls, model_cfg) -> ModelShape:
        """From the config's `model` section (or anything with its fields)."""
        m = model_cfg
        return cls(m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.vocab_multiple, m.bias)

    @property
    def padded_vocab(self) -> int:
        """The vocabulary rounded up to a multiple of vocab_multiple (50257 -> 50304): faster
        matmuls; the padding ids are never targets and never sampled."""
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    # -- parameter tensors

    def block_tensors(self) -> list[tuple[int, int]]:
        """One block's parameter tensors as (elements, how many): the two LayerNorm weights with
        the C-sized biases (ln_1, attention projection, ln_2, MLP projection), the qkv matrix and
        bias, the attention projection, the MLP's up and down matrices, the MLP's up bias."""
        C, b = self.n_embd, int(self.bias)
        return [(C, 2 + 4 * b), (3 * C * C, 1), (3 * C, b), (C * C, 1), (4 * C * C, 2), (4 * C, b)]

    def block_matrices(self) -> list[int]:
        """One block's weight matrices in `named_parameters()` order (qkv, attention projection,
        MLP up, MLP down): what autocast casts for the matmuls and AdamW updates one by one."""
        C = self.n_embd
        return [3 * C * C, C * C, 4 * C * C, 4 * C * C]

    def block_params(self) -> int:
        """Elements of one block's parameters."""
        return sum(n * k for n, k in self.block_tensors())

    def param_counts(self) -> Counter:
        """How many parameter tensors of each element count, in the model: the token embedding
        (the lm_head is the same tensor, counted once), the position embedding, the blocks, ln_f."""
        C, L = self.n_embd, self.n_layer
        out: Counter = Counter({self.padded_vocab * C: 1})
        out[self.block_size * C] += 1
        for n, k in self.block_tensors():
            if k:
                out[n] += k * L
        out[C] += 1 + int(self.bias)  # ln_f
        return out

    def tensors(self) -> int:
        """How many parameter tensors the model has."""
        return sum(self.param_counts().values())

    def embedding_params(self) -> int:
        """The token and the position embedding's elements."""
        return (self.padded_vocab + self.block_size) * self.n_embd

    def params(self, embeddings: bool = True) -> int:
        """Parameters, the tied lm_head counted once; without embeddings: less the token and the
        position embedding (what the training log prints as "without embeddings")."""
        n = sum(n * k for n, k in self.param_counts().items())
        return n if embeddings else n - self.embedding_params()

    # -- compute

    def lm_head_flops_per_token(self) -> int:
        """The lm_head's share of the training FLOPs per token: 6 per weight."""
        return 6 * self.padded_vocab * self.n_embd

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward and backward), as nanoGPT's estimate_mfu and PaLM
        (appendix B) count them: 6 per non-embedding parameter, 6 per lm_head weight, and
        12 x layers x width x context for attention's two matmuls. nanoGPT writes it
        6 N + 12 L H Q T with N its get_num_params(), which leaves out only the position
        embedding (the tied token embedding is the lm_head): the same number."""
        T = seq_len or self.block_size
        attention = 12 * self.n_layer * self.n_embd * T
        return 6 * self.params(embeddings=False) + self.lm_head_flops_per_token() + attention
