"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


class FitError(Exception):
    """A mistake in configuration, input data or command line, explained in one line."""


class ConfigError(FitError):
    """A configuration key, value or combination that cannot be used."""


class DataError(FitError):
    """A data folder, shard or corpus that cannot be read."""


class CheckpointError(FitError):
    """A checkpoint that cannot be loaded safely."""


def parse_args(parser: argparse.ArgumentParser, args: list[str], known: bool = False):
    """argparse, with its usage errors raised as FitError (one line, exit code 2) instead of
    argparse's own exit. With known, (namespace, the arguments it did not know): the
    --section.key=value overrides. Used by the commands that parse with argparse (sample,
    export, plot, runs)."""
    def error(message: str):
        raise FitError(f"{parser.prog}: {message}")

    parser.error = error  # type: ignore[method-assign]
    return parser.parse_known_args(args) if known else parser.parse_args(args)
