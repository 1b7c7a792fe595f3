"""`fitgpt bench`: training and evaluation speed and peak memory of several variants, side by side.

Each variant (full_logits, chunked, checkpointing, compile, or a `+` combination of them) is the
config with those changes. For each one, in one process and one after the other, the bench
builds the step `fitgpt train` runs (`fitgpt.train.build`, seeded), takes `warmup` untimed
training steps, then `steps` timed ones, then one evaluation, all on synthetic seeded tokens
(`fitgpt.planner.verify`'s batches: no data files).
Repeats alternate the order of the variants (forward, then backward, ...), and each variant's
speed ratio to the first is the median over repeats of the ratio measured in the same repeat,
so a machine that slows down for a while weighs on both sides of a ratio.

Peak memory is measured as `fitgpt plan --verify` measures it, on the first repeat, in steps of
its own that are not timed: a training step after the first (the optimizer state exists) and one
evaluation with the model and optimizer state alive; CUDA allocator statistics on a GPU, the
storage tracker on the CPU. MFU is the model's training FLOPs per token (`ModelShape.flops_per_token`)
times tokens/s over the card's dense 16-bit peak from the planner's card table
(`fitgpt.planner.gpus`); a CPU has no entry there, so it shows tokens/s only.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import gc
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

from fitgpt.config.schema import Config
from fitgpt.errors import ConfigError
from fitgpt.model.shape import ModelShape

TOKENS = ("full_logits", "chunked", "checkpointing", "compile", "every", "8bit", "fused", "offload",
          "act_offload", "muon")
# the memory levers (issue 15) as variant words: the settings each one changes
LEVERS: dict[str, tuple[tuple[str, Any], ...]] = {
    "8bit": (("memory", "optimizer_state", "8bit"),),
    "fused": (("memory", "fused_backward", True), ("train", "grad_clip", 0.0)),  # clipping is refused
    "offload": (("memory", "offload_optimizer", True),),
    "act_offload": (("memory", "activation_offload", True),),
    "muon": (("train", "optimizer", "muon"),),  # not a memory lever: Muon's step against AdamW's (issue 16)
}
DEFAULT_VARIANTS = "full_logits,chunked"


@dataclass(frozen=True)
class Variant:
    """One column of the comparison: the config with these changes."""

    name: str
    loss: str | None = None  # 'full' or 'chunked'; None keeps the config's
    checkpointing: bool = False  # True turns activation checkpointing on
    compile: bool = False  # True turns torch.compile on
    chunk: int | None = None  # rows per chunk of the chunked loss; None keeps the config's
    batch: int | None = None  # training micro-batch; None keeps the config's
    every: int | None = None  # checkpoint every this-many-th block (turns checkpointing on)
    levers: tuple[str, ...] = ()  # words of LEVERS

    def apply(self, cfg: Config) -> Config:
        out = copy.deepcopy(cfg)
        for word in self.levers:
            for section, key, value in LEVERS[word]:
                setattr(getattr(out, section), key, value)
        if self.every is not None:
            out.memory.checkpointing, out.memory.checkpoint_every = True, self.every
        if self.loss is not None:
            out.memory.loss = self.loss
        if self.chunk is not None:
            out.memory.loss_chunk = self.chunk
        if self.batch is not None:
            out.train.batch_size = self.batch
        out.memory.checkpointing = out.memory.checkpointing or self.checkpointing
        out.train.compile = out.train.compile or self.compile
        return out


def _number_of(word: str) -> tuple[str, int | None]:
    """'chunked:256' -> ('chunked', 256), 'batch:8' -> ('batch', 8); other words -> (word, None)."""
    if not word.startswith(("chunked:", "batch:", "every:")):
        return word, None
    head, text = word.split(":", 1)
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--variants: {word!r}: expected a positive whole number after '{head}:'")
    return head, int(text)


def parse_variants(spec: str) -> list[Variant]:
    """'full_logits,chunked:256,chunked+checkpointing' -> variants; unknown words are a
    ConfigError. `chunked:N` is the chunked loss with N rows per chunk, `batch:N` a micro-batch
    of N sequences (tokens/s stays comparable)."""
    out: list[Variant] = []
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        words, nums = [], {}
        for w in (w.strip() for w in name.split("+")):
            w, n = _number_of(w)
            if n is not None:
                nums[w] = n
            if w not in ("batch", "every") or n is None:
                words.append(w)
        for w in words:
            if w not in TOKENS:
                close = difflib.get_close_matches(w, TOKENS, n=2)
                hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(TOKENS)}"
                raise ConfigError(f"--variants: unknown variant {w!r} in {name!r}; {hint}")
        if "full_logits" in words and "chunked" in words:
            raise ConfigError(f"--variants: {name!r} asks for both full_logits and chunked")
        loss = "full" if "full_logits" in words else "chunked" if "chunked" in words else None
        if "every" in words:
            raise ConfigError(f"--variants: {name!r}: 'every' needs a number of blocks, e.g. every:2")
        out.append(Variant(name, loss, "checkpointing" in words, "compile" in words,
                           nums.get("chunked"), nums.get("batch"), nums.get("every"),
                           tuple(w for w in words if w in LEVERS)))
    if not out:
        raise ConfigError("--variants: no variant given (e.g. full_logits,chunked)")
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--variants: a variant is listed twice ({', '.join(names)})")
    return out


def _peak_tflops(rt) -> tuple[float | None, str]:
    """The card's dense 16-bit TFLOP/s from the planner's table, and its name ('cpu': none)."""
    if rt.device_type != "cuda":
        return None, rt.device_type
    from fitgpt.planner.gpus import current_gpu

    gpu = current_gpu(rt.device.index or 0)
    return gpu.tflops, gpu.name


def _one_run(cfg: Config, rt, steps: int, warmup: int, memory: bool) -> dict[str, Any]:
    """Build, warm up, time `steps` training steps and one evaluation; with memory, also
    measure the peaks (in extra untimed work) as `fitgpt plan --verify` does."""
    import torch

    from fitgpt.planner.verify import SyntheticBatches, SyntheticVal
    from fitgpt.train.build import build_training
    from fitgpt.train.measure import Meter

    batches = SyntheticBatches(cfg.model.vocab_size, cfg.train.batch_size, cfg.model.block_size,
                               cfg.data.seed)
    tr = build_training(cfg, batches=batches, rt=rt)
    model, optimizer = tr.model, tr.optimizer
    val = SyntheticVal(cfg.model.vocab_size, 2 * cfg.eval_batch_size, cfg.eval_block_size)
    t = cfg.train
    step = tr.step

    out: dict[str, Any] = {"flops_per_token": model.shape.flops_per_token(cfg.model.block_size)}
    for _ in range(max(warmup, 1 if memory or t.compile else 0)):
        step()
    meter = Meter(rt, track_cpu=True)
    if memory:
        _, out["train_peak"], out["train_reserved"] = meter.measure(step, model, optimizer, True)
    rt.synchronize()
    t0 = time.perf_counter()
    losses = [step()[0] for _ in range(steps)]
    rt.synchronize()
    out["seconds"] = time.perf_counter() - t0
    out["loss"] = float(torch.stack(losses).mean()) if losses else None
    optimizer.zero_grad(set_to_none=True)
    if memory:
        _, out["eval_peak"], out["eval_reserved"] = meter.measure(
            lambda: tr.evaluate(val, cfg.eval_batch_size), model, optimizer, True)
    if t.compile:  # compiles the eval graph (the tracker above may have run it eagerly): not timed
        tr.evaluate(val, cfg.eval_batch_size)
    res = tr.evaluate(val, cfg.eval_batch_size)
    out["eval_seconds"], out["eval_tokens"], out["eval_loss"] = res.seconds, res.tokens, res.loss
    return out


def _release(rt) -> None:
    gc.collect()
    if rt.device_type == "cuda":
        import torch

        torch.cuda.empty_cache()


def _row(name: str, cfg: Config, rs: list[dict[str, Any]], tps: list[float], base: list[float],
         steps: int, rt, tflops: float | None) -> dict[str, Any]:
    """One variant's row from its runs `rs` (peaks from the first, losses from the last) and
    its tokens/s per repeat, `tps`, next to the first variant's, `base`."""
    row: dict[str, Any] = {
        "variant": name,
        "loss": cfg.memory.loss,
        "checkpointing": cfg.memory.checkpointing,
        "compile": cfg.train.compile,
        "loss_chunk": cfg.memory.chunk_rows(rt.device_type),
        "batch_size": cfg.train.batch_size,
        "tokens_per_s": statistics.median(tps),
        "ms_per_step": statistics.median(1000 * x["seconds"] / steps for x in rs),
        "tokens_per_s_repeats": tps,
        "mfu": None,
        "train_peak": rs[0].get("train_peak"),
        "eval_peak": rs[0].get("eval_peak"),
        "train_reserved": rs[0].get("train_reserved"),
        "eval_reserved": rs[0].get("eval_reserved"),
        "eval_tokens_per_s": statistics.median(x["eval_tokens"] / x["eval_seconds"] for x in rs),
        "speed_ratio": statistics.median(a / b for a, b in zip(tps, base)),
        "train_loss": rs[-1]["loss"],
        "eval_loss": rs[-1]["eval_loss"],
    }
    if tflops:
        row["mfu"] = row["tokens_per_s"] * rs[0]["flops_per_token"] / (tflops * 1e12)
    return row


