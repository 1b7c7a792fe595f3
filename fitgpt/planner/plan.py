"""`fitgpt plan`: the predicted memory of a configuration on a card, and what to change.

`make_plan` gathers everything (estimate, verdict, proposals, optional auto-fit) without torch;
`render` prints it as tables, `as_json` as plain data. `prepare_training` is what `fitgpt train`
runs before it starts: `memory.fit=auto`, and one line with the predicted peaks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from fitgpt.config.load import parse_size
from fitgpt.config.schema import Config
from fitgpt.console import fmt_bytes
from fitgpt.errors import ConfigError
from fitgpt.planner.estimate import estimate
from fitgpt.planner.fit import Proposal, auto_fit, proposals, resolve_dtype
from fitgpt.planner.gpus import Gpu
from fitgpt.planner.levers import LEVERS, host_total, is_on
from fitgpt.planner.speed import speed
from fitgpt.planner.timeline import Estimate, Part, PhaseEstimate

LOW_USE = 0.40  # below this share of the card, proposals show what the spare memory could buy
SHOWN = 8  # proposals in the table


@dataclass
class Plan:
    """A configuration's predicted memory against a card (or a budget), with proposals."""

    cfg: Config
    estimate: Estimate
    gpu: Gpu | None
    budget: int | None  # bytes the run may use (memory.budget, else the card's memory)
    limit: int | None  # budget minus headroom: what the peak is compared with
    fits: bool | None
    verdict: str
    proposals: list[Proposal] = field(default_factory=list)
    fit_lines: list[str] = field(default_factory=list)
    fit_config: Config | None = None
    fit_estimate: Estimate | None = None
    notes: list[str] = field(default_factory=list)
    fit_error: str | None = None  # --fit found nothing that fits, whatever the levers: why
    host_memory: int | None = None  # this machine's RAM (the planner's host, not the card's)


def plan_device(cfg: Config, gpu: Gpu | None) -> tuple[str, str]:
    """(device type, dtype) to plan for: a named card or size means CUDA; otherwise the
    config's device ('auto' plans for CUDA, what fitgpt is for)."""
    device_type = "cpu" if gpu is None and cfg.train.device == "cpu" else "cuda"
    return device_type, resolve_dtype(cfg, device_type, gpu)


def make_plan(cfg: Config, gpu: Gpu | None, *, fit: bool = False) -> Plan:
    """Estimate cfg for gpu (or for cfg.memory.budget, or with no limit at all)."""
    device_type, dtype = plan_device(cfg, gpu)
    est = estimate(cfg, device_type, dtype, gpu)
    budget = parse_size(cfg.memory.budget) if cfg.memory.budget else (gpu.memory if gpu else None)
    notes = []
    host = host_memory()
    if gpu is not None and not gpu.bf16 and dtype == "bfloat16":
        notes.append(f"{gpu.label} has no bfloat16: training would stop; use --train.dtype=float16 "
                     "(the memory is the same)")
    if budget is None:
        verdict = ("no card to compare with: name one with --gpu (e.g. rtx4070 or 12GB) or give "
                   "--memory.budget")
        return Plan(cfg, est, gpu, None, None, None, verdict, notes=notes, host_memory=host)
    limit = int(budget * (1 - cfg.memory.headroom))
    card = gpu.memory if gpu is not None else budget
    peak = est.peak  # the evaluation alone for an eval-only run
    fits = peak <= limit
    worst = "training" if est.train.total >= est.eval.total else "evaluation"
    if cfg.train.eval_only:
        worst = "evaluation"
        notes.append("train.eval_only: only the evaluation runs; it holds the weights, no "
                     "gradients and no AdamW state")
    what = (f"the {gpu.label}'s {fmt_bytes(card)}" if gpu is not None and gpu.key
            else f"{fmt_bytes(card)}")
    share = f"{peak / card:.0%} of {what}"
    lim = (f"limit {fmt_bytes(limit)} = {'budget' if cfg.memory.budget else 'card'} "
           f"{fmt_bytes(budget)} minus {cfg.memory.headroom:.0%} headroom")
    if fits:
        verdict = f"fits: peak {fmt_bytes(peak)} ({worst}) is {share}; {lim}"
    else:
        verdict = f"does not fit: {worst} needs {fmt_bytes(peak)}, {share}; {lim}"
    plan = Plan(cfg, est, gpu, budget, limit, fits, verdict, notes=notes, host_memory=host)
    if not fits or (peak < LOW_USE * card and not cfg.train.eval_only):
        plan.proposals = proposals(cfg, gpu, limit, device_type=device_type, dtype=dtype)
    if fit:
        # the card may be another machine's: this machine's RAM is reported, not imposed
        try:
            new, lines = auto_fit(cfg, budget, cfg.memory.headroom, device_type=device_type,
                                  dtype=dtype, gpu=gpu)
        except ConfigError as e:  # nothing fits whatever the levers: the plan says so
            plan.fit_error = str(e)
            return plan
        plan.fit_config, plan.fit_lines = new, lines
        plan.fit_estimate = estimate(new, device_type, dtype, gpu)
    return plan


