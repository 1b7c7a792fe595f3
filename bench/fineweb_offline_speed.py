"""How long `fitgpt prepare fineweb` takes to give up when the Hugging Face hub is out of reach.

The unit test (tests/test_prepare.py::test_fineweb_without_network_asks_the_hub_once_at_most)
checks what makes this fast (no request at all in offline mode, one request and no retry
otherwise); this script measures the seconds, which depend on the machine and its load, so they
are no test's bound. Each case runs the real command in a fresh process, one at a time:

  * offline: ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``;
  * refused: the hub's address refuses connections;
  * down: the hub answers 503 to every request;
  * silent: the hub accepts connections and never answers (the probe's 5 s time-out decides);
  * baseline: ``python -c "import datasets"``, the start-up cost that every case pays.

Prints a markdown table of the best of --repeat runs and the hub requests of each.

    .venv/bin/python bench/fineweb_offline_speed.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_prepare import CountingHub  # noqa: E402  (the tests' local hub, one copy)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return time.perf_counter() - start, proc.returncode, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="fitgpt-offline-")
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    base["HF_HOME"] = os.path.join(work, "hf")
    prepare = [sys.executable, "-m", "fitgpt", "prepare", "fineweb", "--out", os.path.join(work, "out")]
    rows = []
    for case in ("baseline", "offline", "refused", "down", "silent"):
        best, requests, line = float("inf"), 0, ""
        for _ in range(args.repeat):
            hub = CountingHub(silent=case == "silent")
            env = {**base, "HF_ENDPOINT": hub.url}
            cmd = prepare
            if case == "baseline":
                cmd = [sys.executable, "-c", "import datasets, huggingface_hub"]
            elif case == "offline":
                env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
            elif case == "refused":
                env["HF_ENDPOINT"] = "http://127.0.0.1:9"
            seconds, code, line = timed(cmd, env)
            hub.server.close()
            best, requests = min(best, seconds), len(hub.requests)
        rows.append((case, best, requests, line))
    print(f"| case | seconds (best of {args.repeat}) | hub requests | last line of stderr |")
    print("| --- | --- | --- | --- |")
    for case, seconds, requests, line in rows:
        print(f"| {case} | {seconds:.1f} | {requests} | {line[:90]} |")


if __name__ == "__main__":
    main()