def run_bench(cfg: Config, variants: list[Variant], steps: int = 5, warmup: int = 1,
              repeats: int = 3, progress=None) -> dict[str, Any]:
    """Time every variant `repeats` times (order alternating) and return the result as plain
    data: {"device", "dtype", "config", ..., "rows": [one dict per variant]}. `progress(text)`,
    when given, is called before each run."""
    import torch

    from fitgpt.model.runtime import enable_tf32, resolve_runtime

    if steps < 1 or repeats < 1 or warmup < 0:
        raise ConfigError("--steps and --repeats must be >= 1, --warmup >= 0")
    rt = resolve_runtime(cfg.train.device, cfg.train.dtype)
    enable_tf32(rt)
    tflops, device_name = _peak_tflops(rt)
    cfgs = {v.name: v.apply(cfg) for v in variants}
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for r in range(repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            if progress is not None:
                progress(f"repeat {r + 1}/{repeats}: {v.name}")
            runs[v.name].append(_one_run(cfgs[v.name], rt, steps, warmup, memory=r == 0))
            _release(rt)

    def speeds(name: str) -> list[float]:
        return [steps * cfgs[name].tokens_per_step / x["seconds"] for x in runs[name]]

    base = speeds(variants[0].name)
    rows = [_row(v.name, cfgs[v.name], runs[v.name], speeds(v.name), base, steps, rt, tflops)
            for v in variants]
    for row in rows:
        for ph in ("train", "eval"):
            p, b = row[f"{ph}_peak"], rows[0][f"{ph}_peak"]
            row[f"{ph}_memory_ratio"] = p / b if p and b else None
    m, t = cfg.model, cfg.train
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(rt.device), "device_name": device_name, "peak_tflops": tflops,
        "dtype": str(rt.dtype).replace("torch.", ""), "config": cfg.name,
        "shape": {"n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd,
                  "block_size": m.block_size, "vocab": ModelShape.of(m).padded_vocab},
        "batch_size": t.batch_size, "grad_accum": t.grad_accum, "tokens_per_step": cfg.tokens_per_step,
        "eval_batch_size": cfg.eval_batch_size, "eval_block_size": cfg.eval_block_size,
        "loss_chunk": cfg.memory.chunk_rows(rt.device_type), "steps": steps, "warmup": warmup, "repeats": repeats,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "memory_how": "cuda max_memory_allocated" if rt.device_type == "cuda" else "storage tracker",
        "rows": rows,
    }


