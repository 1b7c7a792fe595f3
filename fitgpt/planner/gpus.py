"""Common GPUs: how much memory the driver reports, bf16 support, and peak 16-bit tensor FLOP/s.

Memory is the total `nvidia-smi` reports for the card (its "Memory-Usage" denominator, in MiB),
not the marketing figure: a "12 GB" RTX 4070 reports 12282 MiB, an "80 GB" H100 81559 MiB.
That is the most a process could ever hold; `torch.cuda.mem_get_info` gives the same total.
The figures were read from published `nvidia-smi` outputs (GitHub issues and READMEs); the
Ampere GeForce cards report exact binary sizes (RTX 3090: 24576 MiB).

TFLOP/s are dense (no sparsity) 16-bit tensor-core figures with fp32 accumulation, which is
what PyTorch's fp16/bf16 matmuls use. GeForce cards run fp32-accumulate at half the rate of
fp16-accumulate, so their figure is half the one usually quoted: RTX 4090 165.2 (330.3 with
fp16 accumulation), RTX 4070 58.3. Sources: NVIDIA's Ampere GA102 and Ada Lovelace whitepapers
(per-SM rate x SMs x boost clock, cross-checked with hmc-tech.com's spec tables), the
A10/L4/L40S/T4/V100/A100/H100/H200 datasheets, codesota.com for the RTX 5090 (209.5), and
baseten.co's "A10 vs A10G" for the A10G (70: AWS's variant has a reduced tensor rate).
The planner only compares configurations on one card, so these numbers scale its relative
throughput column; they never change which configuration is preferred.

The compute capability decides the size of PyTorch's cuBLAS workspaces (`cublas_workspace`),
which the caching allocator hands out and `max_memory_allocated` counts.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from fitgpt.errors import ConfigError

MiB = 2**20


@dataclass(frozen=True)
class Gpu:
    """One card: what the planner needs to know about it."""

    name: str
    memory: int  # bytes the driver reports as the total
    bf16: bool = True
    tflops: float | None = None  # dense 16-bit tensor TFLOP/s, fp32 accumulate
    key: str = ""  # the table's id, e.g. rtx4070 ("" for an unnamed card given by its size)
    aliases: tuple[str, ...] = ()
    cc: tuple[int, int] | None = None  # compute capability (major, minor); None: unknown

    @property
    def label(self) -> str:
        return self.name if self.key else f"a card with {self.memory / 2**30:.2f} GiB"


def _g(key: str, name: str, mib: int, tflops: float, cc: tuple[int, int], bf16: bool = True,
       *aliases: str) -> Gpu:
    return Gpu(name, mib * MiB, bf16, tflops, key, aliases, cc)


AMPERE, ADA, HOPPER = (8, 6), (8, 9), (9, 0)
GPUS: list[Gpu] = [
    # GeForce Ampere (GA10x): 512 dense fp16 FMA/clk/SM with fp16 accumulate, half with fp32
    _g("rtx3060", "GeForce RTX 3060 (12 GB)", 12288, 25.5, AMPERE),
    _g("rtx3060ti", "GeForce RTX 3060 Ti", 8192, 32.4, AMPERE),
    _g("rtx3070", "GeForce RTX 3070", 8192, 40.6, AMPERE),
    _g("rtx3080", "GeForce RTX 3080 (10 GB)", 10240, 59.5, AMPERE, True, "rtx3080-10gb"),
    _g("rtx3080-12gb", "GeForce RTX 3080 12GB", 12288, 61.3, AMPERE),
    _g("rtx3090", "GeForce RTX 3090", 24576, 71.0, AMPERE),
    # GeForce Ada (AD10x): same per-SM rate at higher clocks
    _g("rtx4060", "GeForce RTX 4060", 8188, 30.2, ADA),
    _g("rtx4060ti", "GeForce RTX 4060 Ti (8 GB)", 8188, 44.1, ADA, True, "rtx4060ti-8gb"),
    _g("rtx4060ti-16gb", "GeForce RTX 4060 Ti 16GB", 16380, 44.1, ADA),
    _g("rtx4070", "GeForce RTX 4070", 12282, 58.3, ADA),
    _g("rtx4070ti", "GeForce RTX 4070 Ti", 12282, 80.2, ADA),
    _g("rtx4070super", "GeForce RTX 4070 SUPER", 12282, 71.0, ADA, True, "rtx4070s"),
    _g("rtx4080", "GeForce RTX 4080", 16376, 97.5, ADA),
    _g("rtx4090", "GeForce RTX 4090", 24564, 165.2, ADA),
    # GeForce Blackwell
    _g("rtx5090", "GeForce RTX 5090", 32607, 209.5, (12, 0)),
    # Data centre: full-rate fp32 accumulation
    _g("a10", "NVIDIA A10", 23028, 125.0, AMPERE),
    _g("a10g", "NVIDIA A10G", 23028, 70.0, AMPERE),
    _g("l4", "NVIDIA L4", 23034, 121.0, ADA),
    _g("t4", "Tesla T4", 15360, 65.0, (7, 5), False),
    _g("v100-16gb", "Tesla V100 16GB", 16384, 125.0, (7, 0), False, "v100", "v100sxm216gb"),
    _g("v100-32gb", "Tesla V100 32GB", 32768, 125.0, (7, 0), False, "v100sxm232gb"),
    _g("a100-40gb", "NVIDIA A100 40GB", 40960, 312.0, (8, 0), True, "a100sxm440gb", "a100pcie40gb"),
    _g("a100-80gb", "NVIDIA A100 80GB", 81920, 312.0, (8, 0), True, "a100", "a100sxm480gb",
       "a100pcie80gb"),
    _g("h100-pcie", "NVIDIA H100 PCIe", 81559, 756.0, HOPPER),
    _g("h100-sxm", "NVIDIA H100 SXM", 81559, 989.0, HOPPER, True, "h100", "h10080gbhbm3",
       "h100sxm5", "h10080gb"),
    _g("h200", "NVIDIA H200", 143771, 989.0, HOPPER, True, "h200sxm", "h200nvl"),
    _g("l40s", "NVIDIA L40S", 46068, 362.0, ADA),
]

# PyTorch's default cuBLAS workspace per (handle, stream), from its CublasHandlePool.cpp
# (parseChosenWorkspaceSize): ':4096:8' (32 MiB) on compute capability 9.x-12.x (Hopper,
# Blackwell; older releases: on 9.0 only), else ':4096:2:16:8' (2 x 4 MiB + 8 x 16 KiB).
# cuBLASLt reuses it (TORCH_CUBLASLT_UNIFIED_WORKSPACE, on by default in open-source builds,
# as torch 2.13 documents in torch.backends.cuda.blas_workspace_size).
CUBLAS_LARGE = 4096 * 8 * 1024
CUBLAS_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8
_WORKSPACE_CONFIG = re.compile(r":([0-9]+):([0-9]+)")


def cublas_workspace(gpu: Gpu | None, env: Mapping[str, str] = os.environ) -> int:
    """Bytes of one cuBLAS workspace on this card, as PyTorch sizes it: CUBLAS_WORKSPACE_CONFIG
    (':SIZE_KiB:COUNT' pairs) when set, else by compute capability; a card of unknown
    architecture gets the larger default."""
    config = env.get("CUBLAS_WORKSPACE_CONFIG")
    if config:
        pairs = _WORKSPACE_CONFIG.findall(config)
        if pairs:
            return sum(int(size) * 1024 * int(count) for size, count in pairs)
    if gpu is None or gpu.cc is None or gpu.cc[0] in (9, 10, 11, 12):
        return CUBLAS_LARGE
    return CUBLAS_DEFAULT

# The link between host memory and each card: (PCIe generation, lanes), from NVIDIA's product
# pages. The RTX 4060 and 4060 Ti have 8 lanes; the V100 SXM2 and the T4 are PCIe 3.0; the H100,
# H200 and RTX 5090 PCIe 5.0. Per lane and direction a link moves 0.985 (3.0), 1.969 (4.0) or
# 3.938 (5.0) GB/s (PCI-SIG: 8, 16, 32 GT/s with 128b/130b encoding); copies from pinned memory
# reach about 80 % of that (CUDA's bandwidthTest: ~25 GB/s on PCIe 4.0 x16, ~12.5 on 3.0 x16).
# An unknown card counts as PCIe 4.0 x16.
PCIE_LINK: dict[str, tuple[int, int]] = {
    **{k: (4, 16) for k in ("rtx3060", "rtx3060ti", "rtx3070", "rtx3080", "rtx3080-12gb",
                            "rtx3090", "rtx4070", "rtx4070ti", "rtx4070super", "rtx4080",
                            "rtx4090", "a10", "a10g", "l4", "a100-40gb", "a100-80gb", "l40s")},
    **{k: (4, 8) for k in ("rtx4060", "rtx4060ti", "rtx4060ti-16gb")},
    **{k: (3, 16) for k in ("t4", "v100-16gb", "v100-32gb")},
    **{k: (5, 16) for k in ("rtx5090", "h100-pcie", "h100-sxm", "h200")},
}
PCIE_LANE_GBPS = {3: 0.985, 4: 1.969, 5: 3.938}
PINNED_COPY_EFFICIENCY = 0.8


def host_link(gpu: Gpu | None) -> float:
    """Bytes per second one way between pinned host memory and this card (see PCIE_LINK)."""
    gen, lanes = PCIE_LINK.get(gpu.key if gpu is not None else "", (4, 16))
    return PCIE_LANE_GBPS[gen] * 1e9 * lanes * PINNED_COPY_EFFICIENCY


_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*[kmgt]i?b\s*$", re.I)
_DROP = ("nvidia", "geforce", "tesla", "quadro")
# What may follow a known name in a driver's device name: memory and form factor, not 'ti'.
_SUFFIX = re.compile(r"^(\d+gb|sxm\d?|pcie|hbm\de?|nvl)*$")


def _norm(text: str) -> str:
    """'NVIDIA GeForce RTX 4070' -> 'rtx4070'; 'A100-SXM4-80GB' -> 'a100sxm480gb'."""
    s = re.sub(r"[^a-z0-9]", "", text.lower())
    for word in _DROP:
        s = s.replace(word, "")
    return s


def _index() -> dict[str, Gpu]:
    """Every accepted spelling (normalised) -> card; 'rtx' is optional in front of a number."""
    out: dict[str, Gpu] = {}
    for g in GPUS:
        for name in (g.key, g.name, *g.aliases):
            n = _norm(name)
            out.setdefault(n, g)
            if n.startswith("rtx"):
                out.setdefault(n[3:], g)
    return out


def gpu_names() -> list[str]:
    """The table's ids, for help texts and error messages."""
    return [g.key for g in GPUS]


