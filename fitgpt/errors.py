"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""


class FitError(Exception):
    """A mistake in configuration, input data or command line, explained in one line."""


class ConfigError(FitError):
    """A configuration key, value or combination that cannot be used."""


class DataError(FitError):
    """A data folder, shard or corpus that cannot be read."""


class CheckpointError(FitError):
    """A checkpoint that cannot be loaded safely."""
