"""Two apps as two unprivileged users on one port, each with a key only it can read.

Issue 5 §2: "each has its own certificate and key, readable only by its own user". The apps
run as uids that exist nowhere else (setpriv, no supplementary groups); the daemon's ACL lets
each claim only its own ALPN. Each generates its key at first run; the test checks owner and
mode, that the other app's user cannot read it, and that both serve through the daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.netns import NetnsPair
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import Daemon, start_daemon
from tests.sdk.harness import (
    FILE_TEXT,
    FILESERVE,
    RunningApp,
    session,
    staged_command,
    start_demo_app,
)

pytestmark = pytest.mark.root

WEB_UID, FILES_UID = 64101, 64102


@pytest.fixture(scope="module")
def daemon(pair: NetnsPair) -> Iterator[Daemon]:
    acl = f"""
[[acl]]
uids = [{WEB_UID}]
alpn = ["h3"]
server_names = ["*"]
[[acl]]
uids = [{FILES_UID}]
alpn = ["smb"]
server_names = ["*"]
"""
    for d in start_daemon(pair, acl):
        # the test's daemon keeps its control socket in a private temp dir: open it to the
        # two test users (a deployment uses [control] group instead)
        os.chmod(d.workdir, 0o711)
        os.chmod(d.control, 0o666)
        yield d


def test_apps_as_their_own_users(daemon: Daemon, pair: NetnsPair) -> None:
    apps: list[RunningApp] = []
    try:
        web = start_demo_app(daemon, "h3", uid=WEB_UID)
        apps.append(web)
        files = start_demo_app(daemon, "file", uid=FILES_UID)
        apps.append(files)
        for app, uid, other in ((web, WEB_UID, FILES_UID), (files, FILES_UID, WEB_UID)):
            key = app.workdir / "cert" / "key.pem"
            st = key.stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, uid, 0o600)
            denied = subprocess.run(
                ["setpriv", f"--reuid={other}", f"--regid={other}", "--clear-groups",
                 "cat", str(key)], capture_output=True, timeout=10)
            assert denied.returncode != 0 and not denied.stdout
            pids = app.pids.values()
            for pid in pids:  # the workers really run as the app's user
                assert os.stat(f"/proc/{pid}").st_uid == uid
        s = session(pair, "h3")
        try:
            info = json.loads(s.get("/count")[1])
            assert info["app"] == "web"
        finally:
            s.close()
        f = session(pair, "smb")
        try:
            assert f.fetch("GET hello.txt") == FILE_TEXT
        finally:
            f.close()
        # the ACL holds: the web user may not claim the file service's ALPN
        refused = start_app_refused(daemon)
        assert "acl_denied" in refused
    finally:
        for app in apps:
            assert app.stop() == 0


def start_app_refused(daemon: Daemon) -> str:
    """The web app's user tries to register the file service: the daemon's ACL refuses it."""
    work = Path(tempfile.mkdtemp(prefix="steerd-sdk-sneaky-"))
    try:
        os.chown(work, WEB_UID, WEB_UID)
        python, env = staged_command(FILESERVE)
        out = subprocess.run(
            ["nsenter", f"--net={netns_path(daemon.pair.server)}", "setpriv",
             f"--reuid={WEB_UID}", f"--regid={WEB_UID}", "--clear-groups", *python,
             "--app", "sneaky", "--root", str(work), "--cert-dir", str(work / "cert"),
             "--control", daemon.control],
            capture_output=True, text=True, timeout=30, cwd="/", env={**os.environ, **env},
        )
    finally:
        shutil.rmtree(work)
    assert out.returncode == 2, out.stderr
    return out.stderr
