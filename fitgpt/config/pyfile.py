"""nanoGPT-style Python config files, read as data: parsed with `ast`, never executed.

nanoGPT's configurator `exec`s a config file; fitgpt evaluates only literals, `+ - * / // % **`,
unary signs and names assigned earlier in the file. A config file is text anyone can hand you, so
every step is bounded before it runs: the file's nesting (the parser's own limits surface as one
line, not a RecursionError or MemoryError), each value's expression (node count and depth), and
every intermediate value (bits of an integer, length of a string or list), so that
`a = 10**64; b = a**64; c = b**64` stops at once instead of computing a number of billions of
digits. The same evaluator reads command-line values (`--train.lr=3e-4*2`).

A value that is not a literal stops the run, with one exception: keys that only name a log run
(`wandb_run_name = 'ft-' + str(time.time())` in nanoGPT's finetune_shakespeare.py) fall back to
fitgpt's default with a note. Whatever changes training must be a literal.
"""

from __future__ import annotations

import ast
import operator
from pathlib import Path
from typing import Any

from fitgpt.errors import ConfigError
from fitgpt.fileio import load_plain_pickle

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

# Keys that only name a log run: a value that is not a literal falls back to this default (and
# what it means), with a note, instead of stopping the run.
NAME_ONLY: dict[str, tuple[Any, str]] = {
    "wandb_run_name": (None, "the run folder's name"),
    "wandb_project": ("fitgpt", "'fitgpt'"),
}

# nanoGPT's init_from='gpt2*' shapes: planning needs only the shape; training refuses (no weights).
GPT2_SHAPES = {
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600),
}

# Bounds on evaluation: far above any real setting, small enough that every step is instant.
MAX_INT_BITS = 256  # about 1e77
MAX_LEN = 10_000  # characters of a string, items of a list
MAX_NODES = 1_000  # syntax nodes in one value
MAX_DEPTH = 50  # nesting of one value

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}


def parse_source(text: str, where: str, mode: str = "exec") -> ast.AST:
    """ast.parse, with every failure (including the parser's own nesting limits, which Python
    reports as RecursionError or MemoryError) as one ConfigError line."""
    try:
        return ast.parse(text, mode=mode)
    except SyntaxError as e:
        line = f":{e.lineno}" if e.lineno else ""
        raise ConfigError(f"{where}{line}: not valid Python: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"{where}: nested too deeply to read; a config value is a literal or "
                          f"short arithmetic") from None
    except ValueError as e:  # e.g. a NUL byte
        raise ConfigError(f"{where}: not valid Python: {e}") from None


def _check_shape(node: ast.AST) -> None:
    """Refuse a value with too many nodes or too deep a nesting, walking without recursion."""
    stack, count = [(node, 1)], 0
    while stack:
        n, depth = stack.pop()
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            raise ConfigError(f"expression too large (over {MAX_NODES} terms or {MAX_DEPTH} "
                              f"levels); a config value is a literal or short arithmetic")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(n))


def _check_size(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ConfigError(f"number too large (over {MAX_INT_BITS} bits)")
    if isinstance(value, (str, bytes, list)) and len(value) > MAX_LEN:
        raise ConfigError(f"value too long (over {MAX_LEN:,} characters or items)")
    return value


def _check_result_size(op: type, left: Any, right: Any) -> None:
    """Refuse, before computing it, a result that would exceed the bounds: the computation
    itself (10**64 ** 64 ** 64) is what would hang."""
    ints = all(isinstance(v, int) for v in (left, right))
    if ints and op is ast.Mult and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
        raise ConfigError(f"number too large (over {MAX_INT_BITS} bits)")
    if ints and op is ast.Pow and right > 0 and abs(left) > 1:
        if (left.bit_length() - 1) * right > MAX_INT_BITS:
            raise ConfigError(f"number too large (over {MAX_INT_BITS} bits)")
    seqs = (str, bytes, list)
    if op is ast.Mult and isinstance(left, seqs + (int,)) and isinstance(right, seqs + (int,)):
        seq, n = (left, right) if isinstance(left, seqs) else (right, left)
        if isinstance(seq, seqs) and isinstance(n, int) and len(seq) * max(n, 0) > MAX_LEN:
            raise ConfigError(f"value too long (over {MAX_LEN:,} characters or items)")
    if op is ast.Mod and isinstance(left, (str, bytes)):
        raise ConfigError("string formatting with % is not allowed in a config value")


def safe_eval(node: ast.AST, names: dict[str, Any]) -> Any:
    """Evaluate literals, + - * / // % ** and names assigned earlier in the file. Nothing else,
    and nothing unbounded."""
    _check_shape(node)
    return _eval(node, names)


def _eval(node: ast.AST, names: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return _check_size(node.value)
    if isinstance(node, (ast.Tuple, ast.List)):
        return _check_size([_eval(e, names) for e in node.elts])
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _compute(node, _UNARY[type(node.op)], _eval(node.operand, names))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, names), _eval(node.right, names)
        _check_result_size(type(node.op), left, right)
        return _compute(node, _BINOPS[type(node.op)], left, right)
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        if node.id.lower() in ("nan", "inf", "infinity"):
            raise ConfigError(f"{node.id!r} is not a finite number: give a finite value")
        raise ConfigError(f"unknown name {node.id!r}")
    raise ConfigError(f"only literals and arithmetic are allowed, not {_short(ast.unparse(node))!r}")


def _compute(node: ast.AST, fn, *args: Any) -> Any:
    try:
        return _check_size(fn(*args))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any arithmetic failure is the file's mistake
        raise ConfigError(f"cannot compute {_short(ast.unparse(node))}: {e}") from None


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


def parse_value(text: str) -> Any:
    """A command-line value (`3e-4`, `5*8`, `'x'`) evaluated with the same bounds."""
    return safe_eval(parse_source(text, "value", mode="eval").body, {})


def read_nanogpt_file(path: Path, notes: list[str] | None = None) -> dict[str, Any]:
    """The flat assignments of a nanoGPT-style config file, evaluated without executing it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); a config file is text") from None
    tree = parse_source(text, str(path))
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring or bare string
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            key = node.targets[0].id
            try:
                values[key] = safe_eval(node.value, values)
            except ConfigError as e:
                if key not in NAME_ONLY:
                    raise ConfigError(f"{path}:{node.lineno}: {e}") from None
                values[key], meaning = NAME_ONLY[key]
                if notes is not None:
                    notes.append(f"{path}:{node.lineno}: {key} is not a literal ({e}; config files "
                                 f"are read, never run); it only names the log run, so the default "
                                 f"is used: {meaning}")
            continue
        line = text.splitlines()[node.lineno - 1].strip()  # not unparse: it recurses
        raise ConfigError(f"{path}:{node.lineno}: only `key = value` lines are allowed, "
                          f"found {_short(line)!r}")
    return values


def nanogpt_meta_vocab(dataset: str) -> int | None:
    """nanoGPT reads vocab_size from data/<dataset>/meta.pkl (character-level sets); so do we,
    unpickling plain data only (dicts, strings, numbers: nothing that could run code)."""
    meta = Path("data") / dataset / "meta.pkl"
    if not meta.is_file():
        return None
    try:
        with open(meta, "rb") as f:
            meta_data = load_plain_pickle(f)
        value = meta_data.get("vocab_size") if isinstance(meta_data, dict) else None
    except Exception as e:  # noqa: BLE001 - any failure is the file's
        raise ConfigError(f"{meta}: not a plain nanoGPT meta.pkl ({e})") from None
    return value if isinstance(value, int) and value > 0 else None
