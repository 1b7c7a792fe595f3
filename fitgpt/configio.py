"""Reading, overriding, checking and writing a `Config`.

Sources, in order of precedence: the dataclass defaults, a config file, the command line.
A config file is TOML (sections named like the dataclasses) or a nanoGPT-style Python file of flat
`key = value` assignments, read with `ast` (never executed) and applied on top of nanoGPT's own
defaults so that it means what it meant to its author.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import operator
import pickle
import typing
from pathlib import Path
from typing import Any

import tomllib

from fitgpt import config as config_module
from fitgpt.config import SECTIONS, Config
from fitgpt.errors import ConfigError

BUILTIN_DIR = Path(__file__).parent / "configs"

# nanoGPT's flat train.py keys (plus the seed's extras) -> fitgpt's dotted keys.
NANOGPT_KEYS: dict[str, str] = {
    "out_dir": "log.out_dir",
    "eval_interval": "eval.interval",
    "log_interval": "log.interval",
    "eval_iters": "eval.iters",
    "eval_only": "train.eval_only",
    "always_save_checkpoint": "log.always_save",
    "init_from": "train.init_from",
    "wandb_log": "log.wandb",
    "wandb_project": "log.wandb_project",
    "wandb_run_name": "log.wandb_run_name",
    "dataset": "data.dir",
    "gradient_accumulation_steps": "train.grad_accum",
    "batch_size": "train.batch_size",
    "block_size": "model.block_size",
    "n_layer": "model.n_layer",
    "n_head": "model.n_head",
    "n_embd": "model.n_embd",
    "dropout": "model.dropout",
    "bias": "model.bias",
    "vocab_size": "model.vocab_size",
    "learning_rate": "train.lr",
    "max_iters": "train.max_steps",
    "weight_decay": "train.weight_decay",
    "beta1": "train.beta1",
    "beta2": "train.beta2",
    "grad_clip": "train.grad_clip",
    "decay_lr": "train.decay_lr",
    "warmup_iters": "train.warmup_steps",
    "lr_decay_iters": "train.lr_decay_steps",
    "min_lr": "train.min_lr",
    "device": "train.device",
    "dtype": "train.dtype",
    "compile": "train.compile",
    "seed": "train.seed",
    # the seed note's additions
    "eval_batch_size": "eval.batch_size",
    "eval_block_size": "eval.block_size",
    "grad_checkpoint": "memory.checkpointing",
    "backend": "parallel.backend",
    # fitgpt's own shortcut
    "nproc": "parallel.nproc",
}
# Keys nanoGPT has that a single fitgpt process has no use for; accepted and ignored with a note.
NANOGPT_ACCEPTED: dict[str, str] = {}

# nanoGPT's train.py defaults. device, dtype and compile are left to fitgpt's 'auto' choices:
# nanoGPT's defaults for them assume a CUDA machine.
NANOGPT_DEFAULTS: dict[str, Any] = {
    "out_dir": "out", "eval_interval": 2000, "log_interval": 1, "eval_iters": 200,
    "eval_only": False, "always_save_checkpoint": True, "init_from": "scratch",
    "wandb_log": False, "wandb_project": "owt", "wandb_run_name": "gpt2",
    "dataset": "openwebtext", "gradient_accumulation_steps": 40, "batch_size": 12,
    "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768, "dropout": 0.0,
    "bias": False, "learning_rate": 6e-4, "max_iters": 600000, "weight_decay": 1e-1,
    "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "decay_lr": True, "warmup_iters": 2000,
    "lr_decay_iters": 600000, "min_lr": 6e-5,
}

# nanoGPT's init_from='gpt2*' shapes: planning needs only the shape; training refuses (no weights).
GPT2_SHAPES = {
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600),
}

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": "auto"}


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
    """Dotted key -> resolved type annotation."""
    out = {}
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{sec}.{f.name}"] = hints[f.name]
    return out


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or none"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any, from_text: bool) -> Any:
    """Check (and, for command-line text, convert) one value against the field's type."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
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
            value = safe_eval(ast.parse(text, mode="eval").body, {})
        except (SyntaxError, ConfigError):
            raise bad from None
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
            return float(value)
        raise bad
    if base is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


# ----------------------------------------------------------------------------- safe evaluation

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}