# ----------------------------------------------------------------------------- output

COLUMNS = ("variant", "tokens/s", "ms/step", "MFU", "train peak", "eval peak", "eval tokens/s",
           "speed", "train mem", "eval mem")


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The table's cells, one list per variant, in COLUMNS order."""
    from fitgpt.console import fmt_bytes

    out = []
    for r in result["rows"]:
        out.append([r["variant"], f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_step']:,.1f}",
                    "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                    fmt_bytes(r["train_peak"]), fmt_bytes(r["eval_peak"]),
                    f"{r['eval_tokens_per_s']:,.0f}", _ratio(r["speed_ratio"]),
                    _ratio(r["train_memory_ratio"]), _ratio(r["eval_memory_ratio"])])
    return out


def headline(result: dict[str, Any]) -> str:
    s = result["shape"]
    where = result["device_name"] if result["device"].startswith("cuda") else result["device"]
    return (f"{result['config']}: {s['n_layer']} layers, n_embd {s['n_embd']}, block "
            f"{s['block_size']}, vocab {s['vocab']} | batch {result['batch_size']} x accum "
            f"{result['grad_accum']} ({result['tokens_per_step']:,} tokens/step), eval batch "
            f"{result['eval_batch_size']} x {result['eval_block_size']} | loss chunk "
            f"{result['loss_chunk']} | {where} {result['dtype']}, torch {result['torch']}, "
            f"{result['threads']} threads | {result['repeats']} repeats x ({result['warmup']} "
            f"warm-up + {result['steps']} timed steps) | {result['date']}")