# ----------------------------------------------------------------------------- output

def _phase_dict(ph: PhaseEstimate) -> dict[str, Any]:
    return {"parts": [vars(p) for p in ph.parts], "allocated": ph.allocated,
            "overhead": [vars(p) for p in ph.overhead], "total": ph.total}


def _estimate_dict(est: Estimate) -> dict[str, Any]:
    """An eval-only run never trains: its "train" is null."""
    return {"device_type": est.device_type, "dtype": est.dtype, "params": est.params,
            "eval_only": est.eval_only,
            "train": None if est.eval_only else _phase_dict(est.train),
            "eval": _phase_dict(est.eval), "peak": est.peak}


def as_json(plan: Plan) -> dict[str, Any]:
    """Everything `render` shows, as plain data."""
    g = plan.gpu
    out: dict[str, Any] = {
        "config": plan.cfg.name,
        "gpu": None if g is None else {"name": g.name, "key": g.key or None, "memory": g.memory,
                                      "bf16": g.bf16, "tflops": g.tflops,
                                      "compute_capability": list(g.cc) if g.cc else None},
        "budget": plan.budget, "limit": plan.limit, "headroom": plan.cfg.memory.headroom,
        **_estimate_dict(plan.estimate),
        "fits": plan.fits, "verdict": plan.verdict, "notes": plan.notes,
        "proposals": [{"description": p.description, "overrides": p.overrides, "fits": p.fits,
                       "peak": p.peak,
                       "train_total": None if p.estimate.eval_only else p.estimate.train.total,
                       "eval_total": p.estimate.eval.total, "throughput": round(p.throughput, 4),
                       "changes_model": p.changes_model} for p in plan.proposals],
    }
    out["host"] = _host_dict(plan, plan.estimate)
    if plan.fit_error is not None:
        out["auto_fit"] = {"fits": False, "error": plan.fit_error}
    if plan.fit_config is not None:
        from fitgpt.planner.fit import overrides_of

        new = plan.fit_config
        sp = speed(new, plan.gpu)
        out["auto_fit"] = {"fits": True, "lines": plan.fit_lines,
                           "overrides": overrides_of(plan.cfg, new),
                           "levers": [lv.key for lv in LEVERS if is_on(new, lv) and not is_on(plan.cfg, lv)],
                           "speed": {"tokens_per_s": round(sp.tokens_per_s), "step_s": sp.step_s,
                                     "compute_s": sp.compute_s, "transfer_s": sp.transfer_s,
                                     "host_s": sp.host_s},
                           "host": _host_dict(plan, plan.fit_estimate),
                           "estimate": _estimate_dict(plan.fit_estimate)}
    return out


def _host_dict(plan: Plan, est: Estimate) -> dict[str, Any]:
    """Host memory: what the run pins there (offloaded state and activations), by part where
    the estimate says, and what this machine has (not necessarily the card's host)."""
    parts = [vars(p) for p in host_parts(est)]
    return {"needed": host_total(est), "parts": parts, "this_machine": plan.host_memory,
            "this_machine_note": "RAM of the machine that ran fitgpt plan (os.sysconf); with "
                                 "--gpu the card may sit in another"}


