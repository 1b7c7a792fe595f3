"""The README's command lines work as written.

- The Quickstart is what CI runs: its test command appears verbatim in .ci/run.
- Every `fitgpt ...` line in the README's code blocks (and every `torchrun ... -m fitgpt ...`
  line) is found here by reading README.md, so a new line is covered without editing this file.
  Each one runs for real on a CPU, in a sandbox folder that holds what the line names (a tiny
  config for CONFIG, a tiny run for RUN_DIR, small prepared shards for data/...), with overrides
  appended that make the model tiny. The few that cannot run in seconds here are listed in
  PARSE_ONLY with the reason, and are parsed the way the CLI parses them (and torchrun, for the
  lines it starts): `fitgpt train CONFIG --nproc 8` used to stop in torchrun's own parser.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from fitgpt.cli.main import main

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()

# Overrides appended to commands that build a model: 2 layers, 32 wide, 2 steps (the GPT-2
# vocabulary stays, so that runs can be sampled and exported with GPT-2's tokenizer).
TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--train.batch_size=2", "--train.grad_accum=2", "--train.max_steps=2",
        "--train.warmup_steps=1", "--train.device=cpu", "--train.dtype=float32",
        "--eval.interval=2", "--eval.tokens=128", "--eval.batch_size=2", "--memory.loss_chunk=32",
        "--log.progress=false", "--log.interval=1"]
TINY_RESUME = ["--train.max_steps=3", "--log.progress=false"]  # a resumed run keeps its shape
TINY_BENCH = ["--steps", "1", "--repeats", "1", "--warmup", "0", "--model.vocab_size=256"]
TINY_SAMPLE = ["--max-new-tokens", "4"]
TINY_PREPARE = ["--val-tokens", "1k", "--workers", "1"]  # FineWeb's default keeps 10M for validation
TINY_CONFIG = """\
name = "tiny"
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
[data]
dir = "data/fineweb10B"
[train]
batch_size = 2
grad_accum = 2
max_steps = 2
warmup_steps = 1
device = "cpu"
dtype = "float32"
[eval]
interval = 2
tokens = 128
batch_size = 2
[memory]
loss_chunk = 32
[log]
progress = false
interval = 1
"""

# Lines that cannot run in seconds on a CPU, by pattern, with the reason. They are parsed.
PARSE_ONLY = {
    r"--nproc 8": "8 processes on a 2-core machine; tests/test_cli.py runs the same form with 2",
    r"^torchrun ": "torchrun lines name 8 GPUs or several machines",
    r"compile": "torch.compile on a CPU takes minutes",
}
# Lines that need the network, by pattern: offline they must stop with this one-line advice.
OFFLINE = {r"^fitgpt prepare fineweb (?!.*--parquet)": "--parquet"}


def quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    """Guards against README and CI drifting apart."""
    cmds = quickstart_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds)
    assert cmds[0].endswith("fitgpt train") and "pytest" in cmds[1]
    assert cmds[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def readme_commands() -> list[str]:
    """Every line of a code block that is a fitgpt command: `fitgpt ...`, `$ fitgpt ...` (shown
    with its output), or `torchrun ... -m fitgpt ...`; trailing comments dropped."""
    out = []
    for lang, block in re.findall(r"```([a-z]*)\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.strip()
            if lang != "bash":  # output shown in a plain block: only its `$ ` lines are commands
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if line.startswith("fitgpt ") or (line.startswith("torchrun ") and "-m fitgpt" in line):
                out.append(re.sub(r"\s+#.*$", "", line))
    return out


COMMANDS = readme_commands()


def test_readme_commands_are_found():
    """The extraction itself: the documented forms this file exists for are among them."""
    assert "fitgpt train configs/gpt2-124m.toml --nproc 8" in COMMANDS
    assert any(c.startswith("fitgpt plan ") for c in COMMANDS) and len(COMMANDS) > 25
    for pattern in list(PARSE_ONLY) + list(OFFLINE):  # no stale entries
        assert any(re.search(pattern, c) for c in COMMANDS), pattern


def argv_of(line: str) -> list[str]:
    """The line's arguments in the sandbox: optional [...] parts dropped, placeholders filled."""
    line = re.sub(r"\s*\[[^\]]*\]", "", line)
    subs = {"CONFIG": "tiny.toml", "RUN_DIR": "runs/tiny", "RUN_OR_FILE": "runs/tiny",
            "OUT_DIR": "out-hf", "FILE.png": "plot.png"}
    argv = [subs.get(a, a) for a in shlex.split(line)]
    return ["runs/tiny" if re.fullmatch(r"runs/demo-\S+", a) else a for a in argv]


