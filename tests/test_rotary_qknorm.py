"""model.position = "rotary" and model.qk_norm: what they compute (relative positions, scale-free
queries and keys), that the model's parameters are the shape's, that cached sampling equals
uncached sampling, that checkpointing, autocast and resume keep working, that the planner
predicts their memory within 3 % of the CPU storage tracker, and what is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from conftest import train_losses as losses

from fitgpt.cli.main import main
from fitgpt.config.load import check, to_dict, to_toml
from fitgpt.config.schema import Config
from fitgpt.errors import ConfigError
from fitgpt.model import rotary
from fitgpt.model.checkpointing import apply_activation_checkpointing
from fitgpt.model.gpt import GPT
from fitgpt.model.shape import ModelShape
from fitgpt.planner.verify import verify
from fitgpt.report.export import ExportError, export_hf
from fitgpt.store.checkpoint import load_checkpoint
from fitgpt.store.resume import resume_config

OPTIONS = [("learned", True), ("rotary", False), ("rotary", True)]


def model(position="rotary", qk_norm=True, seed=0, dropout=0.0, **shape) -> GPT:
    s = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    s.update(shape)
    m = GPT(ModelShape(**s, position=position, qk_norm=qk_norm), dropout)
    m.init_weights(seed)
    return m


def test_rotary_scores_depend_on_the_distance_only():
    """q at position i and k at position j score the same as at i + s and j + s: the rotation
    encodes only their distance (a learned or absolute encoding would not)."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 2, 16, generator=gen), torch.randn(1, 1, 2, 16, generator=gen)

    def score(i, j):
        cq, sq = rotary.tables(i, 1, 16, "cpu", torch.float32)
        ck, sk = rotary.tables(j, 1, 16, "cpu", torch.float32)
        return (rotary.rotate(q, cq, sq) * rotary.rotate(k, ck, sk)).sum(-1)

    assert torch.allclose(score(3, 1), score(10, 8), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)
    c, s = rotary.tables(0, 1, 16, "cpu", torch.float32)  # position 0: the identity
    assert torch.equal(rotary.rotate(q, c, s), q)


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    """With qk_norm, scaling the query and key rows of c_attn changes nothing (each head's q and
    k are RMS-normalised); without it, the attention pattern changes."""
    x = torch.randint(0, 64, (2, 16))
    for qk_norm in (True, False):
        m = model(qk_norm=qk_norm).eval()
        with torch.no_grad():
            before = m.lm_head(m.hidden(x))
            for blk in m.transformer.h:
                blk.attn.c_attn.weight[:64].mul_(5.0)  # q and k rows
            after = m.lm_head(m.hidden(x))
        assert torch.allclose(before, after, atol=1e-4) == qk_norm
    y = rotary.qk_norm(torch.randn(3, 4, 2, 16) * 9)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3, 4, 2), atol=1e-4)


@pytest.mark.parametrize("position,qk_norm", OPTIONS)
def test_parameters_are_the_shapes_and_rotary_has_no_position_embedding(position, qk_norm):
    m = model(position, qk_norm)
    s = m.shape
    assert sum(p.numel() for p in m.parameters()) == s.params()
    assert len(list(m.parameters())) == s.tensors()
    assert ("transformer.wpe.weight" in m.state_dict()) == (position == "learned")
    assert s.embedding_params() == (s.padded_vocab + (16 if position == "learned" else 0)) * 32


@pytest.mark.parametrize("position,qk_norm", OPTIONS)
def test_cached_generation_equals_uncached_token_for_token(position, qk_norm):
    """Cached keys were rotated at their own positions: sampling with the KV cache draws the same
    tokens as without it, also once the window slides past block_size (the cache refills), and
    the cached step's logits are the full forward's."""
    m = model(position, qk_norm, seed=1).eval()
    with torch.no_grad():
        for blk in m.transformer.h:  # weights large enough that positions matter
            blk.attn.c_attn.weight.mul_(8.0)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    runs = [m.generate(prompt, 30, temperature=1.0, kv_cache=kv,
                       generator=torch.Generator().manual_seed(3)) for kv in (False, True)]
    assert torch.equal(runs[0], runs[1])
    seq = runs[0][:, :12]
    from fitgpt.model.generate import KVCache

    cache = KVCache(2, 16)
    with torch.no_grad():
        m.hidden(seq[:, :8], cache)
        step = m.hidden(seq[:, 8:9], cache)[:, -1]
        full = m.hidden(seq[:, :9])[:, -1]
    assert torch.allclose(step, full, atol=1e-5)


def test_checkpointing_dropout_and_autocast_give_the_same_gradients():
    """Recomputed blocks (every block, every other block) give the gradients of the plain model,
    with dropout (the replay draws the same masks) and under bfloat16 autocast."""
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for dtype in (None, torch.bfloat16):
        grads = []
        for every in (None, 1, 2):
            m = model(dropout=0.1)
            if every:
                apply_activation_checkpointing(m, every)
            torch.manual_seed(5)
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                m(x, y).backward()
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        assert all(torch.equal(grads[0], g) for g in grads[1:]), dtype
        assert grads[0].abs().sum() > 0


