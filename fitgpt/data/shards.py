"""Token shards on disk, and the batches drawn from them.

Two layouts are read:

* llm.c / modded-nanogpt shards: a header of 256 little-endian int32 (``header[0] = 20240520``,
  ``header[1] = 1``, ``header[2] = ntokens``) followed by ``ntokens`` little-endian uint16.
  Files are named ``NAME_val_000000.bin`` and ``NAME_train_000001.bin``, ... (FineWeb), or
  ``NAME_val.bin`` and ``NAME_train.bin`` (llm.c's tinyshakespeare and tinystories scripts).
* nanoGPT's headerless ``train.bin`` / ``val.bin``: the whole file is uint16 tokens.

Memory stays bounded: shards are memory-mapped and re-opened per batch (as nanoGPT does, to
avoid the slow leak of long-lived memmaps), never loaded into Python lists.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where batches are made, so `fitgpt prepare` stays light
    import torch

from fitgpt.data.manifest import MANIFEST
from fitgpt.data.tokenizer import EOT
from fitgpt.errors import ConfigError, DataError
from fitgpt.fileio import atomic_write, write_json

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
_MAGIC_UINT32 = 20240801  # llm.c's uint32-token shards (version 7): not supported here
_NANOGPT_NAMES = ("train.bin", "val.bin")
_TOKEN = np.dtype("<u2")


def shard_bytes(ntokens: int) -> int:
    """Size of an llm.c shard of ``ntokens`` tokens: what a manifest entry's file is checked against."""
    return HEADER_BYTES + 2 * ntokens


def shard_split(index: int) -> str:
    """The split of the ``index``-th shard of a prepared folder: the first is validation."""
    return "val" if index == 0 else "train"


def shard_path(out: Path, name: str, index: int) -> Path:
    """``NAME_val_000000.bin`` for index 0, ``NAME_train_00000K.bin`` after it."""
    return out / f"{name}_{shard_split(index)}_{index:06d}.bin"


def manifest_header(name: str) -> dict[str, Any]:
    """The keys a prepared folder's manifest.json starts with: what its shards are."""
    return {"format": "llm.c", "magic": MAGIC, "version": VERSION, "name": name}


def _as_tokens(tokens: Any, what: str) -> np.ndarray:
    """``tokens`` as a 1-D little-endian uint16 array; DataError if an id does not fit."""
    arr = np.asarray(tokens).reshape(-1)
    if arr.size == 0:
        return np.zeros(0, dtype=_TOKEN)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{what}: token ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= 65536:
        bad = lo if lo < 0 else hi
        raise DataError(
            f"{what}: token id {bad} does not fit in uint16 (0..65535); "
            "the llm.c version-1 shard format holds vocabularies of at most 65536 ids"
        )
    return arr.astype(_TOKEN, copy=False)


def write_shard(path: str | os.PathLike[str], tokens: Any) -> str:
    """Write one llm.c shard (header + uint16 tokens) atomically; return the file's sha256.

    Raises:
        DataError: an id is negative or >= 65536 (nothing is written).
    """
    path = Path(path)
    arr = _as_tokens(tokens, f"shard {path}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size
    digest = hashlib.sha256()

    def write(f) -> None:
        for chunk in (header.tobytes(), arr.tobytes()):
            digest.update(chunk)
            f.write(chunk)

    atomic_write(path, write)
    return digest.hexdigest()


def _shard_layout(path: Path) -> tuple[int, int]:
    """``(byte offset, number of tokens)`` of the token data in ``path``, validated.

    Raises:
        DataError: unreadable file, bad magic/version or a size that disagrees with the header.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as exc:
        raise DataError(f"shard {path}: cannot read ({exc.strerror or exc})") from exc
    header = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<i4")
    magic = int(header[0]) if len(header) else None
    if magic == MAGIC and len(header) == HEADER_INTS:
        version, ntok = int(header[1]), int(header[2])
        if version == VERSION and ntok >= 0 and size == shard_bytes(ntok):
            return HEADER_BYTES, ntok
    if path.name in _NANOGPT_NAMES:  # headerless; may start with the magic by coincidence
        if size % 2:
            raise DataError(
                f"shard {path}: nanoGPT uint16 file has an odd size ({size} bytes); "
                "file is truncated or corrupt"
            )
        return 0, size // 2
    corrupt = "file is truncated or corrupt"
    if magic is None:
        problem = "file is empty, expected an llm.c shard header"
    elif magic == _MAGIC_UINT32:
        problem = f"uint32-token shards (magic {magic}) are not supported; expected {MAGIC}"
    elif magic != MAGIC:
        problem = (
            f"no llm.c header (bad magic {magic}, expected {MAGIC}); files named *_train*.bin and "
            "*_val*.bin are read as llm.c shards. Older llm.c scripts wrote them without a header: "
            "re-run the current script, or, for headerless uint16 tokens, name the files train.bin "
            "and val.bin (nanoGPT's format) in a folder of their own"
        )
    elif len(header) < HEADER_INTS:
        problem = f"file holds {size} bytes, less than the {HEADER_BYTES}-byte header; {corrupt}"
    elif version != VERSION:
        problem = f"unsupported version {version}, expected {VERSION} (llm.c uint16 shards)"
    else:
        held = f"{(size - HEADER_BYTES) // 2}{' and an odd byte' if size % 2 else ''}"
        problem = f"header says {ntok} tokens but file holds {held}; {corrupt}"
    raise DataError(f"shard {path}: {problem}")


def _open_tokens(path: Path, offset: int, ntok: int) -> np.ndarray:
    """A read-only uint16 view of ``ntok`` tokens at ``offset`` (empty array if none)."""
    if ntok == 0:
        empty = np.zeros(0, dtype=_TOKEN)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=_TOKEN, mode="r", offset=offset, shape=(ntok,))


def _gather(
    shards: list[Path],
    layout: list[tuple[int, int]],
    which: np.ndarray,
    offsets: np.ndarray,
    T: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``tokens[o:o+T]`` / ``tokens[o+1:o+T+1]`` of shard ``which[i]`` at ``offsets[i]``.

    Each shard is memory-mapped afresh and released afterwards (no long-lived memmaps).
    """
    buf = np.empty((len(which), T + 1), dtype=np.int64)
    span = np.arange(T + 1, dtype=np.int64)
    for s in np.unique(which):
        rows = np.flatnonzero(which == s)
        tokens = _open_tokens(shards[s], *layout[s])
        buf[rows] = tokens[offsets[rows, None] + span]  # (rows, T+1) gather from the memmap
        del tokens
    import torch

    t = torch.from_numpy(buf)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T) each


