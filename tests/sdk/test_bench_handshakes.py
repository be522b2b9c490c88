"""bench/handshakes.py keeps working: a short run of both modes completes handshakes and
stops cleanly (it raises on an unclean stop). Correctness only, never speed.

How many handshakes a run of --seconds gets in is the machine's business: a run that got too
few to show anything (no handshake in a mode, or too little daemon CPU for the 10 ms clock
ticks it is measured in) is run again, twice as long, until one does; only a failed
handshake, an unclean stop, or nothing shown within DEADLINE s of runs fails the test."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from tests.e2e.conftest import PYTHON, ROOT

pytestmark = [pytest.mark.root, pytest.mark.serial]

DEADLINE = 150.0  # s of bench runs (one takes ~5 s on an idle 2-core machine)


def _run(seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [PYTHON, str(ROOT / "bench" / "handshakes.py"), "--seconds", str(seconds), "--rounds",
         "1", "--parallel", "1", "--json"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_bench_handshakes_runs() -> None:
    started, seconds = time.monotonic(), 0.5
    while True:
        result = _run(seconds)
        print(f"bench/handshakes --seconds {seconds}: "
              + ", ".join(f"{m} {result['runs'][m][0]['ok']} ok" for m in ("direct", "steerd"))
              + f", daemon {result['daemon_cpu_ms']:.3f} ms CPU per handshake")
        for mode in ("direct", "steerd"):
            assert result["failed"][mode] == 0, result  # every handshake begun completed
        # Enough to show something: handshakes in both modes, and daemon CPU measured (the
        # steerd runs really went through the daemon).
        if (all(result["runs"][m][0]["ok"] > 0 for m in ("direct", "steerd"))
                and result["daemon_cpu_ms"] > 0):
            return
        assert time.monotonic() - started < DEADLINE, f"nothing shown in {DEADLINE} s: {result}"
        seconds *= 2
