"""Continuing a run reads its command line as a new run does (one override parser)."""

from __future__ import annotations

import shutil

from conftest import tiny_config
from conftest import train_losses as losses

from fitgpt.cli.main import main
from fitgpt.config.load import to_toml
from fitgpt.store.checkpoint import load_checkpoint
from fitgpt.store.resume import resume_config, resume_wanted


def test_resume_takes_dashed_override_keys(shard_dir, tmp_path):
    """Guards issue 14: `fitgpt train --resume RUN --train.max-steps=N` parsed its overrides
    without turning `-` into `_` (unknown key), unlike a new run. Now both spellings continue the
    run to the same step with the same losses, and nanoGPT's `--init-from=resume` is seen too."""
    cfg = tiny_config(shard_dir, tmp_path / "out", train__max_steps=2, eval__interval=2,
                      memory__track=False)
    toml = tmp_path / "tiny.toml"
    toml.write_text(to_toml(cfg))
    assert main(["train", str(toml)]) == 0
    first = tmp_path / "out" / "run"
    second = tmp_path / "copy"
    shutil.copytree(first, second)

    dashed, _, _ = resume_config(str(second), None, ["--train.max-steps=4", "--eval-interval", "4"], [])
    plain, _, _ = resume_config(str(first), None, ["--train.max_steps=4", "--eval_interval", "4"], [])
    assert dashed == plain and dashed.train.max_steps == 4
    assert resume_wanted(None, ["--init-from=resume"])

    assert main(["train", "--resume", str(first), "--train.max_steps=4"]) == 0
    assert main(["train", "--resume", str(second), "--train.max-steps=4"]) == 0

    assert load_checkpoint(first)["step"] == load_checkpoint(second)["step"] == 4
    assert len(losses(first)) == 4 and losses(first) == losses(second)
