"""The run's configuration: one dataclass per concern, loading, overrides and checks.

Owns: the dataclasses, every field documented (schema: that text is `fitgpt train --help`),
TOML and nanoGPT files, `--section.key=value` overrides, checks and config.toml (load),
nanoGPT's Python config files read with ast and never executed (pyfile), the names that become
folder names (names), and the command line around a config, shared by the commands and the
bench (cmdline).

May import: the base modules only (it is the bottom layer). Never torch, not even inside a
function: the planner, `fitgpt plan` and `--help` read configs on machines without it.

Entry points: `schema.Config`, `load.load_config`, `load.parse_overrides`, `load.help_text`.
"""
