"""Tests for fitgpt.data.shards: shard files, split discovery, train batches, val windows, writer."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fitgpt.data.shards import (
    HEADER_BYTES,
    MAGIC,
    TrainBatches,
    ValWindows,
    find_splits,
    read_shard,
    write_shard,
    write_token_shards,
)
from fitgpt.data.tokenizer import EOT
from fitgpt.errors import DataError


def _ramp(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(start, start + n) % 65536).astype(np.uint16)


# ----------------------------------------------------------------------------- shard files


def test_shard_round_trip(tmp_path: Path) -> None:
    """Guards against header/dtype/endianness mistakes: what is written is read back exactly."""
    tokens = np.array([0, 1, 255, 256, 50256, 65535], dtype=np.int64)
    path = tmp_path / "x_train_000001.bin"
    digest = write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * len(tokens)
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert list(header[:3]) == [MAGIC, 1, len(tokens)] and not header[3:].any()
    assert digest == hashlib.sha256(raw).hexdigest()
    got = read_shard(path)
    assert got.dtype == np.uint16 and not got.flags.writeable
    assert got.tolist() == tokens.tolist()
    assert not list(tmp_path.glob(".*.tmp"))


def test_empty_shard_reads_as_empty(tmp_path: Path) -> None:
    """Guards against a crash when memory-mapping a shard that holds zero tokens."""
    write_shard(tmp_path / "e.bin", [])
    assert len(read_shard(tmp_path / "e.bin")) == 0


def test_bad_magic_names_file(tmp_path: Path) -> None:
    """Guards against silently reading a foreign file as tokens."""
    path = tmp_path / "foo_train_000001.bin"
    path.write_bytes(np.full(300, 7, dtype="<i4").tobytes())
    with pytest.raises(DataError, match=r"foo_train_000001\.bin.*bad magic 7.*20240520"):
        read_shard(path)


def test_bad_version_names_file(tmp_path: Path) -> None:
    """Guards against reading a shard of an unknown format version."""
    path = tmp_path / "v.bin"
    write_shard(path, _ramp(10))
    raw = bytearray(path.read_bytes())
    raw[4:8] = np.array([7], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"v\.bin.*version 7"):
        read_shard(path)


def test_truncated_shard_names_file(tmp_path: Path) -> None:
    """Guards against training on a half-downloaded shard (size disagrees with the header)."""
    path = tmp_path / "t.bin"
    write_shard(path, _ramp(1000))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(DataError, match=r"t\.bin.*header says 1000 tokens but file holds 998"):
        read_shard(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=r"t\.bin.*truncated"):
        read_shard(path)


@pytest.mark.parametrize("bad", [65536, -1])
def test_uint16_overflow_refused_and_nothing_written(tmp_path: Path, bad: int) -> None:
    """Guards against ids wrapping around in uint16 and against partial files left on error."""
    path = tmp_path / "o.bin"
    with pytest.raises(DataError, match=str(bad)):
        write_shard(path, [1, 2, bad, 3])
    assert list(tmp_path.iterdir()) == []


def test_nanogpt_headerless_files(tmp_path: Path) -> None:
    """Guards against misreading nanoGPT's headerless train.bin/val.bin (no 1024-byte header)."""
    tokens = _ramp(777, 40000)
    # Starts with the llm.c magic by coincidence (309 << 16 | 42952 == 20240520), wrong size.
    tokens[:2] = [42952, 309]
    tokens.astype("<u2").tofile(tmp_path / "train.bin")
    assert read_shard(tmp_path / "train.bin").tolist() == tokens.tolist()
    (tmp_path / "val.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match=r"val\.bin.*odd size"):
        read_shard(tmp_path / "val.bin")


# ----------------------------------------------------------------------------- find_splits


def test_find_splits_llmc_sorted(tmp_path: Path) -> None:
    """Guards against unsorted shard order and against temporary files counting as shards."""
    for name in ["f_train_000002.bin", "f_train_000001.bin", "f_val_000000.bin"]:
        write_shard(tmp_path / name, _ramp(10))
    (tmp_path / ".f_train_000003.bin.tmp").write_bytes(b"")
    (tmp_path / "train.bin").write_bytes(b"")  # llm.c names take precedence
    train, val = find_splits(tmp_path)
    assert [p.name for p in train] == ["f_train_000001.bin", "f_train_000002.bin"]
    assert [p.name for p in val] == ["f_val_000000.bin"]


def test_find_splits_nanogpt(tmp_path: Path) -> None:
    """Guards against not recognising nanoGPT's train.bin/val.bin layout."""
    _ramp(10).tofile(tmp_path / "train.bin")
    _ramp(10).tofile(tmp_path / "val.bin")
    assert find_splits(tmp_path) == ([tmp_path / "train.bin"], [tmp_path / "val.bin"])


@pytest.mark.parametrize("name", ["tiny_shakespeare", "TinyStories"])
def test_find_splits_llmc_single_file_names(tmp_path: Path, name: str) -> None:
    """Guards against missing llm.c's own data scripts' output (issue 12): tinyshakespeare.py
    and tinystories.py write NAME_train.bin / NAME_val.bin, with the llm.c header."""
    write_shard(tmp_path / f"{name}_train.bin", _ramp(100, 7))
    write_shard(tmp_path / f"{name}_val.bin", _ramp(50))
    train, val = find_splits(tmp_path)
    assert [p.name for p in train] == [f"{name}_train.bin"] and [p.name for p in val] == [f"{name}_val.bin"]
    assert read_shard(train[0]).tolist() == _ramp(100, 7).tolist()


def test_llmc_named_file_without_header_says_so(tmp_path: Path) -> None:
    """Guards against a headerless file named like llm.c's (older llm.c scripts wrote raw
    uint16) being read as tokens or refused with a bare 'bad magic': the message says that the
    header is missing and how to read the file as nanoGPT's headerless format."""
    _ramp(3000).astype("<u2").tofile(tmp_path / "tiny_shakespeare_train.bin")
    write_shard(tmp_path / "tiny_shakespeare_val.bin", _ramp(50))
    train, _ = find_splits(tmp_path)
    with pytest.raises(DataError, match=r"tiny_shakespeare_train\.bin: no llm\.c header .*train\.bin"):
        read_shard(train[0])
    with pytest.raises(DataError, match="no llm.c header"):
        TrainBatches(train, 32, 2, seed=0)


def test_find_splits_errors(tmp_path: Path) -> None:
    """Guards against unhelpful errors for a missing folder or a split without shards."""
    with pytest.raises(DataError, match=r"does not exist.*fitgpt train"):
        find_splits(tmp_path / "nope")
    with pytest.raises(DataError, match="no train shards"):
        find_splits(tmp_path)
    write_shard(tmp_path / "f_train_000001.bin", _ramp(10))
    with pytest.raises(DataError, match="no val shards"):
        find_splits(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    write_shard(other / "f_val_000000.bin", _ramp(10))
    with pytest.raises(DataError, match="no train shards"):
        find_splits(other)


# ----------------------------------------------------------------------------- TrainBatches


@pytest.fixture
def train_shards(tmp_path: Path) -> list[Path]:
    paths = []
    for i, n in enumerate([5000, 3000, 20]):  # the last one is too short for block 32
        paths.append(tmp_path / f"d_train_{i + 1:06d}.bin")
        write_shard(paths[-1], _ramp(n, 10000 * (i + 1)))
    return paths


def _draw(tb: TrainBatches, n: int) -> list[torch.Tensor]:
    return [torch.cat(tb.next_batch(), dim=1) for _ in range(n)]


def test_train_batches_shapes_and_shift(train_shards: list[Path]) -> None:
    """Guards against off-by-one targets and wrong dtype/shape."""
    tb = TrainBatches(train_shards, block_size=32, batch_size=4, seed=0)
    assert len(tb.shards) == 2  # the short shard is skipped
    for _ in range(5):
        x, y = tb.next_batch()
        assert x.shape == y.shape == (4, 32)
        assert x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y - x, torch.ones_like(x))  # ramp data: every target is next token
    tb.batch_size = 7
    assert tb.next_batch()[0].shape == (7, 32)


def test_train_batches_seeded(train_shards: list[Path]) -> None:
    """Guards against unseeded sampling (runs not reproducible) or a seed that is ignored."""
    a = _draw(TrainBatches(train_shards, 32, 8, seed=1), 3)
    b = _draw(TrainBatches(train_shards, 32, 8, seed=1), 3)
    c = _draw(TrainBatches(train_shards, 32, 8, seed=2), 3)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_train_batches_resume_exact(train_shards: list[Path]) -> None:
    """Guards against a resumed run seeing different batches than an uninterrupted one."""
    tb = TrainBatches(train_shards, 32, 8, seed=3)
    _draw(tb, 2)
    buf = io.BytesIO()
    torch.save(tb.state_dict(), buf)
    expected = _draw(tb, 3)
    buf.seek(0)
    fresh = TrainBatches(train_shards, 32, 8, seed=99)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(p, q) for p, q in zip(expected, _draw(fresh, 3), strict=True))
    with pytest.raises(DataError, match="block size"):
        TrainBatches(train_shards, 16, 8, seed=3).load_state_dict(tb.state_dict())


