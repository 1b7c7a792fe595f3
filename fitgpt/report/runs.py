"""Run folders after the fact: `fitgpt runs` lists them, `fitgpt plot` draws their curves.

Everything is read from the files a run writes (config.toml, metrics.jsonl, summary.json), so a
run that is still going or was killed shows what it logged so far. The drawing is in
fitgpt.report.plots (matplotlib, imported only when a picture is drawn).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitgpt.errors import FitError
from fitgpt.model.shape import ModelShape

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
    """Parameters (tied lm_head counted once) from a saved config's model table, as the
    model's `ModelShape` counts them; None when the table lacks a field that counts."""
    try:
        shape = ModelShape(
            n_layer=int(model["n_layer"]), n_head=1, n_embd=int(model["n_embd"]),  # n_head changes no count
            block_size=int(model["block_size"]), vocab_size=int(model["vocab_size"]),
            vocab_multiple=int(model.get("vocab_multiple", 64)), bias=bool(model["bias"]),
            norm=str(model.get("norm", "layernorm")), tie_embeddings=bool(model.get("tie_embeddings", True)))
    except (KeyError, TypeError, ValueError):
        return None
    return shape.params()


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


def print_runs(folder: str) -> list[Run]:
    """`fitgpt runs`: a table of the runs under folder (a line when there are none); the runs."""
    from rich.table import Table

    from fitgpt.console import console

    runs = list_runs(Path(folder))
    if not runs:
        console.print(f"no runs under {folder}/", markup=False)
        return runs
    table = Table(box=None, header_style="bold")
    for col, just in (("run", "left"), ("params", "right"), ("tokens", "right"),
                      ("best val", "right"), ("status", "left")):
        table.add_column(col, justify=just)
    for row in runs_table(runs):
        table.add_row(*row)
    console.print(table)
    return runs
