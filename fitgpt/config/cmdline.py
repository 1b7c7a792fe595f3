"""The command line around a config: `[CONFIG] [--option VALUE ...] [--section.key=value ...]`.

`fitgpt train`, `eval`, `plan` (fitgpt.cli) and `bench` (fitgpt.train.bench) all take a config
plus a few options of their own and pass everything else on as overrides; the splitting lives
here, in the config layer, so that the bench below the command line shares it.
"""

from __future__ import annotations

from fitgpt.errors import FitError


def split_args(args: list[str], options: tuple[str, ...]) -> tuple[str | None, dict[str, str], list[str]]:
    """(positional CONFIG, {option: value}, overrides). Overrides are everything else."""
    config, opts, rest = None, {}, []
    i = 0
    while i < len(args):
        tok = args[i]
        name, _, val = tok.partition("=")
        if name in options:
            if not val:
                if i + 1 >= len(args):
                    raise FitError(f"{name} needs a value")
                val = args[i + 1]
                i += 1
            opts[name] = val
        elif not tok.startswith("-") and config is None and not rest:
            config = tok
        else:
            rest.append(tok)
        i += 1
    return config, opts, rest
