"""HellaSwag, completion style, as llm.c and modded-nanogpt score it.

Each example of the official release (JSON lines with ctx, endings, label and other keys) gives
four rows: the context's tokens followed by one ending's tokens (encoded with a leading space).
A row's score is the loss summed over its ending's tokens only. `acc` counts the examples whose
lowest summed loss is the labelled ending; `acc_norm` uses the mean loss per ending token
instead (so a long ending is not penalised for its length).

Rows are batched within the evaluation's memory budget: rows go through the model together
while rows x longest row <= eval batch size x eval block size tokens (the size of one
validation forward pass), padded to the longest row, the padding's targets -1 (ignored). The
loss per row is computed from the hidden states with the same chunked loss as training, so the
full logits never exist. A context longer than the model's window loses its oldest tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fitgpt.errors import DataError
from fitgpt.model.loss import chunked_cross_entropy


@dataclass
class Example:
    ctx: str
    endings: list[str]
    label: int


@dataclass
class HellaSwagResult:
    examples: int
    acc: float  # fraction whose lowest summed ending loss is the label
    acc_norm: float  # fraction whose lowest mean ending loss is the label
    seconds: float


def read_examples(path: Path, limit: int | None = None) -> list[Example]:
    """Examples from a file in the official JSON-lines format; anything malformed is a DataError
    that names the line."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            ex = Example(str(d["ctx"]), [str(e) for e in d["endings"]], int(d["label"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}:{n}: not a HellaSwag example (needs ctx, endings, label): "
                            f"{type(e).__name__} {e}") from None
        if not 0 <= ex.label < len(ex.endings) or len(ex.endings) < 2:
            raise DataError(f"{path}:{n}: label {ex.label} does not index its "
                            f"{len(ex.endings)} endings")
        out.append(ex)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def rows_of(ex: Example, encode: Callable[[str], list[int]], block_size: int):
    """(tokens, number of ending tokens) per ending; the context cropped from the left so the
    row fits the model's window (positions predict the next token, so a row has block_size + 1
    tokens at most)."""
    ctx = encode(ex.ctx)
    rows = []
    for ending in ex.endings:
        end = encode(" " + ending)
        if not end:
            raise DataError(f"an ending encodes to no tokens: {ending!r}")
        keep = max(0, block_size + 1 - len(end))
        tokens = (ctx[-keep:] if keep else []) + end
        rows.append((tokens[-(block_size + 1):], min(len(end), block_size)))
    return rows


def batches(rows: list[tuple[list[int], int]], budget: int) -> Iterator[list[int]]:
    """Indices of rows per forward pass: while rows x longest <= budget tokens (at least one)."""
    batch: list[int] = []
    longest = 0
    for i, (tokens, _) in enumerate(rows):
        n = len(tokens) - 1
        if batch and (len(batch) + 1) * max(longest, n) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        yield batch


@torch.no_grad()
def ending_losses(model, rows: list[tuple[list[int], int]], budget: int, rt) -> list[float]:
    """Summed loss over each row's ending tokens."""
    out = [0.0] * len(rows)
    for idx in batches(rows, budget):
        T = max(len(rows[i][0]) - 1 for i in idx)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        y = torch.full((len(idx), T), -1, dtype=torch.long)  # -1: ignored (context, padding)
        for r, i in enumerate(idx):
            tokens, n_end = rows[i]
            t = torch.tensor(tokens)
            x[r, :len(t) - 1] = t[:-1]
            y[r, len(t) - 1 - n_end:len(t) - 1] = t[-n_end:]  # targets: the ending's tokens
        x, y = rt.to_device(x, y)
        with rt.autocast():
            h = model.hidden(x)  # (rows, T, C)
            for r, i in enumerate(idx):
                out[i] = float(chunked_cross_entropy(h[r], model.lm_head.weight, y[r],
                                                     model.loss.chunk_rows, "sum",
                                                     model.shape.logit_softcap))
    return out


def score(model, examples: list[Example], encode: Callable[[str], list[int]], batch_size: int,
          block_size: int, rt) -> HellaSwagResult:
    """acc and acc_norm of model over examples; batch_size x block_size tokens per pass."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    rows, spans = [], []
    for ex in examples:
        r = rows_of(ex, encode, min(block_size, model.shape.block_size))
        spans.append((len(rows), len(r)))
        rows += r
    try:
        losses = ending_losses(model, rows, batch_size * block_size, rt)
    finally:
        model.train(was_training)
    acc = acc_norm = 0
    for ex, (start, n) in zip(examples, spans):
        total = losses[start:start + n]
        mean = [t / rows[start + k][1] for k, t in enumerate(total)]
        acc += min(range(n), key=total.__getitem__) == ex.label
        acc_norm += min(range(n), key=mean.__getitem__) == ex.label
    k = len(examples)
    return HellaSwagResult(k, acc / k, acc_norm / k, time.perf_counter() - t0)


def eval_hellaswag(where: str, file: str, overrides: list[str]) -> dict:
    """`fitgpt eval --task hellaswag --file F --ckpt ...`."""
    from fitgpt.console import say
    from fitgpt.data.tokenizer import N_VOCAB, gpt2_encoding
    from fitgpt.errors import FitError
    from fitgpt.store.load import load_model

    examples = read_examples(Path(file))
    notes: list[str] = []
    cfg, model, rt = load_model(where, overrides, notes)
    for note in notes:
        say(f"note: {note}")
    if cfg.model.vocab_size != N_VOCAB:
        raise FitError(f"HellaSwag is GPT-2 text: it needs a model with GPT-2's {N_VOCAB} ids, "
                       f"this one has {cfg.model.vocab_size}")
    enc = gpt2_encoding()
    res = score(model, examples, enc.encode_ordinary, cfg.eval_batch_size, cfg.eval_block_size, rt)
    say(f"hellaswag: {res.examples:,} examples | acc {res.acc:.4f} | acc_norm {res.acc_norm:.4f} | "
        f"{res.seconds:.1f}s")
    return {"examples": res.examples, "acc": res.acc, "acc_norm": res.acc_norm}
