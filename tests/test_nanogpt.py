"""nanoGPT's ckpt.pt: converted to fitgpt's layout, then sampled, evaluated, resumed, exported."""

from __future__ import annotations

import re

import pytest
import torch

from fitgpt.cli.main import main
from fitgpt.config.load import NANOGPT_DEFAULTS
from fitgpt.config.schema import Config
from fitgpt.data.shards import ValWindows, find_splits
from fitgpt.eval.evaluate import evaluate
from fitgpt.model.runtime import Runtime, build_model
from fitgpt.model.shape import ModelShape
from fitgpt.store.checkpoint import load_checkpoint
from fitgpt.store.load import config_of, load_model

# nanoGPT's model.py registers, per block: ln_1, attn (c_attn, c_proj), ln_2, mlp (c_fc, c_proj);
# before the blocks wte and wpe, after them ln_f; lm_head's weight is wte's (tied, listed once).
NANOGPT_ORDER_ONE_LAYER = [
    "transformer.wte.weight", "transformer.wpe.weight",
    "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
    "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
    "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias",
    "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
    "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
    "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias",
    "transformer.ln_f.weight", "transformer.ln_f.bias",
]


def nanogpt_optimizer(model, by_module_type=False):
    """nanoGPT's configure_optimizers: named_parameters, matrices decayed, the rest not. With
    by_module_type, the older nanoGPT's grouping (Linear weights decayed; embeddings not)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if by_module_type:
        decay = [p for n, p in named if p.dim() >= 2 and ".c_" in n]
        rest = [p for n, p in named if not (p.dim() >= 2 and ".c_" in n)]
    else:
        decay = [p for n, p in named if p.dim() >= 2]
        rest = [p for n, p in named if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95))


def write_nanogpt_ckpt(path, vocab=256, by_module_type=False, iter_num=3, bias=False):
    """A ckpt.pt as nanoGPT's train.py saves it after torch.compile: `_orig_mod.` prefixes,
    `attn.bias` causal-mask buffers, model_args, the optimizer, and the flat config globals."""
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=bias, vocab_size=vocab,
                dropout=0.0)
    cfg = Config()
    for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"):
        setattr(cfg.model, k, args[k])
    cfg.model.vocab_multiple = 1
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    opt = nanogpt_optimizer(model, by_module_type)
    x = torch.randint(0, min(vocab, 256), (4, 32))
    model(x, x).backward()
    opt.step()
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    for i in range(2):
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
    config = {**NANOGPT_DEFAULTS, "device": "cuda", "dtype": "bfloat16", "compile": True,
              "backend": "nccl", "dataset": "shakespeare", "batch_size": 4,
              "gradient_accumulation_steps": 2, "max_iters": 6, "lr_decay_iters": 6,
              "warmup_iters": 2, "learning_rate": 3e-3, "min_lr": 3e-4, "eval_interval": 3,
              "eval_iters": 2, "log_interval": 1, "some_new_knob": 1, **args}
    torch.save({"model": sd, "model_args": args, "optimizer": opt.state_dict(),
                "iter_num": iter_num, "best_val_loss": torch.tensor(5.5), "config": config}, path)
    return model, opt


def test_fitgpt_parameter_order_is_nanogpts():
    """Guards loading nanoGPT's optimizer state, which is matched to parameters by position:
    fitgpt's parameters() order must be nanoGPT's named_parameters() order."""
    cfg = Config()
    cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.block_size = 1, 32, 2, 8
    cfg.model.bias, cfg.model.vocab_size = True, 64
    model = build_model(cfg, torch.device("cpu"))
    assert [n for n, _ in model.named_parameters()] == NANOGPT_ORDER_ONE_LAYER
    assert [p.data_ptr() for p in model.parameters()] == [p.data_ptr() for _, p in model.named_parameters()]


def test_checkpoint_converts_with_its_optimizer_state(tmp_path):
    """Guards the conversion: shape from model_args, training settings from the flat config
    (device/dtype/compile left to fitgpt, unknown keys noted), and the AdamW state landing on
    the same-named parameters."""
    path = tmp_path / "out" / "ckpt.pt"
    path.parent.mkdir()
    ref_model, ref_opt = write_nanogpt_ckpt(path)
    notes: list[str] = []
    ckpt = load_checkpoint(tmp_path / "out")  # the out_dir finds ckpt.pt
    cfg = config_of(ckpt, notes)
    m = cfg.model
    padded = ModelShape.of(m).padded_vocab
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, padded) == (2, 2, 32, 32, 256, 256)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr, cfg.data.dir) == (4, 2, 3e-3, "data/shakespeare")
    assert (cfg.train.device, cfg.train.dtype, cfg.train.compile) == ("auto", "auto", False)
    assert ckpt["step"] == 3 and ckpt["tokens"] == 3 * cfg.tokens_per_step
    assert any("some_new_knob" in n and "device" in n for n in notes)
    assert not any("starts fresh" in n for n in notes)

    model = build_model(cfg, torch.device("cpu"), init=False)
    model.load_state_dict(ckpt["model"])  # prefixes and mask buffers are gone
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    opt.load_state_dict(ckpt["optimizer"])
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[ref_params[name]]["exp_avg"])
        torch.testing.assert_close(p, ref_params[name])


def test_other_optimizer_grouping_starts_fresh(tmp_path):
    """Guards a wrong state on the wrong parameter: an older nanoGPT's groups do not match,
    so the optimizer is dropped with a note instead of loaded."""
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", by_module_type=True)
    notes: list[str] = []
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    config_of(ckpt, notes)
    assert "optimizer" not in ckpt and any("starts fresh" in n for n in notes)


def test_eval_and_resume_a_nanogpt_checkpoint(shard_dir, tmp_path, capsys):
    """Guards `fitgpt eval --ckpt ckpt.pt` (the same loss as the model it holds) and
    `fitgpt train --resume ckpt.pt` (continues at iter_num to max_iters)."""
    path = tmp_path / "out" / "ckpt.pt"
    path.parent.mkdir()
    ref_model, _ = write_nanogpt_ckpt(path)
    assert main(["eval", "--ckpt", str(path), f"--data.dir={shard_dir}"]) == 0
    out = capsys.readouterr().out
    loss = float(re.search(r"val loss (\d+\.\d+)", out).group(1))
    val = ValWindows(find_splits(shard_dir)[1], 32, 8)  # eval_iters 2 x batch 4 windows
    ref = evaluate(ref_model, val, 4, Runtime(torch.device("cpu"), torch.float32))
    assert loss == pytest.approx(ref.loss, abs=1e-4)

    assert main(["train", "--resume", str(path), f"--data.dir={shard_dir}", "--log.progress=false"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "at step 3" in out and "done: completed at step 6" in out
    assert (path.parent / "checkpoints" / "latest").is_file()


def test_padded_gpt2_vocab_samples_and_exports(tmp_path, capsys):
    """Guards nanoGPT's 50304: read as GPT-2's 50257 padded (same embedding rows), so it
    samples GPT-2 text and exports with the real vocabulary."""
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", vocab=50304, bias=True)
    cfg, model, _ = load_model(str(tmp_path / "ckpt.pt"), [], [])
    assert cfg.model.vocab_size == 50257 and model.transformer.wte.weight.shape[0] == 50304
    assert main(["sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "The",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("The")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert '"vocab_size": 50257' in (tmp_path / "hf" / "config.json").read_text()


def save_as_fitgpt(nanogpt_path, run_dir, step):
    """The nanoGPT checkpoint converted and saved as fitgpt's checkpoints/step_N.pt + latest."""
    from fitgpt.store.checkpoint import save_checkpoint

    ckpt = load_checkpoint(nanogpt_path)
    config_of(ckpt, [])
    state = {k: v for k, v in ckpt.items() if not k.startswith("_")}
    state["step"] = step
    return save_checkpoint(run_dir, state, step, keep=2)


