"""`fitgpt prepare` and `fitgpt data inspect`: exact shard bytes, determinism across worker
counts, resume, every input format, faults, inspection, and training on the result."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fitgpt.cli.data import cmd_data
from fitgpt.cli.main import main
from fitgpt.cli.prepare import cmd_prepare, parse_count
from fitgpt.data.prepare import pipeline
from fitgpt.data.prepare.job import Progress
from fitgpt.data.shards import HEADER_BYTES, MAGIC, find_splits, read_shard, write_token_shards
from fitgpt.data.tokenizer import EOT, gpt2_encoding
from fitgpt.errors import DataError

WORDS = ("the quick brown fox jumps over a lazy dog and then some words follow here with "
         "café naïve 東京 🙂 numbers 1234 5678 punctuation ; : ! ? <|endoftext|> tabs\tand\nlines").split(" ")


def make_docs(n: int, seed: int = 0) -> list[str]:
    """n documents of 5..60 words, with non-ASCII text and a literal '<|endoftext|>' string."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def expected_stream(docs: list[str]) -> np.ndarray:
    """EOT + tokens of doc 1 + EOT + tokens of doc 2 ..., straight from tiktoken."""
    enc = gpt2_encoding()
    out: list[int] = []
    for d in docs:
        if d.strip():
            out += [EOT, *enc.encode_ordinary(d)]
    return np.array(out, dtype=np.int64)


def read_stream(out: Path) -> np.ndarray:
    train, val = find_splits(out)
    return np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in val + train])


