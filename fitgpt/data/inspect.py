"""`fitgpt data inspect DIR`: what a folder of token shards holds, and whether it is intact.

Prints each shard's tokens, documents (end-of-text tokens) and size, the manifest's checks (size
always, sha256 with ``--verify``), document-length statistics taken from the EOT positions, and a
decoded sample from the start of the validation data.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from fitgpt.console import say

_INDEX = re.compile(r"_(\d+)\.bin$")


def _order(path: Path) -> tuple[int, str]:
    """Stream order of a shard: by the number in its name (val_000000 comes first); llm.c's
    unnumbered NAME_val.bin before NAME_train.bin (its scripts take val from the start)."""
    m = _INDEX.search(path.name)
    if m:
        return int(m.group(1)), path.name
    return (0 if path.name.endswith("_val.bin") else 1), path.name


def eot_positions(shards: list[Path]) -> tuple[list[np.ndarray], int]:
    """Positions of the EOT tokens of each shard in the stream of ``shards`` (in order), and
    the stream's length."""
    from fitgpt.data.shards import read_shard
    from fitgpt.data.tokenizer import EOT

    positions: list[np.ndarray] = []
    offset = 0
    for shard in shards:
        tokens = read_shard(shard)
        positions.append(np.flatnonzero(tokens == EOT) + offset)
        offset += len(tokens)
        del tokens
    return positions, offset


def doc_lengths(positions: list[np.ndarray], total: int) -> np.ndarray:
    """Tokens of each document, excluding its EOT: from one EOT to the next (which may lie in a
    later shard). Tokens before the first EOT do not count as a document."""
    eots = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
    return np.diff(np.append(eots, total)) - 1


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """count, mean, median, p90 and max of document lengths (tokens)."""
    if lengths.size == 0:
        return {"count": 0}
    return {
        "count": int(lengths.size),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p90": float(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
    }


def inspect_dir(data_dir: str | Path, verify: bool = False, sample: int = 64) -> dict[str, Any]:
    """Print the report for ``data_dir`` and return it as a dict (``problems`` lists failures).

    Raises:
        DataError: no shards, or an unreadable shard (naming the file).
    """
    from fitgpt.data.manifest import MANIFEST, read_manifest
    from fitgpt.data.shards import find_splits, shard_length

    root = Path(data_dir)
    train, val = find_splits(root)
    shards = sorted(set(train) | set(val), key=_order)
    manifest = read_manifest(root / MANIFEST, f"re-run the `fitgpt prepare` command that wrote {root}, or remove "
                             f"{MANIFEST} to check the shards against their headers only")
    say(f"data dir {root}")
    _describe_manifest(manifest)
    positions, total = eot_positions(shards)
    eot_counts = [len(p) for p in positions]
    problems: list[str] = []
    rows = _shard_table(shards, set(val), eot_counts, manifest, verify, problems)
    n_val = sum(r["tokens"] for r in rows if r["split"] == "val")
    n_all = sum(r["tokens"] for r in rows)
    say(f"total: {len(rows)} shards, {n_all:,} tokens (val {n_val:,}, train {n_all - n_val:,}), "
        f"{sum(eot_counts):,} documents")
    if manifest is not None:
        if manifest.get("status") != "complete":
            problems.append("the preparation is not complete (re-run its command to resume)")
        how = "sha256 verified" if verify else "sizes checked (add --verify to check sha256)"
        say(f"checks: {how}: {'all ok' if not problems else '; '.join(problems)}")
    stats = length_stats(doc_lengths(positions, total))
    if stats["count"]:
        say(f"document lengths (tokens, from EOT positions): count {stats['count']:,}, mean {stats['mean']:.1f}, "
            f"median {stats['median']:,.0f}, p90 {stats['p90']:,.0f}, max {stats['max']:,}")
    text = _sample(val, sample)
    if text is not None:
        say(f"sample: the first {min(sample, shard_length(val[0]))} tokens of {val[0].name}, decoded:")
        say(text)
    return {"shards": rows, "stats": stats, "problems": problems, "sample": text}


def _describe_manifest(manifest: dict[str, Any] | None) -> None:
    """A line saying where the shards came from (or that there is no manifest to check)."""
    if manifest is None:
        say("no manifest.json: sizes are checked against the shard headers only")
        return
    src = manifest.get("source", {})
    where = src.get("dataset") or ", ".join(f["path"] for f in src.get("files", [])[:3]) or src.get("kind")
    subset = f" ({src['subset']})" if src.get("subset") else ""
    tok = manifest.get("tokenizer", {})
    say(f"manifest: {manifest.get('status', '?')} | source {src.get('kind', '?')}: {where}{subset} | "
        f"tokenizer {tok.get('name', '?')} (vocab sha256 {str(tok.get('vocab_sha256', '?'))[:16]}...)")


def _shard_table(shards: list[Path], val: set[Path], eot_counts: list[int], manifest: dict[str, Any] | None,
                 verify: bool, problems: list[str]) -> list[dict[str, Any]]:
    """Print a row per shard (and per listed shard that is missing), adding failed checks to
    ``problems``; the rows of the shards found."""
    from fitgpt.data.shards import shard_length

    listed = {e["file"]: e for e in (manifest or {}).get("shards", [])}
    rows: list[dict[str, Any]] = []
    say(f"{'shard':<32} {'split':<5} {'tokens':>14} {'documents':>11} {'bytes':>15}  check")
    for shard, docs in zip(shards, eot_counts):
        ntok = shard_length(shard)
        size = shard.stat().st_size
        split = "val" if shard in val else "train"
        check = "header ok" if manifest is None else _check(shard, size, listed.get(shard.name), verify, problems)
        rows.append({"file": shard.name, "split": split, "tokens": ntok, "documents": docs, "check": check})
        say(f"{shard.name:<32} {split:<5} {ntok:>14,} {docs:>11,} {size:>15,}  {check}")
    for name in sorted(set(listed) - {s.name for s in shards}):
        problems.append(f"{name} is listed in the manifest but missing")
        say(f"{name:<32} {listed[name]['split']:<5} {'':>14} {'':>11} {'':>15}  MISSING")
    return rows


def _check(shard: Path, size: int, entry: dict[str, Any] | None, verify: bool, problems: list[str]) -> str:
    """A shard against its manifest entry: what the table's check column says."""
    from fitgpt.data.shards import shard_bytes
    from fitgpt.fileio import file_sha256

    if entry is None:
        problems.append(f"{shard.name} is not listed in the manifest")
        return "NOT IN MANIFEST"
    if size != shard_bytes(int(entry["tokens"])):
        problems.append(f"{shard.name}: size differs from the manifest")
        return f"SIZE MISMATCH (manifest: {entry['tokens']:,} tokens)"
    if not verify:
        return "size ok"
    if file_sha256(shard) != entry["sha256"]:
        problems.append(f"{shard.name}: sha256 differs from the manifest")
        return "SHA256 MISMATCH"
    return "sha256 ok"


def _sample(val: list[Path], n: int) -> str | None:
    if n <= 0 or not val:
        return None
    from fitgpt.data.shards import read_shard
    from fitgpt.data.tokenizer import gpt2_encoding

    tokens = np.asarray(read_shard(val[0])[:n]).tolist()
    return gpt2_encoding().decode(tokens, errors="replace")