@pytest.mark.parametrize("nano_iter, fit_step, pick", [(9, 6, "ckpt.pt"), (3, 6, "step_00000006.pt")])
def test_folder_with_both_checkpoints_takes_the_one_further_along(tmp_path, nano_iter, fit_step, pick):
    """Guards issue 12: a nanoGPT out_dir that fitgpt continued holds ckpt.pt and
    checkpoints/latest; the one with the higher step is taken (not always fitgpt's), and a note
    says which, with both steps."""
    out = tmp_path / "out"
    out.mkdir()
    write_nanogpt_ckpt(out / "ckpt.pt", iter_num=3)
    save_as_fitgpt(out / "ckpt.pt", out, fit_step)
    write_nanogpt_ckpt(out / "ckpt.pt", iter_num=nano_iter)  # nanoGPT itself went on (or not)
    notes: list[str] = []
    ckpt = load_checkpoint(out)
    config_of(ckpt, notes)
    assert ckpt["_path"].endswith(pick) and ckpt["step"] == max(nano_iter, fit_step)
    assert any(f"step {nano_iter}" in n and f"step {fit_step}" in n and n.endswith(pick) for n in notes), notes


def test_ckpt_out_dir_finds_the_newest_run_inside(shard_dir, tmp_path, capsys):
    """Guards issue 12: `--ckpt OUT_DIR` for a folder of runs (OUT_DIR/<run>/checkpoints/...,
    as fitgpt.report.metrics lays them out) takes the run written last, and says so."""
    import os

    write_nanogpt_ckpt(tmp_path / "ckpt.pt")
    old = save_as_fitgpt(tmp_path / "ckpt.pt", tmp_path / "out" / "run-a", 5)
    new = save_as_fitgpt(tmp_path / "ckpt.pt", tmp_path / "out" / "run-b", 4)
    os.utime(old, (2e9, 2e9))  # run-a written last, although its name sorts first
    os.utime(new, (1e9, 1e9))
    notes: list[str] = []
    ckpt = load_checkpoint(tmp_path / "out")
    config_of(ckpt, notes)
    assert ckpt["_path"] == str(old) and any("holds 2 runs" in n and str(old) in n for n in notes)
    assert main(["eval", "--ckpt", str(tmp_path / "out"), f"--data.dir={shard_dir}"]) == 0
    assert "run-a" in capsys.readouterr().out


