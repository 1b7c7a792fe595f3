"""Configuration: defaults < file < command line, nanoGPT files as their authors meant them,
and one clear error for every mistake."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_nanogpt_files import FINETUNE_SHAKESPEARE  # nanoGPT's config/finetune_shakespeare.py, as shipped

from fitgpt.cli.main import main
from fitgpt.config.load import (
    field_docs,
    help_text,
    load_config,
    parse_size,
    read_nanogpt_file,
    to_toml,
)
from fitgpt.config.schema import SECTIONS, Config
from fitgpt.errors import ConfigError

SEED = Path(__file__).parent.parent / "fitgpt" / "configs" / "seed-77m.py"

# The config block of the seed note, verbatim (comments included).
SEED_BLOCK = """\
# In config/train_fineweb.py
batch_size = 16
gradient_accumulation_steps = 32   # keeps effective 512 seqs
block_size = 1024

eval_batch_size = 4        # critical
eval_iters = 100
eval_interval = 500

n_embd = 512               # ~62M model, very safe
# optional: add gradient checkpointing
grad_checkpoint = True     # if your nanoGPT fork supports it
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_seed_config_block_loads_as_written(tmp_path):
    """The seed user's file must mean what they meant: their keys on nanoGPT's defaults.
    As written it pairs n_embd=512 with nanoGPT's 12 heads, which do not divide it (nanoGPT
    asserts on that too): one clear error naming heads that do; with 8 heads it loads."""
    path = str(write(tmp_path, "train_fineweb.py", SEED_BLOCK))
    msg = r"n_embd=512 is not divisible by model.n_head=12; heads that divide it: \[4, 8, 16\]"
    with pytest.raises(ConfigError, match=msg):
        load_config(path, [])
    cfg = load_config(path, ["--n_head=8"])
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.model.block_size) == (16, 32, 1024)
    assert (cfg.eval.batch_size, cfg.eval.iters, cfg.eval.interval) == (4, 100, 500)
    assert cfg.model.n_embd == 512 and cfg.memory.checkpointing is True
    # untouched keys come from nanoGPT's train.py defaults, not fitgpt's
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.train.lr, cfg.train.warmup_steps) == (12, 8, 6e-4, 2000)
    assert cfg.log.interval == 1 and cfg.data.dir == "data/openwebtext"
    assert cfg.train.lr_decay_steps == 600000 and cfg.train.max_steps == 600000


def test_builtin_seed_config_is_the_77m_model():
    """The shipped seed config is the mission's 77M model in fp16."""
    cfg = load_config(str(SEED), [])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (12, 12, 576)
    assert cfg.train.dtype == "float16" and cfg.data.dir == "data/fineweb"


def test_nanogpt_arithmetic_and_imports(tmp_path):
    """nanoGPT's GPT-2 config writes `5 * 8`; other files import time: both must load."""
    p = write(tmp_path, "gpt2.py", "import time\n'''doc'''\nwandb_log = False\nbatch_size = 12\n"
              "block_size = 1024\ngradient_accumulation_steps = 5 * 8\nmax_iters = 600000\n"
              "lr_decay_iters = max_iters\nweight_decay = 1e-1\n")
    cfg = load_config(str(p), [])
    assert cfg.train.grad_accum == 40 and cfg.train.lr_decay_steps == 600000
    assert cfg.train.weight_decay == pytest.approx(0.1)


def test_init_from_gpt2_sets_shape_and_training_refuses(tmp_path, capsys):
    """init_from='gpt2-medium' plans as GPT-2 medium; training it is a clear error (no weights)."""
    p = write(tmp_path, "eval_gpt2_medium.py", "batch_size = 8\neval_iters = 500\neval_only = True\n"
              "wandb_log = False\ninit_from = 'gpt2-medium'\n")
    cfg = load_config(str(p), [])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.bias) == (24, 16, 1024, True)
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "init_from='gpt2-medium'" in err[0]


def test_python_file_is_never_executed(tmp_path):
    """A config file is data: calls and statements are refused, and nothing runs."""
    marker = tmp_path / "pwned"
    p = write(tmp_path, "evil.py", f"import os\nos.system('touch {marker}')\n")
    with pytest.raises(ConfigError, match="only `key = value`"):
        load_config(str(p), [])
    p = write(tmp_path, "evil2.py", f"batch_size = __import__('os').system('touch {marker}')\n")
    with pytest.raises(ConfigError, match="evil2.py:1"):
        read_nanogpt_file(p)
    assert not marker.exists()