def test_train_batches_proportional_and_block_too_large(train_shards: list[Path]) -> None:
    """Guards against biased shard choice and a crash when no shard fits the block size."""
    tb = TrainBatches(train_shards, 32, 2000, seed=4)
    x, _ = tb.next_batch()
    frac_first = (x[:, 0] < 20000).double().mean().item()  # shard 1 tokens are 10000..14999
    assert abs(frac_first - (5000 - 32) / (5000 - 32 + 3000 - 32)) < 0.05
    with pytest.raises(DataError, match="block size 5000 is too large"):
        TrainBatches(train_shards, 5000, 2, seed=0)


# ----------------------------------------------------------------------------- ValWindows


def test_val_windows_independent_of_batch_size(tmp_path: Path) -> None:
    """Guards against the val set (and so the val loss) changing with the eval batch size."""
    shards = [tmp_path / "v_val_000000.bin", tmp_path / "v_val_000001.bin"]
    write_shard(shards[0], _ramp(16 * 10 + 5))
    write_shard(shards[1], _ramp(16 * 3 + 1, 30000))
    vw = ValWindows(shards, block_size=16, max_windows=None)
    assert vw.n_windows == 13 and vw.n_tokens == 13 * 16
    seen = {}
    for bs in (1, 3, 7):
        batches = list(vw.batches(bs))
        assert [len(x) for x, _ in batches][-1] == (13 % bs or bs)
        seen[bs] = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in batches])
    assert torch.equal(seen[1], seen[3]) and torch.equal(seen[1], seen[7])
    first = seen[1][:10]
    # consecutive windows: stride 16, span 17, from the start of the first shard
    assert torch.equal(first[:, 0], torch.arange(10) * 16)
    assert torch.equal(seen[1][10, 0], torch.tensor(30000))
    assert all(torch.equal(y, x + 1) for x, y in vw.batches(4))