@pytest.fixture(scope="module")
def built(tmp_path_factory, shard_files):
    """What the README's lines name, made once: shards, a prepared FineWeb-style folder, a
    tiny run with a checkpoint."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = tmp_path_factory.mktemp("readme")
    (base / "data").mkdir()
    shutil.copytree(shard_files, base / "data" / "fineweb10B")
    text = ("In the beginning God created the heaven and the earth. " * 40).strip()
    parquet = base / "fineweb" / "sample" / "10BT" / "000_00000.parquet"
    parquet.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": [f"{i} {text}" for i in range(60)], "id": [str(i) for i in range(60)]}),
                   parquet)
    (base / "tiny.toml").write_text(TINY_CONFIG)
    assert main(["prepare", "fineweb", "--parquet", str(parquet), "--out", str(base / "data" / "fineweb"),
                 *TINY_PREPARE]) == 0
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert main(["train", "tiny.toml", "--log.run_name=tiny"]) == 0
    finally:
        os.chdir(cwd)
    return base


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory):
    """llm.c shards of random ids below 256 (valid GPT-2 ids)."""
    import numpy as np

    from fitgpt.data.shards import write_shard

    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    write_shard(d / "tiny_val_000000.bin", rng.integers(0, 256, 4096).astype(np.uint16))
    write_shard(d / "tiny_train_000001.bin", rng.integers(0, 256, 20000).astype(np.uint16))
    return d


def sandbox(tmp_path, built, monkeypatch, argv) -> Path:
    """A working folder with what `argv` names; a `prepare` line writes its own data/fineweb."""
    for name in ("fineweb", "tiny.toml"):
        (tmp_path / name).symlink_to(built / name)
    if "runs/tiny" in argv or argv == ["runs"]:  # a copy: resume and plot write into it
        shutil.copytree(built / "runs", tmp_path / "runs")
    if "--ckpt" in argv and argv[argv.index("--ckpt") + 1] != "runs/tiny":  # another out_dir
        shutil.copytree(built / "runs", tmp_path / argv[argv.index("--ckpt") + 1])
    (tmp_path / "data").mkdir()
    for d in (built / "data").iterdir():
        if not (argv[0] == "prepare" and d.name == "fineweb"):
            (tmp_path / "data" / d.name).symlink_to(d)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "fitgpt").symlink_to(ROOT / "fitgpt")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "train_fineweb.py").write_text(
        "batch_size = 16\ngradient_accumulation_steps = 32\nblock_size = 1024\n"
        "eval_batch_size = 4\neval_iters = 100\neval_interval = 500\nn_embd = 512\nn_head = 8\n"
        "grad_checkpoint = True\ndataset = 'fineweb10B'\n")
    (tmp_path / "books").mkdir()
    for i in range(2):
        (tmp_path / "books" / f"b{i}.txt").write_text("Call me Ishmael. " * 200)
    (tmp_path / "notes.txt").write_text("one note\n\nanother note\n" * 100)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"content": f"record {i} " * 50}) + "\n"
                                                   for i in range(50)))
    examples = [{"ctx": "The sun", "endings": [" rose.", " sat.", " ate.", " ran."], "label": 0}] * 2
    (tmp_path / "hellaswag_val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path


def parse_only(argv: list[str], child: bool = False) -> None:
    """Parse as the CLI parses (no model is built): train's and bench's own option splitting and
    config loading, and for torchrun lines and `--nproc`, torchrun's own parser."""
    from torch.distributed.run import get_args_parser

    from fitgpt.cli.train import torchrun_args
    from fitgpt.config.cmdline import split_args
    from fitgpt.config.load import load_config
    from fitgpt.train.bench import parse_variants
    from fitgpt.train.distributed import torchrun_command

    if argv[0] == "torchrun":
        ns = get_args_parser().parse_args(argv[1:])
        assert ns.module and ns.training_script == "fitgpt"
        return parse_only(ns.training_script_args)
    assert argv[0] in ("train", "bench"), argv
    options = ("--resume",) if argv[0] == "train" else ("--variants", "--steps", "--repeats")
    config, opts, overrides = split_args([a for a in argv[1:] if a != "--json"], options)
    cfg = load_config(config, overrides)
    if "--variants" in opts:
        parse_variants(opts["--variants"])
    if argv[0] == "train" and cfg.parallel.nproc > 1 and not child:
        child = ["train", *torchrun_args(config, opts, overrides)]
        ns = get_args_parser().parse_args(torchrun_command(cfg.parallel.nproc, child)[3:])
        assert ns.training_script_args == child
        parse_only(child, child=True)  # what each process parses (it reads WORLD_SIZE)


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_runs(line, built, tmp_path, monkeypatch, capsys):
    """Each README command line runs here (or, for PARSE_ONLY, parses) as written, with tiny
    overrides appended to those that build a model."""
    argv = argv_of(line)
    if any(re.search(p, line) for p in PARSE_ONLY):
        sandbox(tmp_path, built, monkeypatch, argv)
        parse_only(argv[1:] if argv[0] == "fitgpt" else argv)
        return
    argv = argv[1:]
    sandbox(tmp_path, built, monkeypatch, argv)
    if argv[0] == "train" and "--help" not in argv:
        argv += TINY_RESUME if "--resume" in argv else TINY
    if argv[0] == "bench":
        argv += TINY + TINY_BENCH
    if argv[0] == "plan" and "--verify" in argv:
        argv += TINY + ["--model.vocab_size=256"]  # synthetic tokens: no tokenizer needed
    if argv[0] == "sample":
        argv += TINY_SAMPLE
    if argv[:2] == ["prepare", "fineweb"]:
        argv += TINY_PREPARE
    offline = next((advice for p, advice in OFFLINE.items() if re.search(p, line)), None)
    code = main(argv)
    out, err = capsys.readouterr()
    if offline:
        assert code == 2 and offline in err and len(err.strip().splitlines()) == 1, err
    else:
        assert code == 0, (argv, err[-3000:])
        assert "Traceback" not in err
