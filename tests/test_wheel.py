"""steerd as installed, not as checked out: deploy/install.sh builds the wheel, installs it
with its PyPI dependencies into a fresh venv (system site packages, for Debian's bcc) under a
temporary prefix, and renders the unit and the docs there. Then every command runs from a
directory outside the checkout, with PYTHONPATH cleared and the checkout itself hidden (a
private mount namespace with an empty tmpfs over it), so nothing can come from there:
``steerd doctor`` compiles the BPF sources shipped as package data, ``steerd run`` loads the
data plane in a network namespace and ``steerd purge`` removes it; the SDK imports and every
module is the venv's. A second install updates in place.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.netns import netns_pair
from deploy.proclines import Lines
from steerd.daemon.dataplane.netns import netns_path, run_in_netns

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "deploy" / "install.sh"
PORT = 4433
METRICS_PORT = 19453


@dataclasses.dataclass(frozen=True)
class Installed:
    top: Path  # everything lives under it; also the working directory of every command
    prefix: Path
    docdir: Path
    config: Path
    bindir: Path
    log: str  # install.sh's stderr

    @property
    def steerd(self) -> str:
        return str(self.prefix / "bin" / "steerd")

    @property
    def python(self) -> str:
        return str(self.prefix / "bin" / "python")


def _env() -> dict[str, str]:
    """The environment without anything that could import the checkout instead."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}


