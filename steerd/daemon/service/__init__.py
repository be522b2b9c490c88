"""The steerd daemon: the data plane, classifier sockets, control socket and metrics, wired.

One reuseport group per listen address (an IPv4 and an IPv6 wildcard are two groups), each
with its own :class:`~steerd.daemon.dataplane.Dataplane` pinned under ``PIN_DIR/g-ADDRESS``
(:func:`group_pin_dir`): the kernel only lets the steering program select sockets of the
group the datagram arrived on, so worker and classifier sockarrays are per group. A worker
slot means the same worker in every group, so a server CID routes the same whichever address
family the client moves to.

The event loop owns everything (registry, assembler): readers on the classifier sockets and on
the control socket, and a tick (every ``_REPORT_INTERVAL``) that ages pending flights out,
pushes registry replicas to the classifier processes and updates the gauges. The daemon never
sees a TLS key or a 1-RTT byte.

Where each part lives: daemon.py (the ``Daemon`` facade and its state), startup.py (start,
stop), programs.py (the programs' compile and attach thread), tick.py (the periodic work),
classifiers.py (the classifier sockets and processes), sink.py (what the control server
calls: worker sockets into the data plane, refusals, registry changes), status.py (status,
metrics sources, watchdog findings), datagrams.py (reading a classifier socket), files.py
(lock, keys, claims file, pin dirs), cli.py (``steerd run`` / ``purge`` / ``status``).
"""

from steerd.daemon.control import IP_PKTINFO
from steerd.daemon.service.classifiers import _PR_SET_PDEATHSIG, retry_config
from steerd.daemon.service.cli import (
    _purge,
    _purge_locked,
    _run,
    _status,
    add_command,
    format_status,
    purge,
)
from steerd.daemon.service.daemon import Daemon
from steerd.daemon.service.datagrams import (
    _ANC_SPACE,
    _BATCH,
    _IN6_PKTINFO,
    _IN_PKTINFO,
    _RECV_BUFFER,
    _local_address,
    receive,
)
from steerd.daemon.service.files import (
    CLAIM_RESERVATION,
    RUN_DIR,
    _check_private,
    _lock_path,
    claims_path,
    group_pin_dir,
    load_claims,
    load_reset_key,
    lock_pin_dir,
    reset_key_path,
    runtime_dir,
    save_claims,
)
from steerd.daemon.service.programs import _CANARY_COUNTER_INDEX, RETRY_PREFIX_SHARE
from steerd.daemon.service.startup import _CANARY_SECRET_INDEX, RESUME_GRACE, _Group
from steerd.daemon.service.status import _OFFENCE_MEMORY
from steerd.daemon.service.tick import _REPORT_INTERVAL, _SWEEP_INTERVAL

__all__ = [
    "CLAIM_RESERVATION",
    "IP_PKTINFO",
    "RESUME_GRACE",
    "RETRY_PREFIX_SHARE",
    "RUN_DIR",
    "_ANC_SPACE",
    "_BATCH",
    "_CANARY_COUNTER_INDEX",
    "_CANARY_SECRET_INDEX",
    "_IN6_PKTINFO",
    "_IN_PKTINFO",
    "_OFFENCE_MEMORY",
    "_PR_SET_PDEATHSIG",
    "_RECV_BUFFER",
    "_REPORT_INTERVAL",
    "_SWEEP_INTERVAL",
    "Daemon",
    "_Group",
    "_check_private",
    "_local_address",
    "_lock_path",
    "_purge",
    "_purge_locked",
    "_run",
    "_status",
    "add_command",
    "claims_path",
    "format_status",
    "group_pin_dir",
    "load_claims",
    "load_reset_key",
    "lock_pin_dir",
    "purge",
    "receive",
    "reset_key_path",
    "retry_config",
    "runtime_dir",
    "save_claims",
]
