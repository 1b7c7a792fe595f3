"""The pictures: a run's curves (plots.png, `fitgpt plot`) and a plan's memory (`fitgpt plan --png`).

matplotlib is a dependency, but it is imported only inside these functions, so `import fitgpt`
and `fitgpt plan` without --png stay light. Figures are drawn with the object API on an Agg
canvas: no pyplot global state, no display needed. Every PNG is written to a temporary name in
its folder and renamed, so a failed write leaves no half-written picture; a path that cannot be
written is a FitError (one line, exit 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fitgpt.errors import ConfigError, FitError

GiB, MiB = 2**30, 2**20
# one colour per memory part, the same in every picture (tab10 order; overhead parts in greys)
PART_COLORS = {"weights": "#1f77b4", "gradients": "#ff7f0e", "optimizer state": "#2ca02c",
               "activations": "#d62728", "logits and loss": "#9467bd", "autocast weight copies": "#8c564b",
               "batch": "#e377c2", "eval buffers": "#bcbd22", "ddp buckets": "#17becf"}
OVERHEAD_COLORS = ("#7f7f7f", "#a6a6a6", "#cccccc", "#e0e0e0")
SMALL_PART, OTHER = 0.01, "other (each < 1%)"  # parts under 1 % of a phase are drawn as one
PART_COLORS[OTHER] = "#dbdb8d"


def figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas; a ConfigError naming the package if it is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib (a dependency of fitgpt): pip install matplotlib") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def check_png_path(out: Path) -> Path:
    """`out` if a PNG can be written there, else a FitError saying why (before any work)."""
    out = Path(out)
    if out.is_dir():
        raise FitError(f"{out}: is a folder; give a file name ending in .png")
    if out.suffix.lower() != ".png":
        raise FitError(f"{out}: the picture is a PNG; give a file name ending in .png")
    folder = out.parent
    if not folder.is_dir():
        raise FitError(f"{out}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise FitError(f"{out}: the folder {folder} is not writable")
    return out


def save_png(fig, out: Path, dpi: int = 110) -> Path:
    """Write fig to out atomically and fsynced, as every file fitgpt writes (fitgpt.fileio)."""
    from fitgpt.fileio import atomic_write

    out = Path(out)
    try:
        atomic_write(out, lambda f: fig.savefig(f, dpi=dpi, format="png"))
    except OSError as e:
        raise FitError(f"{out}: cannot write the picture ({e.strerror or e})") from None
    return out


def byte_unit(largest: float) -> tuple[float, str]:
    """(divisor, name) for an axis whose largest value is `largest` bytes."""
    return (GiB, "GiB") if largest >= GiB else (MiB, "MiB")


def fmt_tokens(x: float, _pos=None) -> str:
    """Tick labels for token counts: 0, 500, 20k, 1.5M, 2B."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


# ----------------------------------------------------------------------------- runs

def plot_runs(runs: list, out: Path) -> Path:
    """One PNG for one or several runs (fitgpt.report.runs.Run): train and val loss against tokens,
    and each phase's measured peak memory beside the planner's prediction for it."""
    fig = figure(12, 4.5)
    loss_ax, mem_ax = fig.subplots(1, 2, width_ratios=(3, 2))
    for i, run in enumerate(runs):
        _loss_curves(loss_ax, run, f"C{i % 10}", label=run.name if len(runs) > 1 else "")
    loss_ax.set(xlabel="tokens", ylabel="loss (nats per token)", title="loss")
    loss_ax.xaxis.set_major_formatter(fmt_tokens)
    loss_ax.grid(alpha=0.3)
    if loss_ax.has_data():
        loss_ax.legend(fontsize=8, loc="upper right")
    else:
        loss_ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=loss_ax.transAxes)
    _memory_bars(mem_ax, runs)
    return save_png(fig, out)


def _loss_curves(ax, run, color: str, label: str) -> None:
    pre = f"{label} " if label else ""
    pts = [(r["tokens"], r["loss"]) for r in run.kind("train") if r.get("loss") is not None]
    if pts:
        ax.plot(*zip(*pts), color=color, alpha=0.5, lw=1, label=f"{pre}train")
    pts = [(r["tokens"], r["val_loss"]) for r in run.kind("eval") if r.get("val_loss") is not None]
    if pts:
        ax.plot(*zip(*pts), color=color, marker="o", ms=4, lw=2, label=f"{pre}val (last {pts[-1][1]:.3f})")


def phase_peaks(run) -> dict[str, dict[str, int | None]]:
    """{phase: {"measured": bytes, "predicted": bytes}} of a run: the largest peak it logged
    (summary.json's, else metrics.jsonl's) and summary.json's prediction (None without one)."""
    s = run.summary or {}
    out = {}
    for phase, kind in (("training", "train"), ("evaluation", "eval")):
        logged = [r[f"peak_{kind}_bytes"] for r in run.records if r.get(f"peak_{kind}_bytes")]
        measured = s.get(f"peak_{kind}_bytes") or (max(logged) if logged else None)
        out[phase] = {"measured": measured, "predicted": s.get(f"predicted_{kind}_bytes")}
    return out


