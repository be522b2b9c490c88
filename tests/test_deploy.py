"""The deployment files are valid as shipped: the systemd unit verifies, the example config
passes check-config, and the unit's commands exist."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEERD = ROOT / ".venv" / "bin" / "steerd"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: Debian's systemd package provides it")
    text = (ROOT / "deploy" / "steerd.service").read_text()
    assert "@STEERD@ run -c /etc/steerd/steerd.toml" in text
    unit = tmp_path / "steerd.service"
    unit.write_text(text.replace("@STEERD@", str(STEERD)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    complaints = [line for line in done.stderr.splitlines() if "steerd.service" in line]
    assert done.returncode == 0 and not complaints, done.stderr


def test_example_config_checks() -> None:
    done = subprocess.run([str(STEERD), "check-config", str(ROOT / "deploy" / "steerd.toml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: ")
