"""The planner: card lookup, the seed's verdict on its RTX 4070, proposals and auto-fit that keep
the tokens per optimizer step, `fitgpt plan` output (tables, JSON, nanoGPT files, --verify),
`--memory.fit=auto` in `fitgpt train`, and the GPU bench script's dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fitgpt.cli.main import main
from fitgpt.config.load import load_config, parse_size
from fitgpt.errors import ConfigError
from fitgpt.model.runtime import Runtime
from fitgpt.planner.estimate import estimate
from fitgpt.planner.fit import auto_fit, overrides_of, predicted_throughput, proposals, utilisation
from fitgpt.planner.gpus import MiB, find_gpu, lookup, smi_gpu
from fitgpt.planner.plan import make_plan, prepare_training
from fitgpt.planner.verify import verify

ROOT = Path(__file__).parent.parent
SEED = str(ROOT / "fitgpt" / "configs" / "seed-77m.py")
# The seed as its author ran it: nanoGPT has no eval_batch_size, so eval ran at batch 16.
SEED_AS_RUN = ["--eval.batch_size=16"]
TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--model.vocab_size=256", "--train.device=cpu", "--train.dtype=float32",
        "--train.batch_size=4", "--train.grad_accum=2", "--eval.batch_size=5",
        "--memory.loss_chunk=48", "--eval.sample_tokens=0"]


# ----------------------------------------------------------------------------- cards

def test_cards_by_name_and_by_size():
    """Every spelling a user types finds the card; a size is an unnamed card of that size."""
    for text in ("rtx4070", "RTX 4070", "4070", "NVIDIA GeForce RTX 4070"):
        g = find_gpu(text)
        assert g.key == "rtx4070" and g.memory == 12282 * MiB and g.bf16 and g.tflops == 58.3
    assert find_gpu("a100-80gb").memory == 81920 * MiB
    assert find_gpu("A100 80GB").key == "a100-80gb"
    assert find_gpu("h100").key == "h100-sxm" and find_gpu("h100 pcie").tflops == 756
    assert not find_gpu("t4").bf16 and not find_gpu("v100-32gb").bf16
    assert find_gpu("4060 Ti 16GB").key == "rtx4060ti-16gb"
    for text, size in (("12GB", 12 * 10**9), ("12GiB", 12 * 2**30), ("8000MB", 8 * 10**9)):
        g = find_gpu(text)
        assert g.memory == size and g.key == "" and g.bf16 and g.tflops is None


def test_unknown_card_lists_close_names():
    with pytest.raises(ConfigError, match="rtx4070"):
        find_gpu("rtx4071")
    with pytest.raises(ConfigError, match="12GB"):
        find_gpu("voodoo5")


def test_driver_names_map_to_the_table_but_not_to_a_different_card():
    """`current_gpu` and nvidia-smi give driver names: form-factor suffixes match, 'Ti' not."""
    assert lookup("NVIDIA A100-SXM4-80GB", 1).key == "a100-80gb"
    assert lookup("NVIDIA H100 80GB HBM3", 1).key == "h100-sxm"
    assert lookup("NVIDIA A10", 1).key == "a10"
    g = lookup("NVIDIA GeForce RTX 3080 Ti", 5)
    assert g.tflops is None and g.memory == 5  # unknown: not the RTX 3080


# ----------------------------------------------------------------------------- throughput

def test_throughput_model_orders_the_options():
    """Checkpointing costs ~25 % (4/3 of the blocks' FLOPs), small micro-batches lose
    utilisation (the utilisation model's own documented points: 4 x 1024 tokens per
    micro-batch run at 71 %, 1 x 1024 at 50 %, 16k and more at 100 %), the chunked loss ~2 %."""
    cfg = load_config(SEED, [])  # 16 x 1024 tokens per micro-batch
    base = predicted_throughput(cfg)
    ck = load_config(SEED, ["--memory.checkpointing=true"])
    small = load_config(SEED, ["--train.batch_size=4", "--train.grad_accum=128"])
    full = load_config(SEED, ["--memory.loss=full"])
    assert 0.75 < predicted_throughput(ck) / base < 0.85  # the lm_head is not recomputed
    assert predicted_throughput(small) / base == pytest.approx(0.7071, abs=1e-4)
    assert (utilisation(1024), utilisation(4096), utilisation(65536)) == pytest.approx((0.5, 0.7071, 1.0), abs=1e-4)
    assert predicted_throughput(full) / base == pytest.approx(1.02)


# ----------------------------------------------------------------------------- the seed's case

def test_seed_on_rtx4070_full_loss_does_not_fit_and_chunked_does(capsys):
    """The seed's run (full logits, eval at batch 16) needs more than the whole 12 GB card in
    training; fitgpt's default chunked loss brings it well inside the 10 % headroom."""
    gpu = find_gpu("rtx4070")
    full = make_plan(load_config(SEED, SEED_AS_RUN + ["--memory.loss=full"]), gpu)
    t = full.estimate.train
    assert not full.fits and t.total > gpu.memory
    assert max(t.parts, key=lambda p: p.bytes).name == "logits and loss"
    assert full.verdict.startswith("does not fit: training needs")
    assert "RTX 4070" in full.verdict and full.proposals
    chunked = make_plan(load_config(SEED, SEED_AS_RUN), gpu)
    assert chunked.fits and chunked.estimate.peak <= 0.9 * gpu.memory
    assert chunked.estimate.eval.total <= 0.9 * gpu.memory
    assert chunked.verdict.startswith("fits: peak")
    assert main(["plan", SEED, "--gpu", "rtx4070", "--memory.loss=full", *SEED_AS_RUN]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "logits and loss" in out and "proposals" in out
    assert "--memory.loss=chunked" in out
    assert main(["plan", SEED, "--gpu", "rtx4070", *SEED_AS_RUN]) == 0
    out = capsys.readouterr().out
    assert "fits: peak" in out and "% of the GeForce RTX 4070" in out


def test_proposals_keep_sequences_per_step_and_reproduce_from_their_overrides():
    cfg = load_config(SEED, SEED_AS_RUN + ["--memory.loss=full"])
    gpu = find_gpu("rtx4070")
    props = proposals(cfg, gpu, int(0.9 * gpu.memory))
    assert props and props[0].fits and "--memory.loss=chunked" in props[0].overrides
    fitting = [p for p in props if p.fits]
    assert [p.throughput for p in fitting] == sorted((p.throughput for p in fitting), reverse=True)
    rest = [p.peak for p in props if not p.fits]
    assert rest == sorted(rest) and props[:len(fitting)] == fitting
    for p in props:
        new = load_config(SEED, SEED_AS_RUN + ["--memory.loss=full"] + p.overrides)
        assert new.train.batch_size * new.train.grad_accum == 16 * 32
        assert new.eval_windows * new.eval_block_size == cfg.eval_windows * cfg.eval_block_size
        assert estimate(new, gpu=gpu).peak == p.peak
        assert p.fits == (p.peak <= int(0.9 * gpu.memory))


def test_a_card_too_small_gets_a_smaller_model_marked_as_such():
    cfg = load_config(SEED, SEED_AS_RUN)
    props = proposals(cfg, None, int(1.5 * 2**30))
    models = [p for p in props if p.changes_model]
    assert models and all(p.fits for p in models) and props[0].changes_model
    assert "changes the model" in props[0].description
    assert any(o.startswith("--model.") for o in props[0].overrides)


# ----------------------------------------------------------------------------- auto-fit

@pytest.mark.parametrize("budget", ["12GB", "6GB", "4GB"])
def test_auto_fit_fits_the_budget_and_keeps_tokens_per_step(budget):
    cfg = load_config(SEED, SEED_AS_RUN + ["--memory.loss=full"])
    new, lines = auto_fit(cfg, parse_size(budget), 0.1)
    est = estimate(new)
    assert est.train.total <= 0.9 * parse_size(budget) and est.eval.total <= 0.9 * parse_size(budget)
    assert new.tokens_per_step == cfg.tokens_per_step
    assert new.eval_windows * new.eval_block_size == cfg.eval_windows * cfg.eval_block_size
    assert new.memory.loss == "chunked" and lines[0].startswith("memory.loss full -> chunked")
    assert "training peak" in lines[0] and "> " in lines[0]
    if new.train.batch_size != 16:
        assert any(line.startswith(f"train.batch_size 16 -> {new.train.batch_size}") for line in lines)


def test_auto_fit_picks_the_faster_micro_batch_when_memory_allows():
    cfg = load_config(SEED, ["--train.batch_size=2", "--train.grad_accum=256"])
    new, lines = auto_fit(cfg, find_gpu("rtx4090").memory, 0.1)
    assert new.train.batch_size > 2 and new.tokens_per_step == cfg.tokens_per_step
    assert "predicted throughput" in lines[0]


def test_auto_fit_nothing_fits_says_what_would():
    cfg = load_config(SEED, SEED_AS_RUN)
    with pytest.raises(ConfigError, match="nothing fits.*best suggestion: smaller model"):
        auto_fit(cfg, 2**30, 0.1)


def test_auto_fit_of_an_eval_only_run_changes_only_the_evaluation(tmp_path):
    """nanoGPT's eval_gpt2_xl.py on a budget its training could never fit: auto-fit only
    shrinks the evaluation (an eval-only run never trains), and says why with the eval peak."""
    path = tmp_path / "eval_gpt2_xl.py"
    path.write_text(NANOGPT_FILES["eval_gpt2_xl.py"])
    cfg = load_config(str(path), ["--eval.batch_size=32"])
    budget = parse_size("12GB")
    assert estimate(cfg, gpu=find_gpu("12GB")).train.total > budget
    new, lines = auto_fit(cfg, budget, 0.1, gpu=find_gpu("12GB"))
    assert overrides_of(cfg, new) == [f"--eval.batch_size={new.eval_batch_size}"]
    assert new.eval_batch_size < 32 and lines[0].startswith("eval.batch_size 32 -> ")
    assert estimate(new, gpu=find_gpu("12GB")).peak <= 0.9 * budget


def test_seed_with_memory_fit_auto_and_a_12gb_budget_comes_out_fitting():
    cfg = load_config(SEED, SEED_AS_RUN + ["--memory.budget=12GB", "--memory.fit=auto"])
    new, lines = auto_fit(cfg, parse_size(cfg.memory.budget), cfg.memory.headroom)
    assert estimate(new).peak <= 0.9 * 12e9 and new.tokens_per_step == cfg.tokens_per_step
    assert main(["plan", SEED, *SEED_AS_RUN, "--memory.budget=12GB", "--memory.loss=full",
                 "--json", "--fit"]) == 0


# ----------------------------------------------------------------------------- the command

def test_plan_json_parses_and_carries_the_plan(capsys):
    assert main(["plan", SEED, "--gpu", "rtx4070", "--memory.loss=full", "--json", "--fit"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpu"]["key"] == "rtx4070" and data["fits"] is False
    assert data["train"]["total"] == data["train"]["allocated"] + sum(
        p["bytes"] for p in data["train"]["overhead"])
    assert data["peak"] == max(data["train"]["total"], data["eval"]["total"])
    assert data["proposals"][0]["overrides"] == ["--memory.loss=chunked"]
    assert data["auto_fit"]["estimate"]["peak"] <= data["limit"]


NANOGPT_FILES = {
    "train_gpt2.py": "wandb_log = True\nwandb_project = 'owt'\nwandb_run_name = 'gpt2-124M'\n"
                     "batch_size = 12\nblock_size = 1024\ngradient_accumulation_steps = 5 * 8\n"
                     "max_iters = 600000\nlr_decay_iters = 600000\neval_interval = 1000\n"
                     "eval_iters = 200\nlog_interval = 10\nweight_decay = 1e-1\n",
    "train_shakespeare_char.py": "out_dir = 'out-shakespeare-char'\neval_interval = 250\n"
                                 "eval_iters = 200\nlog_interval = 10\n"
                                 "always_save_checkpoint = False\nwandb_log = False\n"
                                 "dataset = 'shakespeare_char'\ngradient_accumulation_steps = 1\n"
                                 "batch_size = 64\nblock_size = 256\nn_layer = 6\nn_head = 6\n"
                                 "n_embd = 384\ndropout = 0.2\nlearning_rate = 1e-3\n"
                                 "max_iters = 5000\nlr_decay_iters = 5000\nmin_lr = 1e-4\n"
                                 "beta2 = 0.99\nwarmup_iters = 100\n",
    "eval_gpt2_xl.py": "batch_size = 8\neval_iters = 500\neval_only = True\nwandb_log = False\n"
                       "init_from = 'gpt2-xl'\n",
    "eval_gpt2_large.py": "batch_size = 8\neval_iters = 500\neval_only = True\n"
                          "wandb_log = False\ninit_from = 'gpt2-large'\n",
}
# (card, fits, the phase the verdict names): train_gpt2.py needs ~8 GiB of a 3090's 24 (bf16,
# chunked loss); GPT-2 large and XL evaluated alone need their weights plus one eval batch, not
# the AdamW state they would have in training (5.8 and 11.6 GiB, which made them "not fit")
NANOGPT_VERDICTS = {"train_gpt2.py": ("rtx3090", True, "training"),
                    "train_shakespeare_char.py": ("rtx3090", True, "training"),
                    "eval_gpt2_xl.py": ("rtx3090", True, "evaluation"),
                    "eval_gpt2_large.py": ("rtx4070", True, "evaluation")}


@pytest.mark.parametrize("name", sorted(NANOGPT_FILES))
def test_nanogpt_config_files_plan(name, tmp_path, capsys):
    """nanoGPT's own config files plan as they are, with the verdict each must get. (The
    char-level one gets the GPT-2 vocab unless told otherwise: nanoGPT reads 65 from
    data/shakespeare_char/meta.pkl.) An eval-only file plans its evaluation alone."""
    path = tmp_path / name
    path.write_text(NANOGPT_FILES[name])
    extra = ["--vocab_size=65"] if "char" in name else []
    card, fits, phase = NANOGPT_VERDICTS[name]
    assert main(["plan", str(path), "--gpu", card, "--json", *extra]) == 0
    data = json.loads(capsys.readouterr().out)
    params = {"train_gpt2.py": 124.0e6, "train_shakespeare_char.py": 10.8e6,
              "eval_gpt2_xl.py": 1557.6e6, "eval_gpt2_large.py": 774.0e6}[name]
    assert data["params"] == pytest.approx(params, rel=0.01)
    assert data["fits"] is fits and f"({phase})" in data["verdict"], data["verdict"]
    eval_parts = {p["name"] for p in data["eval"]["parts"]}
    assert ("optimizer state" in eval_parts) is (not name.startswith("eval_"))
    assert data["eval_only"] is name.startswith("eval_")
    assert (data["train"] is None) is name.startswith("eval_")  # an eval-only run never trains
    assert main(["plan", str(path), "--gpu", card, *extra]) == 0
    out = capsys.readouterr().out
    assert ("training step" in out) is (not name.startswith("eval_"))
    assert "evaluation (" in out


def test_plan_verify_on_a_tiny_cpu_config(capsys):
    """--verify trains 3 steps and evaluates once on synthetic tokens (no data files) and
    prints predicted against measured; on the CPU the storage tracker measures."""
    assert main(["plan", "--verify", *TINY]) == 0
    out = capsys.readouterr().out
    assert "verification on cpu float32 (storage tracker)" in out
    assert "predicted" in out and "measured" in out
    res = verify(load_config(None, TINY))
    for phase in ("train", "eval"):
        r = res[phase]
        assert r["measured_allocated"] > 0 and r["predicted_allocated"] > 0
        assert abs(r["error_allocated_pct"]) < 10, r


# ----------------------------------------------------------------------------- fitgpt train

def test_train_fit_auto_needs_a_budget_on_cpu(capsys):
    assert main(["train", *TINY, "--memory.fit=auto"]) == 2
    assert "memory.fit=auto needs --memory.budget on CPU" in capsys.readouterr().err


def test_train_fit_auto_shrinks_the_micro_batch_and_keeps_tokens(shard_dir, tmp_path, capsys):
    """A budget between the micro-batch 2 and 4 peaks: training runs at micro-batch 2 with
    twice the accumulation, and says so before it starts, with the predicted peaks."""
    small = load_config(None, TINY + ["--train.batch_size=2", "--eval.batch_size=2"])
    big = load_config(None, TINY)
    budget = (estimate(small, "cpu").peak + estimate(big, "cpu").train.total) // 2
    assert estimate(big, "cpu").train.total > 0.9 * budget
    args = ["train", *TINY, "--memory.fit=auto", f"--memory.budget={budget / 0.9:.0f}B",
            "--train.max_steps=2", "--eval.interval=2", "--eval.tokens=256",
            f"--data.dir={shard_dir}", f"--log.out_dir={tmp_path}", "--log.run_name=fit"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "memory.fit=auto: train.batch_size 4 -> " in out
    assert "predicted peak (cpu float32): training" in out
    saved = load_config(str(tmp_path / "fit" / "config.toml"), [])
    assert saved.tokens_per_step == big.tokens_per_step and saved.train.batch_size < 4


def test_gpu_bench_script_dry_run():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_memory_check.py"), "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and "train" in line]
    assert len(rows) >= 8


def test_gpu_session_script_dry_run(tmp_path):
    """bench/gpu_session.sh --dry-run runs each GPU check's dry run from the checkout (fitgpt on
    PYTHONPATH), and each ends with rc 0 in the session log."""
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "--dry-run", str(tmp_path)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr
    log = (tmp_path / "gpu_session.log").read_text()
    for name in ("memory", "largest", "seed", "speed"):
        assert f"## {name}: rc 0 in" in log, log[-2000:]
    # the largest-model check plans GPT-2 XL for 12 GiB with the levers and not without them
    assert "gpt2-1558m  with the levers      planned: --memory.checkpointing=true" in log
    assert "gpt2-1558m  cheap settings only  cannot fit" in log
    spec = importlib.util.spec_from_file_location("gpu_memory_check", ROOT / "bench" / "gpu_memory_check.py")
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    assert f"{len(grid.GRID)} configurations; predictions for CUDA float16" in log
    assert "seed, full logits, batches predicted to fit 12 GiB: 8 (" in log


def test_verify_refuses_a_multi_process_plan(capsys):
    """--verify measures one process, so it cannot check a per-process plan for N processes."""
    assert main(["plan", "--parallel.nproc=2", "--verify", "--train.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "--verify measures in this one process" in err and "--parallel.nproc=1" in err


def test_verify_of_nanogpt_shakespeare_with_dropout(tmp_path, capsys):
    """nanoGPT's train_shakespeare_char.py (dropout 0.2, bias False, vocab 65), made small
    enough for a test: `fitgpt plan --verify` within 3 % for training and evaluation (the
    planner ignored dropout before: -37 % at batch 8)."""
    path = tmp_path / "train_shakespeare_char.py"
    path.write_text(NANOGPT_FILES["train_shakespeare_char.py"])
    small = ["--vocab_size=65", "--n_layer=2", "--n_embd=96", "--batch_size=4", "--block_size=64",
             "--train.device=cpu"]
    assert main(["plan", str(path), *small, "--verify", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["verify"]
    for phase in ("train", "eval"):
        assert abs(res[phase]["error_allocated_pct"]) < 3, res[phase]


def test_eval_only_run_measures_what_the_plan_predicts(shard_dir, tmp_path):
    """`fitgpt train` with train.eval_only evaluates once with the weights alone, never AdamW
    state: summary.json's measured evaluation peak (storage tracker) is the plan's within 3 %
    (the plan counted 8 B/param of AdamW state before: +127 % here), and `--verify`
    measures only the evaluation."""
    over = [*TINY, "--model.vocab_size=4096", "--model.n_embd=64", "--train.eval_only=true"]
    args = ["train", *over, f"--data.dir={shard_dir}", f"--log.out_dir={tmp_path}",
            "--log.run_name=ev", "--eval.tokens=256"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    measured, predicted = summary["peak_eval_bytes"], summary["predicted_eval_bytes"]
    assert abs(predicted - measured) <= 0.03 * measured, (predicted, measured)
    res = verify(load_config(None, over))
    assert res["train"]["measured_allocated"] == "not run (eval-only)"
    assert abs(res["eval"]["error_allocated_pct"]) < 3, res["eval"]


def test_card_detection_queries_only_this_ranks_gpu(monkeypatch):
    """Under torchrun every process plans before it calls set_device; it must query its own GPU
    (LOCAL_RANK) and never GPU 0, where a query would create a CUDA context for every rank.
    There is no GPU here: CUDA's query functions are replaced by recorders, and
    `prepare_training` runs as `fitgpt train` runs it in rank 3 of 4."""
    queried = []

    class Props:
        name, major, minor, total_memory = "NVIDIA H100 80GB HBM3", 9, 0, 81559 * MiB

    def record(what, result):
        return lambda index=None: queried.append((what, index)) or result

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "get_device_properties", record("properties", Props))
    monkeypatch.setattr(cuda, "mem_get_info", record("mem_get_info", (0, 81559 * MiB)))
    monkeypatch.setattr(cuda, "get_device_name", record("name", Props.name))
    monkeypatch.setattr(cuda, "current_device", record("current_device", 0))
    monkeypatch.setattr(cuda, "is_bf16_supported", record("is_bf16_supported", True))
    monkeypatch.setattr("fitgpt.model.runtime.resolve_runtime",
                        lambda device, dtype: Runtime(torch.device("cuda"), torch.bfloat16))
    for key, value in (("RANK", "3"), ("LOCAL_RANK", "3"), ("WORLD_SIZE", "4")):
        monkeypatch.setenv(key, value)
    cfg = load_config(None, TINY + ["--train.device=cuda", "--train.dtype=bfloat16",
                                    "--parallel.nproc=4", "--train.grad_accum=4"])
    _, lines = prepare_training(cfg)
    assert queried and {index for _, index in queried} == {3}, queried
    assert lines[-1].startswith("predicted peak (cuda bfloat16)")


# Sizes that hung the planner (a loop per loss chunk, per layer) or crashed in torch.
HUGE = {"batch": ["--train.batch_size=1000000000000"], "layers": ["--model.n_layer=10000000"],
        "vocab": [f"--model.vocab_size={10**30}"], "vocab_int64": [f"--model.vocab_size={10**18}"],
        "width": [f"--model.n_embd={2**40}", "--model.n_head=16"]}


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_sizes_stop_before_allocating_with_one_line(name, shard_dir, tmp_path):
    """`fitgpt train` with a size far beyond the machine stops before allocating: one line
    with the plan's numbers, exit 2, no run folder. (The timeout only trips on a hang.)"""
    runs = tmp_path / "runs"
    res = subprocess.run([sys.executable, "-m", "fitgpt", "train", "--train.device=cpu",
                          f"--data.dir={shard_dir}", f"--log.out_dir={runs}", *HUGE[name]],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fitgpt: error: "), res.stderr[-2000:]
    if name != "vocab":  # 10**30 does not even fit the config's int64 (its own one line)
        assert "this run cannot fit this machine's" in lines[0] and "the plan needs" in lines[0]
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize("name", ["batch", "layers", "vocab_int64", "width"])
def test_plan_of_huge_sizes_answers(name, capsys):
    """`fitgpt plan` answers at once for any size, with proposals (it loops over no chunk,
    layer, divisor or width)."""
    assert main(["plan", "--gpu", "rtx4070", "--json", *HUGE[name]]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["verdict"].startswith("does not fit")
    assert data["proposals"]


@pytest.mark.parametrize("old_driver", [False, True])
def test_plan_reads_the_card_and_its_architecture_from_nvidia_smi(old_driver, tmp_path, monkeypatch):
    """Without --gpu, `fitgpt plan` asks nvidia-smi (a stand-in script on PATH here) for the
    card, and for its compute capability, which sizes the cuBLAS workspaces; a driver too old
    for the compute_cap field still gives the card, whose table entry knows it."""
    smi = tmp_path / "nvidia-smi"
    cap = "echo bad field >&2; exit 2" if old_driver else "echo 'NVIDIA H100 80GB HBM3, 81559, 9.0'"
    smi.write_text(f"#!/bin/sh\ncase \"$1\" in\n  *compute_cap*) {cap};;\n"
                   "  *) echo 'NVIDIA H100 80GB HBM3, 81559';;\nesac\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gpu = smi_gpu()
    assert gpu is not None and gpu.key == "h100-sxm" and gpu.cc == (9, 0)
    assert gpu.memory == 81559 * MiB
    est = estimate(load_config(SEED, []), gpu=gpu)
    assert {p.name: p.bytes for p in est.train.parts}["cuBLAS workspaces"] == 2 * 32 * MiB


def test_eval_only_resume_measures_what_the_plan_predicts(shard_dir, tmp_path):
    """Evaluating a trained run (`--resume RUN --train.eval_only=true`) must not load the
    checkpoint's AdamW moments either: the plan counts none, and the run never steps or saves."""
    over = [*TINY, "--model.vocab_size=4096", "--model.n_embd=64"]
    base = ["train", *over, f"--data.dir={shard_dir}", f"--log.out_dir={tmp_path}",
            "--log.run_name=tr", "--eval.tokens=256", "--train.max_steps=2"]
    assert main(base) == 0
    run = tmp_path / "tr"
    before = (run / "checkpoints" / "latest").read_text()
    assert main(["train", "--resume", str(run), "--train.eval_only=true"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    measured, predicted = summary["peak_eval_bytes"], summary["predicted_eval_bytes"]
    assert abs(predicted - measured) <= 0.03 * measured, (predicted, measured)
    assert (run / "checkpoints" / "latest").read_text() == before