def _memory_bars(ax, runs: list) -> None:
    """Grouped bars: per phase, per run, the measured peak (solid) and the prediction (hatched)."""
    peaks = [phase_peaks(r) for r in runs]
    values = [v for p in peaks for ph in p.values() for v in ph.values() if v]
    if not values:
        ax.text(0.5, 0.5, "no memory recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="peak memory per phase", xticks=[], yticks=[])
        return
    div, unit = byte_unit(max(values))
    width = 0.8 / (2 * len(runs))
    for i, (run, p) in enumerate(zip(runs, peaks)):
        color = f"C{i % 10}"
        for j, phase in enumerate(("training", "evaluation")):
            for k, (what, style) in enumerate((("measured", {}), ("predicted", {"hatch": "//", "alpha": 0.45}))):
                v = p[phase][what]
                if not v:
                    continue
                x = j - 0.4 + width * (2 * i + k + 0.5)
                first = j == 0
                name = f"{run.name} {what}" if len(runs) > 1 else what
                ax.bar(x, v / div, width, color=color, edgecolor=color, label=name if first else None, **style)
                ax.annotate(f"{v / div:.3g}", (x, v / div), textcoords="offset points", xytext=(0, 2),
                            ha="center", fontsize=7)
    names = []
    for phase, name in (("training", "training step"), ("evaluation", "evaluation")):
        m, p = peaks[0][phase]["measured"], peaks[0][phase]["predicted"]
        if len(runs) == 1 and m and p:  # how far the prediction was off
            name += f"\n(predicted {(p - m) / m:+.1%})"
        names.append(name)
    ax.set_xticks([0, 1], names)
    ax.set(ylabel=unit, title="peak memory per phase: measured and predicted")
    ax.set_ylim(0, max(values) / div * 1.15)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper right")
    how = (runs[0].summary or {}).get("memory_measured_by")
    if how and len(runs) == 1:
        ax.set_xlabel(f"measured by: {how}", fontsize=8)


# ----------------------------------------------------------------------------- plan

def plan_png(plan, out: Path) -> Path:
    """`fitgpt plan --png`: the training step and the evaluation as bars stacked by part
    (overhead hatched on top), against the card's memory and the limit left by the headroom;
    beside them, each proposal's peak against the same lines."""
    data = _plan_data(plan)
    shown = data["proposals"]
    fig = figure(13 if shown else 8, 6.5)
    axes = fig.subplots(1, 2, width_ratios=(1, 1.3)) if shown else [fig.subplots(1, 1)]
    div, unit = byte_unit(max([data["card"] or 0, *(ph["total"] for ph in data["phases"].values()),
                               *(p["peak"] for p in shown)]))
    _stacked_phases(axes[0], data, div, unit)
    if shown:
        _proposal_bars(axes[1], data, div, unit)
    fig.suptitle(data["title"], fontsize=10)
    return save_png(fig, out)


def _lever_line(cfg, est) -> str:
    """A third title line for the memory levers and the host memory they use ('' without)."""
    from fitgpt.planner.plan import lever_words

    words = lever_words(cfg)[3:].replace(" | ", ", ")
    host = f"host memory {est.host_total / GiB:.2f} GiB (not drawn)" if est.host_total else ""
    return "\n" + "; ".join(w for w in (words, host) if w) if words or host else ""


def _plan_data(plan) -> dict[str, Any]:
    """What the picture needs from a Plan (fitgpt.planner.plan), as plain numbers."""
    from fitgpt.planner.plan import SHOWN

    est, cfg = plan.estimate, plan.cfg
    where = plan.gpu.label if plan.gpu is not None else (
        f"a budget of {plan.budget / GiB:.2f} GiB" if plan.budget else "no card given")
    phases = {}
    shown = (("evaluation", est.eval),) if cfg.train.eval_only else (
        ("training step", est.train), ("evaluation", est.eval))  # an eval-only run never trains
    for key, ph in shown:
        small = sum(p.bytes for p in ph.parts if p.bytes < SMALL_PART * ph.total)
        parts = [(p.name, p.bytes) for p in ph.parts if p.bytes >= SMALL_PART * ph.total]
        phases[key] = {"parts": parts + ([(OTHER, small)] if small else []),
                       "overhead": [(p.name, p.bytes) for p in ph.overhead if p.bytes > 0],
                       "total": ph.total}
    peak = est.eval.total if cfg.train.eval_only else est.peak
    proposals = [{"label": p.description, "peak": p.peak, "fits": p.fits} for p in plan.proposals[:SHOWN]]
    if proposals:
        proposals.insert(0, {"label": "this config", "peak": peak, "fits": plan.fits, "now": True})
    verdict = {True: "fits", False: "does not fit", None: "no card to compare with"}[plan.fits]
    return {"title": f"{cfg.name}: {est.params / 1e6:.1f}M parameters, {est.device_type} {est.dtype}, "
                     f"on {where}: {verdict}\nmicro-batch {cfg.train.batch_size} x block "
                     f"{cfg.model.block_size}, eval batch {cfg.eval_batch_size} x block "
                     f"{cfg.eval_block_size}, loss {cfg.memory.loss}"
                     + (", activation checkpointing" if cfg.memory.checkpointing else "")
                     + _lever_line(cfg, est),
            "card": plan.gpu.memory if plan.gpu is not None else plan.budget,
            "card_label": plan.gpu.label if plan.gpu is not None else "budget",
            "limit": plan.limit, "headroom": cfg.memory.headroom,
            "phases": phases, "proposals": proposals}


def _card_lines(ax, data: dict, div: float, unit: str, vertical: bool = False) -> None:
    """The card's memory (solid) and the limit below it (dashed), with the headroom between
    them shaded; their sizes go in the legend."""
    card, limit = data["card"], data["limit"]
    if not card:
        return
    line, span = (ax.axvline, ax.axvspan) if vertical else (ax.axhline, ax.axhspan)
    line(card / div, color="black", lw=1.2, label=f"{data['card_label']}: {card / div:.2f} {unit}")
    if limit:
        line(limit / div, color="#d62728", lw=1.2, ls="--",
             label=f"limit {limit / div:.2f} {unit} ({data['headroom']:.0%} headroom)")
        span(limit / div, card / div, color="#d62728", alpha=0.07, lw=0)


def _stacked_phases(ax, data: dict, div: float, unit: str) -> None:
    """A bar per phase (training step, evaluation; an eval-only run has only the second),
    stacked by part, largest parts of the first phase first."""
    phases = data["phases"]
    order = [n for n, _ in sorted(next(iter(phases.values()))["parts"], key=lambda p: -p[1])]
    order += [n for ph in phases.values() for n, _ in ph["parts"] if n not in order]
    order.sort(key=lambda n: n == OTHER)
    overhead = list(dict.fromkeys(n for ph in phases.values() for n, _ in ph["overhead"]))
    labelled = set()
    for x, ph in enumerate(phases.values()):
        sizes, bottom = {**dict(ph["parts"]), **dict(ph["overhead"])}, 0.0
        for i, name in enumerate(order + overhead):
            v = sizes.get(name, 0) / div
            if not v:
                continue
            over = name in overhead
            color = OVERHEAD_COLORS[overhead.index(name) % 4] if over else PART_COLORS.get(name, f"C{i % 10}")
            ax.bar(x, v, 0.5, bottom=bottom, color=color, edgecolor="white", lw=0.5,
                   hatch="//" if over else None,
                   label=None if name in labelled else (f"+ {name}" if over else name))
            labelled.add(name)
            bottom += v
        ax.annotate(f"{ph['total'] / div:.2f} {unit}", (x, bottom), textcoords="offset points",
                    xytext=(0, 3), ha="center", fontsize=9, weight="bold")
    _card_lines(ax, data, div, unit)
    ax.set_xticks(range(len(phases)), list(phases))
    ax.set_xlim(-0.6, len(phases) - 0.4)
    top = max([data["card"] or 0, *(ph["total"] for ph in phases.values())]) / div
    ax.set_ylim(0, top * 1.1)
    ax.set(ylabel=unit, title="predicted peak, part by part (+: outside PyTorch)")
    ax.grid(alpha=0.3, axis="y")
    handles, labels = ax.get_legend_handles_labels()  # the card's lines, then parts bottom-up
    names = [data["card_label"], "limit", *order, *(f"+ {n}" for n in overhead)]
    rank = {lab: next((i for i, n in enumerate(names) if lab.startswith(n)), len(names)) for lab in labels}
    pairs = sorted(zip(handles, labels), key=lambda hl: rank[hl[1]])
    ax.legend(*zip(*pairs), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _proposal_bars(ax, data: dict, div: float, unit: str) -> None:
    """Horizontal bars: this config's peak, then each proposal's; green fits, red does not."""
    props = data["proposals"]
    ys = range(len(props))
    colors = ["#2ca02c" if p["fits"] else "#d62728" for p in props]
    bars = ax.barh(ys, [p["peak"] / div for p in props], color=colors, height=0.6)
    bars[0].set(hatch="..", edgecolor="black", alpha=0.8)  # this config, not a proposal
    for y, p in zip(ys, props):
        ax.annotate(f"{p['peak'] / div:.2f} {unit}", (p["peak"] / div, y), textcoords="offset points",
                    xytext=(4, 0), va="center", fontsize=8, bbox={"fc": "white", "ec": "none", "pad": 1})
    ax.set_yticks(list(ys), [_short(p["label"]) for p in props], fontsize=8)
    ax.invert_yaxis()
    _card_lines(ax, data, div, unit, vertical=True)
    top = max([data["card"] or 0, *(p["peak"] for p in props)]) / div
    ax.set_xlim(0, top * 1.18)
    ax.set(xlabel=f"peak ({unit}) of the larger phase",
           title="this config, then the proposals (green: fits)")
    ax.grid(alpha=0.3, axis="x")
    if data["card"]:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
