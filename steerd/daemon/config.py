"""steerd's configuration: one TOML file, validated up front, with a default for everything.

Why so strict: the daemon runs as root and owns port 443 for every QUIC server on the host, so
a typo (``prot = 443``, ``alpn = "h3"`` instead of a list) must stop it at start-up with a
message naming the file, the section, the key, what was expected and what was found, instead
of silently running with a default. Unknown keys are errors for the same reason. Every error
is a ``ConfigError`` whose text is stable (tests compare it exactly), in the form::

    steerd.toml: [listen] port: must be an integer 1..65535, got "x"

Every setting has an embedded default, so ``Config()`` is a daemon that runs with no file
(listening on 0.0.0.0 and :: port 443, only root may register apps). ``deploy/steerd.toml``
documents every key. ``steerd check-config FILE`` validates a file and prints a summary.
"""

from __future__ import annotations

import argparse
import grp
import ipaddress
import json
import os
import pwd
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from quic.cid import (
    BALANCERS,
    CR_UNROUTABLE,
    MAX_CID_LEN,
    MAX_SLOT_LEN,
    MIN_NONCE_LEN,
    CidLayout,
    balancer_problem,
)
from quic.errors import QuicError
from quic.flight import MIN_INITIAL_DATAGRAM
from quic.reassembly import DEFAULT_CRYPTO_CAP
from steerd.app.protocol import DEFAULT_CONTROL_PATH, SCM_MAX_FD