def test_precedence_and_both_override_forms(tmp_path):
    """defaults < file < command line; --eval.batch_size=4, --eval_batch_size 4 and a bare
    boolean flag all work."""
    p = write(tmp_path, "c.toml", "[train]\nbatch_size = 7\nlr = 1e-3\n[eval]\nbatch_size = 9\n")
    cfg = load_config(str(p), ["--train.batch_size=3", "--eval_batch_size", "4", "--train.compile",
                               "--learning_rate=2"])
    assert cfg.train.batch_size == 3 and cfg.eval.batch_size == 4 and cfg.train.compile is True
    assert cfg.train.lr == 2.0 and isinstance(cfg.train.lr, float)  # int where float is fine
    assert cfg.model.n_embd == Config().model.n_embd


@pytest.mark.parametrize("args, needle", [
    (["--eval.batch_sise=4"], "did you mean eval.batch_size"),
    (["--eval_bach_size=4"], "did you mean eval_batch_size"),
    (["--train.batch_size=abc"], "train.batch_size: expected int, got 'abc'"),
    (["--train.lr=fast"], "train.lr: expected float"),
    (["--model.n_embd=100", "--model.n_head=12"], "not divisible by model.n_head=12"),
    (["--eval.block_size=4096"], "eval.block_size=4096 is larger than model.block_size"),
    (["--train.batch_size=0"], "train.batch_size=0 is out of range; valid: >= 1"),
    (["--train.dtype=float8"], "train.dtype"),
    (["--memory.budget=lots"], "memory size 'lots'"),
])
def test_bad_values_name_the_field(args, needle):
    """Each mistake is an error that names the field, what was expected and what was given."""
    with pytest.raises(ConfigError) as e:
        load_config("demo", args)
    assert needle in str(e.value)


def test_toml_unknown_key_and_type(tmp_path):
    """Unknown keys and wrong types in a TOML file are errors too (no silent coercion)."""
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(str(write(tmp_path, "a.toml", "[train]\nbatchsize = 3\n")), [])
    with pytest.raises(ConfigError, match="train.batch_size: expected int, got '3'"):
        load_config(str(write(tmp_path, "b.toml", "[train]\nbatch_size = '3'\n")), [])
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(str(write(tmp_path, "c.toml", "[trian]\nbatch_size = 3\n")), [])


def test_resolved_config_round_trips(tmp_path):
    """The config.toml saved in a run folder loads back to the same config."""
    cfg = load_config(str(SEED), ["--eval.tokens=4096", "--memory.loss=full"])
    again = load_config(str(write(tmp_path, "saved.toml", to_toml(cfg))), [])
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_every_field_is_documented_in_help():
    """`fitgpt train --help` shows a docstring for every field of every section."""
    docs = field_docs()
    text = help_text()
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"{sec}.{f.name}"
            assert docs.get(key), f"{key} has no docstring"
            assert f"--{key}=" in text and docs[key] in text


def test_parse_size():
    assert parse_size("12GB") == 12 * 10**9 and parse_size("12GiB") == 12 * 2**30
    assert parse_size("11.5 GiB") == int(11.5 * 2**30) and parse_size("8000MB") == 8 * 10**9


