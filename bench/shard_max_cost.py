"""What checking every shard's largest token id before training costs, per 100M tokens.

`fitgpt train` checks that no shard holds an id >= model.vocab_size before step 0
(fitgpt/data/manifest.py). Reading a shard's largest id means reading the whole shard; this script
writes one shard of --tokens random GPT-2 ids (default 100M, 200 MB) in a temporary folder and
times, best of --repeat:

  * cold: the shard's pages dropped from the page cache first (``posix_fadvise(DONTNEED)``;
    the disk, or on a virtual machine the host's cache, then serves it);
  * warm: the shard in the page cache;
  * cached: `max_token_ids` when the cache folder already holds the answer (a stat and a small
    JSON read), which is what every start after the first pays for shards without a manifest;
  * manifest: `max_token_ids` for a shard that `fitgpt prepare` listed with its ``max_token``.

and extrapolates each to 10B tokens (100 shards of 100M). Prints a markdown table.

    .venv/bin/python bench/shard_max_cost.py [--tokens 100M] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from fitgpt.cli.prepare import parse_count
from fitgpt.data.manifest import MANIFEST, max_token_ids
from fitgpt.data.shards import read_shard, write_shard


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def best(fn, repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=parse_count, default=100_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fitgpt-maxid-"))
    os.environ["FITGPT_CACHE"] = str(work / "cache")
    try:
        plain = work / "plain" / "x_train_000001.bin"
        plain.parent.mkdir()
        ids = np.random.default_rng(0).integers(0, 50257, size=args.tokens, dtype=np.uint16)
        write_shard(plain, ids)
        listed = work / "listed"
        listed.mkdir()
        shutil.copy(plain, listed / plain.name)
        entry = {"file": plain.name, "split": "train", "tokens": args.tokens, "sha256": "-",
                 "max_token": int(ids.max())}
        (listed / MANIFEST).write_text(json.dumps({"shards": [entry]}))
        del ids
        rows = [
            ("cold (read from disk)", best(lambda: read_shard(plain).max(), args.repeat, lambda: evict(plain))),
            ("warm (page cache)", best(lambda: read_shard(plain).max(), args.repeat)),
        ]
        max_token_ids([plain])  # fills the cache
        rows.append(("cached in the fitgpt cache", best(lambda: max_token_ids([plain]), args.repeat)))
        rows.append(("listed in manifest.json", best(lambda: max_token_ids([listed / plain.name]), args.repeat)))
        scale = 1e8 / args.tokens
        print(f"| largest id of a shard ({args.tokens:,} tokens) | seconds per 100M tokens | 10B tokens |")
        print("| --- | --- | --- |")
        for label, seconds in rows:
            print(f"| {label} | {seconds * scale:.4f} | {seconds * scale * 100:.2f} s |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
