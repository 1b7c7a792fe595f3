"""The GPT-2 model, read top to bottom.

Token + position embeddings, n_layer pre-LayerNorm blocks (causal self-attention through
`F.scaled_dot_product_attention`, then a 4x GELU MLP), a final LayerNorm, and an lm_head tied to
the token embedding (GPT-2's recipe; `model.mlp`, `norm`, `tie_embeddings`, `zero_init` and
`logit_softcap` choose ReLU^2, a parameter-free RMSNorm, an untied head, zero-initialised output
projections and soft-capped logits instead). Its sizes come from a `ModelShape`
(fitgpt.model.shape), which also counts its parameters and FLOPs. The loss, a `LossSpec` given
at construction, never needs the full (B, T, V) logits: see `fitgpt.model.loss`. Activation
checkpointing is applied to a built model from outside (`fitgpt.model.checkpointing`);
generation and its KV cache are in `fitgpt.model.generate`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fitgpt.model import rotary
from fitgpt.model.blockops import relu2, rms_norm
from fitgpt.model.generate import KVCache, generate
from fitgpt.model.loss import LossSpec
from fitgpt.model.shape import ModelShape


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has none-or-both before 2.1)."""

    def __init__(self, n: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """RMS norm without parameters (model.norm = "rmsnorm", as modded-nanogpt and nanochat):
    x / sqrt(mean(x^2) + eps), eps the dtype's machine epsilon (F.rms_norm's default); written
    out in fitgpt.model.blockops so that it saves one small tensor on every device."""

    def forward(self, x):
        return rms_norm(x)


def make_norm(s: ModelShape) -> nn.Module:
    """The norm the shape asks for: GPT-2's LayerNorm or the parameter-free RMSNorm."""
    return RMSNorm() if s.norm == "rmsnorm" else LayerNorm(s.n_embd, s.bias)


class Head(nn.Linear):
    """The lm_head: logits of hidden states, soft-capped when the shape says so (c * tanh(z / c),
    in fp32) so that sampling sees the logits the loss was trained on. The loss itself takes
    `weight` and `softcap` (fitgpt.model.loss), never calling this on every position."""

    def __init__(self, s: ModelShape):
        super().__init__(s.n_embd, s.padded_vocab, bias=False)
        self.softcap = s.logit_softcap

    def forward(self, h):
        logits = super().forward(h)
        if self.softcap:
            logits = self.softcap * torch.tanh(logits.float() / self.softcap)
        return logits


class CausalSelfAttention(nn.Module):
    def __init__(self, s: ModelShape, dropout: float):
        super().__init__()
        self.n_head = s.n_head
        self.dropout = dropout
        self.qk_norm = s.qk_norm
        self.c_attn = nn.Linear(s.n_embd, 3 * s.n_embd, bias=s.bias)
        self.c_proj = nn.Linear(s.n_embd, s.n_embd, bias=s.bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, rope=None):
        """rope: the (cos, sin) tables of these positions with model.position=rotary, else None."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k = q.view(B, T, self.n_head, C // self.n_head), k.view(B, T, self.n_head, C // self.n_head)
        if self.qk_norm:
            q, k = rotary.qk_norm(q), rotary.qk_norm(k)
        if rope is not None:
            q, k = rotary.rotate(q, *rope), rotary.rotate(k, *rope)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        mask, causal = None, True  # the whole context (or the first part of the cache)
        if cache is not None and cache.pos > 0:  # queries at pos..pos+T-1 see the cache up to theirs
            causal = False
            if T > 1:
                mask = torch.ones(T, cache.pos + T, dtype=torch.bool, device=x.device).tril(cache.pos)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, pos + T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, s: ModelShape, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(s.n_embd, 4 * s.n_embd, bias=s.bias)
        self.c_proj = nn.Linear(4 * s.n_embd, s.n_embd, bias=s.bias)
        self.dropout = nn.Dropout(dropout)
        self.relu2 = s.mlp == "relu2"

    def forward(self, x):
        u = self.c_fc(x)  # (B, T, 4C)
        u = relu2(u) if self.relu2 else F.gelu(u)  # ReLU^2 saves what GELU saves: its input
        return self.dropout(self.c_proj(u))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, s: ModelShape, dropout: float):
        super().__init__()
        self.ln_1 = make_norm(s)
        self.attn = CausalSelfAttention(s, dropout)
        self.ln_2 = make_norm(s)
        self.mlp = MLP(s, dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, rope=None):
        x = x + self.attn(self.ln_1(x), cache, layer, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The model of `shape`, with `dropout` in training mode, computing its loss as `loss` says."""

    def __init__(self, s: ModelShape, dropout: float = 0.0, loss: LossSpec | None = None):
        super().__init__()
        self.shape = s
        self.loss = loss or LossSpec()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(s.padded_vocab, s.n_embd),
            **({"wpe": nn.Embedding(s.block_size, s.n_embd)} if s.position == "learned" else {}),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList([Block(s, dropout) for _ in range(s.n_layer)]),
            ln_f=make_norm(s),
        ))
        self.lm_head = Head(s)
        if s.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied

    # -- initialisation (GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer))
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's initialisation. With zero_init the attention and MLP output projections and an
        untied lm_head start at zero (modded-nanogpt, nanochat): each block starts as the
        identity and the first logits are uniform. Their random draws are still made, so the
        other tensors get the same values as without it."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
                continue
            std = 0.02
            if name.endswith("c_proj.weight"):
                std = 0.02 / math.sqrt(2 * self.shape.n_layer)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype).mul_(std))
                if self.shape.zero_init and name.endswith(("c_proj.weight", "lm_head.weight")):
                    p.zero_()

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters (tied weights counted once); without embeddings: minus wte and wpe.
        The shape's count (tests/test_shape.py checks it against this model's tensors)."""
        return self.shape.params(embeddings)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) after ln_f. With a cache, idx holds the tokens at
        positions cache.pos.. (their keys and values are added to it) and attends to the cache."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.shape.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                             f"{self.shape.block_size}")
        x, rope = self._embed(idx, start)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None, 0, rope) if cache is None else block(x, cache, i, rope)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def _embed(self, idx: torch.Tensor, start: int):
        """Token embeddings plus the learned position embeddings of positions start..; with
        rotary, the token embeddings alone and the (cos, sin) tables of those positions."""
        T, wte = idx.size(1), self.transformer.wte
        if self.shape.position == "rotary":
            hs = self.shape.n_embd // self.shape.n_head
            rope = rotary.tables(start, T, hs, idx.device, rotary.compute_dtype(idx.device.type, wte.weight))
            return self.transformer.drop(wte(idx)), rope
        pos = torch.arange(start, start + T, device=idx.device)
        return self.transformer.drop(wte(idx) + self.transformer.wpe(pos)), None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean"):
        """With targets: the loss (mean over tokens, or the sum with reduction='sum').
        Without: the logits of the last position, (B, 1, V), for generation."""
        h = self.hidden(idx)  # (B, T, C)
        if targets is None:
            return self.lm_head(h[:, [-1], :])  # (B, 1, V)
        h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)  # (B*T, C), (B*T,)
        return self.loss(h, self.lm_head.weight, targets, reduction, self.shape.logit_softcap)

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float],
                            device_type: str) -> torch.optim.AdamW:
        """AdamW; weight decay on matrices only (an untied lm_head is one); fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """Sample max_new_tokens after idx (B, T): `fitgpt.model.generate.generate` says how."""
        return generate(self, idx, max_new_tokens, **options)
