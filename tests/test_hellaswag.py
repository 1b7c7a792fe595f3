"""HellaSwag scoring, checked by hand on a model whose every logit is known in closed form."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from fitgpt.cli.main import main
from fitgpt.config.load import to_dict
from fitgpt.config.schema import Config
from fitgpt.errors import DataError
from fitgpt.eval.hellaswag import Example, ending_losses, read_examples, rows_of, score
from fitgpt.model.runtime import Runtime, build_model

ALPHABET = " abcdefghijklmno"  # 16 ids: ' ' is 0, 'a' is 1, ...
SCALE = 2.0
CPU = Runtime(torch.device("cpu"), torch.float32)


def encode(text: str) -> list[int]:
    return [ALPHABET.index(c) for c in text]


def repeat_model(block=16):
    """A bigram model that expects each token to repeat: blocks are identities (their output
    projections are zero), positions are zero, wte[i] = SCALE x e_i, so the logits after token
    i are SCALE x LayerNorm(SCALE x e_i) and depend on nothing else."""
    cfg = Config()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.vocab_multiple = 2, 2, 32, block, 16, 1
    model = build_model(cfg, torch.device("cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") or "wpe" in name:
                p.zero_()
        model.transformer.wte.weight.copy_(SCALE * torch.eye(16, 32))
    return cfg, model.eval()


def token_loss(prev: int, nxt: int) -> float:
    """The repeat model's loss, by hand: LayerNorm of SCALE x e_prev over 32 dims (eps 1e-5),
    times SCALE x e_j for logit j."""
    mean, var = SCALE / 32, SCALE**2 * (1 / 32) * (31 / 32)
    logits = [SCALE * ((SCALE if j == prev else 0.0) - mean) / math.sqrt(var + 1e-5) for j in range(16)]
    return math.log(sum(math.exp(v) for v in logits)) - logits[nxt]


def ending_loss(ctx: str, ending: str) -> tuple[float, int]:
    toks = encode(ctx + " " + ending)
    n = len(ending) + 1
    return sum(token_loss(toks[i - 1], toks[i]) for i in range(len(toks) - n, len(toks))), n


# acc (lowest sum) picks ending 0 of the first two examples, acc_norm (lowest mean) ending 1;
# both pick ending 1 of the third; in the fourth, whose context is longer than the model's
# window, acc picks 1 ("k": two misses) and acc_norm 0 ("jjjj": two misses, three repeats).
EXAMPLES = [
    {"ctx": "ab", "endings": ["c", "cccccc", "dd", "eee"], "label": 1},
    {"ctx": "ab", "endings": ["c", "cccccc", "dd", "eee"], "label": 0},
    {"ctx": "aa", "endings": ["b", "  ", "bc", "bcd"], "label": 1},
    {"ctx": "abcdefghijklmnoabcdefghij", "endings": ["jjjj", "k", "kl", "klm"], "label": 0},
]


def write_file(path, examples=EXAMPLES):
    with open(path, "w") as f:
        for i, ex in enumerate(examples):  # the official release's other keys, ignored
            f.write(json.dumps({"ind": i, "activity_label": "x", "ctx_a": ex["ctx"], "ctx_b": "",
                                "split": "val", "split_type": "indomain", "source_id": "s", **ex}) + "\n")
    return path


def test_scores_match_the_hand_computation(tmp_path):
    """Guards which tokens are scored (the ending's only, context and padding masked) and the
    two argmins: acc by summed loss, acc_norm by mean loss per ending token."""
    _, model = repeat_model()
    examples = read_examples(write_file(tmp_path / "h.jsonl"))
    picks_sum, picks_mean = [], []
    for ex in examples:
        losses = [ending_loss(ex.ctx, e) for e in ex.endings]
        picks_sum.append(min(range(4), key=lambda k: losses[k][0]))
        picks_mean.append(min(range(4), key=lambda k: losses[k][0] / losses[k][1]))
    assert picks_sum == [0, 0, 1, 1] and picks_mean == [1, 1, 1, 0]
    for batch in (1, 2, 64):  # rows per pass differ, padding differs: same scores
        res = score(model, examples, encode, batch, 16, CPU)
        assert (res.examples, res.acc, res.acc_norm) == (4, 2 / 4, 3 / 4)

    rows = [r for ex in examples for r in rows_of(ex, encode, 16)]
    got = ending_losses(model, rows, 3 * 16, CPU)
    want = [ending_loss(ex.ctx, e)[0] for ex in examples for e in ex.endings]
    assert got == pytest.approx(want, abs=1e-4)


def test_long_context_is_cropped_from_the_left():
    """Guards rows longer than the window: the ending is kept whole, the context's oldest
    tokens go."""
    ex = Example("abcdefghijklmno" * 3, ["abc"], 0)
    (tokens, n), = rows_of(ex, encode, 16)
    assert len(tokens) == 17 and n == 4 and tokens[-4:] == encode(" abc")


def test_malformed_file_names_the_line(tmp_path):
    """Guards a confusing crash on a wrong file: one line saying where and what."""
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps({"ctx": "a", "endings": ["b"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*label"):
        read_examples(p)


def test_eval_task_hellaswag_command(tmp_path, capsys):
    """Guards `fitgpt eval --task hellaswag --file F --ckpt C` on a GPT-2-vocabulary model:
    it prints the same scores as scoring directly."""
    from fitgpt.data.tokenizer import gpt2_encoding

    cfg = Config(name="tiny")
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 2, 2, 32, 64, 50257
    model = build_model(cfg, torch.device("cpu"))
    ckpt = tmp_path / "m.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, ckpt)
    data = [{"ctx": "The cat sat on the", "endings": ["mat.", "moon landing", "dog", "car"], "label": 0},
            {"ctx": "She opened the", "endings": ["door", "sky", "it", "book slowly"], "label": 3}]
    f = write_file(tmp_path / "hellaswag_val.jsonl", data)
    assert main(["eval", "--task", "hellaswag", "--file", str(f), "--ckpt", str(ckpt),
                 "--eval.batch_size=3"]) == 0
    out = capsys.readouterr().out
    acc, acc_norm = map(float, re.search(r"acc (\S+) \| acc_norm (\S+)", out).groups())
    res = score(model.eval(), read_examples(f), gpt2_encoding().encode_ordinary, 3, 64, CPU)
    assert (acc, acc_norm) == (res.acc, res.acc_norm)
    assert main(["eval", "--task", "hellaswag", "--ckpt", str(ckpt)]) == 2  # no --file
    assert main(["eval", "--task", "mmlu", "--file", str(f), "--ckpt", str(ckpt)]) == 2