def footnote(result: dict[str, Any]) -> str:
    first = result["rows"][0]["variant"]
    mfu = (f"MFU against {result['device_name']}'s {result['peak_tflops']:g} TFLOP/s (dense 16-bit)"
           if result["peak_tflops"] else "MFU: no peak FLOP/s for this device")
    return (f"speed, train memory, eval memory: ratio to {first} (speed: median over repeats of "
            f"the ratio within a repeat); peaks: {result['memory_how']}; {mfu}")


def render(result: dict[str, Any], console) -> None:
    """The headline, the table and its footnote on a rich console (at least 132 columns wide
    when the output is not a terminal, so that a log file keeps whole rows)."""
    from rich.console import Console
    from rich.table import Table

    if not console.is_terminal and console.width < 132:
        console = Console(file=console.file, width=132, highlight=False, soft_wrap=True, emoji=False)
    t = Table(show_edge=False, pad_edge=False)
    for i, name in enumerate(COLUMNS):
        t.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for cells in table_rows(result):
        t.add_row(*cells)
    console.print(headline(result), markup=False)
    console.print(t)
    console.print(footnote(result), markup=False)


def markdown(result: dict[str, Any]) -> str:
    """The same table in Markdown, for docs/performance.md and the README."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(result)]
    return "\n".join(lines)


USAGE = """usage: fitgpt bench [CONFIG] [--section.key=value ...] [--variants V,V+W,...] [--steps N]
                    [--warmup W] [--repeats R] [--threads N] [--json] [--markdown]

Trains each variant for W warm-up and N timed steps and runs one evaluation, one variant after
the other in this process, on synthetic tokens (no data files), and prints tokens/s, ms per
step, MFU (GPU), the peak memory of training and of evaluation, and each variant's ratio to the
first. Repeats alternate the order of the variants.

  --variants LIST   comma-separated; each a '+' combination of full_logits, chunked (or
                    chunked:N, N rows per chunk), checkpointing, compile, batch:N (micro-batch),
                    and the memory levers: every:N (checkpoint every N-th block), 8bit (AdamW
                    state), fused (step in backward, grad_clip 0), offload, act_offload (CUDA);
                    muon (train.optimizer=muon) (default: full_logits,chunked)
  --steps N         timed training steps per run (default 5)
  --warmup W        untimed training steps first (default 1; compile always gets one)
  --repeats R       runs of every variant (default 3)
  --threads N       torch CPU threads (default: torch's choice)
  --json            print the result as JSON
  --markdown        also print the table as Markdown

CONFIG defaults to bench-cpu (4 layers, n_embd 128, block 256, batch 8, GPT-2 vocabulary).
"""


def cli(args: list[str]) -> int:
    """`fitgpt bench ...`; returns the exit code."""
    import json
    import shlex
    import sys

    from fitgpt.config.cmdline import split_args
    from fitgpt.config.load import load_config
    from fitgpt.console import console, say

    if "-h" in args or "--help" in args:
        say(USAGE)
        return 0
    flags = {a for a in args if a in ("--json", "--markdown")}
    config, opts, overrides = split_args([a for a in args if a not in flags],
                                         ("--variants", "--steps", "--warmup", "--repeats", "--threads"))
    nums = {}
    for key, default in (("--steps", 5), ("--warmup", 1), ("--repeats", 3), ("--threads", 0)):
        try:
            nums[key] = int(opts.get(key, default))
        except ValueError:
            raise ConfigError(f"{key} needs a whole number, got {opts[key]!r}") from None
    variants = parse_variants(opts.get("--variants", DEFAULT_VARIANTS))
    notes: list[str] = []
    cfg = load_config(config, overrides, default="bench-cpu", notes=notes)
    as_json = "--json" in flags
    if nums["--threads"] > 0:
        import torch

        torch.set_num_threads(nums["--threads"])
    progress = None if as_json else (lambda text: say(f"bench: {text}"))
    result = run_bench(cfg, variants, nums["--steps"], nums["--warmup"], nums["--repeats"], progress)
    result["command"] = shlex.join(["fitgpt", "bench", *args])
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return 0
    for note in notes:
        say(f"note: {note}")
    say(f"$ {result['command']}")
    render(result, console)
    if "--markdown" in flags:
        say()
        say(markdown(result))
    return 0
