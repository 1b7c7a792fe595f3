"""The `fitgpt` command itself: pipes, the torchrun launch, and the notes it owes the user."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fitgpt.cli.main import main
from fitgpt.cli.train import torchrun_args
from fitgpt.config.load import NANOGPT_KEYS
from fitgpt.train.distributed import torchrun_command


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["plan", "--help"],
                                  ["prepare", "--help"], ["plan", "gpt2-124m"]])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path, args):
    """Guards `fitgpt train --help | head`, which ended in a BrokenPipeError traceback: here the
    reading end is closed before fitgpt writes (a real EPIPE, as when head has exited). Plain
    prints end with 141 (128 + SIGPIPE, what a shell shows); argparse's help (0) and rich's
    tables (1) already stopped quietly on their own, and still do."""
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "fitgpt", *args], stdout=w, stderr=subprocess.PIPE,
                         cwd=tmp_path)
    os.close(w)
    os.close(r)
    err = p.communicate(timeout=120)[1].decode()
    assert err == "", err[-2000:]
    assert p.returncode == {"prepare": 0, "plan": 1 if "gpt2-124m" in args else 141}.get(args[0], 141)


def torchrun_parses(cmd: list[str]) -> list[str]:
    """torchrun's own parser on its command line; the arguments it hands to fitgpt."""
    from torch.distributed.run import get_args_parser

    ns = get_args_parser().parse_args(cmd[3:])
    return ns.training_script_args


def test_every_override_reaches_the_processes_torchrun_starts(capsys):
    """Guards `fitgpt train CONFIG --nproc 8` (the README's form), which stopped in torchrun's
    parser: "ambiguous option: --nproc could match --nproc-per-node, --nproc_per_node". Every
    flat nanoGPT key, in both spellings, now reaches the processes unchanged in meaning."""
    with pytest.raises(SystemExit):  # the hazard: torchrun matches abbreviations anywhere
        torchrun_parses(torchrun_command(8, ["train", "c.toml", "--nproc", "8"]))
    assert "ambiguous option: --nproc" in capsys.readouterr().err
    for key in NANOGPT_KEYS:
        for given in ([f"--{key}=1"], [f"--{key}", "1"]):
            child = ["train", *torchrun_args("c.toml", {"--resume": "auto"}, given)]
            assert torchrun_parses(torchrun_command(8, child)) == child
            assert child[-1] == f"--{NANOGPT_KEYS[key]}=1"


def test_nproc_launch_on_cpu_with_nanogpt_nccl_backend(shard_dir, tmp_path, capfd):
    """The README's `fitgpt train CONFIG --nproc N`, run for real with 2 processes, from a
    nanoGPT-style file that keeps nanoGPT's `backend = 'nccl'`: on a CPU the run uses gloo and
    says so, instead of failing."""
    cfg = tmp_path / "tiny.py"
    cfg.write_text(f"backend = 'nccl'\ndevice = 'cpu'\ndtype = 'float32'\ndataset = 'x'\n"
                   f"n_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\nvocab_size = 256\n"
                   f"batch_size = 2\ngradient_accumulation_steps = 2\nmax_iters = 2\nwarmup_iters = 1\n"
                   f"eval_interval = 2\neval_iters = 2\nout_dir = {str(tmp_path / 'out')!r}\n")
    assert main(["train", str(cfg), "--nproc", "2", f"--data.dir={shard_dir}", "--log.progress=false"]) == 0
    out = capfd.readouterr().out
    assert "parallel.backend=nccl needs CUDA devices" in out and "using gloo" in out
    assert "2 processes, ddp" in out and "done: completed at step 2" in out


def test_slow_cpu_dtype_is_said_once(capsys):
    """A 16-bit dtype on a CPU without native arithmetic for it costs 18-20x per step (measured):
    one note, with the way back to float32; none where the CPU has the instructions."""
    from fitgpt.model.runtime import _NOTED, resolve_runtime

    _NOTED.clear()
    native = torch.ops.mkldnn._is_mkldnn_fp16_supported()
    for _ in range(2):
        resolve_runtime("cpu", "float16")
    out = capsys.readouterr().out
    assert out.count("train.dtype=float16 on this CPU") == (0 if native else 1)
    if not native:
        assert "--train.dtype=float32" in out
    resolve_runtime("cpu", "float32")
    assert capsys.readouterr().out == ""


def test_bfloat16_note_follows_the_cpus_instructions(tmp_path):
    """bfloat16 is fast on CPUs with bfloat16 instructions (this one's AVX-512 BF16) and slow
    without: the same process limited to AVX2 (a real CPU feature limit, not a mock) says so."""
    code = ("import torch; from fitgpt.model.runtime import resolve_runtime; "
            "print('native', torch.ops.mkldnn._is_mkldnn_bf16_supported()); "
            "resolve_runtime('cpu', 'bfloat16')")
    for env in ({}, {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **env}, cwd=tmp_path)
        native = "native True" in r.stdout
        assert ("train.dtype=bfloat16 on this CPU" in r.stdout) == (not native), r.stdout + r.stderr
