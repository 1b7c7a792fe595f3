"""nanoGPT's own config files, as their users run them (issue 12's acceptance).

The files below carry the same keys and values as nanoGPT's `config/finetune_shakespeare.py`,
`config/train_shakespeare_char.py` and `config/eval_gpt2*.py`. Each must plan; the
shakespeare_char flow must train, continue with nanoGPT's `--init_from=resume`, and sample text
decoded through the dataset's `meta.pkl` (a character vocabulary), as nanoGPT's sample.py does.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from fitgpt.cli.main import main

FINETUNE_SHAKESPEARE = """\
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl' # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# the number of examples per iter:
# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
"""

TRAIN_SHAKESPEARE_CHAR = """\
# train a miniature character-level shakespeare model
# good for debugging and playing on macbooks and such

out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10 # don't print too too often

# we expect to overfit on this small dataset, so only save when val improves
always_save_checkpoint = False

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # context of up to 256 previous characters

# baby GPT model :)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3 # with baby networks can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000 # make equal to max_iters usually
min_lr = 1e-4 # learning_rate / 10 usually
beta2 = 0.99 # make a bit bigger because number of tokens per iter is small

warmup_iters = 100 # not super necessary potentially

# on macbook also add
# device = 'cpu'  # run on cpu only
# compile = False # do not torch compile the model
"""

EVAL_GPT2 = """\
# evaluate the base gpt2
# n_layer={L}, n_head={H}, n_embd={C}
batch_size = 8
eval_iters = 500 # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = '{name}'
"""

GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
              "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 60

# What every run below appends: a model that trains in seconds on a CPU.
TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32",
        "--block_size=32", "--batch_size=4", "--eval_iters=2", "--log_interval=1"]


def write_char_dataset(folder):
    """nanoGPT's data/shakespeare_char/prepare.py output: train.bin and val.bin (headerless
    uint16) and meta.pkl holding vocab_size, itos and stoi."""
    folder.mkdir(parents=True)
    chars = sorted(set(TEXT))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in TEXT], dtype=np.uint16)
    cut = int(0.9 * len(ids))
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return chars


def plan_json(capsys, args):
    capsys.readouterr()
    rc = main(["plan", *args, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out[out.index("{"):])


@pytest.mark.parametrize("name", sorted(GPT2_SIZES))
def test_eval_gpt2_files_plan_without_optimizer_state(tmp_path, capsys, name):
    """nanoGPT's eval_gpt2*.py never creates AdamW state: the plan of an eval-only run counts
    none, so GPT-2 large's evaluation fits a 12 GB card (its fp32 weights are 3.1 GB)."""
    L, H, C = GPT2_SIZES[name]
    cfg = tmp_path / f"eval_{name}.py"
    cfg.write_text(EVAL_GPT2.format(L=L, H=H, C=C, name=name))
    rc, plan = plan_json(capsys, [str(cfg), "--gpu", "rtx4070"])
    assert rc == 0
    phases = [plan[k] for k in ("train", "eval") if isinstance(plan.get(k), dict)]
    optimizer = [p for ph in phases for p in ph.get("parts", []) if "optimizer" in p["name"]]
    assert all(p["bytes"] == 0 for p in optimizer), optimizer
    if name in ("gpt2", "gpt2-medium", "gpt2-large"):
        assert plan["fits"] is True, plan


def test_finetune_shakespeare_file_plans(tmp_path, capsys, monkeypatch):
    """The file's `wandb_run_name = 'ft-' + str(time.time())` names a log run only: it plans,
    and `min_lr` > `learning_rate` is no error with `decay_lr = False` (nanoGPT never uses it)."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "finetune_shakespeare.py"
    cfg.write_text(FINETUNE_SHAKESPEARE)
    rc, plan = plan_json(capsys, [str(cfg), "--gpu", "a100-80gb"])
    assert rc == 0, plan


def test_train_shakespeare_char_file_plans(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_char_dataset(tmp_path / "data" / "shakespeare_char")
    cfg = tmp_path / "train_shakespeare_char.py"
    cfg.write_text(TRAIN_SHAKESPEARE_CHAR)
    rc, plan = plan_json(capsys, [str(cfg), "--gpu", "rtx4070"])
    assert rc == 0 and plan["fits"] is True, plan


def test_shakespeare_char_trains_resumes_and_samples_through_meta_pkl(tmp_path, capsys, monkeypatch):
    """The nanoGPT flow, end to end: train from the file, continue with --init_from=resume (the
    same file and out_dir), then sample: the text decodes through meta.pkl's itos."""
    monkeypatch.chdir(tmp_path)
    chars = write_char_dataset(tmp_path / "data" / "shakespeare_char")
    cfg = tmp_path / "train_shakespeare_char.py"
    cfg.write_text(TRAIN_SHAKESPEARE_CHAR)
    assert main(["train", str(cfg), *TINY, "--max_iters=4", "--eval_interval=2"]) == 0
    first = capsys.readouterr().out
    assert "step 4" in first.replace("step     4", "step 4") or "completed at step 4" in first

    assert main(["train", str(cfg), *TINY, "--max_iters=6", "--eval_interval=2",
                 "--init_from=resume"]) == 0
    resumed = capsys.readouterr()
    text = resumed.out + resumed.err
    assert "completed at step 6" in text, text
    assert "resum" in text.lower()

    assert main(["sample", "--ckpt", "out-shakespeare-char", "--prompt", "First",
                 "--max-new-tokens", "40", "--seed", "1"]) == 0
    sample = capsys.readouterr().out
    assert "First" in sample
    body = sample[sample.index("First"):]
    assert len(body) >= 40
    assert set(body) - {"\n"} <= set(chars) | {" "}, body
