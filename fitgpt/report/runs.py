"""Run folders after the fact: `fitgpt runs` lists them, `fitgpt plot` draws their curves.

Everything is read from the files a run writes (config.toml, metrics.jsonl, summary.json), so a
run that is still going or was killed shows what it logged so far. The drawing is in
fitgpt.report.plots (matplotlib, imported only when a picture is drawn).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitgpt.errors import FitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package (a dependency there)
    import tomli as tomllib

NO_SUMMARY = "running or killed"


@dataclass
class Run:
    """What a run folder holds."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)  # config.toml, as TOML tables
    summary: dict[str, Any] | None = None  # summary.json, written when the run ended
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl

    @property
    def name(self) -> str:
        return self.path.name

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "?")) if self.summary else NO_SUMMARY

    @property
    def tokens(self) -> int | None:
        if self.summary and self.summary.get("tokens") is not None:
            return int(self.summary["tokens"])
        seen = [r["tokens"] for r in self.records if r.get("tokens") is not None]
        return max(seen) if seen else None

    @property
    def best_val(self) -> float | None:
        if self.summary and self.summary.get("best_val_loss") is not None:
            return float(self.summary["best_val_loss"])
        vals = [r["val_loss"] for r in self.kind("eval") if r.get("val_loss") is not None]
        return min(vals) if vals else None

    @property
    def params(self) -> int | None:
        if self.summary and self.summary.get("params"):
            return int(self.summary["params"])
        return params_of(self.config.get("model", {}))


def params_of(model: dict[str, Any]) -> int | None:
    """Parameters (tied lm_head counted once) from a config's model table, as GPT counts them."""
    try:
        L, C, T = int(model["n_layer"]), int(model["n_embd"]), int(model["block_size"])
        V, mult, bias = int(model["vocab_size"]), int(model.get("vocab_multiple", 64)), bool(model["bias"])
    except (KeyError, TypeError, ValueError):
        return None
    padded = -(-V // mult) * mult
    per_block = 12 * C * C + 2 * C + (11 * C if bias else 0)
    return L * per_block + C * (2 if bias else 1) + padded * C + T * C


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("config.toml", "metrics.jsonl",
                                                                "summary.json"))


def read_run(path: Path) -> Run:
    """A run folder's files; missing or half-written ones are skipped, not errors."""
    path = Path(path)
    if not path.is_dir():
        raise FitError(f"{path}: no such run folder")
    run = Run(path)
    try:
        run.config = tomllib.loads((path / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        pass
    try:
        run.summary = json.loads((path / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    try:
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                run.records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
    except OSError:
        pass
    return run


def list_runs(base: Path) -> list[Run]:
    """Every run folder directly under base, oldest first."""
    if not base.is_dir():
        raise FitError(f"{base}: no such folder (runs are written under log.out_dir, default runs/)")
    return [read_run(p) for p in sorted((p for p in base.iterdir() if is_run(p)),
                                        key=lambda p: p.stat().st_mtime)]


def _fmt(v: float | None, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def runs_table(runs: list[Run]) -> list[tuple[str, str, str, str, str]]:
    """(name, model size, tokens, best val loss, status) per run, as printed."""
    from fitgpt.console import fmt_count

    return [(r.name, "-" if r.params is None else fmt_count(r.params),
             "-" if r.tokens is None else fmt_count(r.tokens), _fmt(r.best_val, ".4f"), r.status)
            for r in runs]


# ----------------------------------------------------------------------------- plots

def plot_runs(paths: list[Path], out: Path) -> Path:
    """One PNG (fitgpt.report.plots.plot_runs): train and val loss against tokens, and each phase's
    measured peak memory beside its prediction; one colour per run."""
    from fitgpt.report.plots import plot_runs as draw

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return draw([read_run(p) for p in paths], out)


# ----------------------------------------------------------------------------- commands

def cmd_plot(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fitgpt plot", description=(
        "Train/val loss against tokens and each phase's peak memory against its prediction, for "
        "one run or several compared."))
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/plots.png for one run, "
                                 "plots.png here for several)")
    a = parse(p, args)
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


def cmd_runs(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fitgpt runs", description=(
        "List the run folders under DIR: name, model size, tokens, best val loss, status "
        f"(a run without summary.json is '{NO_SUMMARY}')."))
    p.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="default: runs")
    a = parse(p, args)
    from rich.table import Table

    from fitgpt.console import console

    runs = list_runs(Path(a.dir))
    if not runs:
        console.print(f"no runs under {a.dir}/", markup=False)
        return 0
    table = Table(box=None, header_style="bold")
    for col, just in (("run", "left"), ("params", "right"), ("tokens", "right"),
                      ("best val", "right"), ("status", "left")):
        table.add_column(col, justify=just)
    for row in runs_table(runs):
        table.add_row(*row)
    console.print(table)
    return 0


def parse(parser: argparse.ArgumentParser, args: list[str], known: bool = False):
    """argparse, with its usage errors raised as FitError (one line, exit code 2). With known,
    (namespace, the arguments it did not know): the --section.key=value overrides."""
    def error(message: str):
        raise FitError(f"{parser.prog}: {message}")

    parser.error = error  # type: ignore[method-assign]
    return parser.parse_known_args(args) if known else parser.parse_args(args)
