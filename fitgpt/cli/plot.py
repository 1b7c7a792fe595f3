"""`fitgpt plot RUN_DIR [RUN_DIR ...] [--out FILE.png]`: drawn by fitgpt.report.runs.plot_runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from fitgpt.errors import FitError, parse_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fitgpt plot", description=(
        "Train/val loss against tokens and each phase's peak memory against its prediction, for "
        "one run or several compared."))
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/plots.png for one run, "
                                 "plots.png here for several)")
    return p


def cmd_plot(args: list[str]) -> int:
    """Exit code 0; folders that are not runs and an --out that is not a PNG are refused first."""
    from fitgpt.report.runs import is_run, plot_runs

    a = parse_args(_parser(), args)
    paths = [Path(d) for d in a.run_dirs]
    for d in paths:
        if not is_run(d):
            raise FitError(f"{d}: not a run folder (no config.toml, metrics.jsonl or summary.json)")
    out = Path(a.out) if a.out else (paths[0] / "plots.png" if len(paths) == 1 else Path("plots.png"))
    if out.suffix.lower() != ".png":
        raise FitError(f"--out {out}: the picture is a PNG; give a file name ending in .png")
    from fitgpt.console import say

    say(f"wrote {plot_runs(paths, out)}")
    return 0
