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

BLOCK_OPTIONS = ("mlp", "norm", "tie_embeddings", "zero_init", "logit_softcap")
"""The `model` fields of the MLP, the norms and the head that ModelShape carries (absent from a
nanoGPT config or an old checkpoint's: the GPT-2 defaults)."""


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
    position: str = "learned"
    """learned: a position embedding of block_size rows; rotary: none (RoPE has no parameters)."""
    qk_norm: bool = False
    """Queries and keys RMS-normalised per head (no parameters; the planner replays it)."""
    mlp: str = "gelu"
    """The MLP's activation: gelu or relu2 (ReLU squared); no size changes."""
    norm: str = "layernorm"
    """layernorm (a weight, and a bias with `bias`) or rmsnorm (no parameters)."""
    tie_embeddings: bool = True
    """The lm_head is the token embedding (GPT-2); false: its own (padded_vocab, n_embd) matrix."""
    zero_init: bool = False
    """The output projections (and an untied lm_head) start at zero; no size changes."""
    logit_softcap: float = 0.0
    """Logits capped at +-this with c * tanh(z / c) (0: none); no size changes."""

    @classmethod
    def of(cls, model_cfg) -> ModelShape:
        """From the config's `model` section (or anything with its fields)."""
        m = model_cfg
        return cls(m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.vocab_multiple, m.bias,
                   position=getattr(m, "position", "learned"), qk_norm=getattr(m, "qk_norm", False),
                   **{f: getattr(m, f) for f in BLOCK_OPTIONS if hasattr(m, f)})

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
        norms = 2 * self.norm_tensors()  # ln_1 and ln_2
        return [(C, norms + 2 * b), (3 * C * C, 1), (3 * C, b), (C * C, 1), (4 * C * C, 2), (4 * C, b)]

    def norm_tensors(self) -> int:
        """Parameter tensors of one norm: LayerNorm's weight (and bias); none for RMSNorm."""
        return 0 if self.norm == "rmsnorm" else 1 + int(self.bias)

    def head_params(self) -> int:
        """Elements of an untied lm_head (0 when it is the token embedding)."""
        return 0 if self.tie_embeddings else self.padded_vocab * self.n_embd

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
        if self.position == "learned":
            out[self.block_size * C] += 1
        for n, k in self.block_tensors():
            if k:
                out[n] += k * L
        out[C] += self.norm_tensors()  # ln_f
        if self.head_params():
            out[self.head_params()] += 1  # an untied lm_head
        return +out  # without zero counts

    def tensors(self) -> int:
        """How many parameter tensors the model has."""
        return sum(self.param_counts().values())

    def embedding_params(self) -> int:
        """The token and the position embedding's elements (rotary: no position embedding)."""
        return (self.padded_vocab + self.position_rows) * self.n_embd

    @property
    def position_rows(self) -> int:
        """Rows of the learned position embedding (wpe): block_size, or 0 with rotary."""
        return self.block_size if self.position == "learned" else 0

    def params(self, embeddings: bool = True) -> int:
        """Parameters, a tied lm_head counted once; without embeddings: less the token and the
        position embedding (what the training log prints as "without embeddings"; an untied
        lm_head stays in)."""
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
        embedding (the tied token embedding is the lm_head): the same number. An untied lm_head
        is in the non-embedding parameters already and is counted once."""
        T = seq_len or self.block_size
        attention = 12 * self.n_layer * self.n_embd * T
        body = self.params(embeddings=False) - self.head_params()
        return 6 * body + self.lm_head_flops_per_token() + attention
