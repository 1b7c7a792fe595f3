"""Auto-fit with the memory levers, the released GPT-2 sizes and the plan's host figure.

Auto-fit must add a lever only when the settings that cost nothing in quality (chunked loss,
micro-batch with accumulation, checkpointing, eval batch) are not enough, say for each lever what
was still missing, never pick one the run would refuse, and say plainly when nothing fits
whatever the levers. The speed model's lever costs are checked against hand counts. All of it is
planner arithmetic: no torch, no GPU.
"""

from __future__ import annotations

import json

import pytest

from fitgpt.cli.main import main
from fitgpt.config.load import load_config
from fitgpt.errors import ConfigError
from fitgpt.model.shape import ModelShape
from fitgpt.planner.estimate import estimate
from fitgpt.planner.fit import auto_fit, overrides_of
from fitgpt.planner.gpus import find_gpu, host_link
from fitgpt.planner.levers import LEVERS, host_total, is_on
from fitgpt.planner.plan import host_memory, make_plan
from fitgpt.planner.speed import HOST_ADAMW_PARAMS_PER_S, predicted_throughput, speed

SIZES = {"gpt2-124m": (12, 12, 768, 124.4), "gpt2-350m": (24, 16, 1024, 354.6),
         "gpt2-774m": (36, 20, 1280, 773.6), "gpt2-1558m": (48, 25, 1600, 1556.8)}


def levers_on(cfg) -> list[str]:
    return [lv.key for lv in LEVERS if is_on(cfg, lv)]


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name", SIZES)
def test_released_sizes_keep_the_124m_tokens_per_step(name):
    """Each shipped size has GPT-2's shape (parameter counts as OpenAI's 124M/355M/774M/1.5B,
    counted with the padded vocabulary) and the 124M config's 0.5M tokens per optimizer step."""
    layers, heads, width, millions = SIZES[name]
    cfg = load_config(name, [])
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (layers, heads, width, 1024)
    assert ModelShape.of(m).padded_vocab == 50304
    assert round(ModelShape.of(m).params() / 1e6, 1) == millions
    assert cfg.tokens_per_step == load_config("gpt2-124m", []).tokens_per_step == 524288


@pytest.mark.parametrize("alias,name", [("gpt2", "gpt2-124m"), ("gpt2-medium", "gpt2-350m"),
                                        ("gpt2-large", "gpt2-774m"), ("gpt2-xl", "gpt2-1558m")])
def test_hugging_face_names_find_the_released_sizes(alias, name):
    assert load_config(alias, []).name == name


# ----------------------------------------------------------------------------- auto-fit

def test_no_lever_when_the_cheap_settings_suffice():
    """GPT-2 124M fits a 24 GB RTX 4090 as configured: nothing changes, no lever."""
    cfg = load_config("gpt2-124m", [])
    gpu = find_gpu("rtx4090")
    new, lines = auto_fit(cfg, gpu.memory, 0.1, gpu=gpu)
    assert overrides_of(cfg, new) == [] and levers_on(new) == []
    assert lines[0].startswith("nothing to change")


def test_no_lever_when_checkpointing_and_micro_batch_suffice():
    """GPT-2 350M on a 12 GB RTX 4070 needs checkpointing or a smaller micro-batch, not a lever."""
    cfg = load_config("gpt2-350m", [])
    gpu = find_gpu("rtx4070")
    new, lines = auto_fit(cfg, gpu.memory, 0.1, gpu=gpu)
    assert levers_on(new) == [] and estimate(new, gpu=gpu).peak <= 0.9 * gpu.memory
    assert not any("still missing" in line for line in lines)


def test_774m_on_a_12gb_card_gets_levers_with_reasons():
    """GPT-2 large's model state alone (16 B/param: 12.4 GB) is over a 12 GB card: auto-fit adds
    levers, one line each with the memory still missing, keeps the tokens per step, and the
    result fits the card."""
    cfg = load_config("gpt2-774m", [])
    gpu = find_gpu("rtx4070")
    new, lines = auto_fit(cfg, gpu.memory, 0.1, gpu=gpu)
    added = levers_on(new)
    assert added, lines
    for key in added:
        line = next(x for x in lines if x.startswith(key))
        assert "still missing" in line or "host memory" in line, line
    est = estimate(new, gpu=gpu)
    assert est.peak <= 0.9 * gpu.memory and new.tokens_per_step == cfg.tokens_per_step
    assert "memory.fused_backward" not in added  # refused with train.grad_clip=1
    assert any(line.startswith("predicted speed: ") for line in lines)


