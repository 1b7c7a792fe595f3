"""The GPT-2 model, read top to bottom.

Token + position embeddings, n_layer pre-LayerNorm blocks (causal self-attention through
`F.scaled_dot_product_attention`, then a 4x GELU MLP), a final LayerNorm, and an lm_head tied to
the token embedding. The loss never needs the full (B, T, V) logits: see `fitgpt.model.loss`.
Memory tricks (activation checkpointing, compile) are applied from outside, in `fitgpt.train.parallelize`.
Generation can keep each layer's keys and values in a `KVCache` (see `GPT.generate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fitgpt.model.loss import chunked_cross_entropy, full_cross_entropy


@dataclass
class GPTShape:
    """What the model needs to know; built from `ModelConfig` by `GPTShape.of`."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int  # padded
    dropout: float = 0.0
    bias: bool = False

    @classmethod
    def of(cls, model_cfg) -> GPTShape:
        m = model_cfg
        padded = (m.vocab_size + m.vocab_multiple - 1) // m.vocab_multiple * m.vocab_multiple
        return cls(m.n_layer, m.n_head, m.n_embd, m.block_size, padded, m.dropout, m.bias)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has none-or-both before 2.1)."""

    def __init__(self, n: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of every layer, in buffers of block_size positions allocated on first use
    (so they take the dtype autocast gives k and v); `pos` positions are filled."""

    def __init__(self, n_layer: int, block_size: int):
        self.block_size = block_size
        self.k: list[torch.Tensor | None] = [None] * n_layer  # each (B, nh, block_size, hs)
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, T, hs) at positions pos..pos+T-1; return all keys and values so far."""
        if self.k[layer] is None:
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.block_size, hs)
            self.v[layer] = v.new_zeros(B, nh, self.block_size, hs)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, end, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.n_head = s.n_head
        self.dropout = s.dropout
        self.c_attn = nn.Linear(s.n_embd, 3 * s.n_embd, bias=s.bias)
        self.c_proj = nn.Linear(s.n_embd, s.n_embd, bias=s.bias)
        self.resid_dropout = nn.Dropout(s.dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
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
    def __init__(self, s: GPTShape):
        super().__init__()
        self.c_fc = nn.Linear(s.n_embd, 4 * s.n_embd, bias=s.bias)
        self.c_proj = nn.Linear(4 * s.n_embd, s.n_embd, bias=s.bias)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.ln_1 = LayerNorm(s.n_embd, s.bias)
        self.attn = CausalSelfAttention(s)
        self.ln_2 = LayerNorm(s.n_embd, s.bias)
        self.mlp = MLP(s)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.shape = s
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(s.vocab_size, s.n_embd),
            wpe=nn.Embedding(s.block_size, s.n_embd),
            drop=nn.Dropout(s.dropout),
            h=nn.ModuleList([Block(s) for _ in range(s.n_layer)]),
            ln_f=LayerNorm(s.n_embd, s.bias),
        ))
        self.lm_head = nn.Linear(s.n_embd, s.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        # How the loss is computed: 'chunked' (rows at a time) or 'full' (whole logits).
        self.loss_impl = "chunked"
        self.loss_chunk = 2048

    # -- initialisation (GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer))
    def init_weights(self, seed: int | None = None) -> None:
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

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters (tied weights counted once); without embeddings: minus wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) after ln_f. With a cache, idx holds the tokens at
        positions cache.pos.. (their keys and values are added to it) and attends to the cache."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.shape.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                             f"{self.shape.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x) if cache is None else block(x, cache, i)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean"):
        """With targets: the loss (mean over tokens, or the sum with reduction='sum').
        Without: the logits of the last position, (B, 1, V), for generation."""
        h = self.hidden(idx)  # (B, T, C)
        if targets is None:
            return self.lm_head(h[:, [-1], :])  # (B, 1, V)
        h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)  # (B*T, C), (B*T,)
        if self.loss_impl == "full":
            return full_cross_entropy(h, self.lm_head.weight, targets, reduction)
        return chunked_cross_entropy(h, self.lm_head.weight, targets, self.loss_chunk, reduction)

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float],
                            device_type: str) -> torch.optim.AdamW:
        """AdamW; weight decay on matrices only; fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, as nanoGPT and PaLM (appendix B) count them: 6 per
        non-embedding parameter, 6 per lm_head weight, 12 x layers x width x context for attention."""
        s = self.shape
        T = seq_len or s.block_size
        n = self.num_params(embeddings=False)
        return 6 * n + 6 * s.vocab_size * s.n_embd + 12 * s.n_layer * s.n_embd * T

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 vocab_limit: int | None = None, top_p: float | None = None,
                 kv_cache: bool = False):
        """Sample max_new_tokens after idx (B, T); the context is cropped to block_size;
        ids >= vocab_limit (the padding rows of the embedding) are never produced.

        kv_cache=True keeps each layer's keys and values, so a step runs one token through the
        model instead of the whole context; the tokens are the same as without it. Once the
        context reaches block_size the window must slide, which changes every position (and so
        every key): from then on each step re-runs the cropped context, as without the cache."""
        T = self.shape.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not kv_cache:
                h = self.hidden(idx[:, -T:])
            else:
                cache = cache or KVCache(self.shape.n_layer, T)
                if cache.pos in (0, T):  # first step, or full: (re)fill with the cropped context
                    cache.pos = 0
                    h = self.hidden(idx[:, -T:], cache)
                else:
                    h = self.hidden(idx[:, -1:], cache)  # only the newest token
            logits = self.lm_head(h[:, -1, :]).float()  # (B, V)
            if vocab_limit is not None:
                logits = logits[:, :vocab_limit]
            nxt = sample_next(logits, temperature, top_k, top_p, generator).to(idx.device)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, V): greedy at temperature <= 0; otherwise sampled
    (on the CPU, with `generator`) from the top_k most likely and the smallest set whose
    probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before it already reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)
