"""`fitgpt sample --ckpt RUN_DIR_OR_FILE [--prompt TEXT|--prompt-file F] [--max-new-tokens N ...]`.

Generation is fitgpt.eval.sample.sample_checkpoint (the KV cache is the model's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fitgpt.errors import FitError, parse_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fitgpt sample", allow_abbrev=False, description=(
        "Generate text from a checkpoint (a run folder or a .pt file; nanoGPT's ckpt.pt too). "
        "Extra --section.key=value arguments override the checkpoint's config, e.g. "
        "--train.device=cpu, or --data.dir=DIR: the data folder whose meta.pkl (a character-level "
        "nanoGPT dataset's vocabulary) encodes the prompt and decodes the samples."))
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=200, help="0: no top-k")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, e.g. 0.95")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--no-kv-cache", action="store_true",
                   help="re-run the whole context for every token (same tokens, slower)")
    return p


def cmd_sample(args: list[str]) -> int:
    """Exit code 0; bad options and an unreadable prompt file are one-line FitErrors."""
    a, overrides = parse_args(_parser(), args, known=True)
    if a.max_new_tokens < 0 or a.num_samples < 1:
        raise FitError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if a.top_p is not None and not 0.0 < a.top_p <= 1.0:
        raise FitError(f"--top-p must be in (0, 1], got {a.top_p}")
    prompt = a.prompt
    if a.prompt_file:
        try:
            prompt = Path(a.prompt_file).read_text()
        except OSError as e:
            raise FitError(f"--prompt-file {a.prompt_file}: {e.strerror}") from None
    from fitgpt.eval.sample import sample_checkpoint

    sample_checkpoint(a.ckpt, overrides, prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                      top_k=a.top_k or None, top_p=a.top_p, seed=a.seed, num_samples=a.num_samples,
                      kv_cache=not a.no_kv_cache)
    return 0
