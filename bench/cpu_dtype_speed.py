"""CPU cost of a training step under 16-bit autocast against float32, on the demo model.

    python bench/cpu_dtype_speed.py                                   # float32, bfloat16, float16
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/cpu_dtype_speed.py float32,bfloat16

One forward and backward of the demo config (2 layers, n_embd 64, block 128, batch 8, GPT-2
vocabulary), on one thread, timed in process CPU time so that other jobs on the machine do not
move the ratio; the dtypes alternate, and the median of --repeats is reported. The second line
turns off the CPU's AVX-512 (and its bfloat16 instructions) in PyTorch and oneDNN, standing in
for a CPU without native bfloat16: fitgpt's note on a slow CPU dtype (fitgpt.model.runtime) quotes
these ratios.
"""

from __future__ import annotations

import argparse
import time

import torch

from fitgpt.config.load import load_config
from fitgpt.model.runtime import Runtime, build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dtypes", nargs="?", default="float32,bfloat16,float16")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("demo-gpt2", ["--train.device=cpu"])
    model = build_model(cfg, torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.block_size))
    dtypes = a.dtypes.split(",")

    def step(dtype: str) -> float:
        rt = Runtime(torch.device("cpu"), getattr(torch, dtype))
        t = time.process_time()
        with rt.autocast():
            loss = model(x, x)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.process_time() - t

    for d in dtypes:
        step(d)  # warm-up
    times = {d: [] for d in dtypes}
    for _ in range(a.repeats):
        for d in dtypes:
            times[d].append(step(d))
    median = {d: sorted(t)[len(t) // 2] for d, t in times.items()}
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bfloat16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, "
          f"native float16 {torch.ops.mkldnn._is_mkldnn_fp16_supported()}")
    for d in dtypes:
        ratio = f", {median[d] / median['float32']:.1f}x float32" if "float32" in median else ""
        print(f"{d:>9}: {median[d] * 1000:,.0f} ms CPU per step{ratio}")


if __name__ == "__main__":
    main()
