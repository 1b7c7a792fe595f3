"""What to change so that a run fits a card: ranked proposals, and `memory.fit=auto`.

Both search the same settings, each costing nothing in the model's quality:
- `memory.loss=chunked` (never the full logits),
- `memory.checkpointing` (recompute each block in backward),
- the micro-batch `train.batch_size`, with `train.grad_accum` raised so that batch x accumulation
  (the sequences per optimizer step) stays exactly the same (only its divisors qualify),
- the evaluation batch (the validation windows stay the same: `eval.tokens` is pinned).
When none of these fits even at its floor, the memory levers come next (8-bit AdamW state,
offloading to host memory, fused backward, selective checkpointing: `fitgpt.planner.levers`),
never one the run would refuse. A smaller model (`model.n_embd` or `model.n_layer`) is proposed
only when nothing else fits, and marked as changing the model. Candidates are scored by the
estimator (`estimate`) and by the speed model (`fitgpt.planner.speed.predicted_throughput`).
Pure Python: no torch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fitgpt.config.schema import Config
from fitgpt.console import fmt_bytes
from fitgpt.errors import ConfigError
from fitgpt.model.shape import ModelShape
from fitgpt.planner.estimate import estimate
from fitgpt.planner.gpus import Gpu
from fitgpt.planner.levers import LEVER_KEYS, LEVERS, LeverSearch, host_total, is_on, lever_refusal
from fitgpt.planner.speed import predicted_throughput, speed, utilisation  # noqa: F401 - re-exported
from fitgpt.planner.timeline import Estimate

# ----------------------------------------------------------------------------- candidates

@dataclass
class Proposal:
    """One way to run: what changes, how to ask for it, and what it costs."""

    description: str
    overrides: list[str]  # --section.key=value strings that reproduce it
    estimate: Estimate
    fits: bool
    throughput: float  # relative to the configuration as given (1.0)
    changes_model: bool = False
    config: Config | None = field(default=None, repr=False)

    @property
    def peak(self) -> int:
        """What must fit: the larger phase (only the evaluation for an eval-only run)."""
        return self.estimate.peak


def _fmt_value(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def apply(cfg: Config, changes: dict[str, object]) -> Config:
    """A copy of cfg with dotted keys set. Changing the micro-batch pins the evaluation (its
    batch size and its windows, which default to multiples of train.batch_size)."""
    new = copy.deepcopy(cfg)
    if "train.batch_size" in changes:
        if new.eval.batch_size is None and "eval.batch_size" not in changes:
            changes = {**changes, "eval.batch_size": cfg.eval_batch_size}
        if new.eval.tokens is None:
            changes = {**changes, "eval.tokens": cfg.eval_windows * cfg.eval_block_size}
    for key, value in changes.items():
        sec, name = key.split(".")
        setattr(getattr(new, sec), name, value)
    return new


def overrides_of(cfg: Config, new: Config) -> list[str]:
    """The `--section.key=value` flags that turn cfg into new."""
    out = []
    for sec in ("model", "train", "eval", "memory"):
        a, b = getattr(cfg, sec), getattr(new, sec)
        for name, value in vars(b).items():
            if getattr(a, name) != value:
                out.append(f"--{sec}.{name}={_fmt_value(value)}")
    return out


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending, from its factors (trial division up to 10^6: a cofactor
    left above that is taken as prime, so a few divisors of a huge n may be missed; the cost
    never grows with n)."""
    factors: dict[int, int] = {}
    m, p = n, 2
    while p * p <= m and p <= 10**6:
        while m % p == 0:
            factors[p] = factors.get(p, 0) + 1
            m //= p
        p += 1 if p == 2 else 2
    if m > 1:
        factors[m] = factors.get(m, 0) + 1
    out = [1]
    for p, e in factors.items():
        out = [d * p**i for d in out for i in range(e + 1)]
    return sorted(out)