def safe_eval(node: ast.AST, names: dict[str, Any]) -> Any:
    """Evaluate literals, + - * / // % ** and names assigned earlier in the file. Nothing else."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return [safe_eval(e, names) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        v = safe_eval(node.operand, names)
        return -v if isinstance(node.op, ast.USub) else (not v if isinstance(node.op, ast.Not) else +v)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = safe_eval(node.left, names), safe_eval(node.right, names)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ConfigError("exponent too large")
        try:
            return _BINOPS[type(node.op)](left, right)
        except Exception as e:  # noqa: BLE001 - any arithmetic failure is the file's mistake
            raise ConfigError(f"cannot compute {ast.unparse(node)}: {e}") from None
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        raise ConfigError(f"unknown name {node.id!r}")
    raise ConfigError(f"only literals and arithmetic are allowed, not {ast.unparse(node)!r}")


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


def read_nanogpt_file(path: Path) -> dict[str, Any]:
    """The flat assignments of a nanoGPT-style config file, evaluated without executing it."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid Python: {e.msg}") from None
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring or bare string
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            try:
                values[node.targets[0].id] = safe_eval(node.value, values)
            except ConfigError as e:
                raise ConfigError(f"{path}:{node.lineno}: {e}") from None
            continue
        raise ConfigError(f"{path}:{node.lineno}: only `key = value` lines are allowed, "
                          f"found {ast.unparse(node)[:60]!r}")
    return values


def resolve_path(spec: str) -> Path:
    """A config file path, or the name of a built-in config (`demo`, `gpt2-124m`)."""
    p = Path(spec)
    if p.is_file():
        return p
    for cand in (BUILTIN_DIR / f"{spec}.toml", BUILTIN_DIR / f"{spec}.py", BUILTIN_DIR / spec):
        if cand.is_file():
            return cand
    builtin = ", ".join(sorted(f.stem for f in BUILTIN_DIR.iterdir() if f.suffix in (".toml", ".py")))
    raise ConfigError(f"config {spec!r}: no such file, and not a built-in config ({builtin})")