DEFAULT_CONFIG_PATH = "/etc/steerd/steerd.toml"
# Loopback only by default: the metrics name apps and counts clients, which is nobody else's
# business; an operator who scrapes from another host opts in. 9443 is not a well-known port
# of anything steerd is likely to share a host with.
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
DEFAULT_METRICS_PORT = 9443
# Upper bound of the worker slot pool (the BPF sockarray has one entry per slot).
MAX_WORKER_SLOTS = 65536
RETRY_MODES = ("off", "auto", "always")  # [flood] retry

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_IFNAME = re.compile(r"[^\s/:]{1,15}\Z")
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?\Z")  # POSIX-ish user/group names


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` is the complete, stable message."""


# ---------------------------------------------------------------------------------------------
# Names shared with the registry (register requests are checked with the same rules as the
# config, so an ACL can never name something a request could not claim, and vice versa).


def check_alpn(value: object) -> str:
    """An ALPN protocol ID as the daemon stores it; ValueError says what is wrong.

    ALPN IDs are opaque byte strings of 1..255 bytes (RFC 7301); steerd handles them as
    UTF-8 text because every registered ID is (h3, smb, doq, ...) and JSON carries text.
    """
    if not isinstance(value, str):
        raise ValueError(f"must be a string of 1..255 bytes, got {render(value)}")
    if not 1 <= len(value.encode("utf-8", "surrogatepass")) <= 255:
        raise ValueError(f"must be a string of 1..255 bytes, got {render(value)}")
    return value


def check_server_name(value: object) -> str:
    """A server-name claim normalised to lowercase: ``example.com``, ``*.example.com`` or ``*``.

    ``*`` means every name (and no SNI at all); ``*.suffix`` means every name that ends in
    ``.suffix``, however many labels deep (routing, unlike certificate matching, has no reason
    to stop at one label). Names are compared in lowercase because DNS names are
    case-insensitive and a client may send either case.
    """
    bad = ValueError(
        f'must be a DNS name, "*.suffix" or "*", got {render(value)}'
    )
    if not isinstance(value, str):
        raise bad
    name = value.lower()
    if name == "*":
        return name
    host = name[2:] if name.startswith("*.") else name
    if not host or len(host) > 253 or not all(_LABEL.match(x) for x in host.split(".")):
        raise bad
    return name


def check_app_name(value: object) -> str:
    """An app name: what operators see in status and metrics labels, so keep it tame."""
    if not isinstance(value, str) or not _APP_NAME.match(value):
        raise ValueError(
            "must be 1..64 characters of letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, got {render(value)}"
        )
    return value


def render(value: object) -> str:
    """A value as the user wrote it in TOML/JSON, so messages quote strings and not ints."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


# ---------------------------------------------------------------------------------------------
# The configuration, section by section.


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where the reuseport group lives: one worker socket per address per worker."""

    addresses: tuple[str, ...] = ("0.0.0.0", "::")
    port: int = 443


@dataclass(frozen=True, slots=True)
class XdpConfig:
    """Interfaces that get the XDP guard; none means the guard is off (steering still works)."""

    interfaces: tuple[str, ...] = ()
    # "auto": native XDP where the driver has it, else generic; "tc": the same guard at TC
    # ingress (cheaper on veth and other virtual interfaces, see docs/PERFORMANCE.md)
    mode: str = "auto"


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The control socket: who may connect is decided by the file mode and group."""

    path: str = DEFAULT_CONTROL_PATH
    mode: int = 0o660
    group: str | int | None = None  # a group name or gid; None leaves root's group


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus endpoint (``/metrics``)."""

    enabled: bool = True
    address: str = DEFAULT_METRICS_ADDRESS
    port: int = DEFAULT_METRICS_PORT


@dataclass(frozen=True, slots=True)
class AclRule:
    """Peers matching any of uids/gids/users/groups may claim these ALPNs and server names.

    A claim of ALPN A for server name N (or for all names) needs one rule that matches the
    peer, lists A (or ``*``), and covers N (see ``covers``). Root may claim anything.
    """

    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    alpn: tuple[str, ...] = ()
    server_names: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """What happens when no app owns the offered ALPNs, and whose ALPN preference wins."""

    no_owner: str = "close"  # "close": CONNECTION_CLOSE no_application_protocol; or "default_app"
    default_app: str | None = None
    alpn_preference: str = "client"  # or "server": alpn_order first, then the client's order
    alpn_order: tuple[str, ...] = ()


# What one pending connection must be allowed to buffer: a full-size client Initial datagram
# (quic.flight.MIN_INITIAL_DATAGRAM, RFC 9000 §14.1) plus the CRYPTO bytes the assembler
# accepts per connection (its crypto_cap). quic.flight.AssemblerConfig refuses less.
MIN_PENDING_BYTES = MIN_INITIAL_DATAGRAM + DEFAULT_CRYPTO_CAP  # 17584
MAX_PENDING_BYTES = 2**20


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Bounds on everything a client or an app can make the daemon hold."""

    pending_connections: int = 4096
    # per pending connection: the buffered first-flight datagrams (>= MIN_PENDING_BYTES)
    pending_bytes: int = MIN_PENDING_BYTES
    pending_ttl: float = 2.0  # seconds a first flight may take to complete
    route_ttl: float = 10.0  # seconds an initial_routes entry lives
    # New connections per second the route tables are sized for (first_flight_capacity): a
    # table smaller than rate x route_ttl evicts routes of handshakes still under way.
    first_flight_rate: float = 10000.0
    classifiers: int = 1  # classifier processes (sharded by DCID hash)
    worker_slots: int = 256  # size of the worker slot pool (and of the BPF sockarray)
    workers_per_app: int = 64
    control_connections: int = 64
    # Per tenant (uid other than 0, docs/SECURITY.md §2.6), so that one cannot take every
    # slot or connection from the others: worker slots held by the uid's generations,
    # draining ones included (a file with worker_slots below 64 lowers the default to it);
    # generations one app may have at once (live plus draining); control connections of the
    # uid at once (a file with control_connections below 16 lowers the default to it).
    uid_worker_slots: int = 64
    app_generations: int = 3
    uid_control_connections: int = 16
    control_message_bytes: int = 65536
    control_rate: float = 20.0  # messages per second per control connection, sustained
    control_burst: int = 40
    # Learned mode (servers with their own CIDs, bpf/learn.c): the kernel tables of learned
    # server CIDs and of learned client addresses hold this many each; one worker slot may
    # hold learned_quota of each; an entry unused for learned_ttl seconds expires (longer
    # than the apps' QUIC idle timeout, or idle connections lose their steering).
    learned_capacity: int = 65536
    learned_quota: int = 4096
    learned_ttl: float = 300.0
    # An entry learned from a server's packet is unproven until a client datagram carrying
    # the learned CID arrives (the client's Handshake): it lives learned_unproven_ttl seconds
    # and counts against the slot's learned_unproven_quota (CIDs and addresses apart), not
    # learned_quota, so spoofed Initials that make a server answer cannot fill the tables.
    learned_unproven_ttl: float = 3.0
    learned_unproven_quota: int = 2048
    # Worker slots that may be in learned mode at once (registrations past it are refused):
    # learned_capacity must hold learned_slots x (learned_quota + learned_unproven_quota).
    # Unset: as many as it holds, at most worker_slots (10 with the defaults).
    learned_slots: int = 10


MAX_ROUTE_CAPACITY = 1 << 22


def first_flight_capacity(limits: LimitsConfig) -> int:
    """Entries the first-flight route tables need (``initial_routes`` in the kernel, the
    classifiers' decided-DCID tables): every route lives ``route_ttl``, so at
    ``first_flight_rate`` that many are alive at once; a quarter more for bursts, rounded up
    to a power of two (what the kernel's hash table uses anyway), at least 4096."""
    need = int(limits.first_flight_rate * limits.route_ttl * 1.25)
    return min(MAX_ROUTE_CAPACITY, max(4096, 1 << max(0, need - 1).bit_length()))


@dataclass(frozen=True, slots=True)
class FloodConfig:
    """Defences against floods of spoofed new Initials: the guard's per-source-prefix token
    bucket (in XDP/TC, needs [xdp] interfaces) and the classifier's stateless Retry mode."""

    retry: str = "auto"  # "off", "auto" (under load) or "always"
    retry_pending_fraction: float = 0.25  # auto: pending first flights / pending_connections
    retry_initial_rate: float = 2000.0  # auto: token-less new Initials per second
    retry_hold: float = 5.0  # auto: seconds Retry mode stays on after the load fell
    retry_rate: float = 20000.0  # Retries sent per second at most (all classifiers together)
    retry_burst: int = 2000
    token_lifetime: float = 10.0  # seconds a Retry token is valid
    # seconds an address that presented a valid token skips the guard's Retry mode (0: never)
    retry_proven_ttl: float = 30.0
    # ... for at most this many Initials per second each: a busy address (a NAT, a load
    # generator) past it meets the Retry again, and under a flood from many prefixes the
    # Retry budget is mostly the flood's (docs/RELIABILITY.md §1a)
    retry_proven_rate: float = 1000.0
    guard_rate: float = 0.0  # new Initials per second per source prefix; 0: no bucket
    guard_burst: int = 64
    guard_v4_prefix_len: int = 24
    guard_v6_prefix_len: int = 48
    # all source prefixes together, new Initials and 0-RTT per second; 0: no total cap
    guard_total_rate: float = 0.0
    guard_total_burst: int = 1024


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """Tenant isolation switches (docs/SECURITY.md)."""

    # Hand worker sockets to apps of another uid than the daemon's even when the socket jail
    # (cgroup BPF hooks, bpf/jail.c) cannot be attached. UNSAFE: any such app can then take
    # the whole port from the others (replace the group's steering program, connect() or
    # bind to device its socket, bind new sockets to the port).
    allow_unjailed: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; ``Config()`` is the built-in default."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    xdp: XdpConfig = field(default_factory=XdpConfig)
    cid: CidLayout = field(default_factory=CidLayout)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    acl: tuple[AclRule, ...] = ()
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    flood: FloodConfig = field(default_factory=FloodConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    source: str = "<defaults>"


# ---------------------------------------------------------------------------------------------
# Parsing.

T = TypeVar("T")


class Section:
    """One TOML table being read: typed getters that raise exact, located errors."""

    def __init__(self, source: str, where: str, table: Mapping[str, Any], known: tuple[str, ...]):
        self.source = source
        self.where = where
        self.table = table
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ConfigError(
                f"{source}: {where} {unknown[0]}: unknown key (known: {', '.join(sorted(known))})"
            )

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.where} {key}: {message}")

    def get(self, key: str, default: T, check: Callable[[str, Any], T]) -> T:
        if key not in self.table:
            return default
        return check(key, self.table[key])

    def int_range(self, key: str, default: int, lo: int, hi: int) -> int:
        def check(k: str, v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise self.fail(k, f"must be an integer {lo}..{hi}, got {render(v)}")
            return v

        return self.get(key, default, check)

    def number(
        self, key: str, default: float, lo: float, hi: float, what: str = "seconds"
    ) -> float:
        def check(k: str, v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise self.fail(k, f"must be a number of {what} {lo:g}..{hi:g}, got {render(v)}")
            return float(v)

        return self.get(key, default, check)

    def boolean(self, key: str, default: bool) -> bool:
        def check(k: str, v: Any) -> bool:
            if not isinstance(v, bool):
                raise self.fail(k, f"must be true or false, got {render(v)}")
            return v

        return self.get(key, default, check)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        def check(k: str, v: Any) -> str:
            if v not in choices or not isinstance(v, str):
                options = ", ".join(f'"{c}"' for c in choices)
                raise self.fail(k, f"must be one of {options}, got {render(v)}")
            return v

        return self.get(key, default, check)

    def items(
        self, key: str, default: tuple[T, ...], item: Callable[[Any], T], what: str,
        nonempty: bool = False,
    ) -> tuple[T, ...]:
        """A list of items, each checked by ``item`` (ValueError -> located message)."""

        def check(k: str, v: Any) -> tuple[T, ...]:
            if not isinstance(v, list) or (nonempty and not v):
                kind = "a non-empty list" if nonempty else "a list"
                raise self.fail(k, f"must be {kind} of {what}, got {render(v)}")
            out: list[T] = []
            for x in v:
                try:
                    y = item(x)
                except ValueError as e:
                    raise self.fail(k, f"each item {e}") from None
                if y in out:
                    raise self.fail(k, f"duplicate item {render(x)}")
                out.append(y)
            return tuple(out)

        return self.get(key, default, check)


def parse_ip(value: Any) -> str:
    bad = ValueError(f"must be an IPv4 or IPv6 address, got {render(value)}")
    if not isinstance(value, str):
        raise bad
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise bad from None


def _ifname(value: Any) -> str:
    if not isinstance(value, str) or not _IFNAME.match(value) or value in (".", ".."):
        raise ValueError(f"must be an interface name of 1..15 characters, got {render(value)}")
    return value


def _uid(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32 - 1:
        raise ValueError(f"must be an integer 0..4294967294, got {render(value)}")
    return value


def _posix_name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"must be a user or group name, got {render(value)}")
    return value


def _alpn_or_any(value: Any) -> str:
    return check_alpn(value)  # "*" is a valid ALPN string and means "any" in an ACL rule


def table(source: str, where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {where}: must be a table, got {render(value)}")
    return value


_SECTIONS = ("acl", "cid", "control", "flood", "limits", "listen", "metrics", "policy",
             "security", "xdp")


def parse_config(data: Mapping[str, Any], source: str) -> Config:
    """Validate a parsed TOML document; ``source`` names the file in messages.

    The sections are read in this order, and the first error found is the one reported:
    [cid] before [limits] (the CID's slot bytes bound worker_slots), [listen] before
    [limits] (the addresses multiply workers_per_app), [xdp] before [flood] (the guard)."""
    _check_section_names(data, source)
    listen = _parse_listen(data, source)
    xdp = _parse_xdp(data, source)
    cid = parse_cid(data, source)
    control = _parse_control(data, source)
    metrics = _parse_metrics(data, source)
    acl = _parse_acl(data, source)
    policy = _parse_policy(data, source)
    limits = _parse_limits(data, source, cid, listen)
    flood = _parse_flood(data, source, xdp)
    security = _parse_security(data, source)
    return Config(
        listen=listen, xdp=xdp, cid=cid, control=control, metrics=metrics, acl=acl,
        policy=policy, limits=limits, flood=flood, security=security, source=source,
    )


# The steps of parse_config, one per section, in the order it takes them.


def _check_section_names(data: Mapping[str, Any], source: str) -> None:
    """A misspelt section name would otherwise leave its whole section at the defaults
    without a word."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section [{unknown[0]}] (known: {', '.join(_SECTIONS)})"
        )


def section(
    data: Mapping[str, Any], source: str, name: str, known: tuple[str, ...]
) -> Section:
    """A section may be left out (every key has a default) but, when present, it must be a
    table of known keys: this is where a stray ``listen = 443`` or a typo in a key is
    caught, before any value is read."""
    return Section(source, f"[{name}]", table(source, f"[{name}]", data.get(name, {})), known)


def _parse_listen(data: Mapping[str, Any], source: str) -> ListenConfig:
    """The port and addresses every worker socket and classifier socket is bound to: an
    empty list would leave the daemon serving nothing, so it is refused."""
    s = section(data, source, "listen", ("addresses", "port"))
    d = ListenConfig()
    return ListenConfig(
        addresses=s.items("addresses", d.addresses, parse_ip, "IP addresses", nonempty=True),
        port=s.int_range("port", d.port, 1, 65535),
    )


def _parse_xdp(data: Mapping[str, Any], source: str) -> XdpConfig:
    """The guard's interfaces are only names here (they may not exist yet at check time);
    the mode is one of the attach modes the data plane knows."""
    s = section(data, source, "xdp", ("interfaces", "mode"))
    dx = XdpConfig()
    return XdpConfig(
        interfaces=s.items("interfaces", dx.interfaces, _ifname, "interface names"),
        mode=s.choice("mode", dx.mode, ("auto", "native", "generic", "tc")),
    )


def parse_cid(data: Mapping[str, Any], source: str) -> CidLayout:
    """Every app encodes its server CIDs with this layout, so it is checked as a whole
    here too: a layout past QUIC's CID limit must stop the daemon at start-up, not fail
    each app at its first connection. Likewise a layout the named balancer would misread
    (``balancer``, quic/cid.py) is refused here: behind that balancer every connection would
    lose its host at the client's first address change."""
    s = section(data, source, "cid", ("balancer", "config_id", "host_id", "host_id_len",
                                       "nonce_len", "slot_len"))
    dc = CidLayout()
    balancer = s.choice("balancer", dc.balancer, BALANCERS)
    config_id = s.int_range("config_id", dc.config_id, 0, CR_UNROUTABLE - 1)
    host_id_len = s.int_range("host_id_len", dc.host_id_len, 0, 4)
    slot_len = s.int_range("slot_len", dc.slot_len, 1, MAX_SLOT_LEN)
    nonce_len = s.int_range("nonce_len", dc.nonce_len, MIN_NONCE_LEN, MAX_CID_LEN - 2)
    host_max = 256**host_id_len - 1
    host_id = s.int_range("host_id", dc.host_id, 0, host_max)
    cid_len = 1 + host_id_len + slot_len + nonce_len
    if cid_len > MAX_CID_LEN:
        raise ConfigError(
            f"{source}: [cid]: 1 + host_id_len + slot_len + nonce_len must be at most "
            f"{MAX_CID_LEN}, got {cid_len}"
        )
    problem = balancer_problem(balancer, config_id, host_id_len, cid_len)
    if problem:
        raise s.fail(*problem)
    try:
        return CidLayout(
            config_id=config_id, host_id=host_id, host_id_len=host_id_len,
            slot_len=slot_len, nonce_len=nonce_len, balancer=balancer,
        )
    except QuicError as e:  # the layout's own checks, should they be stricter than ours
        raise ConfigError(f"{source}: [cid]: {e.detail}") from None


def _parse_control(data: Mapping[str, Any], source: str) -> ControlConfig:
    """The socket's path, mode and group decide who may register apps at all, so each
    must be exactly what the operator meant: an octal mode written in decimal, or a path
    longer than a unix socket address holds, is refused rather than mangled."""
    s = section(data, source, "control", ("group", "mode", "path"))
    dk = ControlConfig()

    def abs_path(k: str, v: Any) -> str:
        if not isinstance(v, str) or not v.startswith("/") or "\0" in v or len(v) > 107:
            raise s.fail(k, f"must be an absolute path of at most 107 bytes, got {render(v)}")
        return v

    def group(k: str, v: Any) -> str | int:
        if isinstance(v, int) and not isinstance(v, bool):
            try:
                return _uid(v)
            except ValueError as e:
                raise s.fail(k, str(e)) from None
        try:
            return _posix_name(v)
        except ValueError:
            raise s.fail(k, f"must be a group name or gid, got {render(v)}") from None

    def mode(k: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o777:
            raise s.fail(k, f"must be an integer 0o000..0o777 (write 0o660), got {render(v)}")
        return v

    return ControlConfig(
        path=s.get("path", dk.path, abs_path),
        mode=s.get("mode", dk.mode, mode),
        group=s.get("group", dk.group, group),
    )


def _parse_metrics(data: Mapping[str, Any], source: str) -> MetricsConfig:
    """The metrics name apps and count clients: where they listen is the operator's
    explicit choice, so the address must be a literal IP (no name to resolve)."""
    s = section(data, source, "metrics", ("address", "enabled", "port"))
    dm = MetricsConfig()

    def ip(k: str, v: Any) -> str:
        try:
            return parse_ip(v)
        except ValueError as e:
            raise s.fail(k, str(e)) from None

    return MetricsConfig(
        enabled=s.boolean("enabled", dm.enabled),
        address=s.get("address", dm.address, ip),
        port=s.int_range("port", dm.port, 1, 65535),
    )


def _parse_acl(data: Mapping[str, Any], source: str) -> tuple[AclRule, ...]:
    """The ACL is what stops one user's app from claiming another's names, so a rule must
    say which ALPNs it grants and to whom: a rule that named nobody or granted an
    unstated default would read as a grant while granting nothing, or everything."""
    raw_acl = data.get("acl", [])
    if not isinstance(raw_acl, list):
        raise ConfigError(
            f"{source}: [acl]: must be an array of tables ([[acl]]), got {render(raw_acl)}"
        )
    rules = []
    for n, raw in enumerate(raw_acl, 1):
        where = f"[[acl]] #{n}"
        s = Section(
            source, where, table(source, where, raw),
            ("alpn", "gids", "groups", "server_names", "uids", "users"),
        )
        rule = AclRule(
            uids=s.items("uids", (), _uid, "uids"),
            gids=s.items("gids", (), _uid, "gids"),
            users=s.items("users", (), _posix_name, "user names"),
            groups=s.items("groups", (), _posix_name, "group names"),
            alpn=s.items("alpn", (), _alpn_or_any, "ALPN strings", nonempty=True),
            server_names=s.items(
                "server_names", AclRule().server_names, check_server_name, "server names",
                nonempty=True,
            ),
        )
        if "alpn" not in s.table:
            raise s.fail("alpn", "missing (a list of the ALPNs this rule allows, or [\"*\"])")
        if not (rule.uids or rule.gids or rule.users or rule.groups):
            raise ConfigError(
                f"{source}: {where}: must name at least one of uids, gids, users, groups"
            )
        rules.append(rule)
    return tuple(rules)


def _parse_policy(data: Mapping[str, Any], source: str) -> PolicyConfig:
    """``no_owner`` and ``default_app`` only make sense together: a default app without
    ``no_owner = "default_app"`` would be silently ignored, and the reverse has nowhere to
    send unowned connections."""
    s = section(data, source, "policy", ("alpn_order", "alpn_preference", "default_app",
                                          "no_owner"))
    dp = PolicyConfig()

    def app_name(k: str, v: Any) -> str:
        try:
            return check_app_name(v)
        except ValueError as e:
            raise s.fail(k, str(e)) from None

    policy = PolicyConfig(
        no_owner=s.choice("no_owner", dp.no_owner, ("close", "default_app")),
        default_app=s.get("default_app", dp.default_app, app_name),
        alpn_preference=s.choice("alpn_preference", dp.alpn_preference, ("client", "server")),
        alpn_order=s.items("alpn_order", dp.alpn_order, check_alpn, "ALPN strings"),
    )
    if policy.no_owner == "default_app" and policy.default_app is None:
        raise s.fail("default_app", 'missing: no_owner = "default_app" needs an app name')
    if policy.no_owner == "close" and policy.default_app is not None:
        raise s.fail("default_app", 'is set but no_owner is "close" (set no_owner = "default_app")')
    return policy


# Long on purpose: one field of [limits] after another, each checked as it is read, next to
# the checks that tie fields (and the other sections) together.
def _parse_limits(
    data: Mapping[str, Any], source: str, cid: CidLayout, listen: ListenConfig
) -> LimitsConfig:
    """Every bound on what clients and apps can make the daemon hold; two depend on other
    sections: the slot pool cannot outgrow what the CID's slot bytes can name, and one
    app's sockets (workers x listen addresses) must fit in one control message."""
    s = section(data, source, "limits", tuple(LimitsConfig.__dataclass_fields__))
    dl = LimitsConfig()

    def pending_bytes(k: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not (
            MIN_PENDING_BYTES <= v <= MAX_PENDING_BYTES
        ):
            raise s.fail(
                k,
                f"must be an integer {MIN_PENDING_BYTES}..{MAX_PENDING_BYTES} (one pending "
                f"connection holds at least a {MIN_INITIAL_DATAGRAM}-byte Initial datagram "
                f"and {DEFAULT_CRYPTO_CAP} bytes of CRYPTO data), got {render(v)}",
            )
        return v

    def at_most(key: str, default: int, bound: str, value: int) -> int:
        """A per-uid share of a global limit: 1..the global one (``bound``, already read);
        unset, the default or the global one, whichever is smaller."""
        if key not in s.table:
            return min(default, value)
        v = s.table[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= value:
            raise s.fail(key, f"must be an integer 1..{value} (at most [limits] {bound}), "
                              f"got {render(v)}")
        return v

    worker_slots = s.int_range(
        "worker_slots", dl.worker_slots, 1, min(256**cid.slot_len, MAX_WORKER_SLOTS)
    )
    control_connections = s.int_range("control_connections", dl.control_connections, 1, 4096)
    learned_capacity = s.int_range("learned_capacity", dl.learned_capacity, 1024, 1 << 22)
    learned_quota = s.int_range("learned_quota", dl.learned_quota, 16, 1 << 22)
    learned_unproven_quota = s.int_range(
        "learned_unproven_quota", dl.learned_unproven_quota, 16, 1 << 22)
    learned_per_slot = learned_quota + learned_unproven_quota
    learned_fit = learned_capacity // learned_per_slot
    learned_need = (f"learned_quota {learned_quota} + learned_unproven_quota "
                    f"{learned_unproven_quota} = {learned_per_slot} entries per learned-mode slot")
    if "learned_slots" in s.table:
        learned_slots = at_most("learned_slots", 0, "worker_slots", worker_slots)
        if learned_slots > learned_fit:
            raise s.fail("learned_capacity", (
                f"{learned_capacity} entries cannot hold learned_slots {learned_slots} x "
                f"({learned_need}) = {learned_slots * learned_per_slot}: raise "
                "learned_capacity or lower learned_slots, learned_quota or "
                "learned_unproven_quota"))
    elif learned_fit < 1:
        raise s.fail("learned_capacity", (
            f"{learned_capacity} entries cannot hold one learned-mode slot ({learned_need}): "
            "raise learned_capacity or lower learned_quota or learned_unproven_quota"))
    else:
        learned_slots = min(learned_fit, worker_slots)
    limits = LimitsConfig(
        pending_connections=s.int_range("pending_connections", dl.pending_connections, 1, 10**7),
        pending_bytes=s.get("pending_bytes", dl.pending_bytes, pending_bytes),
        pending_ttl=s.number("pending_ttl", dl.pending_ttl, 0.01, 60),
        route_ttl=s.number("route_ttl", dl.route_ttl, 0.1, 3600),
        first_flight_rate=s.number("first_flight_rate", dl.first_flight_rate, 10, 10**6,
                                   "new connections per second"),
        classifiers=s.int_range("classifiers", dl.classifiers, 1, 64),
        worker_slots=worker_slots,
        workers_per_app=s.int_range("workers_per_app", dl.workers_per_app, 1, SCM_MAX_FD),
        control_connections=control_connections,
        uid_worker_slots=at_most("uid_worker_slots", dl.uid_worker_slots, "worker_slots",
                                 worker_slots),
        # 2 at least: a replace needs the live generation and its successor at once
        app_generations=s.int_range("app_generations", dl.app_generations, 2, 64),
        uid_control_connections=at_most("uid_control_connections", dl.uid_control_connections,
                                        "control_connections", control_connections),
        control_message_bytes=s.int_range(
            "control_message_bytes", dl.control_message_bytes, 1024, 2**20
        ),
        control_rate=s.number(
            "control_rate", dl.control_rate, 0.1, 100000, "messages per second"
        ),
        control_burst=s.int_range("control_burst", dl.control_burst, 1, 10**6),
        learned_capacity=learned_capacity,
        learned_quota=learned_quota,
        learned_ttl=s.number("learned_ttl", dl.learned_ttl, 10, 86400),
        learned_unproven_ttl=s.number("learned_unproven_ttl", dl.learned_unproven_ttl, 0.5, 60),
        learned_unproven_quota=learned_unproven_quota,
        learned_slots=learned_slots,
    )
    fds = limits.workers_per_app * len(listen.addresses)
    if fds > SCM_MAX_FD:
        raise ConfigError(
            f"{source}: [limits] workers_per_app: {limits.workers_per_app} workers x "
            f"{len(listen.addresses)} listen addresses = {fds} sockets, more than the "
            f"{SCM_MAX_FD} one control message can carry"
        )
    return limits


def _parse_flood(data: Mapping[str, Any], source: str, xdp: XdpConfig) -> FloodConfig:
    """The flood defences; a rate set without what enforces it (the guard needs [xdp]
    interfaces, the total cap the per-prefix bucket) would look like protection while
    doing nothing, so it is refused."""
    s = section(data, source, "flood", tuple(FloodConfig.__dataclass_fields__))
    df = FloodConfig()
    flood = FloodConfig(
        retry=s.choice("retry", df.retry, RETRY_MODES),
        retry_pending_fraction=s.number(
            "retry_pending_fraction", df.retry_pending_fraction, 0.01, 1, "pending/cap"),
        retry_initial_rate=s.number(
            "retry_initial_rate", df.retry_initial_rate, 1, 10**7, "Initials per second"),
        retry_hold=s.number("retry_hold", df.retry_hold, 0, 3600),
        retry_rate=s.number("retry_rate", df.retry_rate, 1, 10**7, "Retries per second"),
        retry_burst=s.int_range("retry_burst", df.retry_burst, 1, 10**7),
        token_lifetime=s.number("token_lifetime", df.token_lifetime, 1, 60),
        retry_proven_ttl=s.number("retry_proven_ttl", df.retry_proven_ttl, 0, 3600),
        retry_proven_rate=s.number("retry_proven_rate", df.retry_proven_rate, 1, 10**6,
                                   "Initials per second"),
        guard_rate=s.number("guard_rate", df.guard_rate, 0, 10**7, "Initials per second"),
        guard_burst=s.int_range("guard_burst", df.guard_burst, 1, 10**7),
        guard_v4_prefix_len=s.int_range("guard_v4_prefix_len", df.guard_v4_prefix_len, 0, 32),
        guard_v6_prefix_len=s.int_range("guard_v6_prefix_len", df.guard_v6_prefix_len, 0, 128),
        guard_total_rate=s.number("guard_total_rate", df.guard_total_rate, 0, 10**8,
                                  "Initials per second"),
        guard_total_burst=s.int_range("guard_total_burst", df.guard_total_burst, 1, 10**8),
    )
    if flood.guard_rate and not xdp.interfaces:
        raise s.fail("guard_rate", "needs the guard: set [xdp] interfaces (or guard_rate = 0)")
    if flood.guard_total_rate and not flood.guard_rate:
        raise s.fail("guard_total_rate", "needs the per-prefix bucket: set guard_rate too")
    return flood


def _parse_security(data: Mapping[str, Any], source: str) -> SecurityConfig:
    """Switches that weaken tenant isolation: off unless written out, as booleans only."""
    s = section(data, source, "security", tuple(SecurityConfig.__dataclass_fields__))
    return SecurityConfig(
        allow_unjailed=s.boolean("allow_unjailed", SecurityConfig().allow_unjailed),
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; every failure is a ConfigError naming the file."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: invalid TOML: not UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    return parse_config(data, source)


def summary(config: Config) -> list[str]:
    """What the daemon will do with this config, for an operator to eyeball."""
    c = config.cid
    ctl = config.control
    pol = config.policy
    lim = config.limits
    lines = [
        f"listen: {', '.join(config.listen.addresses)} port {config.listen.port}",
        "xdp: "
        + (f"{', '.join(config.xdp.interfaces)} ({config.xdp.mode})" if config.xdp.interfaces
           else "off"),
        f"cid: {c.cid_len} bytes (config_id {c.config_id}, host_id {c.host_id} in "
        f"{c.host_id_len} bytes, slot {c.slot_len} bytes, nonce {c.nonce_len} bytes; "
        f"balancer {c.balancer})",
        f"control: {ctl.path} mode {ctl.mode:04o}"
        + (f" group {ctl.group}" if ctl.group is not None else ""),
        "metrics: "
        + (_hostport(config.metrics.address, config.metrics.port) if config.metrics.enabled
           else "off"),
        f"acl: {len(config.acl)} rule(s); root may claim anything",
        "policy: no owner -> "
        + ("CONNECTION_CLOSE no_application_protocol" if pol.no_owner == "close"
           else f"app {pol.default_app}")
        + f"; ALPN preference: {pol.alpn_preference}"
        + (f" ({', '.join(pol.alpn_order)})" if pol.alpn_order else ""),
        f"limits: {lim.pending_connections} pending connections of {lim.pending_bytes} bytes, "
        f"pending TTL {lim.pending_ttl:g}s, route TTL {lim.route_ttl:g}s, "
        f"{lim.classifiers} classifier(s), {lim.worker_slots} worker slots, "
        f"{lim.workers_per_app} workers per app",
        f"flood: Retry {config.flood.retry}, guard "
        + (f"{config.flood.guard_rate:g} Initials/s per /{config.flood.guard_v4_prefix_len} "
           f"(IPv4), /{config.flood.guard_v6_prefix_len} (IPv6), burst "
           f"{config.flood.guard_burst}" if config.flood.guard_rate else "off"),
        f"control limits: {lim.control_connections} connections, "
        f"{lim.control_message_bytes} bytes per message, {lim.control_rate:g} messages/s "
        f"(burst {lim.control_burst})",
        f"tenant limits: per uid other than 0, {lim.uid_worker_slots} worker slots (draining "
        f"generations included) and {lim.uid_control_connections} control connections; "
        f"{lim.app_generations} generations per app",
    ]
    return lines


def warnings(config: Config) -> list[str]:
    """Things that are valid but probably not meant: ACL names this host cannot resolve
    (yet: a user may be created after the daemon starts, so these are not errors)."""
    out = []
    if config.security.allow_unjailed:
        out.append("[security] allow_unjailed = true: if the socket jail cannot be attached, "
                   "apps of other uids get worker sockets anyway and any of them can take "
                   "the whole port (docs/SECURITY.md)")
    for n, rule in enumerate(config.acl, 1):
        for user in rule.users:
            try:
                pwd.getpwnam(user)
            except KeyError:
                out.append(f"[[acl]] #{n} users: no user {render(user)} on this host")
        for group in rule.groups:
            try:
                grp.getgrnam(group)
            except KeyError:
                out.append(f"[[acl]] #{n} groups: no group {render(group)} on this host")
    group = config.control.group
    if isinstance(group, str):
        try:
            grp.getgrnam(group)
        except KeyError:
            out.append(f"[control] group: no group {render(group)} on this host "
                       "(the daemon will not start)")
    return out


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"ok: {config.source}")
    for line in summary(config):
        print(f"  {line}")
    for line in warnings(config):
        print(f"warning: {line}", file=sys.stderr)
    return 0


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``steerd check-config FILE``: validate before restarting the daemon, not after."""
    p = subparsers.add_parser(
        "check-config", help="validate a steerd TOML config file and summarise it"
    )
    p.add_argument("file", metavar="FILE", help="the TOML file, e.g. " + DEFAULT_CONFIG_PATH)
    p.set_defaults(func=_check_config)


def cli_config(path: str | None) -> Config:
    """``--config``, else DEFAULT_CONFIG_PATH when it exists, else the embedded defaults: the
    same for ``steerd run``, ``steerd purge`` (which must find what the run used) and the
    tools that read the CID layout (``steerd cid decode``)."""
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    return load_config(path) if path else Config()
