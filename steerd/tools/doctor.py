"""``steerd doctor``: check, for real, everything the data plane needs on this machine.

Why a command: a missing header tree or an unmounted bpffs otherwise surfaces as a compiler
or syscall error deep in daemon start-up. The doctor names each prerequisite, says whether
it holds and how to fix it, and finally compiles and loads the steering and guard programs
(steer.c, guard.c) into a scratch pin dir (then removes them), which is the only proof that
counts; likewise it attaches the socket jail's cgroup hooks (jail.c) for a throw-away
loopback port and checks that they refuse bind, connect and SO_BINDTODEVICE to a process
they do not list, and attaches the non-unicast filter (unicast.c) and checks that it drops a
loopback broadcast to a wildcard-bound socket and passes unicast. Learned mode's egress program
(learn.c) is not tried here.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

from steerd.daemon.dataplane import Dataplane, DataplaneConfig, DataplaneError
from steerd.daemon.dataplane.jail import check_jail_prerequisites
from steerd.daemon.dataplane.maps import DEFAULT_PIN_DIR
from steerd.daemon.dataplane.programs import Prerequisite, check_prerequisites
from steerd.daemon.dataplane.unicast import check_unicast_prerequisites
from steerd.daemon.sockwatch import protection


def load_check(pin_dir: str) -> Prerequisite:
    """Compile, load and pin the steering and guard programs in a scratch dir next to
    ``pin_dir``."""
    scratch = os.path.join(os.path.dirname(pin_dir.rstrip("/")) or "/",
                           f"steerd-doctor-{uuid.uuid4().hex[:8]}")
    dp = Dataplane(DataplaneConfig(pin_dir=scratch))
    try:
        dp.load()
        counters = dp.counters()
    except DataplaneError as exc:
        return Prerequisite("programs load", False, str(exc).replace("\n", " "),
                            "fix the failures above first")
    finally:
        dp.destroy()
    return Prerequisite(
        "programs load", True,
        f"steer (SK_REUSEPORT) and guard (XDP and TC) compiled, verified and pinned; "
        f"{len(counters)} counters readable; scratch pin dir {scratch} removed",
    )


def protection_check(checks: list[Prerequisite]) -> Prerequisite:
    """Which protection against 32-bit socket calls is in force on this kernel (issue 18):
    no hook here refuses them, so the daemon's socket watchdog (steerd/daemon/sockwatch.py)
    undoes what they change; the "32-bit entry" probe says whether the caller is also
    killed."""
    entry = next((c for c in checks if c.name == "32-bit entry"), None)
    killed = entry is not None and entry.ok and "killed" in entry.detail
    return Prerequisite("protection", True,
                        protection(None, "a raw tracepoint" if killed else None))


def run(args: argparse.Namespace) -> int:
    checks = check_prerequisites(args.pin_dir)
    if not args.no_load:
        if all(c.ok for c in checks):
            checks.append(load_check(args.pin_dir))
        else:
            checks.append(Prerequisite("programs load", False, "not tried",
                                       "fix the failures above first"))
    checks += check_jail_prerequisites(probe=not args.no_load and all(c.ok for c in checks))
    checks += check_unicast_prerequisites(probe=not args.no_load and all(c.ok for c in checks))
    checks.append(protection_check(checks))
    width = max(len(c.name) for c in checks)
    for c in checks:
        line = f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}"
        if not c.ok and c.fix:
            line += f"\n      {'':<{width}}  fix: {c.fix}"
        print(line)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        print(f"steerd doctor: {len(failed)} prerequisite(s) missing: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    print("steerd doctor: all prerequisites hold")
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "doctor", help="check the data-plane prerequisites (root, bcc, headers, bpffs, BPF)"
    )
    parser.add_argument("--pin-dir", default=DEFAULT_PIN_DIR,
                        help=f"bpffs directory the daemon pins into (default {DEFAULT_PIN_DIR})")
    parser.add_argument("--no-load", action="store_true",
                        help="skip compiling and loading the programs")
    parser.set_defaults(func=run)
