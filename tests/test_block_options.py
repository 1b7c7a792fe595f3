"""The MLP, norm and head options of issue 16 (model.mlp = relu2, norm = rmsnorm,
tie_embeddings = false, zero_init, logit_softcap): exact functions and gradients, both loss paths,
sampling with and without the KV cache, checkpointing, parameter counts and FLOPs, the optimizer's
groups, resume, Hugging Face export, and the planner within 3 % of the CPU storage tracker."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, torchrun_train
from conftest import train_losses as losses

from fitgpt.cli.main import main
from fitgpt.config.load import check, to_toml
from fitgpt.config.schema import Config
from fitgpt.errors import ConfigError
from fitgpt.model.blockops import relu2, rms_norm
from fitgpt.model.checkpointing import apply_activation_checkpointing
from fitgpt.model.gpt import GPT
from fitgpt.model.loss import LossSpec
from fitgpt.model.shape import ModelShape
from fitgpt.planner.verify import verify
from fitgpt.report.export import ExportError, export_hf
from fitgpt.store.resume import resume_config

ALL = dict(mlp="relu2", norm="rmsnorm", tie_embeddings=False, zero_init=True, logit_softcap=15.0)
COMBOS = [{}, dict(mlp="relu2"), dict(norm="rmsnorm"), dict(tie_embeddings=False),
          dict(logit_softcap=5.0), dict(norm="rmsnorm", bias=True), ALL]


def shape(**kw) -> ModelShape:
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)
    return ModelShape(**{**base, **kw})


def model(seed=0, loss=None, dropout=0.0, perturb=0.0, **kw) -> GPT:
    """A tiny model; perturb > 0 moves every weight off its init (zero_init's zeros too)."""
    net = GPT(shape(**kw), dropout, loss)
    net.init_weights(seed)
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * perturb)
    return net


def test_relu2_and_rms_norm_are_the_reference_functions_with_exact_gradients():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu2, (x,)) and torch.autograd.gradcheck(rms_norm, (x,))
    y = torch.randn(4, 7, 16)
    assert torch.equal(relu2(y), F.relu(y).square())
    assert torch.allclose(rms_norm(y), F.rms_norm(y, (16,)), atol=1e-6)
    assert not torch.allclose(rms_norm(y), F.layer_norm(y, (16,)), atol=1e-3)  # can fail: not LayerNorm


@pytest.mark.parametrize("kw", COMBOS, ids=[",".join(map(str, c)) or "gpt2" for c in COMBOS])
def test_parameter_counts_are_the_built_models(kw):
    """ModelShape counts what the model builds (an untied head once, RMSNorm nothing), and the
    FLOPs per token count an untied head once: the same compute as a tied one."""
    net = model(**kw)
    s = net.shape
    params = list(net.parameters())
    assert s.params() == sum(p.numel() for p in params)
    assert s.tensors() == len(params)
    assert s.param_counts() == Counter(p.numel() for p in params)
    heads = ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight")
    body = sum(p.numel() for name, p in net.named_parameters() if name not in heads)
    assert s.flops_per_token() == 6 * body + 6 * 128 * 32 + 12 * 2 * 32 * 16  # the head once
    untied = shape(tie_embeddings=False)
    assert untied.params() - shape().params() == untied.padded_vocab * 32
    assert untied.flops_per_token() == shape().flops_per_token()


def test_zero_init_zeroes_the_output_projections_and_an_untied_head_only():
    base, zero = model(seed=3, tie_embeddings=False), model(seed=3, tie_embeddings=False, zero_init=True)
    for (name, p), (_, q) in zip(base.named_parameters(), zero.named_parameters()):
        if name.endswith(("c_proj.weight", "lm_head.weight")):
            assert p.abs().sum() > 0 and q.abs().sum() == 0, name
        else:
            assert torch.equal(p, q), name  # the other draws are unchanged
    tied = model(seed=3, zero_init=True)
    assert tied.transformer.wte.weight.abs().sum() > 0  # a tied head is the embedding: not zeroed
    x = torch.randint(0, 100, (2, 16))
    assert abs(zero(x, x).item() - math.log(128)) < 1e-5  # zero logits: uniform over the padded vocab


