"""Generation speed with and without the KV cache, and a check that both give the same tokens.

    python bench/sample_speed.py                  # GPT-2 124M, 256 new tokens (~15 min on 2 cores)
    python bench/sample_speed.py gpt2-124m --model.n_layer=6 --model.n_embd=384 --model.n_head=6

The model is built from a config (default: configs/gpt2-124m.toml, the GPT-2 124M shape) with
random weights: speed does not depend on the weights. A random prompt of --prompt-tokens ids is
continued greedily and then with seeded sampling (temperature 1, top-k 200), each with and
without the cache; each timing is the best of --repeats. The run stops with an error if the
cached tokens differ. Both paths pay the same lm_head per token (n_embd x 50304 weights), so the
speed-up is larger the more of the model sits in the blocks.
"""

from __future__ import annotations

import argparse
import time

import torch

from fitgpt.config.load import load_config
from fitgpt.model.runtime import build_model


def timed(model, idx, n, kv, sampled, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        gen = torch.Generator().manual_seed(0)
        kw = dict(temperature=1.0, top_k=200) if sampled else dict(temperature=0.0)
        t0 = time.perf_counter()
        out = model.generate(idx, n, generator=gen, kv_cache=kv, vocab_limit=50257, **kw)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="gpt2-124m")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    a, overrides = p.parse_known_args()
    cfg = load_config(a.config, overrides)
    cfg.train.device = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu")).eval()
    m = cfg.model
    idx = torch.randint(0, 50257, (1, a.prompt_tokens))
    print(f"model: {m.n_layer} layers x {m.n_embd}, {m.n_head} heads, block {m.block_size}, "
          f"{model.num_params() / 1e6:.1f}M parameters | CPU, {torch.get_num_threads()} threads | "
          f"prompt {a.prompt_tokens} tokens, {a.new_tokens} new")
    print("| decoding | without cache | with KV cache | speed-up | same tokens |")
    print("| --- | --- | --- | --- | --- |")
    for sampled in (False, True):
        slow, ref = timed(model, idx, a.new_tokens, False, sampled, a.repeats)
        fast, out = timed(model, idx, a.new_tokens, True, sampled, a.repeats)
        same = torch.equal(ref, out)
        print(f"| {'sampled (seeded)' if sampled else 'greedy'} | {slow:.2f} s "
              f"({a.new_tokens / slow:.1f} tok/s) | {fast:.2f} s ({a.new_tokens / fast:.1f} tok/s) "
              f"| {slow / fast:.1f}x | {'yes' if same else 'NO'} |", flush=True)
        if not same:
            raise SystemExit("the cached tokens differ from the uncached ones")


if __name__ == "__main__":
    main()
