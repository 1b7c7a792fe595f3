"""Checkpoints that unpickle but are wrong are refused in one line, before anything is built.

Each case takes a real checkpoint of a tiny run (or a nanoGPT-style ckpt.pt), damages one entry,
and runs the three commands that read checkpoints. Before fitgpt.store.ckptcheck every case ended in a
traceback from deep inside PyTorch (or, for the 1e6-wide config, an attempt to allocate the
model); now each is exit code 2 with one line naming the file and the entry.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tokens, tiny_config

from fitgpt.cli.main import main
from fitgpt.data.shards import write_shard
from fitgpt.store.checkpoint import find_checkpoint, load_checkpoint


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    """A real checkpoint of one training step of the tiny model."""
    from fitgpt.train.trainer import run

    root = tmp_path_factory.mktemp("good")
    shards = root / "shards"
    shards.mkdir()
    write_shard(shards / "tiny_val_000000.bin", make_tokens(2048, 256, 0))
    write_shard(shards / "tiny_train_000001.bin", make_tokens(8000, 256, 1))
    s = run(tiny_config(shards, root, train__max_steps=1, eval__interval=1, eval__tokens=256))
    return find_checkpoint(s["run_dir"])


def _first_param(ck) -> str:
    return next(iter(ck["optimizer"]["state"]))


def _set(d, key, value):
    d[key] = value


CASES = {
    # name: (damage, what the message must say)
    "shape mismatch": (lambda ck: _set(ck["model"], "transformer.wpe.weight", torch.zeros(16, 32)),
                       "has shape (16, 32)"),
    "missing key": (lambda ck: ck["model"].pop("transformer.ln_f.weight"), "weights missing"),
    "extra key": (lambda ck: _set(ck["model"], "transformer.h.7.ln_1.weight", torch.ones(32)),
                  "is not part of"),
    "model is a list": (lambda ck: _set(ck, "model", list(ck["model"].values())),
                        "'model' is a list"),
    "rng of the wrong size": (lambda ck: _set(ck["rng"], "torch", torch.zeros(3, dtype=torch.uint8)),
                              "random-generator state"),
    "rng not a table": (lambda ck: _set(ck, "rng", [1, 2]), "'rng' is a list"),
    "optimizer moment shape": (lambda ck: _set(ck["optimizer"]["state"][_first_param(ck)], "exp_avg",
                                               torch.zeros(2, 2)), "exp_avg"),
    "optimizer is text": (lambda ck: _set(ck, "optimizer", "adamw"), "'optimizer' is a str"),
    "optimizer names an unknown parameter": (
        lambda ck: ck["optimizer"]["param_groups"][0]["params"].append("transformer.h.9.x.weight"),
        "not a parameter"),
    "step is text": (lambda ck: _set(ck, "step", "x"), "'step' is 'x'"),
    "negative tokens": (lambda ck: _set(ck, "tokens", -5), "'tokens' is -5"),
    "best val loss is text": (lambda ck: _set(ck, "best_val_loss", "low"), "best_val_loss"),
    "config is text": (lambda ck: _set(ck, "config", "model"), "'config' is a str"),
    "config section is a list": (lambda ck: _set(ck["config"], "model", [1]), "config section 'model'"),
    "config asks for a 12 TB model": (lambda ck: _set(ck["config"]["model"], "n_embd", 1_000_000),
                                      "needs (256, 1000000)"),
    "config value of the wrong type": (lambda ck: _set(ck["config"]["train"], "lr", "fast"),
                                       "saved config is not usable"),
    "backoff is text": (lambda ck: _set(ck["backoff"], "micro_split", "two"), "backoff entry"),
}


def _damaged(good: Path, tmp_path: Path, name: str) -> Path:
    ck = torch.load(good, map_location="cpu", weights_only=True)
    damage, _ = CASES[name]
    damage(ck)
    out = tmp_path / "bad" / "step_00000001.pt"
    out.parent.mkdir()
    torch.save(ck, out)
    return out


COMMANDS = {"train --resume": ["train", "--resume"], "eval --ckpt": ["eval", "--ckpt"],
            "sample --ckpt": ["sample", "--max-new-tokens", "2", "--ckpt"]}


def _refused(argv: list[str], path: Path, must: str, capsys) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    assert str(path) in err and must in err, err
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing written beside it


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(CASES))
def test_damaged_checkpoint_is_refused_in_one_line(case, command, good_ckpt, tmp_path, capsys):
    """Guards against a traceback (or a huge allocation) from a checkpoint that loads but whose
    entries have the wrong type, shape or size."""
    path = _damaged(good_ckpt, tmp_path, case)
    _refused([*COMMANDS[command], str(path)], path, CASES[case][1], capsys)


NANOGPT_CASES = {
    "iter_num is text": (lambda ck: _set(ck, "iter_num", "x"), "'iter_num' is 'x'"),
    "model_args width is text": (lambda ck: _set(ck["model_args"], "n_embd", "wide"), "model_args 'n_embd'"),
    "model_args asks for a 12 TB model": (lambda ck: _set(ck["model_args"], "n_embd", 1_000_000),
                                          "needs (256, 1000000)"),
    "model_args zero layers": (lambda ck: _set(ck["model_args"], "n_layer", 0), "no usable model: model.n_layer"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(NANOGPT_CASES))
def test_damaged_nanogpt_checkpoint_is_refused_in_one_line(case, command, tmp_path, capsys):
    """The same for nanoGPT's ckpt.pt, whose fields are converted before fitgpt reads them."""
    from test_nanogpt import write_nanogpt_ckpt

    path = tmp_path / "out" / "ckpt.pt"
    path.parent.mkdir()
    write_nanogpt_ckpt(path)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    NANOGPT_CASES[case][0](ck)
    torch.save(ck, path)
    _refused([*COMMANDS[command], str(path)], path, NANOGPT_CASES[case][1], capsys)


def test_latest_naming_a_path_is_refused(good_ckpt, tmp_path, capsys):
    """`latest` names a file in checkpoints/, never a path: a resume writes into the run folder
    the checkpoint's path implies, so `../../elsewhere/...` would move every write there."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    other = tmp_path / "elsewhere" / "checkpoints"
    other.mkdir(parents=True)
    (other / "step_00000001.pt").write_bytes(good_ckpt.read_bytes())
    (run / "checkpoints" / "latest").write_text("../../elsewhere/checkpoints/step_00000001.pt\n")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "latest" in err and "names '../../" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["checkpoints"]


def test_good_checkpoint_still_loads(good_ckpt, capsys):
    """The checks accept what fitgpt itself writes."""
    assert main(["eval", "--ckpt", str(good_ckpt), "--eval.tokens=64"]) == 0
    assert "val loss" in capsys.readouterr().out


def test_float32_checkpoint_resumes_in_float16(good_ckpt, tmp_path, capsys):
    """Guards against a traceback from GradScaler.load_state_dict: a float32 run saves an empty
    scaler state, which an enabled (float16) scaler refuses; it now starts a fresh scaler."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(good_ckpt.parent.parent, run_dir)
    assert main(["train", "--resume", str(run_dir), "--train.dtype=float16", "--train.max_steps=2",
                 "--eval.interval=100"]) == 0
    assert load_checkpoint(run_dir)["step"] == 2
