"""`fitgpt bench`: a CPU smoke test of the whole command, and its parts."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from fitgpt.config.load import load_config
from fitgpt.config.schema import Config
from fitgpt.errors import ConfigError
from fitgpt.model.shape import ModelShape
from fitgpt.train.bench import COLUMNS, Variant, cli, markdown, parse_variants, render, table_rows

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--model.vocab_size=256", "--train.batch_size=2", "--train.grad_accum=2",
        "--eval.batch_size=3", "--memory.loss_chunk=24", "--train.device=cpu"]


@pytest.fixture(scope="module")
def tiny_result():
    """One bench run of a tiny config, 3 steps, two variants, two repeats, as JSON."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli([*TINY, "--steps", "3", "--warmup", "1", "--repeats", "2",
                    "--variants", "full_logits,chunked+checkpointing", "--json"])
    assert code == 0
    return json.loads(out.getvalue())


def test_bench_json_has_every_column_finite_and_positive(tiny_result):
    """The smoke test: every number the table shows is there, finite and positive."""
    r = tiny_result
    assert [row["variant"] for row in r["rows"]] == ["full_logits", "chunked+checkpointing"]
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["steps"] == 3
    assert r["tokens_per_step"] == 2 * 2 * 32
    for row in r["rows"]:
        for key in ("tokens_per_s", "ms_per_step", "train_peak", "eval_peak", "eval_tokens_per_s",
                    "speed_ratio", "train_memory_ratio", "eval_memory_ratio", "train_loss",
                    "eval_loss"):
            v = row[key]
            assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (key, v)
        assert len(row["tokens_per_s_repeats"]) == 2
        assert row["mfu"] is None  # a CPU has no peak FLOP/s in the card table
    first, second = r["rows"]
    # the ratios are the second variant's figures over the first's (speed: within each repeat)
    assert second["train_memory_ratio"] == pytest.approx(second["train_peak"] / first["train_peak"])
    assert second["eval_memory_ratio"] == pytest.approx(second["eval_peak"] / first["eval_peak"])
    per_repeat = [a / b for a, b in zip(second["tokens_per_s_repeats"], first["tokens_per_s_repeats"])]
    assert second["speed_ratio"] == pytest.approx(statistics.median(per_repeat))
    # the chunked loss with checkpointing holds less than full logits: its ratio says so
    assert second["train_peak"] < first["train_peak"] and second["train_memory_ratio"] < 1
    assert (first["loss"], first["checkpointing"]) == ("full", False)
    assert (second["loss"], second["checkpointing"]) == ("chunked", True)
    # the same seeded synthetic tokens and weights: both variants see the same losses
    assert abs(first["train_loss"] - second["train_loss"]) < 1e-4
    assert abs(first["eval_loss"] - second["eval_loss"]) < 1e-4


def test_bench_table_and_markdown_have_the_columns(tiny_result):
    from rich.console import Console

    rows = table_rows(tiny_result)
    assert len(rows) == 2 and all(len(cells) == len(COLUMNS) for cells in rows)
    md = markdown(tiny_result).splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |" and len(md) == 4
    console = Console(record=True, width=200)
    render(tiny_result, console)
    text = console.export_text()
    for name in COLUMNS:
        assert name in text
    assert "chunked+checkpointing" in text and "no peak FLOP/s" in text


def test_parse_variants():
    vs = parse_variants("full_logits, chunked,chunked+checkpointing,compile")
    assert [v.name for v in vs] == ["full_logits", "chunked", "chunked+checkpointing", "compile"]
    assert vs[0].loss == "full" and vs[1].loss == "chunked" and vs[3].loss is None
    assert vs[2].checkpointing and not vs[1].checkpointing and vs[3].compile
    with pytest.raises(ConfigError, match="did you mean chunked"):
        parse_variants("chunkd")
    with pytest.raises(ConfigError, match="both"):
        parse_variants("full_logits+chunked")
    with pytest.raises(ConfigError, match="twice"):
        parse_variants("chunked,chunked")