def test_val_windows_max_and_too_small(tmp_path: Path) -> None:
    """Guards against max_windows being ignored and against an empty val set going unnoticed."""
    path = tmp_path / "v_val_000000.bin"
    write_shard(path, _ramp(1000))
    vw = ValWindows([path], block_size=10, max_windows=5)
    assert vw.n_windows == 5 and vw.n_tokens == 50
    assert sum(len(x) for x, _ in vw.batches(2)) == 5
    with pytest.raises(DataError, match="too small for block size 1000"):
        ValWindows([path], block_size=1000, max_windows=None)


# ----------------------------------------------------------------------------- writer


def test_write_token_shards_layout(tmp_path: Path) -> None:
    """Guards against a wrong llm.c layout: EOT placement, val first, shard sizes, manifest."""
    docs = [list(range(1, 8)), np.arange(100, 150), [7] * 30, [9]]  # 7 + 50 + 30 + 1 tokens
    out = tmp_path / "out"
    manifest = write_token_shards(docs, out, "toy", val_tokens=20, shard_tokens=32)
    stream = np.concatenate([np.concatenate(([EOT], np.asarray(d))) for d in docs])
    assert len(stream) == 92
    names = [s["file"] for s in manifest["shards"]]
    assert names == [
        "toy_val_000000.bin",
        "toy_train_000001.bin",
        "toy_train_000002.bin",
        "toy_train_000003.bin",
    ]
    assert [s["tokens"] for s in manifest["shards"]] == [20, 32, 32, 8]
    assert [s["split"] for s in manifest["shards"]] == ["val", "train", "train", "train"]
    got = np.concatenate([read_shard(out / n) for n in names])
    assert got.tolist() == stream.tolist()
    assert manifest["documents"] == 4 and manifest["total_tokens"] == 92
    assert manifest["format"] == "llm.c" and manifest["magic"] == MAGIC
    assert manifest["tokenizer"] == "gpt2"
    for s in manifest["shards"]:
        assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    train, val = find_splits(out)
    assert len(train) == 3 and len(val) == 1
    with pytest.raises(DataError, match="already holds toy shards"):
        write_token_shards(docs, out, "toy", val_tokens=20, shard_tokens=32)