def _phase_table(ph: PhaseEstimate, title: str):
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    t.add_column("part")
    t.add_column("bytes", justify="right")
    t.add_column("how it is counted", overflow="fold")
    for p in sorted(ph.parts, key=lambda p: -p.bytes):
        t.add_row(p.name, fmt_bytes(p.bytes), p.note)
    t.add_row("[bold]allocated peak[/]", f"[bold]{fmt_bytes(ph.allocated)}[/]",
              "torch.cuda.max_memory_allocated" if ph.overhead else "what the storage tracker sees",
              end_section=True)
    for p in ph.overhead:
        t.add_row(f"+ {p.name}", fmt_bytes(p.bytes), p.note)
    if ph.overhead:
        t.add_row("[bold]total[/]", f"[bold]{fmt_bytes(ph.total)}[/]", "what the card must hold")
    return t


def _proposal_table(plan: Plan):
    from rich.table import Table

    t = Table(title="proposals (ranked: fitting ones by predicted throughput, then by peak)",
              title_justify="left", show_edge=False, pad_edge=False)
    widest = max((len(o) for p in plan.proposals[:SHOWN] for o in p.overrides), default=10)
    for name, kw in (("#", {"justify": "right"}), ("change", {}), ("peak", {"justify": "right"}),
                     ("fits", {}), ("speed", {"justify": "right"}),
                     ("overrides to paste", {"min_width": min(widest, 40), "overflow": "fold"})):
        t.add_column(name, **kw)
    for i, p in enumerate(plan.proposals[:SHOWN], 1):
        t.add_row(str(i), p.description, fmt_bytes(p.peak), "yes" if p.fits else "no",
                  f"{p.throughput:.2f}x", " ".join(p.overrides))
    return t


def render(plan: Plan, console) -> None:
    """The plan as tables and lines on a rich console."""
    est, cfg = plan.estimate, plan.cfg
    where = plan.gpu.label if plan.gpu is not None else est.device_type
    console.print(f"[bold]{cfg.name}[/]: {est.params / 1e6:.2f}M parameters | {where} | "
                  f"{est.device_type} {est.dtype} | micro-batch {cfg.train.batch_size} x accum "
                  f"{cfg.train.grad_accum} x block {cfg.model.block_size} | eval batch "
                  f"{cfg.eval_batch_size} x block {cfg.eval_block_size} | loss {cfg.memory.loss}"
                  + (" | activation checkpointing" if cfg.memory.checkpointing else "")
                  + lever_words(cfg))
    phases = [(est.train, "training step"), (est.eval, "evaluation (model and optimizer state alive)")]
    if est.eval_only:
        phases = [(est.eval, "evaluation (an eval-only run: weights, no optimizer state)")]
    for ph, title in phases:
        console.print()
        console.print(_phase_table(ph, title))
    _render_host(plan, est, console)
    console.print()
    style = {True: "bold green", False: "bold red", None: "bold"}[plan.fits]
    console.print(f"[{style}]{plan.verdict}[/]", highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}", markup=False)
    if plan.fits and not plan.proposals and plan.estimate.peak < LOW_USE * (plan.budget or 0):
        console.print(f"under {LOW_USE:.0%} of the card, and no faster setting of the same model "
                      "fits (fitgpt's throughput model saturates at 16k tokens per micro-batch): "
                      "the spare memory could hold a larger model or a longer context",
                      markup=False)
    if plan.proposals:
        console.print()
        console.print(_proposal_table(plan))
        if len(plan.proposals) > SHOWN:
            console.print(f"({len(plan.proposals) - SHOWN} more with --json)")
    if plan.fit_config is not None:
        from fitgpt.planner.fit import overrides_of

        console.print()
        console.print("[bold]auto-fit[/] (what --memory.fit=auto would do):")
        for line in plan.fit_lines:
            console.print(f"  {line}", markup=False)
        flags = overrides_of(cfg, plan.fit_config)
        if flags:
            console.print(f"  overrides: {' '.join(flags)}", markup=False)
        _render_host(plan, plan.fit_estimate, console, indent="  ")
    if plan.fit_error is not None:
        console.print()
        console.print("[bold red]auto-fit: cannot fit[/] (whatever the memory levers):")
        console.print(f"  {plan.fit_error}", markup=False)


