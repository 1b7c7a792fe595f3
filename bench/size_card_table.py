"""Which GPT-2 fits which card: the planner's auto-fit (`fitgpt plan CONFIG --gpu CARD --fit`) for
the released GPT-2 sizes on three cards, as a markdown table (size x card: fits as configured?,
the levers auto-fit adds, the settings it picks, predicted peak on the card, host memory and
tokens/s). Pure planner arithmetic: no torch, no GPU, a second or two.

    python bench/size_card_table.py            # print the table
    python bench/size_card_table.py --write    # and put it into docs/memory.md
    python bench/size_card_table.py --measure-host-adamw   # the CPU AdamW figure the speed model uses

The table in docs/memory.md sits between the two marker comments; --write replaces what is
between them and nothing else.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fitgpt.config.load import load_config
from fitgpt.console import fmt_bytes
from fitgpt.errors import ConfigError
from fitgpt.planner.fit import auto_fit
from fitgpt.planner.gpus import find_gpu
from fitgpt.planner.levers import LEVERS, host_total, is_on
from fitgpt.planner.plan import Plan, make_plan
from fitgpt.planner.speed import speed

SIZES = ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m")
CARDS = ("rtx4070", "rtx4090", "a100-80gb")
DOC = Path(__file__).resolve().parent.parent / "docs" / "memory.md"
BEGIN, END = "<!-- size-card-table: begin -->", "<!-- size-card-table: end -->"


def settings(plan: Plan) -> str:
    """The non-lever settings auto-fit picked, short."""
    new = plan.fit_config
    m = new.memory
    out = [f"{new.train.batch_size} x {new.train.grad_accum}"]
    if m.checkpointing:
        out.append("ckpt all" if m.checkpoint_every == 1 else f"ckpt 1/{m.checkpoint_every}")
    if new.eval_batch_size != plan.cfg.eval_batch_size:
        out.append(f"eval b {new.eval_batch_size}")
    return ", ".join(out)


def added(cfg, new) -> str:
    return ", ".join(lv.name for lv in LEVERS if is_on(new, lv) and not is_on(cfg, lv)) or "none"


def card_only(cfg, gpu) -> str:
    """Auto-fit without the levers that use host memory: the card alone."""
    try:
        new, _ = auto_fit(cfg, gpu.memory, cfg.memory.headroom, gpu=gpu, levers=CARD_ONLY)
    except ConfigError:
        return "cannot fit"
    new_cfg = new
    return (f"{added(cfg, new_cfg)}: {new_cfg.train.batch_size} x {new_cfg.train.grad_accum}"
            + (", ckpt" if new_cfg.memory.checkpointing else "")
            + f", {speed(new_cfg, gpu).tokens_per_s / 1e3:,.1f}k tok/s")


def row(size: str, card: str) -> list[str]:
    cfg = load_config(size, [])
    gpu = find_gpu(card)
    plan = make_plan(cfg, gpu, fit=True)
    given = "yes" if plan.fits else "no"
    if plan.fit_config is None:
        why = (plan.fit_error or "").split(": that floor needs ")
        floor = why[1].split(",")[0] if len(why) > 1 else "?"
        return [size, gpu.name, given, "**cannot fit**", "-", f"floor {floor}", "-", "-", "-"]
    new, est = plan.fit_config, plan.fit_estimate
    host = host_total(est)
    sp = speed(new, gpu)
    return [size, gpu.name, given, added(cfg, new), settings(plan),
            fmt_bytes(est.peak), fmt_bytes(host) if host else "-",
            f"{sp.tokens_per_s / 1e3:,.1f}k", card_only(cfg, gpu) if host else "same"]


HEADER = ["model", "card", "fits as configured", "levers auto-fit adds", "micro x accum, other",
          "predicted peak (card)", "host memory", "tokens/s (model)", "without host memory"]
CARD_ONLY = ("memory.fused_backward", "memory.optimizer_state")  # no offloading of any kind


def table() -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for size in SIZES:
        for card in CARDS:
            lines.append("| " + " | ".join(row(size, card)) + " |")
    return "\n".join(lines)


def write(text: str, doc: Path = DOC) -> None:
    old = doc.read_text()
    if BEGIN not in old or END not in old:
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} markers to write between")
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def measure_host_adamw() -> None:
    """AdamW's step on CPU tensors, parameters per second: torch's fused and for-each fp32 (50M
    parameters) and fitgpt's 8-bit CPU step (20M). The speed model's HOST_ADAMW_PARAMS_PER_S
    holds the fused and the 8-bit figures of the build machine."""
    import torch

    from fitgpt.train.optim_8bit import AdamW8bit

    for name, make, n in (("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True), 50_000_000),
                          ("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, foreach=True), 50_000_000),
                          ("fitgpt AdamW8bit (CPU)", lambda ps: AdamW8bit(ps), 20_000_000)):
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = torch.randn(n)
        opt = make([p])
        opt.step()  # warm-up: allocates the state
        t = time.perf_counter()
        for _ in range(3):
            opt.step()
        dt = (time.perf_counter() - t) / 3
        print(f"{name}: {dt:.3f} s per step of {n / 1e6:.0f}M parameters = {n / dt / 1e6:.0f}M "
              f"parameters/s (torch {torch.__version__}, {torch.get_num_threads()} threads)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"also write the table into {DOC.name}")
    p.add_argument("--measure-host-adamw", action="store_true",
                   help="time torch's AdamW on CPU tensors instead (imports torch)")
    a = p.parse_args()
    if a.measure_host_adamw:
        measure_host_adamw()
        return 0
    text = table()
    print(text)
    if a.write:
        write(text)
        print(f"wrote the table into {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