def find_gpu(text: str) -> Gpu:
    """A card by name (`rtx4070`, `RTX 4070`, `4070`, `a100-80gb`, `h100`) or an unnamed card
    by size (`12GB`, `12GiB`, `8000MB`: memory only, bf16 assumed, no TFLOP/s).

    Raises ConfigError for an unknown name, listing the closest known ones."""
    if _SIZE.match(text):
        from fitgpt.config.load import parse_size

        return Gpu(f"{text.strip()} card", parse_size(text))
    index = _index()
    n = _norm(text)
    if n in index:
        return index[n]
    close = difflib.get_close_matches(n, list(index), n=4, cutoff=0.6)
    keys = list(dict.fromkeys(index[c].key for c in close))
    hint = f"did you mean {', '.join(keys)}?" if keys else f"known: {', '.join(gpu_names())}"
    raise ConfigError(f"--gpu {text!r}: unknown card; {hint} (or give its memory, e.g. 12GB)")


def lookup(name: str, memory: int) -> Gpu:
    """The table's entry for a device name the driver reports, with the driver's memory; an
    unknown card keeps its name, bf16 assumed, no TFLOP/s."""
    n = _norm(name)
    index = _index()
    g = index.get(n)
    if g is None:  # a longer driver name: 'NVIDIA A100 80GB PCIe', 'NVIDIA H100 NVL'
        for known in sorted(index, key=len, reverse=True):
            if n.startswith(known) and _SUFFIX.match(n[len(known):]):
                g = index[known]
                break
    if g is None:
        return Gpu(name, memory, True, None, name)
    return Gpu(g.name, memory, g.bf16, g.tflops, g.key, g.aliases, g.cc)