def test_variant_changes_only_what_it_names():
    cfg = Config()
    cfg.memory.loss, cfg.memory.loss_chunk = "full", 512
    out = Variant("chunked+checkpointing", "chunked", True, False).apply(cfg)
    assert (out.memory.loss, out.memory.checkpointing, out.train.compile) == ("chunked", True, False)
    assert out.memory.loss_chunk == 512 and cfg.memory.loss == "full"  # a copy
    assert Variant("compile", None, False, True).apply(cfg).memory.loss == "full"


def test_default_config_is_small_with_the_gpt2_vocabulary():
    cfg = load_config(None, [], default="bench-cpu")
    m = cfg.model
    assert (m.n_layer, m.n_embd, m.block_size, cfg.train.batch_size) == (4, 128, 256, 8)
    assert ModelShape.of(m).padded_vocab == 50304 and cfg.train.grad_accum == 1


def test_bad_numbers_are_config_errors():
    with pytest.raises(ConfigError, match="whole number"):
        cli([*TINY, "--steps", "three"])
    with pytest.raises(ConfigError, match=">= 1"):
        cli([*TINY, "--steps", "0"])


def test_cli_wiring_and_imports_stay_torch_free(capsys):
    """`fitgpt bench` is a command; importing the CLI and fitgpt.train.bench does not import torch."""
    import subprocess
    import sys

    from fitgpt.cli.main import main

    assert main(["bench", "--help"]) == 0
    assert "--variants" in capsys.readouterr().out
    code = "import sys, fitgpt.cli.main, fitgpt.train.bench; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_golden_outputs_record_and_check(tmp_path):
    """bench/golden.py (for refactors that must not change behaviour): a check right after a
    record is identical, and a changed byte count in one plan is reported with exit 1."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "golden.py"
    gold = tmp_path / "golden.json"
    run = lambda action: subprocess.run([sys.executable, str(script), action, str(gold)],  # noqa: E731
                                        capture_output=True, text=True)
    assert run("record").returncode == 0
    ok = run("check")
    assert ok.returncode == 0 and "identical" in ok.stdout
    data = json.loads(gold.read_text())
    data["plans"]["gpt2-124m"]["train"]["allocated"] += 512
    gold.write_text(json.dumps(data))
    bad = run("check")
    assert bad.returncode == 1 and "changed: gpt2-124m" in bad.stdout


def test_lever_variants_set_the_levers_and_nothing_else():
    cfg = Config()
    v8, fused, every = parse_variants("8bit+every:2,fused,chunked+every:3")
    out = v8.apply(cfg)
    assert (out.memory.optimizer_state, out.memory.checkpointing, out.memory.checkpoint_every) == ("8bit", True, 2)
    assert out.memory.fused_backward is False and out.train.grad_clip == cfg.train.grad_clip
    out = fused.apply(cfg)
    assert out.memory.fused_backward is True and out.train.grad_clip == 0.0  # clipping is refused with it
    assert out.memory.optimizer_state == "fp32" and not out.memory.checkpointing
    assert every.apply(cfg).memory.checkpoint_every == 3 and cfg.memory.checkpoint_every == 1  # a copy
    with pytest.raises(ConfigError, match="every:2"):
        parse_variants("every")
    with pytest.raises(ConfigError, match="positive whole number"):
        parse_variants("every:0")


def test_bench_rows_for_the_levers_that_run_on_a_cpu():
    """8-bit state, fused backward and every-other-block checkpointing each get a row against
    plain AdamW in the same run; the memory ratios go the way the levers promise."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli([*TINY, "--model.n_embd=64", "--model.n_head=4", "--train.grad_accum=1",
                    "--steps", "2", "--warmup", "1", "--repeats", "1",
                    "--variants", "chunked,chunked+8bit,chunked+fused,chunked+every:2", "--json"])
    assert code == 0
    rows = {r["variant"]: r for r in json.loads(out.getvalue())["rows"]}
    assert rows["chunked+8bit"]["train_memory_ratio"] < 1  # 2 B of moments per weight, not 8
    assert rows["chunked+every:2"]["train_memory_ratio"] < 1
    for r in rows.values():
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