def write_fineweb_parquet(path: Path, docs: list[str], row_group_size: int = 7) -> None:
    """A parquet file in FineWeb's schema (all nine columns), small row groups."""
    n = len(docs)
    table = pa.table({
        "text": pa.array(docs, pa.string()),
        "id": pa.array([f"<urn:uuid:{i:08d}>" for i in range(n)], pa.string()),
        "dump": pa.array(["CC-MAIN-2024-10"] * n, pa.string()),
        "url": pa.array([f"https://example.com/{i}" for i in range(n)], pa.string()),
        "date": pa.array(["2024-02-21T00:00:00Z"] * n, pa.string()),
        "file_path": pa.array(["s3://commoncrawl/x.warc.gz"] * n, pa.string()),
        "language": pa.array(["en"] * n, pa.string()),
        "language_score": pa.array([0.9] * n, pa.float64()),
        "token_count": pa.array([len(d) // 4 for d in docs], pa.int64()),
    })
    pq.write_table(table, path, row_group_size=row_group_size)


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def fineweb_dir(tmp_path: Path) -> tuple[Path, list[str]]:
    """Two FineWeb-schema parquet files of 30 documents each."""
    d = tmp_path / "fw"
    d.mkdir()
    docs = make_docs(60, seed=1)
    write_fineweb_parquet(d / "000_00000.parquet", docs[:30])
    write_fineweb_parquet(d / "001_00000.parquet", docs[30:])
    return d, docs


def test_shards_match_the_llmc_format_byte_for_byte(tmp_path: Path) -> None:
    """Guards against a wrong header, size, token order, EOT placement (must come before each
    document), special-token handling or manifest hash/count."""
    docs = make_docs(25) + ["", "   "]  # blank records hold no document
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "out"
    assert cmd_prepare(["text", str(src), "--out", str(out), "--val-tokens", "50", "--shard-tokens", "200",
                        "--workers", "1"]) == 0
    expected = expected_stream(docs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["documents"] == 25
    assert manifest["total_tokens"] == expected.size and manifest["val_tokens"] == 50
    names = [e["file"] for e in manifest["shards"]]
    assert names[0] == "text_val_000000.bin" and names[1:3] == ["text_train_000001.bin", "text_train_000002.bin"]
    stream = []
    for i, entry in enumerate(manifest["shards"]):
        raw = (out / entry["file"]).read_bytes()
        header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
        assert header[0] == MAGIC and header[1] == 1 and header[2] == entry["tokens"]
        assert not header[3:].any()
        assert len(raw) == HEADER_BYTES + 2 * entry["tokens"]
        assert entry["tokens"] == (50 if i == 0 else 200) or i == len(names) - 1
        tokens = np.frombuffer(raw[HEADER_BYTES:], dtype="<u2")
        assert entry["documents"] == int((tokens == EOT).sum())
        assert entry["sha256"] == pipeline.file_sha256(out / entry["file"])
        stream.append(tokens)
    assert np.array_equal(np.concatenate(stream), expected)
    assert manifest["tokenizer"]["vocab_sha256"] and manifest["tokenizer"]["eot"] == EOT
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_pipeline_matches_the_old_demo_writer(tmp_path: Path) -> None:
    """Guards the demo refactor: the pipeline writes what data.write_token_shards wrote."""
    docs = make_docs(40, seed=3)
    enc = gpt2_encoding()
    old = write_token_shards([enc.encode_ordinary(d) for d in docs], tmp_path / "a", "x",
                             val_tokens=64, shard_tokens=256)
    from fitgpt.data.prepare.sources import ListSource

    new = pipeline.prepare_shards(ListSource(docs, {"kind": "list"}), tmp_path / "b", "x", val_tokens=64,
                                  shard_tokens=256)
    assert [e["sha256"] for e in new["shards"]] == [e["sha256"] for e in old["shards"]]


def test_worker_count_does_not_change_the_output(
    fineweb_dir: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against out-of-order chunks from the process pool, output that depends on
    --workers, workers that only work when forked (spawn must work too), and a pool that does
    not stop early at --tokens (cut inside a document)."""
    d, docs = fineweb_dir
    outs = []
    for workers, start in ((1, ""), (2, "fork"), (2, "spawn")):
        monkeypatch.setenv("FITGPT_PREPARE_START", start)
        out = tmp_path / f"w{workers}{start}"
        args = ["fineweb", "--parquet", str(d / "*.parquet"), "--out", str(out), "--tokens", "1234",
                "--val-tokens", "100", "--shard-tokens", "300", "--workers", str(workers)]
        assert cmd_prepare(args) == 0
        outs.append(folder_bytes(out))
    assert outs[0] == outs[1] == outs[2]
    stream = read_stream(tmp_path / "w1")
    assert np.array_equal(stream, expected_stream(docs)[:1234])
    manifest = json.loads(outs[0]["manifest.json"])
    assert manifest["source"]["kind"] == "parquet" and manifest["dataset"] == "HuggingFaceFW/fineweb"
    assert manifest["shards"][-1]["end_offset"] > 0  # the last document was cut


def test_interrupted_run_resumes_to_identical_bytes(
    fineweb_dir: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against resume writing different bytes than an uninterrupted run (wrong input
    position, a document cut twice or skipped), re-writing verified shards, or trusting a
    damaged shard."""
    d, _ = fineweb_dir
    def args(out: Path, workers: int) -> list[str]:
        return ["fineweb", "--parquet", str(d), "--out", str(out), "--val-tokens", "150", "--shard-tokens",
                "250", "--workers", str(workers)]
    assert cmd_prepare(args(tmp_path / "full", 1)) == 0
    full = folder_bytes(tmp_path / "full")

    real_write = pipeline.write_shard
    calls: list[str] = []
    def crash_on_third(path, tokens):  # val and train_000001 complete, then the process "dies"
        calls.append(Path(path).name)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_write(path, tokens)
    monkeypatch.setattr(pipeline, "write_shard", crash_on_third)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        cmd_prepare(args(out, 2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "in progress" and len(manifest["shards"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin",
                                                      "manifest.json"]
    calls.clear()
    monkeypatch.setattr(pipeline, "write_shard", lambda p, t: calls.append(Path(p).name) or real_write(p, t))
    assert cmd_prepare(args(out, 1)) == 0
    assert "fineweb_val_000000.bin" not in calls and "fineweb_train_000001.bin" not in calls
    assert folder_bytes(out) == full

    damaged = out / "fineweb_train_000002.bin"  # same size, one token changed: only sha256 sees it
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 1
    damaged.write_bytes(bytes(raw))
    calls.clear()
    assert cmd_prepare(args(out, 1)) == 0
    assert calls[0] == "fineweb_train_000002.bin"
    assert folder_bytes(out) == full
    calls.clear()
    assert cmd_prepare(args(out, 1)) == 0  # complete and verified: nothing to do
    assert calls == []


def _prepare_process(d: Path, out: Path, fault: str = "", **popen) -> subprocess.Popen:
    """`python -m fitgpt prepare` on the FineWeb fixture, 2 workers, small shards."""
    args = ["fineweb", "--parquet", str(d), "--out", str(out), "--val-tokens", "150", "--shard-tokens", "250",
            "--workers", "2"]
    env = {**os.environ, "FITGPT_FAULT": fault}
    return subprocess.Popen([sys.executable, "-m", "fitgpt", "prepare", *args], env=env, text=True, **popen)


def _run_prepare(d: Path, out: Path, fault: str = "") -> subprocess.CompletedProcess:
    proc = _prepare_process(d, out, fault, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_killed_process_resumes_to_identical_bytes(fineweb_dir: tuple[Path, list[str]], tmp_path: Path) -> None:
    """A real SIGKILL of `fitgpt prepare` (2 workers), right after a shard file is written and
    before the manifest lists it: the same command again verifies the listed shards, rewrites
    the unlisted one, and ends with the bytes of an uninterrupted run."""
    d, _ = fineweb_dir
    assert _run_prepare(d, tmp_path / "full").returncode == 0
    out = tmp_path / "killed"
    assert _run_prepare(d, out, "killshard:3").returncode == -9
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 3
    assert (out / "fineweb_train_000003.bin").exists()  # written, not yet in the manifest
    proc = _run_prepare(d, out)
    assert proc.returncode == 0, proc.stderr
    assert "3 shards verified" in proc.stdout + proc.stderr
    assert folder_bytes(out) == folder_bytes(tmp_path / "full")


def test_killed_before_the_first_manifest_resumes(fineweb_dir: tuple[Path, list[str]], tmp_path: Path) -> None:
    """Guards against issue 13 item 2: a SIGKILL after the first shard was renamed, before any
    manifest listed it, left a folder the same command refused ("holds shards but no
    manifest.json") although it had said "re-run to resume". The manifest now exists (with no
    shards) before the first shard does."""
    d, _ = fineweb_dir
    assert _run_prepare(d, tmp_path / "full").returncode == 0
    out = tmp_path / "killed"
    assert _run_prepare(d, out, "killshard:0").returncode == -9
    assert (out / "fineweb_val_000000.bin").exists()
    assert json.loads((out / "manifest.json").read_text())["shards"] == []
    proc = _run_prepare(d, out)
    assert proc.returncode == 0, proc.stderr
    assert folder_bytes(out) == folder_bytes(tmp_path / "full")


def test_kills_at_random_moments_all_resume_to_the_same_bytes(tmp_path: Path) -> None:
    """Guards against any state a kill can leave being unresumable (issue 13 item 2 was one
    such state, hit by 1 kill in 12): `fitgpt prepare` (2 workers, ~40 small shards, each
    written, fsynced, renamed and listed) is SIGKILLed at seeded random moments after it
    created its folder, and the same command then finishes with the bytes of an uninterrupted
    run and no temporary file left. The clock only chooses the moments; nothing is timed."""
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(800, seed=11)))

    def args(out: Path, workers: int) -> list[str]:
        return ["text", str(src), "--out", str(out), "--val-tokens", "300", "--shard-tokens", "1000",
                "--workers", str(workers)]

    begin = time.perf_counter()
    assert cmd_prepare(args(tmp_path / "full", 1)) == 0
    span = time.perf_counter() - begin  # about how long the writing lasts
    full = folder_bytes(tmp_path / "full")
    assert len(full) > 30
    rng = random.Random(20240520)
    for k in range(3):
        out = tmp_path / f"k{k}"
        proc = subprocess.Popen([sys.executable, "-m", "fitgpt", "prepare", *args(out, 2)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not out.exists() and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, span))
        proc.kill()
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, err
        assert cmd_prepare(args(out, 1)) == 0
        assert folder_bytes(out) == full, k


def test_file_size_limit_before_the_first_manifest_is_resumable(tmp_path: Path) -> None:
    """Guards against the same unresumable folder when the disk (here a real file-size limit,
    RLIMIT_FSIZE, with SIGXFSZ ignored so that writes fail with EFBIG) refuses the first
    manifest after the first shard fitted: one line, exit 2, and the same command resumes."""
    resource = pytest.importorskip("resource")
    import signal

    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(30)))
    args = ["text", str(src), "--val-tokens", "20", "--shard-tokens", "150", "--workers", "1"]
    assert cmd_prepare([*args, "--out", str(tmp_path / "full")]) == 0
    limit = HEADER_BYTES + 2 * 20 + 100  # the val shard fits; no manifest does

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fitgpt", "prepare", *args, "--out", str(out)], text=True,
                          capture_output=True, preexec_fn=small_files, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "manifest.json" in proc.stderr and "re-run" in proc.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert cmd_prepare([*args, "--out", str(out)]) == 0
    assert folder_bytes(out) == folder_bytes(tmp_path / "full")


MALFORMED = {  # how the manifest is damaged -> what the one line must say
    "shards-not-a-list": (lambda m: m.update(shards={"a": 1}), "'shards' is an object, not a list"),
    "entry-without-tokens": (lambda m: m["shards"][1].pop("tokens"),
                             "shards[1] (text_train_000001.bin) has no 'tokens'"),
    "tokens-a-string": (lambda m: m["shards"][0].update(tokens="50"), "'tokens' is '50', not a whole number"),
    "entry-not-an-object": (lambda m: m["shards"].append(7), "is a number, not an object"),
    "settings-not-an-object": (lambda m: m.update(settings=[1]), "'settings' is a list, not an object"),
    "not-json": (None, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_gives_one_line_and_exit_2(case: str, tmp_path: Path, capsys) -> None:
    """Guards against issue 13 item 11: a manifest with `shards` not a list, an entry without
    `tokens` or with wrong types gave a KeyError or TypeError traceback in `prepare` (resume)
    and `data inspect`. They (and `train`, which reads each shard's largest id from it) now say
    what is wrong in one line, exit 2, and change nothing."""
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(12)))
    out = tmp_path / "out"
    args = ["prepare", "text", str(src), "--out", str(out), "--val-tokens", "50", "--shard-tokens", "150",
            "--workers", "1"]
    assert main(args) == 0
    path = out / "manifest.json"
    damage, expected = MALFORMED[case]
    if damage is None:
        path.write_text("{oops")
    else:
        manifest = json.loads(path.read_text())
        damage(manifest)
        path.write_text(json.dumps(manifest))
    before = folder_bytes(out)
    capsys.readouterr()
    train = ["train", f"--data.dir={out}", f"--log.out_dir={tmp_path / 'runs'}", "--train.device=cpu"]
    for command in (args, ["data", "inspect", str(out)], train):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith("fitgpt: error:") and "\n" not in err, err
        assert expected in err and str(path) in err, err
    assert folder_bytes(out) == before


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_workers_exit_quietly_when_the_parent_is_killed(start: str, tmp_path: Path) -> None:
    """Guards against orphaned tokenizer workers printing BrokenPipeError tracebacks (and
    living on) after `fitgpt prepare` is SIGKILLed mid-work: they die with their parent. The
    stderr of the whole process group (the workers share it) holds no traceback."""
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(10_000, seed=3)))
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fitgpt", "prepare", "text", str(src), "--out", str(tmp_path / "out"),
             "--val-tokens", "1000", "--shard-tokens", "20000", "--workers", "2"],
            env={**os.environ, "FITGPT_FAULT": "killshard:1", "FITGPT_PREPARE_START": start},
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        assert proc.wait(timeout=120) == -9  # killed with chunks in flight in both workers
    for _ in range(1200):  # the workers are gone too (a hang guard, not a time bound)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("tokenizer workers outlived their parent")
    text = err.read_text()
    assert "Traceback" not in text and "BrokenPipe" not in text, text


def test_folder_is_locked_and_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    """Guards against two preparations writing into one folder at once, and against the
    temporary files of a killed run (unique names, so never overwritten) piling up: a real
    flock held on the folder refuses a second `fitgpt prepare`; once it is released, the next
    run removes the stale shard and manifest temporaries and leaves everything else."""
    import fcntl

    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(30)))
    out = tmp_path / "out"
    out.mkdir()
    args = ["text", str(src), "--out", str(out), "--val-tokens", "50", "--shard-tokens", "150", "--workers", "1"]
    stale = [out / ".4242-abcd1234.text_train_000003.bin.tmp", out / ".4242-beef0000.manifest.json.tmp",
             out / ".text_val_000000.bin.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    keep = out / ".notes.tmp"  # not a file that `fitgpt prepare` writes
    keep.write_text("mine")
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another preparation holds the folder
        with pytest.raises(DataError, match="another `fitgpt prepare` is writing to"):
            cmd_prepare(args)
        assert all(p.exists() for p in stale)
    finally:
        os.close(fd)
    assert cmd_prepare(args) == 0
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    """Guards against silently mixing two preparations (other sizes or inputs) in one folder."""
    src = tmp_path / "a.txt"
    src.write_text("\n".join(make_docs(30)))
    out = tmp_path / "out"
    base = ["text", str(src), "--split-by", "line", "--out", str(out), "--val-tokens", "40", "--workers", "1"]
    assert cmd_prepare(base + ["--shard-tokens", "200"]) == 0
    with pytest.raises(DataError, match="shard_tokens"):
        cmd_prepare(base + ["--shard-tokens", "300"])


def test_text_inputs_in_every_format_and_unit(tmp_path: Path) -> None:
    """Guards against wrong document units: a document per file (text default), per line with
    blank lines skipped, per JSON record with --field, per parquet row, and mixed inputs."""
    docs = make_docs(12, seed=5)
    docs[3:8] = [d.replace("\n", " ") for d in docs[3:8]]  # a document per line: no newline inside
    files = []
    for i in range(3):
        f = tmp_path / f"book{i}.txt"
        f.write_text(docs[i])
        files.append(f)
    cases = {
        "files": ([str(f) for f in files], [], docs[:3]),
        "lines": ([str(tmp_path / "lines.txt")], ["--split-by", "line"], docs[3:8]),
        "jsonl": ([str(tmp_path / "c.jsonl")], ["--field", "content"], docs[8:12]),
        "parquet": ([str(tmp_path / "p.parquet")], [], docs),
    }
    (tmp_path / "lines.txt").write_text("\n\n".join(docs[3:8]).replace("\n", "\r\n") + "\n\n   \n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"content": d}) + "\n\n" for d in docs[8:12]))
    write_fineweb_parquet(tmp_path / "p.parquet", docs)
    for name, (inputs, extra, expected_docs) in cases.items():
        out = tmp_path / f"out-{name}"
        assert cmd_prepare(["text", *inputs, "--out", str(out), "--workers", "1", "--val-tokens", "30", *extra]) == 0
        assert np.array_equal(read_stream(out), expected_stream(expected_docs)), name
        assert json.loads((out / "manifest.json").read_text())["documents"] == len(expected_docs)
    out = tmp_path / "folder"  # a folder of text files: its files in name order, a document each
    assert cmd_prepare(["text", str(tmp_path / "book*.txt"), "--out", str(out), "--val-tokens", "30"]) == 0
    assert np.array_equal(read_stream(out), expected_stream(docs[:3]))


def test_token_ids_beyond_uint16_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against ids >= 65536 being wrapped silently into uint16 shards."""
    import fitgpt.data.prepare.encode as encode

    class Wide:  # a tokenizer with a larger vocabulary
        def __getattr__(self, name):
            return getattr(gpt2_encoding(), name)

        def encode_to_numpy(self, text, **kw):
            return np.array([70000, 1], dtype=np.uint32)

    monkeypatch.setattr(encode, "gpt2_encoding", Wide)
    src = tmp_path / "a.txt"
    src.write_text("hello")
    with pytest.raises(DataError, match="token id 70000 in record 0 does not fit in uint16"):
        cmd_prepare(["text", str(src), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "no-text-column", "not-parquet", "out-under-file",
                                  "tiny", "bad-json"])
def test_input_and_output_faults_give_one_line_and_exit_2(case: str, tmp_path: Path, capsys) -> None:
    """Guards against tracebacks, partial shards or manifests for bad inputs and outputs."""
    out = tmp_path / "out"
    src = tmp_path / "in.txt"
    if case == "empty":
        src.write_text("")
    elif case == "blank":
        src.write_text("\n  \n\n")
    elif case == "tiny":
        src.write_text("just a few words")
    elif case == "no-text-column":
        src = tmp_path / "in.parquet"
        pq.write_table(pa.table({"content": ["a", "b"], "id": ["1", "2"]}), src)
    elif case == "not-parquet":
        src = tmp_path / "in.parquet"
        src.write_text("this is not parquet")
    elif case == "bad-json":  # found by the pool's feeder thread, deep in the input
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(40)) + "{oops\n")
    elif case == "out-under-file":  # tests run as root: a path under a regular file is unwritable
        src.write_text("some text to tokenize")
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    args = ["prepare", "text", str(src), "--out", str(out), "--workers", "2" if case == "bad-json" else "1"]
    if case in ("tiny", "bad-json"):
        args += ["--val-tokens", "100" if case == "tiny" else "100000"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fitgpt: error:") and "\n" not in err
    expect = {"missing": "not found", "empty": "empty", "blank": "no documents", "no-text-column": "no column 'text'",
              "not-parquet": "not a readable parquet", "out-under-file": "cannot create the output folder",
              "tiny": "nothing is left for training", "bad-json": "in.jsonl:41: not a JSON line"}[case]
    assert expect in err
    if out.exists():
        assert list(out.iterdir()) == []


@pytest.mark.parametrize("fail_at", [0, 2])
def test_full_disk_leaves_no_partial_shard_and_manifest_unchanged(
    fail_at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Guards against a half-written shard under its final name, or a manifest that lists a
    shard that was not written, when the disk fills up (ENOSPC at fsync). Before the first
    shard the folder is left as it was found (empty); later the manifest is unchanged."""
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(30)))
    out = tmp_path / "out"
    real_fsync = os.fsync
    seen: list[str] = []
    before: dict[str, bytes] = {}

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith(".bin.tmp"):
            seen.append(name)
            if len(seen) == fail_at + 1:
                before.update(folder_bytes(out))
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    args = ["prepare", "text", str(src), "--out", str(out), "--val-tokens", "50", "--shard-tokens", "150",
            "--workers", "1"]
    assert main(args) == 2
    assert "disk full" in capsys.readouterr().err
    after = folder_bytes(out)
    kept = {k: v for k, v in before.items() if not k.endswith(".tmp")} if fail_at else {}
    assert after == kept
    assert not any(k.startswith(".") for k in after)  # the temporary file is gone
    assert len([k for k in after if k.endswith(".bin")]) == fail_at
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(args) == 0  # space freed: the same command finishes the job