def test_softcap_bounds_the_logits_and_both_losses_agree_with_gradients():
    """Chunked (several chunks, one ragged) and full loss of the capped logits equal the
    cross-entropy of c * tanh(z / c) computed by hand, with the same gradients."""
    cap = 2.0
    ref_net = model(seed=1, perturb=0.5, logit_softcap=cap, **{k: v for k, v in ALL.items() if k != "logit_softcap"})
    x = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(2))
    y = x.roll(-1, 1)
    y[0, :3] = -1
    h = ref_net.hidden(x)
    assert ref_net.lm_head(h).abs().max() <= cap and F.linear(h, ref_net.lm_head.weight).abs().max() > cap
    z = cap * torch.tanh(F.linear(h, ref_net.lm_head.weight) / cap)
    want = F.cross_entropy(z.flatten(0, 1), y.flatten(), ignore_index=-1)
    grads = []
    for spec in (LossSpec("chunked", 7), LossSpec("full")):
        net = model(seed=1, perturb=0.5, logit_softcap=cap, loss=spec,
                    **{k: v for k, v in ALL.items() if k != "logit_softcap"})
        loss = net(x, y)
        assert abs(loss.item() - want.item()) < 1e-5
        loss.backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    with torch.no_grad():  # the no-grad chunked path (evaluation)
        assert abs(model(seed=1, perturb=0.5, loss=LossSpec("chunked", 7), **{**ALL, "logit_softcap": cap})(x, y).item()
                   - want.item()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_autocast_chunked_matches_full(dtype):
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(5))
    out = []
    for spec in (LossSpec("chunked", 5), LossSpec("full")):
        net = model(seed=2, perturb=0.3, loss=spec, **ALL)
        with torch.autocast("cpu", dtype=dtype):
            loss = net(x, x.roll(-1, 1))
        loss.backward()
        out.append((loss.item(), net.lm_head.weight.grad.clone()))
    assert abs(out[0][0] - out[1][0]) < 2e-2
    assert torch.allclose(out[0][1], out[1][1], atol=2e-3)


@pytest.mark.parametrize("kw", [ALL, dict(logit_softcap=1.0)], ids=["all", "softcap"])
def test_cached_generation_equals_uncached_and_sees_the_cap(kw):
    net = model(seed=4, perturb=0.5, block_size=16, **kw).eval()
    prompt = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(6))
    runs = [net.generate(prompt, 20, temperature=1.0, kv_cache=kv, vocab_limit=100,
                         generator=torch.Generator().manual_seed(7)) for kv in (False, True)]
    assert torch.equal(*runs)  # past the context too: the cache refills
    logits = net(prompt)  # (B, 1, V): the capped logits sampling draws from
    assert logits.abs().max() <= kw["logit_softcap"]