class _DataOnly(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def nanogpt_meta_vocab(dataset: str) -> int | None:
    """nanoGPT reads vocab_size from data/<dataset>/meta.pkl (character-level sets); so do we,
    unpickling plain data only (dicts, strings, numbers: nothing that could run code)."""
    meta = Path("data") / dataset / "meta.pkl"
    if not meta.is_file():
        return None
    try:
        with open(meta, "rb") as f:
            value = _DataOnly(f).load().get("vocab_size")
    except Exception as e:  # noqa: BLE001 - any failure is the file's
        raise ConfigError(f"{meta}: not a plain nanoGPT meta.pkl ({e})") from None
    return value if isinstance(value, int) and value > 0 else None


def apply_file(cfg: Config, path: Path, notes: list[str]) -> None:
    if path.suffix == ".py":
        values = read_nanogpt_file(path)
        merged = {**NANOGPT_DEFAULTS, **values}
        vocab = nanogpt_meta_vocab(str(merged["dataset"])) if "vocab_size" not in values else None
        if vocab is not None:
            merged["vocab_size"] = vocab
            notes.append(f"vocab_size={vocab} from data/{merged['dataset']}/meta.pkl, as nanoGPT does")
        # init_from last: as in nanoGPT, a released GPT-2's shape wins over n_layer etc.
        for key in sorted(merged, key=lambda k: k == "init_from"):
            set_value(cfg, key, merged[key], where=str(path), from_text=False, notes=notes)
        notes.append(f"{path}: nanoGPT-style file applied on top of nanoGPT's defaults")
    elif path.suffix == ".toml":
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for sec, table in data.items():
            if sec == "name" and isinstance(table, str):
                cfg.name = table
                continue
            if sec not in SECTIONS or not isinstance(table, dict):
                raise unknown_key(sec, str(path))
            for name, value in table.items():
                set_value(cfg, f"{sec}.{name}", value, where=str(path), from_text=False)
    else:
        raise ConfigError(f"{path}: config files are .toml or nanoGPT-style .py")
    if cfg.name == "default":
        cfg.name = path.stem


def parse_overrides(args: list[str]) -> list[tuple[str, str | None]]:
    """`--a.b=v`, `--a.b v`, `--flat=v`, `--flag` -> [(key, text)], text None for a bare flag."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ConfigError(f"unexpected argument {tok!r}; overrides look like --train.batch_size=8")
        body = tok[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            out.append((key, text))
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append((body, args[i + 1]))
            i += 1
        else:
            out.append((body, None))
        i += 1
    return out


def load_config(spec: str | None, overrides: list[str], *, default: str | None = "demo",
                notes: list[str] | None = None) -> Config:
    """Defaults < file (or the built-in `default` when spec is None) < command-line overrides."""
    notes = notes if notes is not None else []
    cfg = Config()
    spec = spec or default
    if spec:
        apply_file(cfg, resolve_path(spec), notes)
    types_ = field_types()
    for key, text in parse_overrides(overrides):
        full = NANOGPT_KEYS.get(key, key)
        if text is None:
            if types_.get(full) is bool:
                text = "true"
            else:
                raise ConfigError(f"--{key}: needs a value, e.g. --{key}=...")
        set_value(cfg, key.replace("-", "_"), text, where="command line", from_text=True,
                  notes=notes)
    normalise(cfg)
    check(cfg)
    return cfg


# ----------------------------------------------------------------------------- checks

def normalise(cfg: Config) -> None:
    d = cfg.train.dtype.lower()
    if d not in DTYPES:
        raise ConfigError(f"train.dtype: expected one of float32, bfloat16, float16, auto; got {cfg.train.dtype!r}")
    cfg.train.dtype = DTYPES[d]


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
    if unit not in units or value <= 0:
        raise ConfigError(f"memory size {text!r}: expected a size such as 12GB, 11.5GiB or 8000MB")
    return int(value * units[unit])


def check(cfg: Config) -> None:
    """Cross-field checks that need no torch: everything wrong is reported before allocation."""
    m, t, e, mem, log = cfg.model, cfg.train, cfg.eval, cfg.memory, cfg.log
    positive = {
        "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.n_embd": m.n_embd,
        "model.block_size": m.block_size, "model.vocab_size": m.vocab_size,
        "model.vocab_multiple": m.vocab_multiple, "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum, "eval.interval": e.interval, "eval.iters": e.iters,
        "log.interval": log.interval, "log.keep": log.keep,
        "memory.micro_split": mem.micro_split, "train.max_nonfinite": t.max_nonfinite,
    }
    for opt in ("eval.batch_size", "eval.block_size", "eval.tokens", "train.lr_decay_steps"):
        sec, name = opt.split(".")
        if getattr(getattr(cfg, sec), name) is not None:
            positive[opt] = getattr(getattr(cfg, sec), name)
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key} must be positive, got {v}")
    if t.max_steps < 0 or t.warmup_steps < 0 or e.sample_tokens < 0 or mem.loss_chunk < 0:
        raise ConfigError("train.max_steps, train.warmup_steps, eval.sample_tokens and memory.loss_chunk "
                          "must be >= 0")
    if m.n_embd % m.n_head:
        divisors = [h for h in range(1, m.n_embd + 1) if m.n_embd % h == 0 and abs(h - m.n_head) <= 8]
        raise ConfigError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
                          f"heads that divide it: {divisors}")
    if cfg.eval_block_size > m.block_size:
        raise ConfigError(f"eval.block_size={e.block_size} is larger than model.block_size="
                          f"{m.block_size}; the position embedding has only {m.block_size} rows")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"need 0 <= train.min_lr <= train.lr and lr > 0; got lr={t.lr}, min_lr={t.min_lr}")
    if mem.loss not in ("chunked", "full"):
        raise ConfigError(f"memory.loss: expected chunked or full, got {mem.loss!r}")
    if mem.fit not in ("off", "auto"):
        raise ConfigError(f"memory.fit: expected off or auto, got {mem.fit!r}")
    if not 0.0 <= mem.headroom < 0.9:
        raise ConfigError(f"memory.headroom must be in [0, 0.9), got {mem.headroom}")
    if mem.budget is not None:
        parse_size(mem.budget)
    par = cfg.parallel
    if par.nproc < 1:
        raise ConfigError(f"parallel.nproc must be positive, got {par.nproc}")
    if par.mode not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel.mode: expected ddp or fsdp, got {par.mode!r}")
    if par.backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"parallel.backend: expected auto, nccl or gloo, got {par.backend!r}")
    if t.init_from not in ("scratch", "resume") and not t.init_from.startswith("gpt2"):
        raise ConfigError(f"train.init_from: expected scratch or resume, got {t.init_from!r}")


# ----------------------------------------------------------------------------- output

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
    docs, types_ = field_docs(), field_types()
    alias = {v: k for k, v in NANOGPT_KEYS.items()}
    defaults = to_dict(Config())
    lines = []
    for sec, cls in SECTIONS.items():
        lines.append(f"\n{sec}: {inspect.getdoc(cls)}")
        for f in dataclasses.fields(cls):
            key = f"{sec}.{f.name}"
            extra = f" (nanoGPT: {alias[key]})" if key in alias else ""
            lines.append(f"  --{key}={_type_name(types_[key]).upper()}  "
                         f"[default {defaults[sec][f.name]!r}]{extra}")
            lines.append(f"      {docs.get(key, '')}")
    return "\n".join(lines)