def test_init_from_resume_continues_a_nanogpt_out_dir(shard_dir, tmp_path, capsys):
    """Guards issue 12: nanoGPT's `--init_from=resume --out_dir=DIR` reads DIR/ckpt.pt (it was
    not found), and a config file given with init_from='resume' applies as overrides: its
    shape settings that differ from the checkpoint's are ignored with a note, as in nanoGPT
    (the run used to stop with a message about a --resume flag nobody typed)."""
    out = tmp_path / "out"
    out.mkdir()
    write_nanogpt_ckpt(out / "ckpt.pt", iter_num=3)
    common = [f"--data.dir={shard_dir}", "--log.progress=false"]
    assert main(["train", "--init_from=resume", f"--out_dir={out}", *common]) == 0
    text = capsys.readouterr().out
    assert f"resuming {out / 'ckpt.pt'} at step 3" in text and "done: completed at step 6" in text

    cfg = tmp_path / "more.py"
    cfg.write_text(f"init_from = 'resume'\nout_dir = {str(out)!r}\nn_layer = 6\nmax_iters = 8\n"
                   f"eval_interval = 4\n")
    assert main(["train", str(cfg), *common]) == 0
    text = capsys.readouterr().out
    assert "n_layer=6 not applied" in text and "keeps its checkpoint's model shape (n_layer=2)" in text
    assert "train.max_steps 6 -> 8" in text and "eval.interval 3 -> 4" in text
    assert "step_00000006.pt at step 6" in text and "done: completed at step 8" in text
