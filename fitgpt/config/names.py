"""Names that become folder names: a run's `log.run_name` and a config's `name`.

A run name is a name, not a path: separators, `.`, `..`, NUL, empty and overlong names are refused
when the config is read, so `--log.run_name=../../x` cannot write outside log.out_dir. The check
sits in config/ because reading a config is where a name is first seen; fitgpt.store.rundir, which
makes the folder, uses the same check.
"""

from __future__ import annotations

import os

from fitgpt.errors import ConfigError

MAX_NAME_BYTES = 200  # below the usual 255-byte file-name limit, with room for a "-N" suffix


def check_name(key: str, name: str) -> None:
    """A run or config name becomes one folder name under out_dir: refuse anything else."""
    bad = ("is empty" if not name.strip() else
           "contains a NUL character" if "\0" in name else
           "contains a path separator" if any(s and s in name for s in ("/", "\\", os.sep, os.altsep)) else
           f"is {name!r}, which names a folder, not a new one" if name in (".", "..") else
           f"is longer than {MAX_NAME_BYTES} bytes" if len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES
           else None)
    if bad:
        raise ConfigError(f"{key}={name!r}: a run name is one folder name under log.out_dir and {bad}; "
                          f"use letters, digits, '-', '_' or '.', e.g. --log.run_name=my-run "
                          f"(to write elsewhere, set --log.out_dir)")