@pytest.mark.parametrize("args, needle", [
    (["train", "--model.n_embd=50"], "not divisible"),
    (["train", "--eval.batch_sise=2"], "did you mean"),
    (["train", "no_such_config.toml"], "no such file"),
    (["train", "--data.dir=/nonexistent/shards"], "/nonexistent/shards"),
    (["eval"], "--ckpt"),
    (["eval", "--ckpt", "/nonexistent/run"], "no checkpoint"),
])
def test_cli_errors_are_one_line_exit_2(args, needle, capsys):
    """A user mistake prints one line, no traceback, and exits 2."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_corrupt_shard_header_is_exit_2(shard_dir, tmp_path, capsys):
    """A shard with a damaged header stops training before anything is allocated."""
    bad = shard_dir / "tiny_train_000001.bin"
    data = bytearray(bad.read_bytes())
    data[0:4] = (12345).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    assert main(["train", f"--data.dir={shard_dir}", f"--log.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny_train_000001.bin" in err[0]


def test_allocator_env(monkeypatch):
    """Both allocator variables are set before torch loads, unless the user set either."""
    from fitgpt.cli.main import set_allocator_env

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    set_allocator_env()
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    set_allocator_env()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    assert "PYTORCH_ALLOC_CONF" not in os.environ


def test_nanogpt_meta_pkl_vocab(tmp_path, monkeypatch):
    """A character-level nanoGPT dataset gets its vocab_size from meta.pkl, as in nanoGPT;
    a meta.pkl that would run code is refused."""
    import os
    import pickle

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    meta = tmp_path / "data" / "shakespeare_char" / "meta.pkl"
    meta.write_bytes(pickle.dumps({"vocab_size": 65, "itos": {0: "a"}, "stoi": {"a": 0}}))
    p = write(tmp_path, "char.py", "dataset = 'shakespeare_char'\nn_layer = 6\nn_head = 6\nn_embd = 384\n")
    cfg = load_config(str(p), [])
    assert cfg.model.vocab_size == 65 and cfg.data.dir == "data/shakespeare_char"

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    meta.write_bytes(pickle.dumps({"vocab_size": Evil()}))
    with pytest.raises(ConfigError, match="not a plain nanoGPT meta.pkl"):
        load_config(str(p), [])


def test_negative_loss_chunk_is_refused(capsys):
    assert main(["plan", "--memory.loss_chunk=-1"]) == 2
    assert "memory.loss_chunk=-1 is out of range; valid: >= 0" in capsys.readouterr().err




def test_finetune_shakespeare_loads_and_training_says_why_not(tmp_path, capsys):
    """Guards issue 12: the file stopped at its log-run name (not a literal) and then at nanoGPT's
    default min_lr 6e-5 > lr 3e-5, which nanoGPT never uses with decay_lr=False. The name falls
    back to the default with a note; training gpt2-xl's weights is refused in one line that
    says what works instead."""
    p = write(tmp_path, "finetune_shakespeare.py", FINETUNE_SHAKESPEARE)
    notes: list[str] = []
    cfg = load_config(str(p), [], notes=notes)
    assert cfg.log.wandb_run_name is None and cfg.log.wandb_project == "shakespeare"
    assert any("wandb_run_name is not a literal" in n and "run folder's name" in n for n in notes)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.decay_lr) == (3e-5, 6e-5, False)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (48, 25, 1600)
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "init_from='gpt2-xl'" in err[0]
    assert f"fitgpt plan {p}" in err[0] and "--init_from=scratch" in err[0]
    assert main(["plan", str(p), "--gpu", "a100-80gb"]) == 0  # what the message offers works
    assert "1557.69M parameters" in capsys.readouterr().out


def test_min_lr_is_checked_only_when_the_decay_uses_it(tmp_path):
    cfg = load_config("demo", ["--train.lr=1e-4", "--train.min_lr=1e-3", "--train.decay_lr=false"])
    assert cfg.train.min_lr > cfg.train.lr
    with pytest.raises(ConfigError, match="train.min_lr=0.001 is above train.lr=0.0001"):
        load_config("demo", ["--train.lr=1e-4", "--train.min_lr=1e-3"])


def test_only_name_keys_fall_back_from_non_literals(tmp_path):
    """A computed value that changes training still stops the run, naming the line."""
    p = write(tmp_path, "c.py", "import time\nmax_iters = int(time.time())\n")
    with pytest.raises(ConfigError, match=r"c.py:2: only literals and arithmetic"):
        load_config(str(p), [])


@pytest.mark.parametrize("source, needle", [
    ("toml:[train]\nlr = nan\n", "train.lr=nan is not a finite number; valid: > 0"),
    ("cli:--train.lr=1e999-1e999", "train.lr=nan is not a finite number; valid: > 0"),
    ("toml:[train]\nlr = inf\n", "train.lr=inf is not a finite number; valid: > 0"),
    ("cli:--train.beta1=1.5", "train.beta1=1.5 is out of range; valid: [0, 1)"),
    ("py:beta2 = -1\n", "train.beta2=-1.0 is out of range; valid: [0, 1)"),
    ("toml:[train]\nweight_decay = nan\n", "train.weight_decay=nan is not a finite number; valid: >= 0"),
    ("cli:--train.lr=0", "train.lr=0.0 is out of range; valid: > 0"),
    ("cli:--model.dropout=1", "model.dropout=1.0 is out of range; valid: [0, 1)"),
    ("cli:--memory.headroom=-1e999", "memory.headroom=-inf is not a finite number; valid: [0, 0.9)"),
    ("toml:[train]\nseed = -1\n", "train.seed=-1 is out of range; valid: [0, 18446744073709551615]"),
    ("toml:[train]\nmax_steps = 99999999999999999999\n", "train.max_steps=99999999999999999999 is out of range"),
    ("cli:--memory.loss=fast", "memory.loss: expected one of chunked, full, got 'fast'"),
    ("cli:--parallel.mode=zero3", "parallel.mode: expected one of ddp, fsdp, got 'zero3'"),
    ("cli:--train.device=gpu", "train.device: expected auto, cpu, cuda, cuda:N or mps; got 'gpu'"),
    ("cli:--train.dtype=fp17", "train.dtype: expected one of float32, bfloat16, float16, auto; got 'fp17'"),
    ("toml:[train]\ninit_from = 'foo'\n", "train.init_from: expected scratch, resume or one of gpt2, "
     "gpt2-medium, gpt2-large, gpt2-xl (its shape, for planning); got 'foo'"),
    ("cli:--memory.budget=nanGB", "memory size 'nanGB'"),
    ("cli:--train.lr=nan", "'nan' is not a finite number"),
    ("py:learning_rate = inf\n", "'inf' is not a finite number"),
])
def test_non_finite_and_out_of_range_values_are_refused(tmp_path, capsys, source, needle):
    """Guards issue 13 item 9: NaN, infinities and out-of-range hyperparameters passed check()
    and ended in tracebacks. Each is one line naming the field and its valid range, exit 2."""
    kind, text = source.split(":", 1)
    args = [text] if kind == "cli" else []
    config = str(write(tmp_path, f"c.{kind}", text)) if kind != "cli" else "demo"
    with pytest.raises(ConfigError) as e:
        load_config(config, args)
    assert needle in str(e.value)
    assert main(["plan", config, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_every_number_field_has_its_valid_range_beside_it():
    """One edit per field: every int and float field carries a Range in its annotation, and
    the help shows it."""
    from fitgpt.config.load import field_ranges, field_types

    numeric = [k for k, tp in field_types().items()
               if {int, float} & ({tp} | set(getattr(tp, "__args__", ())))]
    assert numeric and [k for k in numeric if k not in field_ranges()] == []
    assert "--train.beta1=FLOAT  [default 0.9, valid [0, 1)]" in help_text()
    assert "--memory.loss={chunked,full}" in help_text()


def test_choices_are_read_from_the_annotation(tmp_path):
    """Guards issue 14: a choice field is a Literal beside its field (with a Choice when it takes
    other spellings or a pattern), and the check, `--help` and the error all read the choices from
    there, so a new choice is one edit. train.dtype's aliases work in any case from every source."""
    import typing

    from fitgpt.config.load import choose, field_choices, field_types, normalise
    from fitgpt.config.pyfile import GPT2_SHAPES

    literal = {k: typing.get_args(tp) for k, tp in field_types().items()
               if typing.get_origin(tp) is typing.Literal}
    assert {"train.dtype", "train.init_from", "memory.loss", "memory.fit", "parallel.mode",
            "parallel.backend"} <= set(literal)
    for key, values in literal.items():
        assert f"--{key}={{{','.join(values)}}}" in help_text()
        if key in field_choices():  # a written-out description must name every choice
            assert all(v in field_choices()[key].text.format(", ".join(values)) for v in values)
    assert set(GPT2_SHAPES) == set(literal["train.init_from"]) - {"scratch", "resume"}
    assert choose("x.y", "b", typing.Literal["a", "b"]) == "b"  # nothing but the annotation

    p = write(tmp_path, "c.toml", "[train]\ndtype = 'BF16'\n")
    assert load_config(str(p), []).train.dtype == "bfloat16"
    assert load_config("demo", ["--train.dtype=Fp16"]).train.dtype == "float16"
    assert load_config("demo", ["--dtype=float32", "--train.device=cuda:1"]).train.device == "cuda:1"
    cfg = Config()
    cfg.train.dtype = "fp32"  # assigned in code, not through the loader
    normalise(cfg)
    assert cfg.train.dtype == "float32"
    cfg.memory.loss = "fast"
    with pytest.raises(ConfigError, match="memory.loss: expected one of chunked, full, got 'fast'"):
        normalise(cfg)


def test_override_keys_may_be_spelled_with_dashes():
    """Guards issue 14: `--train.max-steps=5` is `--train.max_steps=5` for every reader of the
    command line (one parser), a bare flag included."""
    from fitgpt.config.load import parse_overrides

    assert parse_overrides(["--train.max-steps=5", "--eval-batch-size", "4", "--train.eval-only"]) == [
        ("train.max_steps", "5"), ("eval_batch_size", "4"), ("train.eval_only", None)]
    cfg = load_config("demo", ["--train.max-steps=5", "--eval-batch-size", "4", "--train.eval-only"])
    assert (cfg.train.max_steps, cfg.eval.batch_size, cfg.train.eval_only) == (5, 4, True)


def test_run_names_are_checked_in_the_config_layer():
    """Guards issue 14: run-name validation lives in config/ (below store/, which uses it)."""
    from fitgpt.config.names import check_name
    from fitgpt.store import rundir

    assert rundir.check_name is check_name
    with pytest.raises(ConfigError, match="contains a path separator"):
        load_config("demo", ["--log.run_name=../x"])