def lever_words(cfg: Config) -> str:
    """The levers cfg has on, for the plan's first line ('' when none: the line is as before)."""
    words = [lv.name for lv in LEVERS if is_on(cfg, lv)]
    m = cfg.memory
    if m.checkpointing and m.checkpoint_every > 1:
        words.insert(0, f"checkpointing every {m.checkpoint_every} blocks")
    return "".join(f" | {w}" for w in words)


def host_parts(est: Estimate) -> list[Part]:
    """What the run holds in host memory: the offloaded model state (all run long), and the
    activations the larger phase offloads."""
    acts = max(est.train.host, est.eval.host)
    return list(est.host) + ([Part("offloaded activations", acts, "saved for backward, pinned; "
                                   "the phase that holds the most")] if acts else [])


def _render_host(plan: Plan, est: Estimate, console, indent: str = "") -> None:
    """Host memory, apart from the card's: only when the run pins some there (offloaded state
    or activations), with this machine's RAM beside it."""
    need = host_total(est)
    if not need:
        return
    parts = ", ".join(f"{p.name} {fmt_bytes(p.bytes)}" for p in host_parts(est))
    mine = plan.host_memory
    room = ("" if mine is None else
            f"; this machine has {fmt_bytes(mine)} of RAM, " + ("enough" if need <= mine else "NOT enough")
            + (" (the card named with --gpu may sit in another machine)" if plan.gpu and plan.gpu.key else ""))
    console.print(f"{indent}host memory (not on the card): {fmt_bytes(need)}"
                  + (f" ({parts})" if parts else "") + room, markup=False)


def render_verify(result: dict[str, Any], console) -> None:
    """Predicted against measured, per phase (from `fitgpt.planner.verify.verify`)."""
    from rich.table import Table

    t = Table(title=f"verification on {result['device']} {result['dtype']} ({result['how']})",
              title_justify="left", show_edge=False, pad_edge=False)
    for name in ("phase", "what", "predicted", "measured", "error"):
        t.add_column(name, justify="left" if name in ("phase", "what") else "right")
    for phase in ("train", "eval"):
        r = result[phase]
        for what in ("allocated", "reserved"):
            if r.get(f"measured_{what}") is None and r.get(f"predicted_{what}") is None:
                continue
            meas = r.get(f"measured_{what}")
            err = r.get(f"error_{what}_pct")
            t.add_row(phase, what, fmt_bytes(r.get(f"predicted_{what}")),
                      meas if isinstance(meas, str) else fmt_bytes(meas),
                      "" if err is None else f"{err:+.1f}%")
    console.print(t)


# ----------------------------------------------------------------------------- fitgpt train

