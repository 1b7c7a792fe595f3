"""Reading, overriding, checking and writing a `Config`.

Sources, in order of precedence: the dataclass defaults, a config file, the command line.
A config file is TOML (sections named like the dataclasses) or a nanoGPT-style Python file of flat
`key = value` assignments, read with `ast` (never executed, see fitgpt.config.pyfile) and applied on
top of nanoGPT's own defaults so that it means what it meant to its author.

Every file is read as UTF-8 text with bounded nesting, and every value is checked against its
field's type, choices (`Literal`) and valid range (`Range`, beside the field in fitgpt.config.schema):
a mistake is one line naming the field, never a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import sys
import typing
from pathlib import Path
from typing import Any

from fitgpt.config import schema as config_module
from fitgpt.config.levers import activation_refusal, fused_backward_refusal, optimizer_refusal
from fitgpt.config.names import check_name
from fitgpt.config.pyfile import (  # noqa: F401 - re-exported: nanoGPT files are part of loading
    GPT2_SHAPES,
    NANOGPT_ACCEPTED,
    NANOGPT_DEFAULTS,
    NANOGPT_KEYS,
    nanogpt_meta_vocab,
    parse_value,
    read_nanogpt_file,
    safe_eval,
)
from fitgpt.config.schema import SECTIONS, Choice, Config, Range
from fitgpt.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package (a dependency there)
    import tomli as tomllib

BUILTIN_DIR = Path(__file__).parent.parent / "configs"
# The released GPT-2 sizes also by the names OpenAI, Hugging Face and nanoGPT's init_from use.
BUILTIN_ALIASES = {"gpt2": "gpt2-124m", "gpt2-medium": "gpt2-350m", "gpt2-large": "gpt2-774m",
                   "gpt2-xl": "gpt2-1558m"}


# ----------------------------------------------------------------------------- field metadata

@functools.cache
def field_docs() -> dict[str, str]:
    """Dotted key -> the docstring written under that field in config.py."""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(config_module))
    names = {cls.__name__: sec for sec, cls in SECTIONS.items()}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in names:
            body = node.body
            for a, b in zip(body, body[1:]):
                if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                        and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)):
                    docs[f"{names[node.name]}.{a.target.id}"] = b.value.value.strip()
    return docs


@functools.cache
def field_types() -> dict[str, Any]:
    """Dotted key -> resolved type annotation (without its Range)."""
    out = {}
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{sec}.{f.name}"] = hints[f.name]
    return out


def _annotated(kind: type) -> dict[str, Any]:
    """Dotted key -> the `kind` object in the field's `Annotated[...]`, for the fields that have one."""
    out = {}
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            for meta in getattr(hints[f.name], "__metadata__", ()):
                if isinstance(meta, kind):
                    out[f"{sec}.{f.name}"] = meta
    return out


@functools.cache
def field_ranges() -> dict[str, Range]:
    """Dotted key -> the Range of a numeric field."""
    return _annotated(Range)


@functools.cache
def field_choices() -> dict[str, Choice]:
    """Dotted key -> the Choice of a choice field that has one (other spellings, a pattern)."""
    return _annotated(Choice)


def _choices(tp: Any) -> tuple | None:
    """The values of a `Literal[...]` type, else None."""
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def choose(key: str, value: Any, tp: Any) -> Any:
    """The one check of a choice field (a `Literal`, or a field with a `Choice`): the value as
    stored (an alias replaced by the value it names), or a ConfigError that lists the choices,
    both read from the field's annotation."""
    values, rule = _choices(tp) or (), field_choices().get(key)
    if rule is None:
        if isinstance(value, str) and value in values:
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_short(value)}")
    if isinstance(value, str):
        text = value.lower() if rule.any_case else value
        text = dict(rule.aliases).get(text, text)
        if text in values or (rule.pattern and re.fullmatch(rule.pattern, text)):
            return text
    raise ConfigError(f"{key}: expected {rule.text.format(', '.join(values))}; got {_short(value)}")


