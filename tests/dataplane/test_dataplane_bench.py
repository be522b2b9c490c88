"""bench/datapath must keep working: a very short run, steering checked, numbers present.

Not a performance assertion (CI machines are shared and noisy); run.py's own check() makes
every steering run prove that the classifier got nothing and every worker its share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.serial]

RUN = Path(__file__).resolve().parents[2] / "bench" / "datapath" / "run.py"


def test_bench_datapath_smoke() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed (deploy/setup.sh installs it)")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--rounds", "1", "--stats-rounds", "1", "--seconds", "0.2",
         "--json"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert set(summary["median_pps"]) == {"plain", "null-xdp", "xdp", "steer", "steer+xdp",
                                           "steer+tc", "steer-learned", "steer-learned-peer",
                                           "steer+learner", "steer+unicast"}
    assert all(pps > 0 for pps in summary["median_pps"].values())
    for run in summary["runs"]:
        if run["mode"].startswith("steer"):
            assert run["per_socket"][-1] == 0  # nothing reached the classifier
        # learned mode: every delivered packet was steered by the table the mode exercises
        if run["mode"] == "steer-learned":
            assert run["steer_learned_cid"] >= run["delivered"] > 0
        if run["mode"] == "steer-learned-peer":
            assert run["steer_learned_peer"] >= run["delivered"] > 0
    assert summary["prog_ns_per_packet"]["steer"] > 0
    assert summary["prog_ns_per_packet"]["steer_learned_cid"] > 0
    assert summary["prog_ns_per_packet"]["steer_learned_peer"] > 0
    # the learned-mode egress program ran for the sender's datagrams, and was detached after
    learner = [r for r in summary["stats_runs"] if r["mode"] == "steer+learner"]
    assert learner and all(r["prog_runs"]["learn"] >= r["sent"] for r in learner)
