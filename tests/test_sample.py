"""Sampling: the KV cache changes the speed, never the tokens; `fitgpt sample` end to end."""

from __future__ import annotations

import re

import pytest
import torch

from fitgpt.cli.main import main
from fitgpt.config.load import to_dict
from fitgpt.config.schema import Config
from fitgpt.eval.sample import crop_prompt
from fitgpt.model.generate import KVCache, sample_next
from fitgpt.model.runtime import build_model


def tiny(vocab=256, block=16, bias=False, seed=0):
    cfg = Config(name="tiny")
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.bias = 2, 2, 32, block, vocab, bias
    cfg.train.seed = seed
    model = build_model(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than the init: varied greedy text, peaked sampling
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return cfg, model.eval()


def save_ckpt(path, cfg, model):
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, path)
    return path


@pytest.mark.parametrize("how", ["greedy", "sampled"])
def test_kv_cache_gives_the_same_tokens(how):
    """Guards the cache's correctness: positions, masks and the full-cache fallback. 40 new
    tokens after a 5-token prompt cross block_size 16, so the 'context full: re-run the cropped
    window' path runs too; both paths share sample_next, so greedy and seeded sampling are
    compared through the same code."""
    _, model = tiny(bias=how == "sampled")
    idx = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(temperature=0.0) if how == "greedy" else dict(temperature=1.0, top_k=100, top_p=0.95)
    outs = [model.generate(idx, 40, generator=torch.Generator().manual_seed(7), kv_cache=kv,
                           vocab_limit=250, **kw) for kv in (False, True)]
    assert outs[0].shape == (3, 45)
    assert torch.equal(outs[0], outs[1])
    new = outs[0][:, 5:]
    assert int(new.max()) < 250  # padding ids never produced
    assert all(len(set(row)) >= 5 for row in new.tolist())  # not a constant: a real comparison
    if how == "sampled":  # the seed matters: a different one gives different text
        other = model.generate(idx, 40, generator=torch.Generator().manual_seed(8), kv_cache=True, **kw)
        assert not torch.equal(other, outs[1])


def test_cache_hidden_states_equal_full_forward():
    """Guards the attention mask for several new tokens after a filled cache (pos > 0, T > 1)."""
    _, model = tiny()
    x = torch.randint(0, 256, (2, 14))
    cache = KVCache(model.shape.n_layer, model.shape.block_size)
    with torch.no_grad():
        parts = [model.hidden(x[:, a:b], cache) for a, b in ((0, 5), (5, 9), (9, 10), (10, 14))]
        ref = model.hidden(x)
    assert cache.pos == 14
    torch.testing.assert_close(torch.cat(parts, 1), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="longer than block_size"):
        model.hidden(x[:, :3], cache)  # 14 + 3 > 16


