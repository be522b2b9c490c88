"""Benchmark: what the compile cache (steerd/daemon/dataplane/compiled.py) saves a daemon's
start, side by side in one run.

    .venv/bin/python bench/compile_cache.py [--rounds 5] [--json]

Set-up (root): a Dataplane with its maps in a pin dir of its own and the default config.
Each round loads the steering and guard programs (what ``steerd run`` compiles on every
start, and what every restart compiled again before the cache) twice: once with an empty
cache directory (a compile, the baseline) and once with the entry that compile left (a
load). Reported: wall and CPU time of each, medians over the rounds, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steerd.daemon.dataplane import Dataplane, DataplaneConfig, compiled


def timed(dp: Dataplane) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    dp.load_programs()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(rounds: int) -> dict[str, float]:
    dp = Dataplane(DataplaneConfig(pin_dir=f"/sys/fs/bpf/steerd-bench-{uuid.uuid4().hex[:8]}"))
    dp.open_maps()
    cache = Path(tempfile.mkdtemp(prefix="steerd-bench-cache-"))
    compiled.CACHE_DIR = cache / "bpf"
    cold: list[tuple[float, float]] = []
    warm: list[tuple[float, float]] = []
    try:
        for _ in range(rounds):
            shutil.rmtree(compiled.CACHE_DIR, ignore_errors=True)
            cold.append(timed(dp))
            warm.append(timed(dp))
    finally:
        dp.destroy()
        shutil.rmtree(cache, ignore_errors=True)
    out = {
        "compile_wall_ms": statistics.median(w for w, _ in cold) * 1e3,
        "compile_cpu_ms": statistics.median(c for _, c in cold) * 1e3,
        "cached_wall_ms": statistics.median(w for w, _ in warm) * 1e3,
        "cached_cpu_ms": statistics.median(c for _, c in warm) * 1e3,
    }
    out["wall_ratio"] = out["cached_wall_ms"] / out["compile_wall_ms"]
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    figures = run(args.rounds)
    if args.json:
        print(json.dumps(figures))
        return
    for name, value in figures.items():
        print(f"{name:>18}: {value}")


if __name__ == "__main__":
    main()
