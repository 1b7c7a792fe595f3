"""Pictures: `fitgpt plan --png` (the plan's parts against the card) and their PNG files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fitgpt.cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, read with the format's own layout."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def distinct_colours(path) -> int:
    from matplotlib.image import imread

    img = imread(path)
    return len({tuple(px) for px in img.reshape(-1, img.shape[-1])[::7].tolist()})


def test_plan_png_draws_the_plan_without_torch(tmp_path):
    """Guards `fitgpt plan --png`: a real PNG of the seed's config on its card (a picture, not a
    blank canvas), written by the plan command, which still imports no torch."""
    out = tmp_path / "plan.png"
    code = ("import sys; from fitgpt.cli.main import main; "
            f"rc = main(['plan', 'seed-77m', '--gpu', 'rtx4070', '--png', {str(out)!r}]); "
            "sys.exit(rc or 10 * ('torch' in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    w, h = png_size(out)
    assert (w, h) == (880, 715)  # 8 x 6.5 inches at 110 dpi: one panel, no proposals
    assert out.stat().st_size > 20_000 and distinct_colours(out) > 20


def test_plan_png_with_proposals_and_json(tmp_path, capsys):
    """A plan that does not fit draws its proposals beside it (a wider picture); with --json
    the standard output stays pure JSON."""
    import json

    out = tmp_path / "p.png"
    assert main(["plan", "seed-77m", "--gpu", "rtx4070", "--memory.loss=full", "--eval.batch_size=16",
                 "--json", "--png", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["proposals"]
    assert png_size(out) == (1430, 715)  # 13 x 6.5 inches: the proposals' panel too


@pytest.mark.parametrize("bad, why", [("missing/dir/p.png", "does not exist"), ("p.jpg", "ending in .png"),
                                       (".", "is a folder")])
def test_plan_png_bad_path_is_one_line(tmp_path, capsys, monkeypatch, bad, why):
    """Guards a bad --png path: one line saying what is wrong, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "seed-77m", "--gpu", "rtx4070", "--png", bad]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1 and err.startswith("fitgpt: error: ")
    assert list(tmp_path.iterdir()) == []


def test_png_write_failure_leaves_no_file(tmp_path):
    """A write that fails part-way (a real file-size limit, as a full disk would) is one line,
    and leaves neither a half-written PNG nor its temporary file."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "from fitgpt.cli.main import main; "
            f"sys.exit(main(['plan', 'seed-77m', '--gpu', 'rtx4070', '--png', {str(tmp_path / 'p.png')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write the picture" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_matplotlib_is_a_dependency_imported_only_to_draw():
    """Guards plots.png for every install: matplotlib is in the default dependencies (not an
    extra), and `import fitgpt` or its CLI does not import it (nor does `fitgpt plan` without
    --png), so commands that draw nothing stay light."""
    from pathlib import Path

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    meta = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert any(d.replace(" ", "").startswith("matplotlib>=") for d in meta["dependencies"])
    assert not any(d.startswith("matplotlib") for ds in meta["optional-dependencies"].values() for d in ds)
    code = ("import sys, contextlib, io, fitgpt, fitgpt.cli.main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    fitgpt.cli.main.main(['plan', 'seed-77m', '--gpu', 'rtx4070'])\n"
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_phase_peaks_compare_measured_with_predicted(tmp_path):
    """Guards the numbers plots.png draws in its memory panel: each phase's measured peak
    beside summary.json's prediction; a killed run (no summary) shows the largest logged peak
    and no prediction, and still draws."""
    import json

    from fitgpt.report.plots import phase_peaks
    from fitgpt.report.runs import plot_runs, read_run

    run = tmp_path / "r"
    run.mkdir()
    recs = [{"kind": "train", "step": 1, "tokens": 64, "loss": 5.0, "peak_train_bytes": 900},
            {"kind": "train", "step": 2, "tokens": 128, "loss": 4.0, "peak_train_bytes": 1000},
            {"kind": "eval", "step": 2, "tokens": 128, "val_loss": 4.5, "peak_eval_bytes": 600}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert phase_peaks(read_run(run)) == {"training": {"measured": 1000, "predicted": None},
                                          "evaluation": {"measured": 600, "predicted": None}}
    assert png_size(plot_runs([run], run / "plots.png")) == (1320, 495)
    (run / "summary.json").write_text(json.dumps({"peak_train_bytes": 1000, "peak_eval_bytes": 600,
                                                  "predicted_train_bytes": 1100, "predicted_eval_bytes": 550}))
    assert phase_peaks(read_run(run)) == {"training": {"measured": 1000, "predicted": 1100},
                                          "evaluation": {"measured": 600, "predicted": 550}}


def test_eval_only_plan_draws_no_training_step():
    """An eval-only run (nanoGPT's eval_gpt2*.py) never trains: its picture has the evaluation
    bar alone, so no 28 GiB training bar of AdamW state that will never exist."""
    from fitgpt.config.schema import Config
    from fitgpt.planner.gpus import find_gpu
    from fitgpt.planner.plan import make_plan
    from fitgpt.report.plots import _plan_data

    cfg = Config(name="eval")
    cfg.train.eval_only = True
    data = _plan_data(make_plan(cfg, find_gpu("rtx4070")))
    assert list(data["phases"]) == ["evaluation"]
    cfg.train.eval_only = False
    assert list(_plan_data(make_plan(cfg, find_gpu("rtx4070")))["phases"]) == ["training step", "evaluation"]
