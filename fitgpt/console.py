"""The console: the one place that prints a line (rank 0 only), and the number formats shared by
every layer (`fmt_bytes`, `fmt_count`). Library code calls `say`, never `print`."""

from __future__ import annotations

import os

from rich.console import Console

# text is printed as written: no markup, and a sample's ":smile:" stays ":smile:"
console = Console(highlight=False, soft_wrap=True, emoji=False)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(msg: str = "") -> None:
    """Print one line (rank 0 only)."""
    if is_main_process():
        console.print(msg, markup=False)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"
