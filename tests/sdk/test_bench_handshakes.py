"""bench/handshakes.py keeps working: a short run of both modes completes handshakes and
stops cleanly (it raises on an unclean stop). Correctness only, never speed."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.conftest import PYTHON, ROOT

pytestmark = pytest.mark.root


def test_bench_handshakes_runs() -> None:
    out = subprocess.run(
        [PYTHON, str(ROOT / "bench" / "handshakes.py"), "--seconds", "0.5", "--rounds", "1",
         "--parallel", "1", "--json"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for mode in ("direct", "steerd"):
        assert result["runs"][mode][0]["ok"] > 0, result
        assert result["failed"][mode] == 0, result
    assert result["daemon_cpu_ms"] > 0  # the steerd runs really went through the daemon