class Search:
    """Estimates and throughputs of candidate configurations, cached, against one limit."""

    def __init__(self, cfg: Config, limit: int | None, device_type: str, dtype: str,
                 gpu: Gpu | None = None):
        self.cfg, self.limit, self.device_type, self.dtype, self.gpu = cfg, limit, device_type, dtype, gpu
        self.base = predicted_throughput(cfg, gpu)
        self._cache: dict[tuple, tuple[Config, Estimate]] = {}
        self._refusals: dict[tuple, str | None] = {}
        self.host_limit: int | None = None  # host bytes the levers may pin (None: no limit)

    def run(self, changes: dict[str, object]) -> tuple[Config, Estimate]:
        key = tuple(sorted(changes.items()))
        if key not in self._cache:
            new = apply(self.cfg, changes)
            self._cache[key] = (new, estimate(new, self.device_type, self.dtype, self.gpu))
        return self._cache[key]

    def fits(self, est: Estimate) -> bool:
        return self.limit is None or est.peak <= self.limit

    def eval_batch(self, changes: dict[str, object]) -> int | None:
        """The largest eval batch <= the current one whose evaluation fits (None: none does).
        Only the loss, the model, the eval settings and the levers that move the model state
        matter for evaluation."""
        ev = {k: v for k, v in changes.items()
              if k.startswith(("memory.loss", "model.", "eval.")) or k in LEVER_KEYS}

        def ok(b: int) -> bool:
            return self.limit is None or self.run({**ev, "eval.batch_size": b})[1].eval.total <= self.limit

        hi = self.cfg.eval_batch_size
        if ok(hi):
            return hi
        good = last_true(range(1, hi), ok)
        return None if good is None else good

    def largest_micro(self, changes: dict[str, object]) -> int | None:
        """The largest micro-batch (a divisor of batch x accumulation) whose training fits."""
        return last_true(divisors(self.seqs), lambda d: self.train_fits({**changes, **self.micro(d)}))

    def micro(self, d: int) -> dict[str, object]:
        """The changes for micro-batch d (none for the current one)."""
        if d == self.cfg.train.batch_size:
            return {}
        return {"train.batch_size": d, "train.grad_accum": self.seqs // d}

    @property
    def seqs(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum

    def refusal(self, changes: dict[str, object]) -> str | None:
        """Why a run would refuse this setting, in one line (None: it would run). Only a setting
        with a lever on can be refused: the cheap settings are valid by construction."""
        key = tuple(sorted(changes.items()))
        if key not in self._refusals:
            new = apply(self.cfg, changes)
            self._refusals[key] = (lever_refusal(new, self.device_type, self.dtype)
                                   if any(is_on(new, lv) for lv in LEVERS) else None)
        return self._refusals[key]

    def train_fits(self, changes: dict[str, object]) -> bool:
        if self.refusal(changes) is not None:
            return False
        return self.limit is None or self.run(changes)[1].train.total <= self.limit

    def proposal(self, changes: dict[str, object], description: str,
                 changes_model: bool = False) -> Proposal:
        new, est = self.run(changes)
        return Proposal(description, overrides_of(self.cfg, new), est, self.fits(est),
                        predicted_throughput(new, self.gpu) / self.base, changes_model, new)


def last_true(items: Sequence, ok) -> object | None:
    """The last item for which ok holds, when ok holds for a prefix of items (bisection)."""
    lo, hi = -1, len(items)  # ok(items[lo]) holds (or lo = -1); ok(items[hi]) fails (or hi = len)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(items[mid]) else (lo, mid)
    return items[lo] if lo >= 0 else None


def _describe(cfg: Config, ch: dict[str, object]) -> str:
    parts = []
    if ch.get("memory.loss") == "chunked":
        parts.append("chunked loss")
    for lv in LEVERS:
        if lv.key in ch and ch[lv.key] == lv.value:
            parts.append(lv.name)
    if "memory.checkpointing" in ch:
        parts.append("activation checkpointing" + ("" if ch["memory.checkpointing"] else " off"))
    if ch.get("memory.checkpoint_every", 1) > 1:
        parts.append(f"every {ch['memory.checkpoint_every']} blocks")
    if "train.batch_size" in ch:
        parts.append(f"micro-batch {ch['train.batch_size']} x accumulation {ch['train.grad_accum']}")
    if "eval.batch_size" in ch and ch["eval.batch_size"] != cfg.eval_batch_size:
        parts.append(f"eval batch {ch['eval.batch_size']}")
    if "eval.block_size" in ch:
        parts.append(f"eval block {ch['eval.block_size']}")
    return " + ".join(parts)


def _eval_fix(search: Search, loss: dict[str, object]) -> dict[str, object]:
    """The eval changes that make evaluation fit: a smaller eval batch, or (only when even one
    window is too much) eval batch 1 with shorter windows, which changes what val loss measures."""
    eb = search.eval_batch(loss)
    if eb is not None:
        return {} if eb == search.cfg.eval_batch_size else {"eval.batch_size": eb}
    block = search.cfg.eval_block_size
    while block > 64:
        block //= 2
        trial = {"eval.batch_size": 1, "eval.block_size": block}
        if search.run({**loss, **trial})[1].eval.total <= (search.limit or 0):
            return trial
    return {"eval.batch_size": 1}


def proposals(cfg: Config, gpu: Gpu | None, budget_bytes: int, *, device_type: str = "cuda",
              dtype: str | None = None) -> list[Proposal]:
    """Ways to run cfg within budget_bytes (the limit, headroom already taken off), ranked:
    the fitting ones by predicted throughput, then the rest by predicted peak.

    For each loss and checkpointing choice: the current micro-batch, the largest one that fits
    and micro-batch 1, each with the eval batch that fits. A fitting proposal is dropped when
    one with a subset of its changes is at least as fast; when cfg fits as it is, only faster
    ones are kept (what the spare memory buys). A smaller model only when nothing else fits."""
    search = Search(cfg, budget_bytes, device_type, dtype or resolve_dtype(cfg, device_type, gpu), gpu)
    losses = [{}] + ([{"memory.loss": "chunked"}] if cfg.memory.loss == "full" else [])
    if cfg.train.eval_only:  # only the evaluation runs: only its settings matter
        fixes = [{**loss, **_eval_fix(search, loss)} for loss in losses]
        out = [search.proposal(ch, _describe(cfg, ch)) for ch in fixes if ch]
        for p in out:
            p.fits = p.peak <= budget_bytes
        return sorted(out, key=lambda p: (not p.fits, p.peak))
    best: dict[frozenset, Proposal] = {}
    for loss in losses:
        ev = _eval_fix(search, loss)
        for ck in ({}, {"memory.checkpointing": not cfg.memory.checkpointing}):
            largest = search.largest_micro({**loss, **ck})
            for d in {cfg.train.batch_size, largest or 1, 1}:
                full = {**loss, **ck, **search.micro(d), **ev}
                if not full:
                    continue
                p = search.proposal(full, _describe(cfg, full))
                kinds = frozenset("micro" if k == "train.batch_size" else k
                                  for k in full if k != "train.grad_accum")
                old = best.get(kinds)
                if old is None or (p.fits, p.throughput if p.fits else -p.peak) > (
                        old.fits, old.throughput if old.fits else -old.peak):
                    best[kinds] = p
    items = list(best.items())
    keep = [p for k, p in items if not (p.fits and any(
        q.fits and kk < k and q.throughput >= p.throughput - 1e-9 for kk, q in items))]
    if search.fits(search.run({})[1]):  # it fits already: only what the spare memory buys
        keep = [p for p in keep if p.fits and p.throughput > 1 + 1e-6]
    elif not any(p.fits for p in keep):
        levers: dict[str, object] = {}
        if not cfg.train.eval_only:  # the model state is what is left: the levers shrink it
            base = {"memory.loss": "chunked"} if cfg.memory.loss == "full" else {}
            ls = LeverSearch(search, base)
            keep += ls.proposals(_describe)
            levers = ls.settings(ls.candidates()[0])
        if not any(p.fits for p in keep):
            keep += _smaller_models(search, levers)
    return sorted(keep, key=lambda p: (not p.fits, -p.throughput if p.fits else p.peak))


def _smaller_models(search: Search, levers: dict[str, object] | None = None) -> list[Proposal]:
    """Last resort: the widest narrower model and the deepest shallower one that fit with every
    memory option on (chunked loss, checkpointing, micro-batch 1, eval batch 1) and the memory
    levers in `levers` (settings, e.g. the floor of every lever that applies)."""
    m = search.cfg.model
    floor = {"memory.loss": "chunked", "memory.checkpointing": True, **search.micro(1),
             "eval.batch_size": 1, **(levers or {})}
    names = [lv.name for lv in LEVERS if floor.get(lv.key) == lv.value]
    with_what = "every memory option" + (f" and {', '.join(names)}" if names else "")

    def ok(ch: dict[str, object]) -> bool:
        if search.refusal(ch) is not None:
            return False
        est = search.run(ch)[1]
        return search.fits(est) and (search.host_limit is None or est.host_total <= search.host_limit)

    out = []
    step = 8 * m.n_head // math.gcd(8, m.n_head)  # widths divisible by 8 and by the heads
    widths = range(step, m.n_embd, step)
    for key, values in (("model.n_embd", widths), ("model.n_layer", range(1, m.n_layer))):
        v = last_true(values, lambda v, key=key: ok({**floor, key: v}))
        if v is not None:
            name = key.split(".")[1]
            out.append(search.proposal({**floor, key: v}, f"smaller model (changes the model): "
                                       f"{name} {getattr(m, name)} -> {v}, with {with_what}",
                                       changes_model=True))
    return out


def resolve_dtype(cfg: Config, device_type: str, gpu: Gpu | None) -> str:
    """The dtype a run of cfg would use: 'auto' is bfloat16 on CUDA (float16 on a card without
    bf16), float32 on the CPU."""
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    if device_type != "cuda":
        return "float32"
    return "bfloat16" if gpu is None or gpu.bf16 else "float16"


# ----------------------------------------------------------------------------- auto-fit

def auto_fit(cfg: Config, budget_bytes: int, headroom: float, *, device_type: str = "cuda",
             dtype: str | None = None, gpu: Gpu | None = None,
             host_bytes: int | None = None,
             levers: Sequence[str] | None = None) -> tuple[Config, list[str]]:
    """The fastest configuration whose training and evaluation both fit budget x (1 - headroom).

    Searched: micro-batch (divisors of batch x accumulation, accumulation compensating, so the
    tokens per optimizer step do not change), checkpointing on or off, and the largest eval
    batch that fits. The loss is always chunked: its ~2 % cost buys a peak that does not grow
    with the vocabulary. Ties go to the smaller change. Only when none of that fits are memory
    levers added (`fitgpt.planner.levers`: the fewest that fit, the fastest of those, each
    with the memory that was still missing), never one the run would refuse, never more host
    memory than host_bytes (None: no host limit), only those in `levers` (keys; None: all).
    Returns the new config and one line per change saying why. Raises ConfigError (with the
    planner's best suggestion) when nothing fits whatever the levers.
    """
    limit = int(budget_bytes * (1 - headroom))
    dtype = dtype or resolve_dtype(cfg, device_type, gpu)
    search = Search(cfg, limit, device_type, dtype, gpu)
    search.host_limit = host_bytes
    t = cfg.train
    base = {"memory.loss": "chunked"} if cfg.memory.loss != "chunked" else {}
    eb = search.eval_batch(base)  # evaluation does not depend on the training settings
    ev = {} if eb in (None, cfg.eval_batch_size) else {"eval.batch_size": eb}
    best, best_key = None, None
    choices = ({}, {"memory.checkpointing": not cfg.memory.checkpointing})
    if cfg.train.eval_only:  # only the evaluation runs: only its settings matter
        best, choices = (None if eb is None else {**base, **ev}), ()
    for ck in choices:
        largest = search.largest_micro({**base, **ck}) if eb is not None else None
        for b in divisors(search.seqs) if largest else []:
            if b > largest:  # every micro-batch up to the largest fits: rank them by speed
                break
            ch = {**base, **ck, **search.micro(b), **ev}
            key = (round(predicted_throughput(apply(cfg, ch), gpu) / search.base, 4), -len(ch),
                   -abs(b - t.batch_size))
            if best_key is None or key > best_key:
                best, best_key = ch, key
    where = f"{fmt_bytes(limit)} ({fmt_bytes(budget_bytes)} budget minus {headroom:.0%} headroom)"
    orig = search.run({})[1]
    lever_lines: list[str] = []
    if best is None and not cfg.train.eval_only:
        found = LeverSearch(search, base, levers).choose()
        best, lever_lines = found.changes, found.lines
        if best is None:
            raise ConfigError(_cannot_fit(search, found, where, host_bytes))
    if best is None:
        sugg = proposals(cfg, gpu, limit, device_type=device_type, dtype=dtype)
        hint = ""
        if sugg:
            p = sugg[0]
            hint = f"; best suggestion: {p.description} ({' '.join(p.overrides)}), peak {fmt_bytes(p.peak)}"
        raise ConfigError(f"memory.fit=auto: nothing fits in {where}, not even micro-batch 1 "
                          f"with activation checkpointing and eval batch 1{hint}")
    new, est = search.run(best)
    lines = _lines(cfg, new, orig, est, limit, where, search, levers=bool(lever_lines))
    if lever_lines:
        lines = lever_lines + lines + [_speed_line(cfg, new, est, search)]
    return new, lines


def _lines(cfg: Config, new: Config, orig: Estimate, est: Estimate, limit: int, where: str,
           search: Search, levers: bool = False) -> list[str]:
    """Human lines: each change and why, then the result (levers: the lever lines come before
    these, so there is something to change)."""
    too_big = {ph: getattr(orig, ph).total > limit for ph in ("train", "eval")}
    too_big["train"] = too_big["train"] and not cfg.train.eval_only
    why_train = (f"training peak {fmt_bytes(orig.train.total)} > {fmt_bytes(limit)} budget"
                 if too_big["train"] else
                 f"predicted throughput x{predicted_throughput(new, search.gpu) / search.base:.2f}")
    lines = []
    if new.memory.loss != cfg.memory.loss:
        lines.append(f"memory.loss {cfg.memory.loss} -> {new.memory.loss}: never holds the full "
                     f"logits (" + (f"training peak {fmt_bytes(orig.train.total)} > "
                                    f"{fmt_bytes(limit)} budget" if too_big["train"]
                                    else "the peak no longer grows with the vocabulary") + ")")
    if new.memory.checkpointing != cfg.memory.checkpointing:
        lines.append(f"memory.checkpointing {_fmt_value(cfg.memory.checkpointing)} -> "
                     f"{_fmt_value(new.memory.checkpointing)}: {why_train}")
    if new.memory.checkpointing and new.memory.checkpoint_every != cfg.memory.checkpoint_every:
        k = new.memory.checkpoint_every
        lines.append(f"memory.checkpoint_every {cfg.memory.checkpoint_every} -> {k}: "
                     + ("every block checkpointed, the only degree that fits" if k == 1 else
                        f"only every {k}th block recomputed, the fastest degree that fits"))
    if new.train.batch_size != cfg.train.batch_size:
        lines.append(f"train.batch_size {cfg.train.batch_size} -> {new.train.batch_size}, "
                     f"train.grad_accum {cfg.train.grad_accum} -> {new.train.grad_accum}: "
                     f"{why_train} (same {new.tokens_per_step:,} tokens per step)")
    if new.eval_batch_size != cfg.eval_batch_size:
        lines.append(f"eval.batch_size {cfg.eval_batch_size} -> {new.eval_batch_size}: "
                     f"evaluation peak {fmt_bytes(orig.eval.total)} > {fmt_bytes(limit)} budget")
    if new.eval.tokens != cfg.eval.tokens:
        lines.append(f"eval.tokens set to {new.eval.tokens:,}: the same validation windows as "
                     f"before (they were eval.iters x train.batch_size)")
    if not lines and not levers:
        lines.append(f"nothing to change: training {fmt_bytes(orig.train.total)} and evaluation "
                     f"{fmt_bytes(orig.eval.total)} fit {where}")
    else:
        lines.append(f"predicted peak now: training {fmt_bytes(est.train.total)}, evaluation "
                     f"{fmt_bytes(est.eval.total)}, within {where}")
    return lines


def _speed_line(cfg: Config, new: Config, est: Estimate, search: Search) -> str:
    """The predicted speed of what auto-fit chose, and where its step time goes."""
    sp = speed(new, search.gpu)
    parts = [f"arithmetic {sp.compute_s:.1f} s"]
    if sp.transfer_s:
        parts.append(f"activation copies not hidden {sp.transfer_s:.1f} s")
    if sp.host_s:
        parts.append(f"CPU AdamW step and its copies {sp.host_s:.1f} s")
    host = host_total(est)
    world = max(1, new.parallel.nproc)
    tokens = f"{new.tokens_per_step // world:,} tokens" + (" per process" if world > 1 else "")
    return (f"predicted speed: {sp.tokens_per_s:,.0f} tokens/s idealised, "
            f"x{sp.tokens_per_s / search.base:.2f} of the settings as given; a step of {tokens} is "
            + " + ".join(parts) + (f"; host memory {fmt_bytes(host)}" if host else ""))


MODEL_STATE_SKIP = ("activations", "logits and loss", "batch", "eval buffers", "cuBLAS workspaces",
                    "optimizer step")


def model_state_bytes(est: Estimate) -> int:
    """What the card holds for the model itself in the training phase: weights, gradients,
    optimizer state, their 16-bit copies (every part but activations, loss, batch, workspaces
    and the optimizer step's temporaries)."""
    return sum(p.bytes for p in est.train.parts if p.name not in MODEL_STATE_SKIP)


def _cannot_fit(search: Search, found, where: str, host_bytes: int | None) -> str:
    """One line: nothing fits whatever the levers, the model-state floor, what was refused."""
    cfg = search.cfg
    names = [lv.name for lv in LEVERS if is_on(cfg, lv) or lv in found.tried]
    msg = (f"memory.fit=auto: nothing fits in {where}, not even micro-batch 1 with activation "
           f"checkpointing and eval batch 1, whatever the levers ({', '.join(names) or 'none apply'})")
    if found.floor is not None:
        fl = found.floor
        params = ModelShape.of(cfg.model).params()
        msg += (f": that floor needs {fmt_bytes(max(fl.train.total, fl.eval.total))}, of which the "
                f"model state on the card is {fmt_bytes(model_state_bytes(fl))} (fp32 weights alone "
                f"{fmt_bytes(4 * params)})")
        host = host_total(fl)
        if host_bytes is not None and host > host_bytes:
            msg += f", and the host would need {fmt_bytes(host)} of this machine's {fmt_bytes(host_bytes)}"
    for lv, why in found.refused:
        msg += f"; {lv.name} not possible here: {why}"
    sugg = [p for p in proposals(cfg, search.gpu, search.limit, device_type=search.device_type,
                                 dtype=search.dtype) if p.fits]
    if sugg:
        p = sugg[0]
        msg += f"; best suggestion: {p.description} ({' '.join(p.overrides)}), peak {fmt_bytes(p.peak)}"
    return msg