def _short(value: Any, n: int = 80) -> str:
    """repr of a value, cut so that an error stays one readable line."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _type_name(tp: Any) -> str:
    if _choices(tp):
        return "one of " + ", ".join(map(str, _choices(tp)))
    args = typing.get_args(tp)
    if type(None) in args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or none"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any, from_text: bool) -> Any:
    """Check (and, for command-line text, convert) one value against the field's type."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    if _choices(tp) or key in field_choices():
        return choose(key, value, tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {_short(value)}")
    if value is None or (from_text and optional and str(value).lower() in ("none", "null")):
        if optional:
            return None
        raise bad
    if from_text and isinstance(value, str) and base is not str:
        text = value.strip()
        if base is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise bad
        try:
            value = parse_value(text)
        except ConfigError as e:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_short(text)} ({e})") from None
    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and from_text:
            return int(value)
        raise bad
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float
                raise ConfigError(f"{key}: {_short(value, 30)} is too large for a float") from None
        raise bad
    if base is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


# ----------------------------------------------------------------------------- applying values

def all_keys() -> list[str]:
    return list(field_types()) + list(NANOGPT_KEYS) + list(NANOGPT_ACCEPTED)


def unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `fitgpt train --help`"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def set_value(cfg: Config, key: str, value: Any, *, where: str, from_text: bool,
              notes: list[str] | None = None) -> None:
    """Set one dotted (`eval.batch_size`) or nanoGPT flat (`eval_batch_size`) key."""
    if key in NANOGPT_ACCEPTED:
        if notes is not None:
            notes.append(f"{where}: {key} ignored ({NANOGPT_ACCEPTED[key]})")
        return
    flat = key
    if key in NANOGPT_KEYS:
        key = NANOGPT_KEYS[key]
        if flat == "dataset":
            value = f"data/{value}"  # nanoGPT reads data/<dataset>/{train,val}.bin
        if flat == "init_from" and isinstance(value, str) and value.startswith("gpt2"):
            if value not in GPT2_SHAPES:
                raise ConfigError(f"{where}: init_from={value!r}: known: {', '.join(GPT2_SHAPES)}")
            n_layer, n_head, n_embd = GPT2_SHAPES[value]
            m = cfg.model
            m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias, m.vocab_size = (
                n_layer, n_head, n_embd, 1024, True, 50257)
    types_ = field_types()
    if key not in types_:
        raise unknown_key(flat, where)
    sec, name = key.split(".")
    setattr(getattr(cfg, sec), name, coerce(key, value, types_[key], from_text))


def resolve_path(spec: str) -> Path:
    """A config file path, or the name of a built-in config (`demo`, `gpt2-124m`, `gpt2-xl`)."""
    p = Path(spec)
    if p.is_file():
        return p
    spec = BUILTIN_ALIASES.get(spec, spec)
    for cand in (BUILTIN_DIR / f"{spec}.toml", BUILTIN_DIR / f"{spec}.py", BUILTIN_DIR / spec):
        if cand.is_file():
            return cand
    builtin = ", ".join(sorted(f.stem for f in BUILTIN_DIR.iterdir() if f.suffix in (".toml", ".py")))
    raise ConfigError(f"config {spec!r}: no such file, and not a built-in config ({builtin})")