def test_a_refused_lever_is_never_picked_and_is_named():
    """Fused backward is refused with gradient clipping: auto-fit leaves it out and, when even
    the rest is not enough, says why it could not use it."""
    cfg = load_config("gpt2-1558m", ["--train.device=cpu", "--train.dtype=float32"])
    with pytest.raises(ConfigError) as e:
        auto_fit(cfg, 8 * 2**30, 0.1, device_type="cpu")
    msg = str(e.value)
    assert "nothing fits" in msg and "whatever the levers" in msg
    assert "fused backward not possible here" in msg and "grad_clip" in msg
    # on the CPU the host-memory levers do not exist: they are not among those tried
    assert "optimizer offload" not in msg.split("whatever the levers")[1].split(")")[0]


def test_cannot_fit_says_so_plainly_with_the_model_state_floor(capsys):
    """GPT-2 XL on a 4 GB card: nothing fits whatever the levers; the plan (exit 0) says so with
    the floor's numbers, the model state on the card and the fp32 weights alone."""
    assert main(["plan", "gpt2-xl", "--gpu", "4GB", "--fit"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "auto-fit: cannot fit" in out and "whatever the levers" in out
    assert "model state on the card" in out and "fp32 weights alone 5.80 GiB" in out
    sugg = out.split("best suggestion: ")[1]  # a smaller model, sized with the levers on
    assert sugg.startswith("smaller model") and "--memory.offload_optimizer=true" in sugg


def test_plan_json_has_the_host_figures(capsys):
    """--json carries this machine's RAM (labelled as this machine's, not the card's host) and,
    for auto-fit, the host memory its levers need."""
    assert main(["plan", "gpt2-1558m", "--gpu", "rtx4070", "--fit", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["host"]["this_machine"] == host_memory() and "this_machine_note" in data["host"]
    fit = data["auto_fit"]
    assert fit["fits"] is True and fit["levers"]
    assert fit["estimate"]["peak"] <= data["limit"]
    assert fit["host"]["needed"] == host_total(make_plan(
        load_config("gpt2-1558m", []), find_gpu("rtx4070"), fit=True).fit_estimate)
    if "memory.offload_optimizer" in fit["levers"]:
        assert fit["host"]["needed"] > 0 and fit["speed"]["host_s"] > 0


# ----------------------------------------------------------------------------- speed model

@pytest.mark.parametrize("state", ["fp32", "8bit"])
def test_optimizer_offload_costs_the_cpu_step_or_the_copies_per_step(state):
    """Hand count, once per optimizer step: P / the CPU's AdamW rate for the state's format, or
    2P bytes of 16-bit gradients down and 2P of weights up over the card's link, whichever is
    longer (they overlap); the card's arithmetic is unchanged."""
    gpu = find_gpu("rtx4070")
    cfg = load_config("gpt2-774m", ["--memory.offload_optimizer=true",
                                    f"--memory.optimizer_state={state}"])
    plain = speed(load_config("gpt2-774m", []), gpu)
    sp = speed(cfg, gpu)
    P = ModelShape.of(cfg.model).params()
    assert sp.compute_s == plain.compute_s
    assert sp.host_s == pytest.approx(max(P / HOST_ADAMW_PARAMS_PER_S[state], 4 * P / host_link(gpu)))
    assert sp.tokens_per_s == pytest.approx(cfg.tokens_per_step / (sp.compute_s + sp.host_s))


def test_selective_checkpointing_costs_its_share_of_recomputation():
    """Every 2nd of 12 blocks recomputed: half the full checkpointing's extra block FLOPs."""
    names = ["--memory.checkpointing=true"]
    none = predicted_throughput(load_config("gpt2-124m", []))
    full = predicted_throughput(load_config("gpt2-124m", names))
    half = predicted_throughput(load_config("gpt2-124m", names + ["--memory.checkpoint_every=2"]))
    assert full < half < none
    assert 1 / half - 1 / none == pytest.approx((1 / full - 1 / none) / 2)


def test_pcie_lanes_set_the_host_link():
    """An RTX 4060 Ti has 8 PCIe 4.0 lanes, an RTX 4070 16, an H100 16 of PCIe 5.0."""
    assert host_link(find_gpu("rtx4060ti")) == pytest.approx(host_link(find_gpu("rtx4070")) / 2)
    assert host_link(find_gpu("h100")) == pytest.approx(2 * host_link(find_gpu("rtx4070")))
    assert 24e9 < host_link(find_gpu("rtx4070")) < 26e9  # ~25 GB/s pinned on PCIe 4.0 x16


def test_activation_offload_adds_its_copies_to_the_step():
    """The copies run on the compute stream: the step grows by the activation planner's
    offload time (fitgpt.planner.activations), which grows with the accumulation's slices."""
    from fitgpt.planner.activations import offload_seconds

    gpu = find_gpu("rtx4070")
    cfg = load_config("gpt2-350m", ["--memory.activation_offload=true"])
    sp = speed(cfg, gpu)
    assert sp.transfer_s == offload_seconds(cfg, gpu) > 0
    assert sp.step_s == pytest.approx(speed(load_config("gpt2-350m", []), gpu).compute_s + sp.transfer_s)


# ----------------------------------------------------------------------------- fitgpt train

# AdamW: the levers below (8-bit state, offload, fused backward) are AdamW's; the default demo's
# Muon refuses them (tests/test_muon.py), and auto-fit then leaves them out.
TINY = ["--train.optimizer=adamw",
        "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64", "--model.block_size=32",
        "--model.vocab_size=256", "--train.device=cpu", "--train.dtype=float32",
        "--train.batch_size=4", "--train.grad_accum=2", "--eval.batch_size=5",
        "--memory.loss_chunk=48", "--eval.sample_tokens=0"]


def test_train_fit_auto_adds_a_lever_says_why_and_stays_under_the_budget(shard_dir, tmp_path, capsys):
    """On the CPU, a budget between the cheap settings' floor (micro-batch 1, checkpointing) and
    the same floor with 8-bit AdamW state: `fitgpt train --memory.fit=auto` adds the 8-bit
    state with its reason, trains, and the storage tracker's measured peaks stay within it."""
    floor = ["--train.batch_size=1", "--train.grad_accum=8", "--memory.checkpointing=true",
             "--eval.batch_size=1"]
    cheap = estimate(load_config(None, TINY + floor), "cpu").peak
    lever = estimate(load_config(None, TINY + floor + ["--memory.optimizer_state=8bit"]), "cpu").peak
    assert lever < cheap
    limit = (cheap + lever) // 2
    args = ["train", *TINY, "--memory.fit=auto", f"--memory.budget={limit / 0.9:.0f}B",
            "--train.max_steps=2", "--eval.interval=2", "--eval.tokens=256",
            f"--data.dir={shard_dir}", f"--log.out_dir={tmp_path}", "--log.run_name=lever"]
    assert main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "memory.optimizer_state fp32 -> 8bit" in x)
    assert "still missing" in line
    saved = load_config(str(tmp_path / "lever" / "config.toml"), [])
    assert saved.memory.optimizer_state == "8bit" and saved.tokens_per_step == 256
    summary = json.loads((tmp_path / "lever" / "summary.json").read_text())
    assert summary["memory_measured_by"] and summary["peak_train_bytes"] > 0
    assert max(summary["peak_train_bytes"], summary["peak_eval_bytes"]) <= limit, summary


def test_train_stops_before_allocating_when_the_host_cannot_hold_the_offload(monkeypatch):
    """GPT-2 XL with the optimizer offloaded keeps ~20 GiB on the host: on a machine with 8 GiB
    of RAM the pre-flight stops it with one line naming the host parts; auto-fit, given that
    host limit, does not pick the offload at all."""
    import fitgpt.planner.plan as plan_mod

    monkeypatch.setattr(plan_mod, "host_memory", lambda: 8 * 2**30)
    gpu = find_gpu("rtx4090")
    cfg = load_config("gpt2-1558m", ["--memory.offload_optimizer=true", "--memory.checkpointing=true"])
    est = estimate(cfg, "cuda", "bfloat16", gpu)
    with pytest.raises(ConfigError, match="cannot fit this machine's 8.00 GiB of RAM.*fp32 master weights"):
        plan_mod.check_possible(cfg, est, "cuda", "bfloat16", gpu)
    new, lines = auto_fit(load_config("gpt2-1558m", []), gpu.memory, 0.1, gpu=gpu, host_bytes=8 * 2**30)
    assert not new.memory.offload_optimizer and host_total(estimate(new, gpu=gpu)) <= 8 * 2**30


def test_size_card_table_in_the_docs_is_current():
    """docs/memory.md's size x card table is what bench/size_card_table.py computes now (after
    a planner change: python bench/size_card_table.py --write)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "bench" / "size_card_table.py"
    spec = importlib.util.spec_from_file_location("size_card_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = mod.DOC.read_text()
    assert f"{mod.BEGIN}\n{mod.table()}\n{mod.END}" in doc, "run python bench/size_card_table.py --write"