def test_top_p_keeps_the_smallest_set_reaching_p():
    """Guards nucleus sampling's boundary: tokens outside the smallest set whose mass reaches
    top_p are never drawn, the most likely token always stays."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, 1.0, None, 0.7, gen)) for _ in range(300)}
    assert drawn == {0, 1}
    assert {int(sample_next(logits, 1.0, None, 0.4, gen)) for _ in range(50)} == {0}
    assert {int(sample_next(logits, 1.0, None, 1.0, gen)) for _ in range(400)} == {0, 1, 2, 3}
    assert int(sample_next(torch.tensor([[0.0, 3.0, 1.0]]), 0.0)) == 1  # greedy


def test_long_prompt_is_cropped_with_a_warning():
    """Guards prompts longer than the context: the last block_size tokens, and a warning."""
    kept, warn = crop_prompt(list(range(40)), 16)
    assert kept == list(range(24, 40)) and "40 tokens" in warn and "16" in warn
    assert crop_prompt([1, 2], 16) == ([1, 2], None)


def test_sample_command(tmp_path, capsys):
    """Guards `fitgpt sample` end to end: a checkpoint, a prompt, seeded samples that are the
    same with and without the cache, several samples, a cropped long prompt."""
    cfg, model = tiny(vocab=50257, block=32)
    ckpt = save_ckpt(tmp_path / "m.pt", cfg, model)
    args = ["sample", "--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "12",
            "--seed", "3", "--num-samples", "2", "--top-p", "0.9"]
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert main(args + ["--no-kv-cache"]) == 0
    assert capsys.readouterr().out == cached
    texts = cached.split("-" * 40)
    assert len(texts) == 2 and all(t.strip().startswith("Hello") for t in texts)

    (tmp_path / "p.txt").write_text("word " * 60)
    assert main(["sample", "--ckpt", str(ckpt), "--prompt-file", str(tmp_path / "p.txt"),
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert re.search(r"warning: the prompt has \d+ tokens, more than the model's context of 32",
                     capsys.readouterr().out)
    assert main(["sample", "--ckpt", str(ckpt), "--top-p", "2"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_sample_refuses_a_non_gpt2_vocabulary(tmp_path, capsys):
    """Guards decoding garbage: a 256-id model's tokens are not GPT-2 text, and without a
    meta.pkl in its data folder there is nothing else to decode them with."""
    cfg, model = tiny()
    cfg.data.dir = str(tmp_path)
    ckpt = save_ckpt(tmp_path / "m.pt", cfg, model)
    assert main(["sample", "--ckpt", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "fewer than GPT-2's 50257" in err and "no meta.pkl" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- char-level data

CHAR_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
             "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and "
             "Juliet is the sun; the caf\u00e9 is closed.\n\n")


def write_char_dataset(folder):
    """A character-level dataset exactly as nanoGPT's data/shakespeare_char/prepare.py writes
    one: train.bin and val.bin (headerless uint16, the first 90 % and the last 10 %) and
    meta.pkl (vocab_size, itos, stoi) written by pickle. Returns itos."""
    import pickle

    import numpy as np

    data = CHAR_TEXT * 60
    chars = sorted(set(data))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(data)
    folder.mkdir(parents=True)
    np.array([stoi[c] for c in data[:int(n * 0.9)]], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return itos


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """(run summary, itos, data folder): a tiny model trained 3 steps on the char dataset,
    with the end-of-run sample on; shared by the tests below (none of them changes it)."""
    from conftest import tiny_config

    from fitgpt.train.trainer import run

    root = tmp_path_factory.mktemp("char")
    data = root / "data" / "shakespeare_char"
    itos = write_char_dataset(data)
    cfg = tiny_config(data, root / "out", train__max_steps=3, eval__sample_tokens=24,
                      eval__sample_prompt="ROMEO:")
    cfg.model.vocab_size = len(itos)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FITGPT_CACHE", str(root / "cache"))
        return run(cfg), itos, data


def test_char_level_dataset_samples_through_its_meta_pkl(char_run, capsys):
    """Guards sampling a character-level nanoGPT dataset's model: the prompt is encoded and the
    output decoded with meta.pkl's stoi/itos (as nanoGPT's sample.py does), both by `fitgpt
    sample` and by the end-of-run sample; checked against the model's own greedy ids decoded
    here through the pickled itos."""
    from fitgpt.store.load import load_model

    summary, itos, _ = char_run
    assert summary["sample"].startswith("ROMEO:")
    assert len(summary["sample"]) == len("ROMEO:") + 24 and set(summary["sample"]) <= set(itos.values())
    run_dir = summary["run_dir"]
    capsys.readouterr()
    assert main(["sample", "--ckpt", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "30",
                 "--temperature", "1", "--top-k", "0", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "character-level vocabulary of" in out
    stoi = {c: i for i, c in itos.items()}
    _, model, _ = load_model(run_dir, [], [])
    ids = model.generate(torch.tensor([[stoi[c] for c in "ROMEO:"]]), 30, temperature=1.0,
                         generator=torch.Generator().manual_seed(5), vocab_limit=len(itos),
                         kv_cache=True)[0].tolist()
    assert out.endswith("".join(itos[i] for i in ids) + "\n")
    assert len(set(ids[6:])) >= 2  # a real text, not one repeated id

    assert main(["sample", "--ckpt", run_dir, "--prompt", "ROMEO~"]) == 2  # no '~' in the data
    err = capsys.readouterr().err
    assert "'~'" in err and "meta.pkl" in err and len(err.splitlines()) == 1


def test_nanogpt_char_checkpoint_samples_from_data_dataset_meta(char_run, tmp_path, capsys, monkeypatch):
    """Guards nanoGPT's own layout: out-shakespeare-char/ckpt.pt with config dataset
    'shakespeare_char' finds data/shakespeare_char/meta.pkl from where it runs, as nanoGPT's
    sample.py does, and decodes through it."""
    import shutil

    from fitgpt.store.checkpoint import load_checkpoint

    summary, itos, data = char_run
    shutil.copytree(data, tmp_path / "data" / "shakespeare_char")
    sd = load_checkpoint(summary["run_dir"])["model"]
    args = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "bias": False,
            "vocab_size": len(itos), "dropout": 0.0}
    (tmp_path / "out-shakespeare-char").mkdir()
    torch.save({"model": {k: v[:len(itos)] if k.endswith("wte.weight") or k == "lm_head.weight" else v
                          for k, v in sd.items()},
                "model_args": args, "iter_num": 3, "best_val_loss": 9.9,
                "config": {"dataset": "shakespeare_char", "batch_size": 4, "block_size": 32}},
               tmp_path / "out-shakespeare-char" / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--ckpt", "out-shakespeare-char", "--prompt", "ROMEO:",
                 "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert "data/shakespeare_char/meta.pkl" in out
    text = out[out.index("\nROMEO:") + 1:-1]  # the sample: the last thing printed
    assert len(text) == len("ROMEO:") + 20 and set(text) <= set(itos.values())


def test_char_level_eval_reports_bits_per_byte(char_run, capsys):
    """Guards `fitgpt eval` on a character-level dataset: bits per byte from meta.pkl's
    characters (each its UTF-8 bytes: 'é' is 2), summed nats over ln 2 x those bytes."""
    import math

    import numpy as np

    from fitgpt.data.shards import ValWindows, find_splits
    from fitgpt.eval.run import eval_checkpoint

    summary, itos, data = char_run
    res = eval_checkpoint(summary["run_dir"], [])
    val = ValWindows(find_splits(data)[1], 32, 512 // 32)  # tiny_config: block 32, eval tokens 512
    targets = np.concatenate([y.numpy().ravel() for _, y in val.batches(5)])
    text = "".join(itos[int(t)] for t in targets)
    assert "\u00e9" in text and len(text.encode()) > len(text)  # the check sees a 2-byte character
    assert res["val_bpb"] == pytest.approx(res["val_loss"] * res["tokens"] / (math.log(2) * len(text.encode())))
    assert "bits per byte" in capsys.readouterr().out


def test_meta_pkl_with_code_is_refused_and_nothing_runs(char_run, tmp_path, capsys, monkeypatch):
    """Guards reading meta.pkl as data: a pickle whose payload would run a command is refused
    with one line (exit 2) before anything runs."""
    import pickle

    summary, _, _ = char_run
    marker = tmp_path / "ran"
    monkeypatch.setenv("BOOM_MARKER", str(marker))
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "meta.pkl").write_bytes(pickle.dumps(_Payload()))
    capsys.readouterr()
    assert main(["sample", "--ckpt", summary["run_dir"], "--prompt", "ROMEO:",
                 f"--data.dir={tmp_path / 'evil'}"]) == 2
    err = capsys.readouterr().err
    assert "not a plain nanoGPT meta.pkl" in err and "posix.system" in err and len(err.splitlines()) == 1
    assert not marker.exists()


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {os.environ['BOOM_MARKER']}",))