def device_index(env: Mapping[str, str] = os.environ) -> int | None:
    """This process's CUDA device before `set_device`: torchrun's LOCAL_RANK (the device
    `fitgpt.train.distributed.init` picks), None outside torchrun."""
    if "LOCAL_RANK" in env and int(env.get("WORLD_SIZE", 1)) > 1:
        return int(env["LOCAL_RANK"])
    return None


def current_gpu(index: int | None = None) -> Gpu:
    """A CUDA device this process sees (imports torch): its name, the driver's total, bf16 and
    compute capability. index None: this process's own device (`device_index`), so that no
    process of a torchrun job touches another rank's GPU (a query on device 0 from every rank
    would create a CUDA context there for each of them)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("no CUDA device is visible; name a card with --gpu, or give "
                          "--memory.budget")
    if index is None:
        index = device_index()
    if index is None:
        index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    _free, total = torch.cuda.mem_get_info(index)
    g = lookup(props.name, total)
    return Gpu(g.name, total, props.major >= 8, g.tflops, g.key, g.aliases,
               (props.major, props.minor))


def _smi(exe: str, fields: str) -> str:
    return subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=5, check=True).stdout


def smi_gpu() -> Gpu | None:
    """The first GPU that `nvidia-smi` lists, without importing torch; None when there is none.
    Its compute capability too where the driver reports it (compute_cap, since driver 510)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        try:
            name, mib, cap = _smi(exe, "name,memory.total,compute_cap").splitlines()[0].rsplit(",", 2)
            major, minor = (int(x) for x in cap.strip().split("."))
            cc: tuple[int, int] | None = (major, minor)
        except (subprocess.SubprocessError, ValueError):
            name, mib = _smi(exe, "name,memory.total").splitlines()[0].rsplit(",", 1)
            cc = None
        g = lookup(name.strip(), int(float(mib)) * MiB)
        return Gpu(g.name, g.memory, g.bf16, g.tflops, g.key, g.aliases, cc or g.cc)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