class CountingHub:
    """A local stand-in for the Hugging Face hub that counts the HTTP requests it gets and
    answers each with 503 (the hub is down), so a test can see retries instead of timing them.
    With `silent`, it accepts connections and never answers (bench/fineweb_offline_speed.py)."""

    def __init__(self, silent: bool = False) -> None:
        import socket
        import threading

        self.silent, self.requests, self.held = silent, [], []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            head = b""
            while b"\r\n\r\n" not in head and (part := conn.recv(4096)):
                head += part
            self.requests.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
            if self.silent:
                self.held.append(conn)  # keep it open, say nothing
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self.server.close()


def test_fineweb_without_network_asks_the_hub_once_at_most(tmp_path: Path) -> None:
    """Guards against the ~25 s of retries that `datasets` makes when the hub is out of reach
    (or a traceback): with offline mode set, the hub is not asked at all; with a hub that is
    down (503), the dataset is asked for once (the probe, with no retry, and `datasets` is not
    called), and the line says the hub cannot be reached (it said "check --subset" before);
    with a refused connection, the same one line. Both run the real `datasets` and
    `huggingface_hub`. What this costs in seconds is measured by bench/fineweb_offline_speed.py,
    not bounded here (a loaded machine would make a time bound flaky)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf")
    offline, down = CountingHub(), CountingHub()
    cmd = [sys.executable, "-m", "fitgpt", "prepare", "fineweb", "--out", str(tmp_path / "out")]
    cases = {
        "offline": {"HF_ENDPOINT": offline.url, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        "down": {"HF_ENDPOINT": down.url},
        "refused": {"HF_ENDPOINT": "http://127.0.0.1:9"},
    }
    procs = {name: subprocess.Popen(cmd, env={**env, **extra}, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE) for name, extra in cases.items()}
    try:
        for name, p in procs.items():
            _, err = p.communicate(timeout=300)  # a hang guard only
            assert p.returncode == 2, (name, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "--parquet" in lines[0] and "HuggingFaceFW/fineweb" in lines[0], (name, err)
            assert "cannot reach HuggingFaceFW/fineweb" in lines[0], (name, err)
    finally:
        offline.close()
        down.close()
    assert offline.requests == []
    # huggingface_hub may make a request of its own first; none is repeated (no retry)
    assert "GET /api/datasets/HuggingFaceFW/fineweb HTTP/1.1" in down.requests, down.requests
    assert len(set(down.requests)) == len(down.requests) <= 2, down.requests
    assert not (tmp_path / "out").exists()


def test_fineweb_without_datasets_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against a raw ImportError when the optional `datasets` package is missing."""
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install datasets.*--parquet"):
        cmd_prepare(["fineweb", "--out", str(tmp_path / "out")])


