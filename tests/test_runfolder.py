"""The run folder: one writer at a time, never another run's folder, never outside out_dir, and
never a write through a symbolic link planted in it. Real processes, real flocks, real links."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from fitgpt.cli.main import main
from fitgpt.config.load import to_toml
from fitgpt.fileio import atomic_write, create_exclusive, open_append, temp_name
from fitgpt.store.checkpoint import load_checkpoint
from fitgpt.store.rundir import LOCK_NAME, claim_new
from fitgpt.train.trainer import run

HOLD = ("import sys; from pathlib import Path; from fitgpt.store.rundir import lock_run_dir; "
        "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()")


def _hold(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder`'s run lock until its stdin is closed."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def _trained(shard_dir, tmp_path, **over) -> Path:
    s = run(tiny_config(shard_dir, tmp_path, train__max_steps=2, eval__interval=2, **over))
    return Path(s["run_dir"])


# ----------------------------------------------------------------------------- one writer

def test_resume_of_a_checkpoint_the_run_has_moved_past_is_refused(shard_dir, tmp_path):
    """A resume reads its checkpoint before it takes the lock: when another run of the folder
    saved a later checkpoint in between, continuing from the older one would train those steps
    again and overwrite the newer files. Here the older checkpoint (step 3) is read, the run
    then holds step 6: the resume is refused, naming both, and nothing is written."""
    from fitgpt.errors import FitError

    cfg = tiny_config(shard_dir, tmp_path)
    cfg.log.keep = 3
    run(cfg)
    run_dir = tmp_path / "run"
    old = load_checkpoint(run_dir / "checkpoints" / "step_00000003.pt")
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    with pytest.raises(FitError, match="moved on to step 6 while this resume was reading its checkpoint of step 3"):
        run(tiny_config(shard_dir, tmp_path), old, run_dir)
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before


def test_resume_while_another_process_trains_the_run_is_refused(shard_dir, tmp_path, capsys):
    """Guards against two `--resume` of one run at once: both exited 0, both saved the same
    step (one's files won) and metrics.jsonl interleaved both. The second now gets one line
    naming the first's process id and exit code 2; the first is undisturbed."""
    run_dir = _trained(shard_dir, tmp_path)
    first = subprocess.Popen([sys.executable, "-m", "fitgpt", "train", "--resume", str(run_dir),
                              "--train.max_steps=100000", "--eval.interval=100000",
                              "--log.progress=false"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = ""
        while "step      4" not in seen and first.poll() is None:  # training, past the lock
            seen += first.stdout.readline()
        assert first.poll() is None, seen
        capsys.readouterr()
        assert main(["train", "--resume", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"in use by process {first.pid}" in err, err
        assert (run_dir / LOCK_NAME).read_text().split()[0] == str(first.pid)
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # one writer: no step twice, no interleaving
    assert load_checkpoint(run_dir)["step"] > 2


def test_fresh_run_never_writes_into_an_existing_run(shard_dir, tmp_path, capsys):
    """Guards against a second fresh run with the same run_name silently overwriting the first
    run's checkpoints: it is refused, and says how to continue that run instead."""
    run_dir = _trained(shard_dir, tmp_path)
    before = _files(run_dir)
    cfg = tiny_config(shard_dir, tmp_path, train__max_steps=2, eval__interval=2)
    path = tmp_path / "again.toml"
    path.write_text(to_toml(cfg))
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already holds a run" in err and f"--resume {run_dir}" in err, err
    assert _files(run_dir) == before


def test_fresh_run_into_a_folder_another_process_holds_is_refused(tmp_path):
    """A new run whose explicit name is locked by a live process is refused naming it."""
    holder = _hold(tmp_path / "taken")
    try:
        with pytest.raises(Exception, match=f"in use by process {holder.pid}"):
            claim_new(tmp_path, "taken", numbered=False)
    finally:
        _release(holder)


def test_auto_named_run_skips_taken_folders(tmp_path):
    """Guards against two runs started in the same second sharing the time-stamped folder
    (mkdir exist_ok): a locked or non-empty candidate is skipped for the next -N."""
    (tmp_path / "tiny-1").mkdir()
    (tmp_path / "tiny-1" / "config.toml").write_text("name = 'tiny'\n")
    holder = _hold(tmp_path / "tiny-1-2")
    try:
        got, lock = claim_new(tmp_path, "tiny-1", numbered=True)
        lock.release()
    finally:
        _release(holder)
    assert got == tmp_path / "tiny-1-3"


# ----------------------------------------------------------------------------- names

@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "", "  ", "a\0b", "x" * 300])
def test_run_name_that_is_not_a_name_is_refused(name, shard_dir, tmp_path, capsys):
    """Guards against --log.run_name=../../x writing outside out_dir (once at the root)."""
    out = tmp_path / "deep" / "er" / "out"
    out.mkdir(parents=True)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(tiny_config(shard_dir, out, train__max_steps=1)))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = main(["train", str(path), f"--log.run_name={name}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "a run name is one folder name" in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_config_name_that_is_a_path_is_refused(shard_dir, tmp_path, capsys):
    """Guards against a config file's `name = "../../../x"` naming the run folder outside
    out_dir (the name is used when no run_name is given)."""
    out = tmp_path / "a" / "b" / "out"
    cfg = tiny_config(shard_dir, out)
    cfg.log.run_name = None
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg).replace('name = "tiny"', 'name = "../../../x"'))
    assert 'name = "../../../x"' in path.read_text()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "name='../../../x'" in err, err
    assert not out.exists() and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- links

def test_planted_links_in_the_run_folder_are_not_written_through(shard_dir, tmp_path, capsys):
    """Guards against a resume writing into files outside the run folder through links planted
    in it: `checkpoints/.step_00000004.pt.tmp` (the old fixed temporary name), config.toml and
    summary.json pointing at files elsewhere. The targets keep their bytes, and the run folder
    ends with regular files of its own."""
    run_dir = _trained(shard_dir, tmp_path / "r")
    outside = tmp_path / "outside"
    outside.mkdir()
    planted = {run_dir / "checkpoints" / ".step_00000004.pt.tmp": outside / "a",
               run_dir / "config.toml": outside / "b", run_dir / "summary.json": outside / "c"}
    for link, target in planted.items():
        target.write_text(f"precious {target.name}\n")
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    assert main(["train", "--resume", str(run_dir), "--train.max_steps=4"]) == 0
    for target in planted.values():
        assert target.read_text() == f"precious {target.name}\n"
    for name in ("config.toml", "summary.json", "checkpoints/step_00000004.pt", "checkpoints/latest"):
        assert not (run_dir / name).is_symlink() and (run_dir / name).is_file(), name
    assert load_checkpoint(run_dir)["step"] == 4
    assert not (run_dir / "checkpoints" / ".step_00000004.pt.tmp").is_symlink()  # stale: removed


@pytest.mark.parametrize("name", ["train.log", "metrics.jsonl"])
def test_appended_file_that_is_a_link_is_refused(name, shard_dir, tmp_path, capsys):
    """Guards against appending log lines into whatever a planted train.log or metrics.jsonl
    link points at. The target keeps its bytes: the append is refused in one line (exit 2), or,
    where the resume first rewrites the file (metrics.jsonl loses the records it will write
    again), the rename replaces the link itself."""
    run_dir = _trained(shard_dir, tmp_path / "r")
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    (run_dir / name).unlink()
    (run_dir / name).symlink_to(target)
    capsys.readouterr()
    rc = main(["train", "--resume", str(run_dir), "--train.max_steps=4"])
    err = capsys.readouterr().err.strip()
    assert target.read_text() == "precious\n"
    if rc == 0:
        assert not (run_dir / name).is_symlink()
    else:
        assert rc == 2 and "\n" not in err and f"{name} is a symbolic link" in err, err


def test_atomic_write_replaces_a_link_and_refuses_one_at_the_temporary_name(tmp_path):
    """rename() replaces a link at the final name by the new file (the target is untouched);
    the temporary file is created with O_EXCL, so a link at its name is an error, not a write."""
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "f").symlink_to(target)
    atomic_write(tmp_path / "f", lambda f: f.write(b"new"))
    assert not (tmp_path / "f").is_symlink() and (tmp_path / "f").read_text() == "new"
    assert target.read_text() == "keep"
    tmp = temp_name(tmp_path / "g")
    tmp.symlink_to(target)
    with pytest.raises(FileExistsError):
        create_exclusive(tmp)
    assert target.read_text() == "keep"
    assert temp_name(tmp_path / "g") != temp_name(tmp_path / "g")  # unique per call
    assert str(os.getpid()) in temp_name(tmp_path / "g").name
    (tmp_path / "log").symlink_to(target)
    with pytest.raises(Exception, match="symbolic link"):
        open_append(tmp_path / "log")
    assert target.read_text() == "keep"


WRITE_JSON_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from fitgpt.report.metrics import write_json
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_json(Path(sys.argv[1]), {"big": "x" * 100000})
except OSError as e:
    print("failed", e.errno)
"""


def test_summary_write_on_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path):
    """Guards against report.write_json's own temporary file (no fsync, a fixed name) staying
    behind half-written when the disk fills: all JSON goes through fitgpt.fileio."""
    path = tmp_path / "summary.json"
    path.write_text('{"old": true}\n')
    proc = subprocess.run([sys.executable, "-c", WRITE_JSON_FULL_DISK, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("failed"), proc.stdout + proc.stderr
    assert path.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