def test_rotary_trains_the_loss_falls():
    """A few AdamW steps on one batch: the loss falls (rotary and qk_norm learn)."""
    m = model(seed=4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_export_refuses_rotary_and_qk_norm_with_one_line(tmp_path):
    for position, qk_norm, name in [("rotary", False, "model.position=rotary"), ("learned", True, "model.qk_norm")]:
        cfg = Config(name="tiny")
        cfg.model.position, cfg.model.qk_norm = position, qk_norm
        m = model(position, qk_norm, block_size=cfg.model.block_size, vocab_size=cfg.model.vocab_size,
                  n_layer=1)
        cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd = 1, 2, 32
        with pytest.raises(ExportError, match=name) as e:
            export_hf(cfg, m.state_dict(), tmp_path / name)
        assert "\n" not in str(e.value) and "demo-gpt2" in str(e.value)  # and what exports instead
        assert not (tmp_path / name).exists()  # nothing half-written


def test_odd_head_size_is_refused_with_rotary():
    cfg = Config()
    cfg.model.n_embd, cfg.model.n_head, cfg.model.position = 60, 4, "rotary"  # head size 15
    with pytest.raises(ConfigError, match="even head size"):
        check(cfg)


def test_resume_is_bit_identical_and_refuses_another_position(shard_dir, tmp_path):
    """A rotary + qk_norm run resumed from step 2 continues with the losses of an uninterrupted
    one (the checkpoint has no wpe); resuming with another position or qk_norm is refused; the
    saved run evaluates and samples."""
    cfg = tiny_config(shard_dir, tmp_path / "out", train__max_steps=4, eval__interval=2,
                      memory__track=False, model__position="rotary", model__qk_norm=True)
    toml = tmp_path / "tiny.toml"
    toml.write_text(to_toml(cfg))
    assert main(["train", str(toml)]) == 0
    whole = tmp_path / "out" / "run"
    assert "transformer.wpe.weight" not in load_checkpoint(whole)["model"]

    toml.write_text(to_toml(tiny_config(shard_dir, tmp_path / "out2", train__max_steps=2, eval__interval=2,
                                        memory__track=False, model__position="rotary", model__qk_norm=True)))
    assert main(["train", str(toml)]) == 0
    part = tmp_path / "out2" / "run"
    for change in ("--model.position=learned", "--model.qk_norm=false"):
        with pytest.raises(ConfigError, match=change.split("=")[0][2:]):
            resume_config(str(part), None, [change, "--train.max_steps=4"], [])
    assert main(["train", "--resume", str(part), "--train.max_steps=4"]) == 0

    assert len(losses(whole)) == 4 and losses(whole) == losses(part)
    assert main(["eval", "--ckpt", str(part), "--eval.tokens=64"]) == 0


def test_sample_command_with_rotary_and_qk_norm(tmp_path, capsys):
    """`fitgpt sample` on a saved rotary + qk_norm model: the same text with and without the KV
    cache, past the context (the cache refills)."""
    cfg = Config(name="tiny")
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 2, 2, 32, 16, 50257
    m.position, m.qk_norm = "rotary", True
    net = model(block_size=16, vocab_size=50257, seed=3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.5)
    ckpt = tmp_path / "m.pt"
    torch.save({"model": net.state_dict(), "config": to_dict(cfg)}, ckpt)
    args = ["sample", "--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "24", "--seed", "3"]
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert main(args + ["--no-kv-cache"]) == 0
    assert capsys.readouterr().out == cached and "Hello" in cached


# -- the planner: the CPU storage tracker against the prediction

def grid_config(dtype: str, position: str, qk_norm: bool, loss: str, **memory) -> Config:
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 2, 4, 64, 64, 512
    m.position, m.qk_norm = position, qk_norm
    t.device, t.dtype, t.batch_size, t.grad_accum = "cpu", dtype, 4, 1
    cfg.eval.batch_size, cfg.memory.loss = 4, loss
    for key, value in memory.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    check(cfg)
    return cfg


GRID = [(d, p, q, loss) for d in ("float32", "bfloat16") for p in ("learned", "rotary")
        for q in (False, True) for loss in ("chunked", "full")]
LEVERS = [{"model__dropout": 0.1}, {"memory__checkpointing": True, "memory__checkpoint_every": 2}]


@pytest.mark.parametrize("dtype,position,qk_norm,loss", GRID)
def test_planner_within_3_percent(dtype, position, qk_norm, loss):
    r = verify(grid_config(dtype, position, qk_norm, loss), steps=3)
    for phase in ("train", "eval"):
        err = r[phase]["error_allocated_pct"]
        assert err is not None and abs(err) <= 3.0, (phase, r[phase])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("levers", LEVERS, ids=["dropout", "every2"])
def test_planner_within_3_percent_with_dropout_and_checkpointing(dtype, levers):
    """Dropout on the CPU takes SDPA's math path; checkpoint_every=2 recomputes block 0."""
    r = verify(grid_config(dtype, "rotary", True, "chunked", **levers), steps=3)
    for phase in ("train", "eval"):
        err = r[phase]["error_allocated_pct"]
        assert err is not None and abs(err) <= 3.0, (phase, r[phase])


def test_the_options_move_the_measured_peak():
    """qk_norm's saved tensors raise the measured bfloat16 training peak by more than the 3 %
    tolerance, so the agreement above is not a constant."""
    plain = verify(grid_config("bfloat16", "rotary", False, "chunked"), steps=3)["train"]["measured_allocated"]
    normed = verify(grid_config("bfloat16", "rotary", True, "chunked"), steps=3)["train"]["measured_allocated"]
    assert normed > 1.05 * plain