def host_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_possible(cfg: Config, est: Estimate, device_type: str, dtype: str,
                   card: Gpu | None) -> None:
    """Stop, before anything is allocated, a run that this machine cannot hold at all: even at
    the out-of-memory back-off's floor (one sequence per slice, eval batch 1) the allocated
    bytes exceed the device's whole memory, or what the memory levers keep in host memory or
    the token ids of one optimizer step (drawn up front, on the host) exceed the host's. Raises
    ConfigError with the plan's numbers."""
    host = host_memory()
    memory = card.memory if card is not None else host
    if memory is None:
        return
    floor_cfg = copy.deepcopy(cfg)
    floor_cfg.memory.micro_split = max(cfg.memory.micro_split, cfg.train.batch_size)
    floor_cfg.eval.batch_size = 1
    floor = estimate(floor_cfg, device_type, dtype, card)
    phase = floor.eval if cfg.train.eval_only else max(floor.train, floor.eval, key=lambda p: p.allocated)
    share = max(1, cfg.train.grad_accum // max(1, cfg.parallel.nproc))
    ids = 0 if cfg.train.eval_only else 16 * cfg.train.batch_size * cfg.model.block_size * share
    need = phase.allocated + (ids if card is None else 0)
    where = f"the {card.label}'s" if card is not None else "this machine's"
    plan = (f"the plan needs {fmt_bytes(est.eval.total)} for evaluation" if cfg.train.eval_only else
            f"the plan needs {fmt_bytes(est.train.total)} for training and "
            f"{fmt_bytes(est.eval.total)} for evaluation")
    plan += f" (weights {fmt_bytes(_part(phase, 'weights'))})"
    if need > memory:
        raise ConfigError(
            f"this run cannot fit {where} {fmt_bytes(memory)}: {plan}, and even the out-of-memory "
            f"back-off's floor (one sequence per slice, eval batch 1) needs {fmt_bytes(need)}"
            + (f" with the step's token ids ({fmt_bytes(ids)})" if ids and card is None else "")
            + "; see `fitgpt plan` for what to change")
    if card is not None and host is not None and est.host_total > host:
        raise ConfigError(
            f"this run cannot fit this machine's {fmt_bytes(host)} of RAM: its memory levers keep "
            f"{fmt_bytes(est.host_total)} in host memory ("
            + ", ".join(f"{p.name} {fmt_bytes(p.bytes)}" for p in host_parts(est))
            + "); turn a lever off, or use --memory.optimizer_state=8bit for smaller AdamW state; "
            "see `fitgpt plan` for what to change")
    if card is not None and host is not None and ids > host:
        raise ConfigError(
            f"this run cannot fit this machine's {fmt_bytes(host)}: the token ids of one "
            f"optimizer step (batch {cfg.train.batch_size} x accumulation {share} x block "
            f"{cfg.model.block_size} x 16 B = {fmt_bytes(ids)}) are drawn on the host before the "
            f"first forward; {plan}; see `fitgpt plan` for what to change")


def _part(ph: PhaseEstimate, name: str) -> int:
    return sum(p.bytes for p in ph.parts if p.name == name)


def prepare_training(cfg: Config) -> tuple[Config, list[str]]:
    """Before `fitgpt train` allocates anything: apply `memory.fit=auto`, predict the peaks, and
    stop a run that cannot fit this machine at all (`check_possible`).

    Imports torch (the allocator setting is already in place) to learn the device. Returns the
    config to train with and the lines to print."""
    from fitgpt.model.runtime import resolve_runtime

    rt = resolve_runtime(cfg.train.device, cfg.train.dtype)
    device_type, dtype = rt.device_type, str(rt.dtype).replace("torch.", "")
    lines: list[str] = []
    card = None
    if device_type == "cuda":
        from fitgpt.planner.gpus import current_gpu

        # this process's own device (LOCAL_RANK under torchrun, before set_device): never GPU 0
        # from every rank
        card = current_gpu(rt.device.index)
    if cfg.memory.fit == "auto":
        if cfg.memory.budget:
            budget = parse_size(cfg.memory.budget)
        elif card is not None:
            budget = card.memory
        else:
            raise ConfigError(f"memory.fit=auto needs --memory.budget on {device_type.upper()} "
                              "(e.g. --memory.budget=12GB)")
        # the levers may pin host memory: never more than this machine has
        cfg, fit_lines = auto_fit(cfg, budget, cfg.memory.headroom, device_type=device_type,
                                  dtype=dtype, gpu=card, host_bytes=host_memory())
        lines += [f"memory.fit=auto: {line}" for line in fit_lines]
    est = estimate(cfg, device_type, dtype, card)
    check_possible(cfg, est, device_type, dtype, card)
    line = (f"predicted peak ({device_type} {dtype}): training {fmt_bytes(est.train.total)}, "
            f"evaluation {fmt_bytes(est.eval.total)}")
    if cfg.train.eval_only:
        line = f"predicted peak ({device_type} {dtype}): evaluation {fmt_bytes(est.eval.total)}"
    if device_type == "cuda":
        both = [est.eval] if cfg.train.eval_only else [est.train, est.eval]
        line += (f" (allocated {' and '.join(fmt_bytes(p.allocated) for p in both)} plus CUDA "
                 "overhead)")
    lines.append(line)
    limit = parse_size(cfg.memory.budget) if cfg.memory.budget else (card.memory if card else None)
    if limit is not None and est.peak > limit and cfg.memory.fit != "auto":
        lines.append(f"warning: that is more than the {fmt_bytes(limit)} available; see "
                     f"`fitgpt plan` for what to change, or add --memory.fit=auto")
    return cfg, lines