def read_shard(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map the tokens of one shard, read-only (a ``np.memmap`` of uint16).

    Accepts llm.c shards and nanoGPT's headerless ``train.bin`` / ``val.bin``. An empty shard
    gives an empty read-only array (zero-length files cannot be memory-mapped).

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    path = Path(path)
    offset, ntok = _shard_layout(path)
    return _open_tokens(path, offset, ntok)


def shard_length(path: str | os.PathLike[str]) -> int:
    """Number of tokens in a shard (validated like :func:`read_shard`, without mapping it)."""
    return _shard_layout(Path(path))[1]


def find_splits(data_dir: str | os.PathLike[str]) -> tuple[list[Path], list[Path]]:
    """``(train shards, val shards)`` of a data folder, each sorted by name.

    llm.c names take precedence: numbered shards (``*_train_*.bin``, ``*_val_*.bin``, as the
    FineWeb scripts write them) and single files (``*_train.bin``, ``*_val.bin``, as llm.c's
    tinyshakespeare and tinystories scripts write them); both must carry the llm.c header.
    Otherwise nanoGPT's headerless ``train.bin`` / ``val.bin``.

    Raises:
        DataError: the folder is missing or lacks train or val shards (message says how to fix).
    """
    root = Path(data_dir)
    fix = (f"make shards with `fitgpt prepare text FILES --out {root}` or `fitgpt prepare fineweb "
           f"--out {root}` (or use the built-in demo: `fitgpt train` without a data dir)")
    if not root.is_dir():
        raise DataError(f"data dir {root} does not exist or is not a folder; {fix}")

    def llmc(split: str) -> list[Path]:
        found = {*root.glob(f"*_{split}_*.bin"), *root.glob(f"*_{split}.bin")}
        return sorted(p for p in found if p.is_file() and not p.name.startswith("."))

    train, val = llmc("train"), llmc("val")
    if not train and not val:
        train = [p for p in [root / "train.bin"] if p.is_file()]
        val = [p for p in [root / "val.bin"] if p.is_file()]
    for split, found in (("train", train), ("val", val)):
        if not found:
            raise DataError(
                f"data dir {root} has no {split} shards (*_{split}_*.bin, *_{split}.bin or "
                f"{split}.bin); {fix}"
            )
    return train, val


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class TrainBatches:
    """Seeded random training windows drawn from a list of shards.

    Each row picks a shard with probability proportional to its number of start positions
    (``len - block_size``) and a uniform offset ``o`` in it; ``x = tokens[o:o+T]`` and
    ``y = tokens[o+1:o+T+1]``. Both choices come from one uniform draw over all start positions,
    so the sampling is exact and reproducible from :meth:`state_dict`.

    Attributes:
        block_size: T, the window length.
        batch_size: B, rows per batch; may be changed between batches.
        shards: the usable shards (shorter ones are skipped).
    """

    def __init__(self, shards: list[Path], block_size: int, batch_size: int, seed: int) -> None:
        self.block_size = _check_positive("block_size", block_size)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shards: list[Path] = []
        self._layout: list[tuple[int, int]] = []
        starts: list[int] = []
        longest = 0
        for shard in shards:
            offset, ntok = _shard_layout(Path(shard))
            longest = max(longest, ntok)
            if ntok >= self.block_size + 1:
                self.shards.append(Path(shard))
                self._layout.append((offset, ntok))
                starts.append(ntok - self.block_size)
        if not self.shards:
            raise DataError(
                f"block size {self.block_size} is too large for the training data: every shard "
                f"needs at least block_size+1 tokens, the longest has {longest}"
            )
        self._starts = np.asarray(starts, dtype=np.int64)
        self._cum_starts = np.cumsum(self._starts)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))

    @property
    def batch_size(self) -> int:
        """Rows per batch (settable)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = _check_positive("batch_size", value)

    @property
    def n_positions(self) -> int:
        """Total number of distinct start positions over all usable shards."""
        return int(self._cum_starts[-1])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)``: int64 CPU tensors of shape ``(batch_size, block_size)``."""
        pos = self._rng.integers(0, self.n_positions, size=self._batch_size, dtype=np.int64)
        which = np.searchsorted(self._cum_starts, pos, side="right")
        offsets = pos - (self._cum_starts[which] - self._starts[which])
        return _gather(self.shards, self._layout, which, offsets, self.block_size)

    def state_dict(self) -> dict[str, Any]:
        """Sampler state as plain Python types (safe for ``torch.load(weights_only=True)``)."""
        return {
            "seed": self.seed,
            "block_size": self.block_size,
            "n_positions": self.n_positions,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output so that the following batches are identical.

        Identical batches also require the same shards and block size; a different block size
        is refused.

        Raises:
            DataError: the state is malformed or was saved with another block size.
        """
        rng = np.random.Generator(np.random.PCG64())
        try:
            block_size, seed = int(state["block_size"]), int(state["seed"])
            rng.bit_generator.state = dict(state["rng"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"train sampler state is malformed ({exc!r})") from exc
        if block_size != self.block_size:
            raise DataError(
                f"train sampler state was saved with block size {block_size}, "
                f"but the current block size is {self.block_size}"
            )
        self.seed, self._rng = seed, rng


class ValWindows:
    """A fixed, deterministic validation set of non-overlapping windows.

    Windows span ``block_size + 1`` tokens at stride ``block_size`` (consecutive windows share
    one boundary token, so every token is a target once), taken from the val shards in order,
    never crossing a shard end, up to ``max_windows``. The set does not depend on the batch
    size, so ``sum(loss) / n_tokens`` is the same whatever batch size evaluates it.
    """

    def __init__(self, shards: list[Path], block_size: int, max_windows: int | None) -> None:
        self.block_size = T = _check_positive("block_size", block_size)
        if max_windows is not None:
            max_windows = _check_positive("max_windows", max_windows)
        self.shards = [Path(s) for s in shards]
        self._layout = [_shard_layout(s) for s in self.shards]
        counts = np.array([max(n - 1, 0) // T for _, n in self._layout], dtype=np.int64)
        if max_windows is not None:  # keep the first max_windows windows, in shard order
            before = np.cumsum(counts) - counts
            counts = np.clip(max_windows - before, 0, counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)  # index of each shard's first
        self._which = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        self._offsets = (np.arange(int(counts.sum()), dtype=np.int64) - first) * T
        if self.n_windows == 0:
            sizes = [n for _, n in self._layout]
            raise DataError(
                f"validation data is too small for block size {T}: a window needs {T + 1} "
                f"tokens in one shard, the val shards hold {sum(sizes)} tokens "
                f"(longest shard {max(sizes, default=0)})"
            )

    @property
    def n_windows(self) -> int:
        """Number of windows in the set."""
        return len(self._offsets)

    @property
    def n_tokens(self) -> int:
        """Number of target tokens in the set (``n_windows * block_size``)."""
        return self.n_windows * self.block_size

    def shard(self, rank: int, world: int) -> ValWindows:
        """This rank's share of the windows (every world-th, from rank): the shares of all ranks
        are disjoint and together are the whole set, so summed losses match one process."""
        part = copy.copy(self)
        part._which, part._offsets = self._which[rank::world], self._offsets[rank::world]
        return part

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` int64 tensors over all windows in order; the last may be smaller."""
        B = _check_positive("batch_size", batch_size)
        for i in range(0, self.n_windows, B):
            which, offsets = self._which[i : i + B], self._offsets[i : i + B]
            yield _gather(self.shards, self._layout, which, offsets, self.block_size)


class ShardCutter:
    """A token stream cut into shards: the first ``val_tokens`` tokens, then ``shard_tokens``
    each, without regard to document boundaries; both shard writers (write_token_shards and
    `fitgpt prepare`'s pipeline) cut with it, so they write the same bytes.

    Tokens are copied into the buffer of the shard being filled (allocated when its first token
    comes, so at most one shard is held); :meth:`cut` hands the buffer over and starts the next.
    """

    def __init__(self, val_tokens: int, shard_tokens: int, index: int = 0) -> None:
        self.val_tokens, self.shard_tokens = val_tokens, shard_tokens
        self.index = index  # of the shard being filled
        self.filled = 0
        self._buf: np.ndarray | None = None

    @property
    def capacity(self) -> int:
        """Tokens of the shard being filled."""
        return self.val_tokens if self.index == 0 else self.shard_tokens

    @property
    def full(self) -> bool:
        return self.filled == self.capacity

    def put(self, tokens: np.ndarray) -> int:
        """Copy as many of ``tokens`` as the shard has room for; how many that was."""
        if self._buf is None:
            self._buf = np.empty(self.capacity, dtype=_TOKEN)
        take = min(tokens.size, self.capacity - self.filled)
        self._buf[self.filled : self.filled + take] = tokens[:take]
        self.filled += take
        return take

    def cut(self) -> np.ndarray:
        """The tokens of the shard filled so far; the next shard starts empty."""
        tokens = self._buf[: self.filled] if self._buf is not None else np.zeros(0, dtype=_TOKEN)
        self._buf, self.filled, self.index = None, 0, self.index + 1
        return tokens


def write_token_shards(docs: Iterable[list[int] | np.ndarray], out_dir: str | os.PathLike[str], name: str, *,
                       val_tokens: int, shard_tokens: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write tokenized documents as llm.c shards plus ``manifest.json``; return the manifest.

    EOT (50256) goes *before* every document. The token stream is cut without regard to
    document boundaries: the first ``val_tokens`` tokens form ``NAME_val_000000.bin``, the rest
    ``NAME_train_000001.bin``, ``NAME_train_000002.bin``, ... of at most ``shard_tokens`` each.
    At most one shard is buffered in memory. ``extra`` keys are added to the manifest. (`fitgpt
    prepare` writes the same shards, resumably, from text: fitgpt.data.prepare.pipeline.)

    Raises:
        DataError: ``out_dir`` already holds ``NAME`` shards, a token id does not fit in uint16,
            or the corpus has no tokens left for training (files of this call are removed).
    """
    _check_positive("val_tokens", val_tokens)
    _check_positive("shard_tokens", shard_tokens)
    out = _new_shard_folder(out_dir, name)
    entries: list[dict[str, Any]] = []
    written: list[Path] = []

    def write(tokens: np.ndarray) -> None:
        path = shard_path(out, name, len(entries))
        written.append(path)
        sha256 = write_shard(path, tokens)
        entries.append({"file": path.name, "split": shard_split(len(entries)), "tokens": int(tokens.size),
                        "sha256": sha256})

    try:
        n_docs = _cut_documents(docs, ShardCutter(val_tokens, shard_tokens), write)
        if len(entries) < 2:
            raise DataError(f"corpus for {name} holds {sum(e['tokens'] for e in entries)} tokens (with EOTs), not "
                            f"more than val_tokens={val_tokens}: nothing is left for training")
        manifest: dict[str, Any] = {
            **manifest_header(name), "tokenizer": "gpt2", "eot": EOT, "shards": entries,
            "total_tokens": sum(e["tokens"] for e in entries), "val_tokens": entries[0]["tokens"],
            "train_tokens": sum(e["tokens"] for e in entries[1:]), "documents": n_docs,
        }
        manifest.update(extra or {})
        write_json(out / MANIFEST, manifest)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return manifest


def _new_shard_folder(out_dir: str | os.PathLike[str], name: str) -> Path:
    """``out_dir``, created if needed; refused when ``name`` is not a plain prefix or the folder
    already holds shards of that name (write_token_shards does not resume)."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"shard name {name!r} must be a plain, non-hidden file name prefix")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{name}_*.bin"))
    if existing:
        raise DataError(f"{out} already holds {name} shards (e.g. {existing[0].name}); "
                        "remove them or choose an empty folder")
    return out


def _cut_documents(docs: Iterable[list[int] | np.ndarray], cutter: ShardCutter,
                   write: Callable[[np.ndarray], None]) -> int:
    """Feed EOT + each document to ``cutter``, ``write`` every shard it cuts (the last one
    shorter); the number of documents."""
    eot = np.array([EOT], dtype=_TOKEN)
    n_docs = 0
    for doc in docs:
        n_docs += 1
        arr = np.concatenate((eot, _as_tokens(doc, f"document {n_docs}")))
        while arr.size:
            arr = arr[cutter.put(arr):]
            if cutter.full:
                write(cutter.cut())
    if cutter.filled:
        write(cutter.cut())
    return n_docs
