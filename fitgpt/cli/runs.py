"""`fitgpt runs [DIR]`: the table is fitgpt.report.runs.print_runs."""

from __future__ import annotations

import argparse

from fitgpt.errors import parse_args


def cmd_runs(args: list[str]) -> int:
    """Exit code 0, with or without runs under DIR."""
    from fitgpt.report.runs import NO_SUMMARY, print_runs

    p = argparse.ArgumentParser(prog="fitgpt runs", description=(
        "List the run folders under DIR: name, model size, tokens, best val loss, status "
        f"(a run without summary.json is '{NO_SUMMARY}')."))
    p.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="default: runs")
    a = parse_args(p, args)
    print_runs(a.dir)
    return 0
