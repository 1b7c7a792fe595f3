"""Generation: sampling tokens after a prompt, optionally with a KV cache.

`generate` runs the model's `hidden` (with or without a `KVCache`) and its lm_head on the last
position; `sample_next` turns those logits into the next token. `GPT.generate` calls `generate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             vocab_limit: int | None = None, top_p: float | None = None,
             kv_cache: bool = False) -> torch.Tensor:
    """Sample max_new_tokens after idx (B, T) from `model` (a GPT); the context is cropped to
    block_size; ids >= vocab_limit (the padding rows of the embedding) are never produced.

    kv_cache=True keeps each layer's keys and values, so a step runs one token through the
    model instead of the whole context; the tokens are the same as without it. Once the
    context reaches block_size the window must slide, which changes every position (and so
    every key): from then on each step re-runs the cropped context, as without the cache."""
    T = model.shape.block_size
    cache = None
    for _ in range(max_new_tokens):
        if not kv_cache:
            h = model.hidden(idx[:, -T:])
        else:
            cache = cache or KVCache(model.shape.n_layer, T)
            if cache.pos in (0, T):  # first step, or full: (re)fill with the cropped context
                cache.pos = 0
                h = model.hidden(idx[:, -T:], cache)
            else:
                h = model.hidden(idx[:, -1:], cache)  # only the newest token
        logits = model.lm_head(h[:, -1, :]).float()  # (B, V)
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
