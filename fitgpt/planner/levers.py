"""The memory levers in auto-fit and in the proposals: which apply, which to pick, and why.

Auto-fit first searches the settings that cost nothing in the model's quality and shrink only
what is recomputable or re-sliceable (chunked loss, micro-batch with accumulation, activation
checkpointing, eval batch: `fitgpt.planner.fit`). When even their floor (micro-batch 1, every
block checkpointed, the eval batch that fits) is too large, what is left is mostly the model
state, and only a lever shrinks it. Then auto-fit takes the fewest levers whose floor fits and,
among as many, the set whose fastest setting (micro-batch and checkpointing degree searched
again: none, every k-th block, every block) the speed model (`fitgpt.planner.speed`) predicts
fastest; within 1 %, a set of levers that train the same numbers wins over one with 8-bit state.
One line per lever says what was still missing before it, the levers taken cheapest first.
A lever the run would refuse (device, dtype, clipping, processes: the checks `fitgpt train`
makes) is never picked; its refusal is reported instead.

Why not a fixed order such as "8-bit state first, optimizer offload last": a lever's cost is not
a constant. 8-bit state costs no time, but where it is the only lever it may leave room only
for micro-batch 1 with every block recomputed (half the speed); the offloaded optimizer's CPU
step happens once per optimizer step, so with 0.5M tokens per step it adds a few percent and
leaves the card room for large micro-batches. The speed model weighs both.
Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING

from fitgpt.console import fmt_bytes
from fitgpt.planner.speed import predicted_throughput
from fitgpt.planner.timeline import Estimate

if TYPE_CHECKING:
    from fitgpt.planner.fit import Proposal, Search


@dataclass(frozen=True)
class Lever:
    """One memory lever: the config field that turns it on, and what it does."""

    key: str
    value: object
    name: str
    exact: bool  # training computes the same update with it (else: a documented accuracy cost)
    saves: str


LEVERS = (
    Lever("memory.fused_backward", True, "fused backward", True,
          "each parameter updated and its gradient freed as soon as backward reaches it"),
    Lever("memory.optimizer_state", "8bit", "8-bit AdamW state", False,
          "AdamW's two moments block-wise in 8 bits instead of fp32"),
    Lever("memory.activation_offload", True, "activation offload", True,
          "the activations saved for backward wait in host memory"),
    Lever("memory.offload_optimizer", True, "optimizer offload", True,
          "AdamW's state and the fp32 master weights in host memory, the step on the CPU"),
)
LEVER_KEYS = tuple(lv.key for lv in LEVERS)
CHECKPOINT_EVERY = (2, 3, 4, 6, 8)  # selective checkpointing degrees searched with the levers


def _fmt_value(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def is_on(cfg, lever: Lever) -> bool:
    """Whether cfg already has the lever on (the user set it: not auto-fit's to add)."""
    sec, name = lever.key.split(".")
    return getattr(getattr(cfg, sec), name, None) == lever.value


def lever_refusal(cfg, device_type: str, dtype: str) -> str | None:
    """Why a run of cfg with its levers would be refused, in one line (None: it would run): the
    same checks `fitgpt train` makes, with the device and dtype the plan is for (clipping,
    float16's loss scale, processes, CUDA-only host memory, offload with every block
    checkpointed, ...)."""
    from fitgpt.config.levers import activation_refusal, fused_backward_refusal, optimizer_refusal
    from fitgpt.config.load import check
    from fitgpt.errors import ConfigError

    try:
        check(cfg)
    except ConfigError as e:
        return str(e)
    return (fused_backward_refusal(cfg, dtype) or optimizer_refusal(cfg, device_type, dtype)
            or activation_refusal(cfg, device_type))


@dataclass
class LeverFit:
    """What the lever stage of auto-fit found."""

    changes: dict[str, object] | None  # None: nothing fits whatever the levers
    lines: list[str] = field(default_factory=list)
    levers: list[Lever] = field(default_factory=list)
    refused: list[tuple[Lever, str]] = field(default_factory=list)
    tried: list[Lever] = field(default_factory=list)  # the applicable ones, cheapest first
    floor: Estimate | None = None  # the smallest setting with every applicable lever


class LeverSearch:
    """The lever stage on top of a fit.Search (its cache, its limit, its cheap settings)."""

    def __init__(self, search: Search, base: dict[str, object], allowed=None):
        self.s, self.base = search, base  # base: the loss setting auto-fit already chose
        self.cfg = search.cfg
        self.allowed = LEVER_KEYS if allowed is None else tuple(allowed)  # lever keys to try

    # -- the floor of a set of levers: the least memory the cheap settings reach with them

    def floor(self, levers: list[Lever]) -> dict[str, object] | None:
        """The least memory the cheap settings reach with these levers: the smallest micro-batch
        the run allows, every block checkpointed (or, with activation offload, none: then every
        block's activations wait on the host, which holds less on the card than the
        checkpointed blocks' inputs; the lower of the two), the eval batch that fits. None when
        no micro-batch is valid with these levers."""
        on = {lv.key: lv.value for lv in levers}
        degrees = [{"memory.checkpointing": True, "memory.checkpoint_every": 1}]
        if on.get("memory.activation_offload"):
            degrees.append({"memory.checkpointing": False})
        from fitgpt.planner.fit import divisors

        found = []
        for ck in degrees:
            for d in divisors(self.s.seqs):
                ch = self.minimal({**self.base, **on, **ck, **self.s.micro(d)})
                if self.s.refusal(ch) is None:
                    found.append({**ch, **self.eval_fix(ch)})
                    break
        return min(found, key=lambda ch: self.over(ch), default=None)

    def settings(self, levers: list[Lever]) -> dict[str, object]:
        """The lever and checkpointing settings of these levers' floor (for a smaller model)."""
        fl = self.floor(levers)
        if fl is None:
            return {}
        m = self.s.run(fl)[0].memory
        return {**{k: v for k, v in fl.items() if k in LEVER_KEYS},
                "memory.checkpointing": m.checkpointing, "memory.checkpoint_every": m.checkpoint_every}

    def minimal(self, ch: dict[str, object]) -> dict[str, object]:
        """ch without the settings cfg already has (the micro-batch pair is kept whole)."""
        out = {}
        for k, v in ch.items():
            sec, name = k.split(".")
            if k in ("train.batch_size", "train.grad_accum") or getattr(getattr(self.cfg, sec), name) != v:
                out[k] = v
        return out

    def eval_fix(self, ch: dict[str, object]) -> dict[str, object]:
        """The largest eval batch that fits with ch (1 when none does: the floor)."""
        eb = self.s.eval_batch(ch) or 1
        return {} if eb == self.cfg.eval_batch_size else {"eval.batch_size": eb}

    def over(self, ch: dict[str, object] | None) -> int | None:
        """Bytes over the limit of the larger phase (<= 0: it fits; None: invalid)."""
        if ch is None:
            return None
        est = self.s.run(ch)[1]
        return max(est.train.total, est.eval.total) - self.s.limit

    def ok(self, ch: dict[str, object] | None) -> bool:
        """Valid, within the card's limit, and within the host's (when auto-fit has one)."""
        o = self.over(ch)
        if o is None or o > 0:
            return False
        host = self.s.host_limit
        return host is None or host_total(self.s.run(ch)[1]) <= host

    def fits(self, levers: list[Lever]) -> bool:
        return self.ok(self.floor(levers))

    # -- which levers, in which order

    def candidates(self) -> tuple[list[Lever], list[tuple[Lever, str]]]:
        """The levers not yet on that the run would accept at some micro-batch, cheapest first;
        and those it would refuse, with the reason."""
        ok, refused = [], []
        for lv in LEVERS:
            if is_on(self.cfg, lv) or lv.key not in self.allowed:
                continue
            if self.floor([lv]) is None:
                probe = {**self.base, lv.key: lv.value}
                refused.append((lv, self.s.refusal(probe) or self.s.refusal(
                    {**probe, **self.s.micro(1)}) or "refused"))
            else:
                ok.append(lv)
        bare = self.floor([])
        t0 = predicted_throughput(self.s.run(bare)[0], self.s.gpu) if bare else 1.0

        def cost(lv: Lever) -> tuple:
            new = self.s.run(self.floor([lv]))[0]
            return (-round(predicted_throughput(new, self.s.gpu) / t0, 3), not lv.exact,
                    LEVERS.index(lv))

        return sorted(ok, key=cost), refused

    def choose(self) -> LeverFit:
        """The fewest levers whose floor fits; among as many, the set whose fastest setting is
        predicted fastest (within 1 %: exact before approximate, then cheaper alone first).
        Each lever's line says what was still missing with the ones before it (cheapest
        first)."""
        order, refused = self.candidates()
        result = LeverFit(None, refused=refused, tried=order)
        for size in range(1, len(order) + 1):
            fitting = [list(c) for c in combinations(order, size) if self.fits(list(c))]
            if fitting:
                break
        else:
            fl = self.floor(order)
            result.floor = self.s.run(fl)[1] if fl is not None else None
            return result
        fastest = {tuple(c): self.fastest(c) for c in fitting}

        def rank(levers: list[Lever]) -> tuple:
            tps = predicted_throughput(self.s.run(fastest[tuple(levers)])[0], self.s.gpu)
            return (-round(tps / self.s.base, 2), sum(not lv.exact for lv in levers),
                    [order.index(lv) for lv in levers])

        chosen = min(fitting, key=rank)
        result.levers, result.changes = chosen, fastest[tuple(chosen)]
        result.lines = [self.why(lv, self.over(self.floor(chosen[:i])) or 0, chosen[:i])
                        for i, lv in enumerate(chosen)]
        return result

    def why(self, lv: Lever, missing: int, before: list[Lever]) -> str:
        """One line: the lever, what it does, and the memory still missing before it (at the
        floor of the cheap settings with the levers already taken)."""
        sec, name = lv.key.split(".")
        old = getattr(getattr(self.cfg, sec), name)
        fmt = _fmt_value
        floor = self.floor([])
        micro = floor.get("train.batch_size", self.cfg.train.batch_size) if floor else 1
        head = f"{lv.key} {fmt(old)} -> {fmt(lv.value)} ({lv.name}: {lv.saves}): "
        if missing <= 0:  # the card had room: the host did not
            return head + (f"the host memory needed was over this machine's "
                           f"{fmt_bytes(self.s.host_limit)}")
        return head + (f"{fmt_bytes(missing)} still missing at micro-batch {micro} with every "
                       f"block checkpointed" + "".join(f", {x.name}" for x in before))

    # -- the fastest setting with the chosen levers

    def checkpointing_options(self) -> list[dict[str, object]]:
        """None, every k-th block (k < layers), every block."""
        opts: list[dict[str, object]] = [{"memory.checkpointing": False}]
        opts += [{"memory.checkpointing": True, "memory.checkpoint_every": k}
                 for k in CHECKPOINT_EVERY if k < self.cfg.model.n_layer]
        return opts + [{"memory.checkpointing": True, "memory.checkpoint_every": 1}]

    def fastest(self, levers: list[Lever]) -> dict[str, object]:
        """The fastest valid micro-batch and checkpointing degree that fit with these levers;
        ties to the fewer changes. The floor fits, so there is always one."""
        on = {lv.key: lv.value for lv in levers}
        best, best_key = self.floor(levers), None
        from fitgpt.planner.fit import divisors

        for ck in self.checkpointing_options():
            for d in divisors(self.s.seqs):
                ch = self.minimal({**self.base, **on, **ck, **self.s.micro(d)})
                if self.s.refusal(ch) is not None:
                    continue
                ch = {**ch, **self.eval_fix(ch)}
                if not self.ok(ch):
                    break  # larger micro-batches only need more
                key = (round(predicted_throughput(self.s.run(ch)[0], self.s.gpu), 1), -len(ch))
                if best_key is None or key > best_key:
                    best, best_key = ch, key
        return best

    # -- proposals

    def proposals(self, describe) -> list[Proposal]:
        """Each applicable lever alone and the auto-fit set, at their fastest fitting setting
        (or at their floor when none fits)."""
        order, _ = self.candidates()
        fit = self.choose()
        sets = [[lv] for lv in order]
        if fit.levers and len(fit.levers) > 1:
            sets.append(fit.levers)
        elif not fit.levers and len(order) > 1:
            sets.append(order)
        out = []
        for levers in sets:
            ch = self.fastest(levers) if self.fits(levers) else self.floor(levers)
            if ch is not None:
                out.append(self.s.proposal(ch, describe(self.cfg, ch)))
        return out


def host_total(est: Estimate) -> int:
    """The host memory the run holds for the card: offloaded model state and activations."""
    return est.host_total