def test_write_token_shards_errors_clean_up(tmp_path: Path) -> None:
    """Guards against half-written corpora when a token id is bad or nothing is left to train."""
    with pytest.raises(DataError, match="70000"):
        write_token_shards([[1] * 30, [70000]], tmp_path, "b", val_tokens=10, shard_tokens=10)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="nothing is left for training"):
        write_token_shards([[1, 2, 3]], tmp_path, "s", val_tokens=10, shard_tokens=10)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- token ids


def _plant_bad_id(shard_dir: Path, at: int = 12_345, bad: int = 300) -> Path:
    """A copy of train shard 2 with one id >= the tiny model's vocabulary (256) at ``at``."""
    tokens = np.asarray(read_shard(shard_dir / "tiny_train_000002.bin")).copy()
    tokens[at] = bad
    path = shard_dir / "tiny_train_000003.bin"
    write_shard(path, tokens)
    return path


def test_bad_token_id_stops_before_step_0(shard_dir: Path, tmp_path: Path) -> None:
    """Guards against issue 13 item 5: an id >= vocab_size in the middle of a train shard was
    found only when a batch sampled it (a random step, and the same one again on resume).
    Every shard's largest id is now checked before anything runs; the line names the shard,
    the position and id, and a vocab_size that a new run accepts."""
    from conftest import tiny_config

    from fitgpt.train.trainer import run

    _plant_bad_id(shard_dir)
    with pytest.raises(DataError, match=r"tiny_train_000003\.bin: token id 300 >= model\.vocab_size 256 at "
                                        r"position 12,345; .*--model\.vocab_size=301"):
        run(tiny_config(shard_dir, tmp_path / "runs", train__max_steps=2))
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert written == []  # stopped before a log, a step or a checkpoint (a run folder's lock aside)
    summary = run(tiny_config(shard_dir, tmp_path / "runs", train__max_steps=1, model__vocab_size=301,
                              memory__track=False))
    assert summary["status"] == "completed"  # the suggested fix is accepted


def test_bad_token_id_on_resume_suggests_a_fix_resume_accepts(shard_dir: Path, tmp_path: Path) -> None:
    """Guards against a resume that fails forever: vocab_size is fixed by the checkpoint, so the
    message on resume says to take the shard out, and resuming after that works."""
    from conftest import tiny_config

    from fitgpt.store.resume import resume_config
    from fitgpt.train.trainer import run

    first = run(tiny_config(shard_dir, tmp_path / "runs", train__max_steps=1, eval__interval=1,
                            memory__track=False))
    bad = _plant_bad_id(shard_dir)
    cfg, ckpt, run_dir = resume_config(first["run_dir"], None, ["--train.max_steps=2"], [])
    with pytest.raises(DataError, match=r"tiny_train_000003\.bin: token id 300 .* 12,345.*move that shard out"):
        run(cfg, ckpt=ckpt, run_dir=run_dir)
    with pytest.raises(Exception, match="different model shape"):  # why the new-run fix is not offered
        resume_config(first["run_dir"], None, ["--model.vocab_size=301"], [])
    bad.rename(tmp_path / bad.name)
    cfg, ckpt, run_dir = resume_config(first["run_dir"], None, ["--train.max_steps=2"], [])
    assert run(cfg, ckpt=ckpt, run_dir=run_dir)["steps"] == 2


def test_largest_id_is_cached(shard_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against re-reading every shard at every start (10B tokens: tens of seconds): the
    largest id comes from the manifest entry `fitgpt prepare` wrote, else from the cache, which
    a rewritten shard invalidates."""
    from fitgpt.data import manifest

    shards = sorted(shard_dir.glob("*.bin"))
    reads: list[str] = []
    import fitgpt.data.shards as data

    original = data.read_shard  # fitgpt.data.manifest reads shards through it
    monkeypatch.setattr(data, "read_shard", lambda p: reads.append(Path(p).name) or original(p))
    first = manifest.max_token_ids(shards)
    assert sorted(reads) == sorted(p.name for p in shards) and max(first.values()) < 256
    reads.clear()
    assert manifest.max_token_ids(shards) == first and reads == []  # cached
    _plant_bad_id(shard_dir, bad=999)
    (shard_dir / "tiny_train_000003.bin").replace(shards[-1])  # same name, new content
    assert manifest.max_token_ids(shards)[shards[-1]] == 999 and reads == [shards[-1].name]
