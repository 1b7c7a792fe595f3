"""Metrics: bits per byte, MFU, TensorBoard and W&B records, plots, the runs listing."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fitgpt.cli.main import main
from fitgpt.config.schema import Config
from fitgpt.data.shards import ValWindows, find_splits, write_shard
from fitgpt.data.tokenizer import gpt2_encoding
from fitgpt.errors import ConfigError
from fitgpt.eval.evaluate import EvalResult, evaluate, token_bytes
from fitgpt.model.runtime import Runtime, build_model
from fitgpt.model.shape import ModelShape
from fitgpt.report import metrics as report
from fitgpt.report.log import RunLog
from fitgpt.report.runs import list_runs, params_of, runs_table
from fitgpt.train.state import RunStats, TrainState
from fitgpt.train.trainer import run

CPU = Runtime(torch.device("cpu"), torch.float32)


def test_bits_per_byte_counts_text_bytes_not_eot(tmp_path):
    """Guards bpb's definition: summed nats over ln 2 x the UTF-8 bytes of the target tokens,
    end-of-text counting no bytes; computed here from the decoded text, not the table."""
    enc = gpt2_encoding()
    text = "Once upon a time, a naïve café served crème brûlée. "
    ids = []
    while len(ids) < 700:
        ids += enc.encode_ordinary(text * 3) + [enc.eot_token]
    d = tmp_path / "gpt2"
    d.mkdir()
    write_shard(d / "x_val_000000.bin", np.array(ids, dtype=np.uint16))
    write_shard(d / "x_train_000001.bin", np.array(ids, dtype=np.uint16))
    cfg = Config()
    cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size = 1, 2, 32, 64
    model = build_model(cfg, torch.device("cpu"))
    val = ValWindows(find_splits(d)[1], 64, 10)
    res = evaluate(model, val, 4, CPU, vocab=50257)
    targets = torch.cat([y.flatten() for _, y in val.batches(10)]).tolist()
    nbytes = len(enc.decode_bytes([t for t in targets if t != enc.eot_token]))
    assert enc.eot_token in targets and nbytes > 0
    assert res.bpb == pytest.approx(res.loss * res.tokens / (math.log(2) * nbytes), rel=1e-9)
    assert res.target_bytes == nbytes
    table = token_bytes(50257, 50304)
    assert table[enc.eot_token] == 0 and table[50257:].sum() == 0 and len(table) == 50304
    assert evaluate(model, val, 4, CPU, vocab=None).bpb is None  # vocabulary unknown


def test_bpb_is_none_for_a_non_gpt2_vocabulary(shard_dir):
    """Guards a meaningless bpb for the tiny 256-id test models."""
    model = build_model(tiny_config(shard_dir, "x"), torch.device("cpu"))
    res = evaluate(model, ValWindows(find_splits(shard_dir)[1], 32, 4), 4, CPU, vocab=256)
    assert res.bpb is None and res.loss > 0


def test_mfu_matches_nanogpts_estimate_for_gpt2_124m(monkeypatch):
    """Guards MFU against a number worked out by hand with nanoGPT's estimate_mfu (PaLM's
    appendix B count), not against fitgpt's own formula: GPT-2 124M as nanoGPT builds it
    (12 layers, 12 heads, n_embd 768, block 1024, bias, vocab 50257 padded to 50304) at
    100,000 tokens/s on an A100 (bf16 peak 312 TFLOP/s, the card table's figure). None on a CPU.

    N = nanoGPT's get_num_params() (position embeddings left out, the tied wte counted once):
      blocks 12 x (12 x 768^2 + 13 x 768) = 12 x 7,087,872 = 85,054,464
      + ln_f 2 x 768 = 1,536, + wte 50,304 x 768 = 38,633,472      -> N = 123,689,472
    flops per token = 6N + 12 L H Q T = 742,136,832 + 12 x 12 x 12 x 64 x 1024 (113,246,208)
                    = 855,383,040
    MFU = 855,383,040 x 100,000 / 312e12 = 8.5538304e13 / 3.12e14 = 0.27416123..."""
    from fitgpt.planner.gpus import find_gpu

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = Config()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias = 12, 12, 768, 1024, True
    m.vocab_size, m.vocab_multiple = 50257, 64
    assert ModelShape.of(cfg.model).flops_per_token() == 855_383_040
    cfg.train.device = "cpu"
    assert report.mfu(cfg, 1e5) is None
    report.peak_flops.cache_clear()
    # no GPU here: the card is the table's A100, as current_gpu would report it on one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr("fitgpt.planner.gpus.current_gpu", lambda i: find_gpu("a100-80gb"))
    try:
        cfg.train.device = "auto"
        assert report.mfu(cfg, 1e5) == pytest.approx(0.27416123076923077, rel=1e-12)
        # torchrun's 4 processes (the world size, passed in): tokens/s of 4 cards together
        assert report.mfu(cfg, 1e5, cards=4) == pytest.approx(0.27416123076923077 / 4, rel=1e-12)
    finally:
        report.peak_flops.cache_clear()


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_records_carry_mfu_and_bpb_and_go_to_tensorboard(tmp_path, monkeypatch):
    """Guards the metrics records (mfu, val_bpb in metrics.jsonl and the log line) and the
    TensorBoard event files written from them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config("d", tmp_path)
    cfg.log.tensorboard = True
    monkeypatch.setattr(report, "peak_flops", lambda device: 1e12)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trackers = report.start_trackers(cfg, tmp_path)
    log = RunLog(tmp_path, 0, progress=False)
    state, stats = TrainState(step=10, tokens=2560), RunStats()
    report.record_train(state, stats, 2.5, None, 1e-3, 0.5, cfg, log, trackers)
    report.record_eval(state, stats, EvalResult(2.25, 512, 0.1, bpb=1.125), log, trackers)
    log.close()
    trackers.finish()
    train, ev = records(tmp_path)
    # tiny config (2 layers, n_embd 32, block 32, vocab 256, no bias), by hand: 6 x (2 x (12 x 32^2
    # + 2 x 32) + 32) + 6 x 256 x 32 + 12 x 2 x 32 x 32 = 148,416 + 49,152 + 24,576 = 222,144
    # FLOPs per token; 4 x 2 x 32 = 256 tokens in 0.5 s = 512 tok/s; over the 1e12 peak:
    assert train["mfu"] == pytest.approx(222_144 * 512 / 1e12, rel=1e-12)
    assert ev["val_bpb"] == 1.125
    assert "bpb 1.1250" in (tmp_path / "train.log").read_text()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("eval/val_bpb")[0].value == 1.125
    assert acc.Scalars("train/loss")[0].step == 10


def test_missing_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    """Guards the optional packages: a one-line ConfigError naming the extra when tensorboard
    is missing, and W&B's own WANDB_MODE=offline left as the user set it."""
    cfg = tiny_config("d", tmp_path)
    cfg.log.tensorboard = True
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"fitgpt\[tensorboard\]"):
        report.start_trackers(cfg, tmp_path)
    seen = {}
    fake = types.SimpleNamespace(init=lambda **kw: seen.update(kw, mode=__import__("os").environ.get("WANDB_MODE"))
                                 or types.SimpleNamespace(log=lambda rec, step: None, finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg.log.tensorboard, cfg.log.wandb = False, True
    report.start_trackers(cfg, tmp_path).log({"kind": "train", "loss": 1.0}, step=1)
    assert seen["mode"] == "offline" and seen["name"] == tmp_path.name


def test_run_plots_and_runs_listing(shard_dir, tmp_path, capsys, monkeypatch):
    """Guards plots.png at the end of every run (matplotlib is a dependency), `fitgpt plot` for
    several runs, and `fitgpt runs` (a run without summary.json is 'running or killed'); with
    matplotlib missing (a broken install), plotting is a one-line error saying what to install,
    and the end-of-run hook a note."""
    from test_plots import distinct_colours, png_size

    cfg = tiny_config(shard_dir, tmp_path / "runs")
    summary = run(cfg)
    run_dir = tmp_path / "runs" / "run"
    assert "plots.png" in capsys.readouterr().out  # the closing lines name it
    assert png_size(run_dir / "plots.png") == (1320, 495)  # 12 x 4.5 inches at 110 dpi
    assert (run_dir / "plots.png").stat().st_size > 20_000 and distinct_colours(run_dir / "plots.png") > 20
    assert report.finish_plots(run_dir) == run_dir / "plots.png"
    recs = records(run_dir)
    assert all("mfu" in r and r["mfu"] is None for r in recs if r["kind"] == "train")
    assert all("val_bpb" in r for r in recs if r["kind"] == "eval")

    killed = tmp_path / "runs" / "killed"
    killed.mkdir()
    (killed / "config.toml").write_text((run_dir / "config.toml").read_text())
    (killed / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 3, "tokens": 768,
                                                      "val_loss": 4.5}) + "\n{\"kind\": \"tr")
    rows = {r[0]: r for r in runs_table(list_runs(tmp_path / "runs"))}
    assert rows["run"][3] == f"{summary['best_val_loss']:.4f}" and rows["run"][4] == "completed"
    assert rows["killed"][1:] == (rows["run"][1], "768", "4.5000", "running or killed")
    assert params_of(dataclasses.asdict(cfg.model)) == summary["params"]
    assert main(["runs", str(tmp_path / "runs")]) == 0
    assert "running or killed" in capsys.readouterr().out

    out = tmp_path / "both.png"
    assert main(["plot", str(run_dir), str(killed), "--out", str(out)]) == 0 and out.is_file()
    assert main(["plot", str(tmp_path)]) == 2  # not a run folder
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    capsys.readouterr()
    assert report.finish_plots(run_dir) is None
    assert "note: no plots.png: plotting needs matplotlib" in capsys.readouterr().out
    assert main(["plot", str(run_dir)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_printed_text_is_not_rewritten(capsys):
    """A generated sample or a prompt is printed as written: rich used to turn ':smile:' into an
    emoji even with markup off."""
    from fitgpt.console import say

    say("the :smile: and [bold]x[/bold] stay")
    assert "the :smile: and [bold]x[/bold] stay" in capsys.readouterr().out


def test_byte_sizes_beyond_gib_use_larger_units():
    """A plan of a huge config used to print '1138687133.84 GiB'."""
    from fitgpt.console import fmt_bytes

    assert fmt_bytes(1.5 * 2**40) == "1.50 TiB"
    assert fmt_bytes(3 * 2**50) == "3.00 PiB"
    assert fmt_bytes(2**30) == "1.00 GiB"


@pytest.mark.parametrize("log_interval, eval_interval", [(100, 3), (4, 3)])
def test_throughput_counts_every_timed_step(shard_dir, tmp_path, log_interval, eval_interval):
    """summary.json's tokens/s covers the steps after the last log line and those cut short by an
    evaluation: a log interval longer than the run once left it empty (None)."""
    cfg = tiny_config(shard_dir, tmp_path / "runs", train__max_steps=7, log__interval=log_interval,
                      eval__interval=eval_interval)
    s = run(cfg)
    assert s["status"] == "completed"
    assert s["tokens_per_second"] is not None and s["tokens_per_second"] > 0