def test_checkpointing_and_dropout_give_the_same_gradients():
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(8))
    grads = []
    for ckpt in (False, True):
        net = model(seed=5, perturb=0.2, dropout=0.1, loss=LossSpec("chunked", 9), **ALL).train()
        if ckpt:
            apply_activation_checkpointing(net, 1)
        torch.manual_seed(9)
        net(x, x.roll(-1, 1)).backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_an_untied_head_is_decayed_and_rmsnorm_leaves_no_vector_to_decay():
    net = model(tie_embeddings=False, norm="rmsnorm")
    opt = net.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert any(p is net.lm_head.weight for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert net.lm_head.weight is not net.transformer.wte.weight
    assert no_decay["params"] == []
    from fitgpt.train.optim import param_groups  # the trainer's groups
    from fitgpt.train.optim_muon import muon_param_names

    groups = param_groups(net, 0.1)
    assert any(p is net.lm_head.weight for p in groups[0]["params"]) and groups[1]["params"] == []
    assert "lm_head.weight" not in muon_param_names(net)  # Muon: hidden matrices only


def test_resume_is_bit_identical_and_refuses_a_switched_option(shard_dir, tmp_path):
    opts = dict(model__mlp="relu2", model__norm="rmsnorm", model__tie_embeddings=False,
                model__zero_init=True, model__logit_softcap=15.0, memory__track=False)
    toml = tmp_path / "tiny.toml"
    toml.write_text(to_toml(tiny_config(shard_dir, tmp_path / "out", train__max_steps=4,
                                        eval__interval=2, **opts)))
    assert main(["train", str(toml)]) == 0
    toml.write_text(to_toml(tiny_config(shard_dir, tmp_path / "out2", train__max_steps=2,
                                        eval__interval=2, **opts)))
    assert main(["train", str(toml)]) == 0
    part = tmp_path / "out2" / "run"
    for change in ("--model.mlp=gelu", "--model.norm=layernorm", "--model.tie_embeddings=true",
                   "--model.zero_init=false", "--model.logit_softcap=30"):
        with pytest.raises(ConfigError, match=change.split("=")[0][2:]):
            resume_config(str(part), None, [change, "--train.max_steps=4"], [])
    assert main(["train", "--resume", str(part), "--train.max_steps=4"]) == 0

    whole = tmp_path / "out" / "run"
    assert len(losses(whole)) == 4 and losses(whole) == losses(part)


def test_export_maps_relu2_and_an_untied_head_with_the_same_logits(tmp_path):
    import transformers

    cfg = Config(name="tiny")
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 2, 2, 32, 16, 100
    m.mlp, m.tie_embeddings, m.zero_init = "relu2", False, True
    net = model(seed=6, perturb=0.2, mlp="relu2", tie_embeddings=False, zero_init=True).eval()
    export_hf(cfg, net.state_dict(), tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["activation_function"] == "relu2" and conf["tie_word_embeddings"] is False
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, ref = hf(x).logits, net.lm_head(net.hidden(x))[..., :100]
        assert (got - ref).abs().max().item() <= 1e-4
        assert (hf.transformer.wte.weight - hf.lm_head.weight).abs().max() > 0.1  # untied there too


@pytest.mark.parametrize("option,value", [("norm", "rmsnorm"), ("logit_softcap", 15.0)])
def test_export_refuses_what_gpt2_cannot_express_with_one_line(option, value, tmp_path):
    cfg = Config(name="tiny")
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 2, 2, 32, 16, 100
    setattr(m, option, value)
    net = model(**{option: value})
    with pytest.raises(ExportError, match=f"model.{option}") as e:
        export_hf(cfg, net.state_dict(), tmp_path / "hf")
    assert "\n" not in str(e.value)


# the planner: the CPU storage tracker's peaks within 3 % of the prediction
GRID = [("relu2+rms", dict(mlp="relu2", norm="rmsnorm")),
        ("untied+cap+zero", dict(tie_embeddings=False, logit_softcap=15.0, zero_init=True)),
        ("all+dropout", {**ALL, "dropout": 0.1}),
        ("all+every2", {**ALL, "memory.checkpointing": True, "memory.checkpoint_every": 2})]


def grid_config(settings: dict, dtype: str, loss: str) -> Config:
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 2, 4, 64, 64, 512
    t.device, t.dtype, t.batch_size, t.grad_accum = "cpu", dtype, 8, 1
    cfg.eval.batch_size, cfg.memory.loss = 4, loss
    for key, value in settings.items():
        section, field = key.split(".") if "." in key else ("model", key)
        setattr(getattr(cfg, section), field, value)
    check(cfg)
    return cfg


@pytest.mark.parametrize("loss", ["chunked", "full"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name,settings", GRID, ids=[g[0] for g in GRID])
def test_planner_within_3_percent_of_the_tracker(name, settings, dtype, loss):
    r = verify(grid_config(settings, dtype, loss), steps=2)
    for phase in ("train", "eval"):
        err = r[phase]["error_allocated_pct"]
        assert err is not None and abs(err) <= 3.0, (name, dtype, loss, phase, r[phase])


def test_the_grid_can_fail_the_options_change_the_measured_peak():
    """An untied head and the softcap's (N, V) tanh move the measured peak of the full loss."""
    plain = verify(grid_config({}, "float32", "full"), steps=2)["train"]["measured_allocated"]
    opts = verify(grid_config(GRID[1][1], "float32", "full"), steps=2)["train"]["measured_allocated"]
    assert opts > 1.05 * plain


def test_ddp_and_fsdp2_with_every_option_equal_one_process(shard_dir, tmp_path):
    """2 CPU ranks (gloo, torchrun) with the options on follow one process's losses: DDP, and
    FSDP2 with the untied head in the root's shard group."""

    opts = dict(model__mlp="relu2", model__norm="rmsnorm", model__tie_embeddings=False,
                model__zero_init=True, model__logit_softcap=15.0, train__max_steps=3,
                train__lr_decay_steps=3, eval__interval=3)
    single = tmp_path / "one.toml"
    single.write_text(to_toml(tiny_config(shard_dir, tmp_path / "one", **opts)))
    assert main(["train", str(single)]) == 0

    want = losses(tmp_path / "one" / "run")
    for mode in ("ddp", "fsdp"):
        cfg = tiny_config(shard_dir, tmp_path / mode, **opts)
        cfg.parallel.mode = mode
        path = tmp_path / f"{mode}.toml"
        path.write_text(to_toml(cfg))
        torchrun_train(path)
        got = losses(tmp_path / mode / "run")
        assert len(got) == 3 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want)), (mode, got, want)


def test_runs_count_and_checkpoint_check_know_the_options(tmp_path):
    """`fitgpt runs` counts an untied head and parameter-free norms; a checkpoint whose weights
    have LayerNorms, checked against an rmsnorm config, names the option in its refusal."""
    from fitgpt.errors import CheckpointError
    from fitgpt.report.runs import params_of
    from fitgpt.store.ckptcheck import check_model_fits

    table = dict(n_layer=2, n_embd=32, block_size=16, vocab_size=100, bias=False)
    for kw in (dict(norm="rmsnorm"), dict(tie_embeddings=False)):
        assert params_of({**table, **kw}) == shape(**kw).params() != shape().params()
    cfg = Config()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.norm = 2, 2, 32, 16, 100, "rmsnorm"
    with pytest.raises(CheckpointError, match="norm=rmsnorm"):
        check_model_fits(model().state_dict(), cfg, "m.pt")