def read_text(path: Path) -> str:
    """A config file's text: UTF-8, or one line saying where it is not."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); a config file is text") from None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise ConfigError(f"{path}: not usable TOML: nested too deeply") from None


def file_settings(path: Path, notes: list[str]) -> list[tuple[str, Any]]:
    """The (key, value) pairs a config file itself sets, in file order: nanoGPT's flat keys for a
    .py file (without nanoGPT's defaults), dotted keys for TOML, and ('name', NAME) for TOML's
    name. Keys are not yet checked against the fields (set_value does that)."""
    if path.suffix == ".py":
        return list(read_nanogpt_file(path, notes).items())
    if path.suffix != ".toml":
        raise ConfigError(f"{path}: config files are .toml or nanoGPT-style .py")
    out: list[tuple[str, Any]] = []
    for sec, table in read_toml(path).items():
        if sec == "name" and isinstance(table, str):
            check_name(f"{path}: name", table)  # a name becomes a run folder's name
            out.append(("name", table))
        elif sec not in SECTIONS or not isinstance(table, dict):
            raise unknown_key(sec, str(path))
        else:
            out += [(f"{sec}.{name}", value) for name, value in table.items()]
    return out


def apply_file(cfg: Config, path: Path, notes: list[str]) -> None:
    settings = file_settings(path, notes)
    if path.suffix == ".py":
        values = dict(settings)
        merged = {**NANOGPT_DEFAULTS, **values}
        vocab = nanogpt_meta_vocab(str(merged["dataset"])) if "vocab_size" not in values else None
        if vocab is not None:
            merged["vocab_size"] = vocab
            notes.append(f"vocab_size={vocab} from data/{merged['dataset']}/meta.pkl, as nanoGPT does")
        # init_from last: as in nanoGPT, a released GPT-2's shape wins over n_layer etc.
        for key in sorted(merged, key=lambda k: k == "init_from"):
            set_value(cfg, key, merged[key], where=str(path), from_text=False, notes=notes)
        notes.append(f"{path}: nanoGPT-style file applied on top of nanoGPT's defaults")
    else:
        for key, value in settings:
            if key == "name":
                cfg.name = value
            else:
                set_value(cfg, key, value, where=str(path), from_text=False)
    if cfg.name == "default":
        cfg.name = path.stem


def parse_overrides(args: list[str]) -> list[tuple[str, str | None]]:
    """`--a.b=v`, `--a.b v`, `--flat=v`, `--flag` -> [(key, text)], text None for a bare flag.
    A key may be spelled with `-` for `_` (`--train.max-steps`); it is returned with `_`. Every
    reader of the command line (a new run, a resumed one, torchrun's relaunch) goes through here."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ConfigError(f"unexpected argument {tok!r}; overrides look like --train.batch_size=8")
        body = tok[2:]
        if "=" in body:
            key, text = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, text = body, args[i + 1]
            i += 1
        else:
            key, text = body, None
        out.append((key.replace("-", "_"), text))
        i += 1
    return out


def apply_overrides(cfg: Config, overrides: list[str], notes: list[str] | None = None) -> None:
    """Command-line overrides on top of cfg (a bare `--flag` sets a bool field to true), then
    the checks. Used for a new run and, on a checkpoint's config, for a resumed or loaded one."""
    types_ = field_types()
    for key, text in parse_overrides(overrides):
        if text is None:
            if types_.get(NANOGPT_KEYS.get(key, key)) is not bool:
                raise ConfigError(f"--{key}: needs a value, e.g. --{key}=...")
            text = "true"
        set_value(cfg, key, text, where="command line", from_text=True, notes=notes)
    normalise(cfg)
    check(cfg)


def load_config(spec: str | None, overrides: list[str], *, default: str | None = "demo",
                notes: list[str] | None = None) -> Config:
    """Defaults < file (or the built-in `default` when spec is None) < command-line overrides."""
    notes = notes if notes is not None else []
    cfg = Config()
    spec = spec or default
    if spec:
        apply_file(cfg, resolve_path(spec), notes)
    apply_overrides(cfg, overrides, notes)
    return cfg


# ----------------------------------------------------------------------------- checks

def normalise(cfg: Config) -> None:
    """Every choice field through `choose`, for the values code assigned directly rather than
    through set_value (which already checks them): each is stored as its canonical value."""
    types_ = field_types()
    for key in [k for k, tp in types_.items() if _choices(tp) or k in field_choices()]:
        sec, name = key.split(".")
        setattr(getattr(cfg, sec), name, choose(key, getattr(getattr(cfg, sec), name), types_[key]))


def parse_size(text: str) -> int:
    """'12GB' -> 12e9 bytes, '12GiB' -> 12 * 2**30; a bare number is GiB."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1, "": 2**30}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("kmgtib")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not (0 < value < math.inf):
        raise ConfigError(f"memory size {text!r}: expected a size such as 12GB, 11.5GiB or 8000MB")
    return int(value * units[unit])


INT64_MAX = 2**63 - 1  # what a torch size or counter holds


def check_ranges(cfg: Config) -> None:
    """Every number finite and inside its field's Range (the table is the annotations in
    fitgpt.config.schema: one place, one edit per field)."""
    ranges = field_ranges()
    for key in field_types():
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        rng = ranges.get(key)
        valid = f"valid: {rng}" if rng else "a finite number"
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={v} is not a finite number; {valid}")
        if rng is not None and v not in rng:
            raise ConfigError(f"{key}={v} is out of range; {valid}")
        if isinstance(v, int) and abs(v) > INT64_MAX:
            raise ConfigError(f"{key}={_short(v, 30)} is out of range; at most {INT64_MAX}")


def check(cfg: Config) -> None:
    """Checks that need no torch: everything wrong is reported before allocation."""
    m, t, e, mem, log = cfg.model, cfg.train, cfg.eval, cfg.memory, cfg.log
    check_ranges(cfg)
    if m.n_embd % m.n_head:
        divisors = [h for h in range(1, m.n_embd + 1) if m.n_embd % h == 0 and abs(h - m.n_head) <= 8]
        raise ConfigError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
                          f"heads that divide it: {divisors}")
    if m.position == "rotary" and (m.n_embd // m.n_head) % 2:
        raise ConfigError(f"model.position=rotary needs an even head size; n_embd/n_head = "
                          f"{m.n_embd}/{m.n_head} = {m.n_embd // m.n_head}")
    if cfg.eval_block_size > m.block_size:
        raise ConfigError(f"eval.block_size={e.block_size} is larger than model.block_size="
                          f"{m.block_size}; the position embedding has only {m.block_size} rows")
    if t.decay_lr and t.min_lr > t.lr:  # min_lr is used only by the decay
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}: the cosine decay "
                          f"would raise the learning rate; lower min_lr, or set train.decay_lr=false "
                          f"for a constant lr")
    if mem.budget is not None:
        parse_size(mem.budget)
    if log.run_name is not None:  # a folder name under out_dir, never a path out of it
        check_name("log.run_name", log.run_name)
    why = fused_backward_refusal(cfg) or optimizer_refusal(cfg) or activation_refusal(cfg)
    if why:
        raise ConfigError(why)


def to_dict(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"name": cfg.name}
    for sec in SECTIONS:
        out[sec] = dataclasses.asdict(getattr(cfg, sec))
    return out


def from_dict(d: dict[str, Any]) -> Config:
    """Inverse of to_dict (used for configs stored in checkpoints)."""
    cfg = Config(name=d.get("name", "default"))
    for sec in SECTIONS:
        for key, value in d.get(sec, {}).items():
            set_value(cfg, f"{sec}.{key}", value, where="checkpoint config", from_text=False)
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return repr(v)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that `fitgpt train FILE` loads back (None fields omitted)."""
    lines = [f"name = {_toml_value(cfg.name)}"]
    for sec, values in to_dict(cfg).items():
        if sec == "name":
            continue
        lines.append(f"\n[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def summary_lines(cfg: Config) -> list[str]:
    """The resolved config, one line per section, for the start of a run."""
    return [f"{sec}: " + " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                  for k, v in values.items())
            for sec, values in to_dict(cfg).items() if sec != "name"]


def help_text() -> str:
    """Every field with type, default and docstring, grouped by section, with nanoGPT aliases."""
    docs, types_, ranges = field_docs(), field_types(), field_ranges()
    alias = {v: k for k, v in NANOGPT_KEYS.items()}
    defaults = to_dict(Config())
    lines = []
    for sec, cls in SECTIONS.items():
        lines.append(f"\n{sec}: {inspect.getdoc(cls)}")
        for f in dataclasses.fields(cls):
            key = f"{sec}.{f.name}"
            extra = f" (nanoGPT: {alias[key]})" if key in alias else ""
            choices = _choices(types_[key])
            kind = "{" + ",".join(choices) + "}" if choices else _type_name(types_[key]).upper()
            valid = f", valid {ranges[key]}" if key in ranges else ""
            lines.append(f"  --{key}={kind}  [default {defaults[sec][f.name]!r}{valid}]{extra}")
            lines.append(f"      {docs.get(key, '')}")
    return "\n".join(lines)