class FakeStream:
    """Stands in for a streamed `datasets.IterableDataset` of FineWeb rows."""

    def __init__(self, docs: list[str], fail_at: int | None = None) -> None:
        self.docs, self.fail_at = docs, fail_at

    def __iter__(self):
        for i, d in enumerate(self.docs):
            if i == self.fail_at:
                raise ConnectionError("connection reset by peer")
            yield {"text": d, "id": str(i)}

    def skip(self, n: int) -> FakeStream:
        return FakeStream(self.docs[n:], None if self.fail_at is None else self.fail_at - n)


def test_fineweb_streaming_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the streaming path without network (a stand-in for `datasets`): the call made,
    --tokens, resume through skip(), and one-line errors for a bad subset, no network, and a
    connection lost while streaming."""
    docs = make_docs(40, seed=4)
    calls: list[tuple] = []
    behaviour: dict = {"stream": FakeStream(docs)}

    def load_dataset(repo, name=None, split=None, streaming=False):
        calls.append((repo, name, split, streaming))
        if "error" in behaviour:
            raise behaviour["error"]
        return behaviour["stream"]

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no probe request to the hub
    monkeypatch.setattr(pipeline, "_CHUNK_RECORDS", 4)  # small chunks: shards get written before a failure
    def args(out: Path) -> list[str]:
        return ["fineweb", "--dataset", "fineweb-edu", "--tokens", "900", "--val-tokens", "100", "--shard-tokens",
                "150", "--workers", "1", "--out", str(out)]
    assert cmd_prepare(args(tmp_path / "full")) == 0
    assert calls[0] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
    assert np.array_equal(read_stream(tmp_path / "full"), expected_stream(docs)[:900])
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["source"] == {"kind": "huggingface", "dataset": "HuggingFaceFW/fineweb-edu",
                                  "subset": "sample-10BT", "split": "train"}
    behaviour["stream"] = FakeStream(docs, fail_at=12)  # the connection drops mid-way
    with pytest.raises(DataError, match="streaming HuggingFaceFW/fineweb-edu failed.*re-run the same command"):
        cmd_prepare(args(tmp_path / "resumed"))
    assert len(json.loads((tmp_path / "resumed" / "manifest.json").read_text())["shards"]) >= 2
    behaviour["stream"] = FakeStream(docs)
    assert cmd_prepare(args(tmp_path / "resumed")) == 0
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "full")
    behaviour["error"] = ValueError("BuilderConfig 'sample-1XT' not found")
    with pytest.raises(DataError, match="cannot open .*check --dataset and --subset"):
        cmd_prepare(args(tmp_path / "x"))
    behaviour["error"] = ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub")
    with pytest.raises(DataError, match="cannot reach .*--parquet"):
        cmd_prepare(args(tmp_path / "x"))


def test_data_inspect_reports_counts_checks_stats_and_text(tmp_path: Path, capsys) -> None:
    """Guards against an inspect that misses corruption, miscounts documents, or cannot decode."""
    docs = ["In the beginning God created the heaven and the earth."] + make_docs(20, seed=9)
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    assert main(["prepare", "text", str(src), "--out", str(out), "--val-tokens", "60", "--shard-tokens",
                 "200", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--verify", "--sample", "8"]) == 0
    text = capsys.readouterr().out
    lengths = [len(gpt2_encoding().encode_ordinary(d)) for d in docs]
    assert "text_val_000000.bin" in text and "sha256 ok" in text and "all ok" in text
    assert f"{len(docs)} documents" in text
    assert f"count {len(docs)}, mean {np.mean(lengths):.1f}" in text and f"max {max(lengths)}" in text
    assert "<|endoftext|>In the beginning God created the heaven" in text
    shard = out / "text_train_000001.bin"
    raw = bytearray(shard.read_bytes())
    raw[HEADER_BYTES] ^= 1
    shard.write_bytes(bytes(raw))
    assert main(["data", "inspect", str(out)]) == 0  # sizes only: still fine
    assert main(["data", "inspect", str(out), "--verify"]) == 2
    captured = capsys.readouterr()
    assert "SHA256 MISMATCH" in captured.out and "text_train_000001.bin" in captured.err
    with pytest.raises(SystemExit):
        cmd_data(["inspect"])


def test_training_runs_on_prepared_shards(tmp_path: Path, capsys) -> None:
    """Guards against prepared shards that `fitgpt train --data.dir` cannot find or read."""
    src = tmp_path / "a.txt"
    src.write_text("\n".join(make_docs(120, seed=2)))
    out = tmp_path / "data"
    assert main(["prepare", "text", str(src), "--split-by", "line", "--out", str(out), "--val-tokens", "300",
                 "--workers", "1"]) == 0
    args = ["train", f"--data.dir={out}", "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32",
            "--model.block_size=32", "--train.batch_size=2", "--train.grad_accum=1", "--train.max_steps=2",
            "--eval.interval=2", "--eval.tokens=256", "--train.device=cpu", f"--log.out_dir={tmp_path / 'runs'}",
            "--eval.sample_tokens=0"]
    assert main(args) == 0
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert summary["steps"] == 2 and summary["status"] == "completed"


def test_counts_and_progress_lines(capsys) -> None:
    """Guards against misread sizes (1B, 2.5M) and a silent run when stdout is not a terminal."""
    assert [parse_count(s) for s in ("1B", "100M", "2.5M", "10k", "1e9", "1_000")] == [
        10**9, 10**8, 2_500_000, 10_000, 10**9, 1000]
    for bad in ("abc", "0", "1.5"):
        with pytest.raises(Exception, match="count|whole"):
            parse_count(bad)
    p = Progress(total_tokens=1000, total_records=None, tty=False, interval=0)
    p.advance(records=10, documents=10, tokens=500, nbytes=2000)
    p.shard_done({"file": "x_val_000000.bin", "tokens": 500, "documents": 10})
    p.close()
    out = capsys.readouterr().out
    assert "10 docs | 500 tokens" in out and "tok/s" in out and "ETA" in out and "wrote x_val_000000.bin" in out
    bar = Progress(total_tokens=None, total_records=4, tty=True)
    bar.advance(records=2, documents=2, tokens=50, nbytes=100)
    bar.close()
