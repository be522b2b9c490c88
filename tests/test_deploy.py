"""The deployment files are valid as shipped: the systemd unit verifies once rendered, the
example config passes check-config, the unit's commands exist, and deploy/install.sh parses.
(tests/test_wheel.py runs install.sh for real and checks the unit it renders.)"""

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
    # The placeholders deploy/install.sh fills in: the installed command, config and docs.
    assert "ExecStart=@STEERD@ run -c @CONFIG@" in text
    assert "ExecStartPre=@STEERD@ check-config @CONFIG@" in text
    assert "Documentation=file://@DOCDIR@/README.md" in text
    unit = tmp_path / "steerd.service"
    unit.write_text(text.replace("@STEERD@", str(STEERD))
                    .replace("@CONFIG@", str(ROOT / "deploy" / "steerd.toml"))
                    .replace("@DOCDIR@", str(ROOT)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    complaints = [line for line in done.stderr.splitlines() if "steerd.service" in line]
    assert done.returncode == 0 and not complaints, done.stderr


def test_example_config_checks() -> None:
    done = subprocess.run([str(STEERD), "check-config", str(ROOT / "deploy" / "steerd.toml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: ")


def test_install_script_parses_and_explains_itself() -> None:
    script = ROOT / "deploy" / "install.sh"
    assert script.stat().st_mode & 0o111, "deploy/install.sh is not executable"
    assert "set -euo pipefail" in script.read_text()
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--prefix" in done.stdout and "--no-systemd" in done.stdout
    done = subprocess.run([str(script), "--bogus"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage:" in done.stderr
