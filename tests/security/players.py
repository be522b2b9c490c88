"""The intruder as a player of the attacker tests: intruder.py run for real as another uid,
registered over the control socket, driven one JSON command per line.

Shared by tests/security/test_isolation.py (layout mode) and test_learned_isolation.py
(learned mode): one way to start it, ask it, and stop it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import ROOT, Daemon, _read_line
from tests.sdk.harness import kill_group, staged_command

INTRUDER = Path(__file__).with_name("intruder.py")


@dataclass
class Intruder:
    app: str
    proc: subprocess.Popen[str]
    registered: dict[str, Any]
    workdir: Path

    @property
    def slot(self) -> int:
        return int(self.registered["reply"]["workers"][0]["slot"])

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = _read_line(self.proc, 30)
        assert line is not None, "the intruder died"
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, answer
        return answer

    def long(self, to: list[Any], scids: list[bytes] = (),  # type: ignore[assignment]
             count: int = 0, cid_len: int = 8) -> int:
        """Send server Handshake packets with these SCIDs (then ``count`` random ones)."""
        return int(self.ask(op="long", scids=[c.hex() for c in scids], count=count,
                            cid_len=cid_len, to=to)["sent"])

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            kill_group(self.proc.pid)
            self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_intruder(daemon: Daemon, uid: int, app: str, alpn: str,
                   cid_len: int | None = None) -> Intruder:
    """intruder.py as ``uid`` (no supplementary groups) in the server namespace, registered
    (in learned mode with ``cid_len``-byte CIDs if given)."""
    work = Path(tempfile.mkdtemp(prefix="steerd-intruder-"))
    os.chmod(work, 0o755)
    script = work / "intruder.py"
    shutil.copy(INTRUDER, script)
    os.chmod(script, 0o644)
    python, env = staged_command(str(ROOT / "steerd" / "__init__.py"))  # its interpreter
    learned = [] if cid_len is None else [str(cid_len)]
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns_path(daemon.pair.server)}", "setpriv", f"--reuid={uid}",
         f"--regid={uid}", "--clear-groups", python[0], str(script), daemon.control, app, alpn,
         *learned],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
        env={**os.environ, **env}, start_new_session=True,
    )
    line = _read_line(proc, 30)
    if line is None or '"registered"' not in line:
        kill_group(proc.pid)
        proc.wait(5)
        raise AssertionError(f"the intruder did not register: {line!r}")
    return Intruder(app, proc, json.loads(line), work)
