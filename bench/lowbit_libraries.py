"""The 8-bit AdamW candidates side by side on this machine's CPU: speed of the step, bytes of the
state, and whether the storage tracker can measure the step (docs/memory.md, "Which library").

    python bench/lowbit_libraries.py                 # torch AdamW, bitsandbytes, fitgpt's CPU step
    pip install torchao && python bench/lowbit_libraries.py   # torchao's AdamW8bit too

The parameters are bench-cpu's (fitgpt/configs/bench-cpu.toml: 4 layers, n_embd 128, the
GPT-2 vocabulary: 7.2M parameters), with random gradients. For each optimizer: the first step
(state created; torchao compiles its update here), the median of `--steps` later steps, the
state's bytes, and one more step under fitgpt's StorageTracker: the bytes it saw the step
allocate above what existed (the step's temporaries), or why it could not run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fitgpt.config.load import load_config
from fitgpt.model.runtime import build_model
from fitgpt.planner.tracker import StorageTracker
from fitgpt.train.optim import param_groups


def candidates() -> dict:
    out = {"torch AdamW (fp32, CPU for-loop)": lambda g: torch.optim.AdamW(g, lr=1e-3)}
    try:
        from fitgpt.train.optim_8bit import AdamW8bit, bnb

        out[f"bitsandbytes {bnb.__version__} AdamW8bit"] = lambda g: bnb.optim.AdamW8bit(g, lr=1e-3)
        out["fitgpt AdamW8bit (bitsandbytes, CPU step written out)"] = lambda g: AdamW8bit(g, lr=1e-3)
    except ImportError as e:
        print(f"bitsandbytes: not installed ({e})")
    try:
        import torchao
        from torchao.optim import AdamW8bit as AoAdamW8bit

        out[f"torchao {torchao.__version__} AdamW8bit"] = lambda g: AoAdamW8bit(g, lr=1e-3)
    except ImportError as e:
        print(f"torchao: not installed ({e})")
    return out


def state_bytes(opt) -> int:
    """Bytes of the tensors in the optimizer's state (a tensor subclass: its inner tensors)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            names, _ = t.__tensor_flatten__()
            for n in names:
                add(getattr(t, n))
            return
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()

    for s in opt.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor):
                add(v)
    return total


def run(name: str, make, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(load_config("bench-cpu", ["--train.device=cpu"]), torch.device("cpu"))
    opt = make(param_groups(model, 0.1))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    t0 = time.perf_counter()
    opt.step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    row = {"name": name, "first_s": first, "step_ms": 1000 * statistics.median(times),
           "state_bytes": state_bytes(opt), "params": sum(p.numel() for p in model.parameters())}
    tracker = StorageTracker("cpu")
    try:
        tracker.add(model)
        tracker.add([p.grad for p in model.parameters()])
        tracker.add(opt)
        base = tracker.current
        with tracker:
            opt.step()
        row["tracked_step_bytes"] = tracker.peak - base
    except Exception as e:  # noqa: BLE001 - the point is to report why
        row["tracker"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| optimizer | first step | later steps | state B/param | step temporaries the tracker saw |")
    print("|---|---|---|---|---|")
    for name, make in candidates().items():
        r = run(name, make, args.steps)
        seen = r.get("tracker") or f"{r['tracked_step_bytes'] / 2**20:.1f} MiB"
        print(f"| {name} | {r['first_s']:.2f} s | {r['step_ms']:.0f} ms | "
              f"{r['state_bytes'] / r['params']:.2f} | {seen} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