def _hidden(*cmd: str) -> list[str]:
    """``cmd`` in a private mount namespace where the checkout is an empty directory."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount -t tmpfs steerd-hidden "$0" && exec "$@"', str(ROOT), *cmd]


def _run(inst: Installed, *cmd: str, timeout: float = 120,
         hide: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_hidden(*cmd) if hide else list(cmd), capture_output=True, text=True,
                          timeout=timeout, cwd=inst.top, env=_env(), check=False)


def _install(inst: Installed) -> subprocess.CompletedProcess[str]:
    """deploy/install.sh into ``inst``'s directories (it reads the checkout: not hidden)."""
    cmd = [str(INSTALL), "--prefix", str(inst.prefix), "--docdir", str(inst.docdir),
           "--config", str(inst.config), "--bindir", str(inst.bindir), "--no-systemd"]
    return _run(inst, *cmd, timeout=600, hide=False)


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    if os.geteuid() != 0:
        pytest.fail("the install test needs root (install.sh, BPF, network namespaces)")
    top = Path(tempfile.mkdtemp(prefix="steerd-wheel-", dir="/tmp"))
    assert not top.is_relative_to(ROOT)
    inst = Installed(top, top / "opt" / "steerd", top / "doc" / "steerd",
                     top / "etc" / "steerd" / "steerd.toml", top / "bin", "")
    try:
        done = _install(inst)
        assert done.returncode == 0, done.stderr
        yield dataclasses.replace(inst, log=done.stderr)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _module_files(inst: Installed, *modules: str) -> list[str]:
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]: print(importlib.import_module(m).__file__)")
    done = _run(inst, inst.python, "-c", code, *modules)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_wheel_holds_the_packages_and_the_bpf_sources(installed: Installed) -> None:
    assert "creating the venv" in installed.log, installed.log
    (wheel,) = (installed.prefix / "share" / "steerd").glob("steerd-*.whl")
    names = {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
    want = {
        str(p.relative_to(ROOT))
        for pkg in ("steerd", "quic")
        for p in (ROOT / pkg).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
        and (p.suffix == ".py" or p.name == "py.typed")
    } | {  # the top-level bpf/ is mapped into the package (pyproject.toml's package-dir)
        f"steerd/bpf/{p.name}" for p in (ROOT / "bpf").iterdir() if p.suffix in (".c", ".h")
    }
    assert {"steerd/bpf/steer.c", "steerd/bpf/steerd.h", "steerd/py.typed",
            "steerd/daemon/dataplane/__init__.py"} <= want
    assert names == want, (f"missing from the wheel: {sorted(want - names)}; "
                           f"not in the checkout: {sorted(names - want)}")


def test_modules_come_from_the_venv(installed: Installed) -> None:
    site = installed.prefix / "lib"
    files = _module_files(installed, "steerd", "quic", "steerd.cli", "steerd.app.sdk",
                          "steerd.app.client", "steerd.app.asgi", "steerd.daemon.service",
                          "steerd.daemon.dataplane", "steerd.tools.doctor")
    for f in files:
        assert Path(f).is_relative_to(site), f"{f} is not from {site}"
    assert (installed.bindir / "steerd").resolve() == Path(installed.steerd).resolve()


def test_doctor_compiles_the_installed_bpf_sources(installed: Installed) -> None:
    done = _run(installed, installed.steerd, "doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "steerd doctor: all prerequisites hold" in done.stdout
    assert any(line.startswith("ok") and "programs load" in line
               for line in done.stdout.splitlines()), done.stdout


def test_check_config_of_the_installed_example(installed: Installed) -> None:
    for config in (installed.config, installed.docdir / "examples" / "steerd.toml"):
        done = _run(installed, installed.steerd, "check-config", str(config))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("ok: ")
    assert installed.config.read_text() == (ROOT / "deploy" / "steerd.toml").read_text()


def test_run_and_purge_in_a_namespace(installed: Installed) -> None:
    pin_dir = f"/sys/fs/bpf/steerd-t-{uuid.uuid4().hex[:8]}"
    work = installed.top / f"run-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    config = work / "steerd.toml"
    with netns_pair("w") as pair:
        config.write_text(f"""
[listen]
addresses = ["{pair.server_v4}", "{pair.server_v6}"]
port = {PORT}
[xdp]
interfaces = ["{pair.server_if}"]
[control]
path = "{work / 'control.sock'}"
[metrics]
address = "127.0.0.1"
port = {METRICS_PORT}
[[acl]]
uids = [0]
alpn = ["*"]
server_names = ["*"]
""")
        nsenter = ["nsenter", f"--net={netns_path(pair.server)}"]
        with open(work / "daemon.log", "w") as log:
            proc = subprocess.Popen(
                _hidden(*nsenter, installed.steerd, "run", "-v", "-c", str(config),
                        "--pin-dir", pin_dir),
                stdout=subprocess.PIPE, stderr=log, text=True, cwd=installed.top, env=_env(),
            )
        code = None
        try:
            ready = Lines(proc).wait_for(lambda line: line.strip() == "steerd: ready", 60)
            assert ready is not None, f"no 'steerd: ready':\n{(work / 'daemon.log').read_text()}"
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            assert installed.steerd.encode() in cmdline, cmdline
            status = _run(installed, *nsenter, installed.steerd, "status", "--json",
                          "--control", str(work / "control.sock"))
            assert status.returncode == 0, status.stderr
            url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
            metrics = run_in_netns(
                pair.server, lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            assert "steerd_bpf_events_total" in metrics
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            purged = _run(installed, *nsenter, installed.steerd, "purge", "-c", str(config),
                          "--pin-dir", pin_dir)
            left = os.path.exists(pin_dir)
            if left:
                shutil.rmtree(pin_dir, ignore_errors=True)
        assert code == 0, f"daemon exited {code}:\n{(work / 'daemon.log').read_text()}"
        assert purged.returncode == 0, purged.stderr
        assert not left, f"purge left the pin dir {pin_dir}"


def test_rendered_unit_uses_the_installed_command(installed: Installed) -> None:
    unit = installed.prefix / "share" / "steerd" / "steerd.service"
    lines = unit.read_text().splitlines()
    assert f"ExecStart={installed.steerd} run -c {installed.config}" in lines
    assert f"ExecStartPre={installed.steerd} check-config {installed.config}" in lines
    (doc,) = (line for line in lines if line.startswith("Documentation="))
    readme = Path(doc.removeprefix("Documentation=file://"))
    assert readme == installed.docdir / "README.md" and readme.is_file()
    assert (installed.docdir / "docs" / "OPERATIONS.md").is_file()
    assert "@" not in unit.read_text()
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: Debian's systemd package provides it")
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    complaints = [line for line in done.stderr.splitlines() if "steerd.service" in line]
    assert done.returncode == 0 and not complaints, done.stderr


def test_install_again_updates_in_place(installed: Installed) -> None:
    """Last: a second run reuses the venv, keeps an edited config and still works."""
    edited = installed.config.read_text() + "\n# edited by the operator\n"
    installed.config.write_text(edited)
    stamp = installed.prefix / "lib" / "steerd-test-stamp"
    stamp.write_text("")
    done = _install(installed)
    assert done.returncode == 0, done.stderr
    assert "reusing the venv" in done.stderr and "keeping the config" in done.stderr, done.stderr
    assert installed.config.read_text() == edited
    assert stamp.exists(), "the venv was made anew"
    assert len(list((installed.prefix / "share" / "steerd").glob("steerd-*.whl"))) == 1
    done = _run(installed, installed.steerd, "doctor", "--no-load")
    assert done.returncode == 0, done.stdout + done.stderr
