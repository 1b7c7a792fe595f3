"""`fitgpt sample`: text from a checkpoint (fitgpt's or nanoGPT's), with a KV cache.

The prompt is encoded, and the samples decoded, with GPT-2's BPE, or, when the model's data folder
(data.dir, recorded in the checkpoint's config; `--data.dir=DIR` points elsewhere) holds nanoGPT's
character-level meta.pkl, with that vocabulary, as nanoGPT's sample.py does. A prompt longer than
the model's context keeps its last block_size tokens, with a warning. Samples are drawn together
as one batch from one seeded generator, so a seed gives the same texts every time, with or
without the cache (`--no-kv-cache` is there to compare). How the cache behaves once the context
is full is described in `GPT.generate`.
"""

from __future__ import annotations

from fitgpt.errors import FitError

SEPARATOR = "-" * 40


def crop_prompt(tokens: list[int], block_size: int) -> tuple[list[int], str | None]:
    """The last block_size tokens of a prompt, and a warning when some were dropped."""
    if len(tokens) <= block_size:
        return tokens, None
    return tokens[-block_size:], (f"the prompt has {len(tokens)} tokens, more than the model's "
                                  f"context of {block_size}; keeping its last {block_size}")


def text_vocab(cfg):
    """How this model's ids map to text: the data folder's meta.pkl (a character-level nanoGPT
    dataset) when it has one, else GPT-2's BPE for a GPT-2-vocabulary model; a FitError saying
    what to do otherwise."""
    from fitgpt.data.tokenizer import N_VOCAB, Gpt2Text, find_meta, gpt2_encoding

    vocab_size, data_dir = cfg.model.vocab_size, cfg.data.dir
    meta = find_meta(data_dir)
    if meta is not None:
        if meta.n_vocab > vocab_size or meta.n_vocab < N_VOCAB <= vocab_size:
            raise FitError(f"{meta.path} has {meta.n_vocab} characters and this model {vocab_size} "
                           f"ids: it is not this model's vocabulary; point --data.dir=DIR at the "
                           f"model's own data folder")
        return meta
    if vocab_size < N_VOCAB:  # larger: GPT-2's ids and padding rows, which are never drawn
        raise FitError(f"this model's vocabulary has {vocab_size} ids, fewer than GPT-2's {N_VOCAB}, "
                       f"and its data folder {data_dir} has no meta.pkl (nanoGPT's character-level "
                       f"vocabulary) to decode them with: point --data.dir=DIR at the folder that has it")
    return Gpt2Text(gpt2_encoding())


def generate_texts(model, vocab, prompt: str, *, max_new_tokens: int, temperature: float,
                   top_k: int | None, top_p: float | None, seed: int, num_samples: int,
                   rt, vocab_limit: int, kv_cache: bool = True) -> tuple[list[str], list[str]]:
    """(texts, warnings): num_samples continuations of prompt (the prompt included), encoded
    and decoded with `vocab` (see text_vocab); ids >= vocab_limit are never drawn."""
    import torch

    warnings = []
    tokens = vocab.encode(prompt)
    if not tokens:
        raise FitError("the prompt is empty: a character-level model needs at least one character")
    tokens, warn = crop_prompt(tokens, model.shape.block_size)
    if warn:
        warnings.append(warn)
    idx = torch.tensor([tokens] * num_samples, dtype=torch.long, device=rt.device)
    gen = torch.Generator().manual_seed(seed)
    with rt.autocast():
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=gen, vocab_limit=min(vocab_limit, vocab.n_vocab),
                             kv_cache=kv_cache)
    return [vocab.decode(row) for row in out.tolist()], warnings


def sample_checkpoint(ckpt: str, overrides: list[str], prompt: str, *, max_new_tokens: int,
                      temperature: float, top_k: int | None, top_p: float | None, seed: int,
                      num_samples: int, kv_cache: bool = True) -> list[str]:
    """`fitgpt sample`: load the checkpoint (a run folder or a file, fitgpt's or nanoGPT's, with
    --section.key=value overrides), generate, and print the texts between separators; the texts."""
    from fitgpt.console import say
    from fitgpt.data.tokenizer import CharVocab
    from fitgpt.store.load import load_model

    notes: list[str] = []
    cfg, model, rt = load_model(ckpt, overrides, notes)
    for note in notes:
        say(f"note: {note}")
    vocab = text_vocab(cfg)
    if isinstance(vocab, CharVocab):
        say(f"note: character-level vocabulary of {vocab.n_vocab} ids from {vocab.path}")
    texts, warnings = generate_texts(
        model, vocab, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, num_samples=num_samples, rt=rt, vocab_limit=cfg.model.vocab_size,
        kv_cache=kv_cache)
    for w in warnings:
        say(f"warning: {w}")
    for i, text in enumerate(texts):
        if i:
            say(SEPARATOR)
        say(text)
    return texts
