"""``steerd lb-config HOSTS_FILE [--engine nftables]``: a Linux balancer's ruleset for N hosts.

Why: several steerd hosts behind one L4 balancer must keep each QUIC connection on the host
that owns it when the client's address changes (NAT rebinding, migration), which a 4-tuple
hash alone breaks. steerd's CIDs carry the host ID right after the first octet (quic/cid.py),
so the balancer can route by it. One hosts file lists the hosts and the ``[cid]`` layout they
all run with; this command turns it into a ruleset, and adding or removing a host is editing
the file and rerunning it (the ruleset replaces its own table in one atomic transaction).

Why nftables: Debian's nftables 1.0.6 matches raw payload bits (``@th,OFFSET,LEN``), looks
them up in a map and DNATs to the result, and hashes fields with ``jhash``, all in the kernel
with no program to compile or load; IPVS cannot read UDP payload bytes at all (only an fwmark
set by a netfilter rule, which would be this ruleset again). What the ruleset does, in the
nat prerouting hook of the balancer (so for the first packet of each UDP 4-tuple; conntrack
sends the flow's later packets, and every reply, the same way):

- long header (first payload bit 1: Initial, 0-RTT, Handshake): DNAT by ``jhash ip saddr .
  udp sport mod N`` with a fixed seed over the hosts sorted by ID, so both datagrams of a
  split ClientHello reach one host, and two balancers fed the same file agree (ECMP);
- short header: DNAT by the host ID bytes of the DCID (a map keyed on the payload bits at the
  host ID's offset), so a rebound or migrated client still reaches its host;
- a short header whose host ID is in no map entry is dropped, not hashed: no host can hold
  its connection, and hashing it would only make a random host answer with a reset.

Replies go back through the balancer: the hosts see the client's own address (no SNAT), so
each host's route to clients must point at the balancer, whose conntrack undoes the DNAT
(the client sees the balancer's address as the server's). The balancer needs IP forwarding
on. Removing a host leaves its established flows in conntrack, so they keep going until idle.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quic.cid import CidLayout
from steerd.daemon.config import (
    ConfigError,
    Section,
    parse_cid,
    parse_ip,
    render,
    section,
    table,
)

ENGINES = ("nftables",)
TABLE = "steerd_lb"
HASH_SEED = 0x5EED  # fixed: every balancer (and every rerun) hashes a 4-tuple alike
UDP_HEADER_BITS = 64
_HOSTS_SECTIONS = ("balancer", "cid", "host")


@dataclass(frozen=True, slots=True)
class Host:
    """One steerd host: the ID its CIDs carry and the address the balancer DNATs to."""

    id: int
    address: str


@dataclass(frozen=True, slots=True)
class HostsFile:
    """A validated hosts file: the shared CID layout, the hosts (sorted by ID), and what the
    balancer matches (UDP port, optionally one destination address)."""

    layout: CidLayout
    hosts: tuple[Host, ...]
    port: int = 443
    address: str | None = None

    @property
    def family(self) -> str:
        """nftables' name for the hosts' address family (all hosts share one)."""
        return "ip6" if ":" in self.hosts[0].address else "ip"


def parse_hosts(data: Mapping[str, Any], source: str) -> HostsFile:
    """Validate a parsed hosts file; every error names the file, table and key, as the daemon
    config's do (the [cid] table is read by the very same code as steerd.toml's)."""
    unknown = sorted(set(data) - set(_HOSTS_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section [{unknown[0]}] (known: {', '.join(_HOSTS_SECTIONS)})"
        )
    raw_cid = table(source, "[cid]", data.get("cid", {}))
    if "host_id" in raw_cid:
        raise ConfigError(f"{source}: [cid] host_id: not used in a hosts file (each [[host]] "
                          "has its own id)")
    layout = parse_cid(data, source)
    if layout.host_id_len == 0:
        raise ConfigError(f"{source}: [cid] host_id_len: must be 1..4 for a balancer to route "
                          "by host ID, got 0")
    b = section(data, source, "balancer", ("address", "port"))
    port = b.int_range("port", 443, 1, 65535)
    address = b.get("address", None, lambda k, v: _checked_ip(b, k, v))
    raw_hosts = data.get("host", [])
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise ConfigError(f"{source}: [[host]]: must be a non-empty array of tables "
                          f"([[host]] id = N, address = \"IP\"), got {render(raw_hosts)}")
    hosts: list[Host] = []
    max_id = 256**layout.host_id_len - 1
    for n, raw in enumerate(raw_hosts, 1):
        where = f"[[host]] #{n}"
        s = Section(source, where, table(source, where, raw), ("address", "id"))
        for key in ("id", "address"):
            if key not in s.table:
                raise s.fail(key, "missing")
        host = Host(s.int_range("id", 0, 0, max_id),
                    s.get("address", "", lambda k, v, s=s: _checked_ip(s, k, v)))
        for other in hosts:
            if host.id == other.id:
                raise s.fail("id", f"duplicate host ID {host.id}")
            if host.address == other.address:
                raise s.fail("address", f"duplicate address {render(host.address)}")
        if hosts and (":" in host.address) != (":" in hosts[0].address):
            raise s.fail("address", "all hosts must be IPv4 or all IPv6, got "
                         f"{render(host.address)} after {render(hosts[0].address)}")
        hosts.append(host)
    if address is not None and (":" in address) != (":" in hosts[0].address):
        raise b.fail("address", f"must be of the hosts' address family, got {render(address)}")
    return HostsFile(layout, tuple(sorted(hosts, key=lambda h: h.id)), port, address)


def _checked_ip(s: Section, key: str, value: Any) -> str:
    try:
        return parse_ip(value)
    except ValueError as e:
        raise s.fail(key, str(e)) from None


def load_hosts(path: str | Path) -> HostsFile:
    """Read and validate a hosts file; every failure is a ConfigError naming the file."""
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: invalid TOML: not UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    return parse_hosts(data, source)


def host_id_match(layout: CidLayout) -> str:
    """The nftables raw payload expression of a short header's host ID: after the 8-byte UDP
    header, the flags octet and the CID's first octet."""
    offset = UDP_HEADER_BITS + 8 * (1 + 1)
    return f"@th,{offset},{8 * layout.host_id_len}"


def nftables_ruleset(hf: HostsFile, source: str = "") -> str:
    """The whole ruleset: it first creates and deletes its table, so ``nft -f`` replaces the
    previous one atomically (flows already in conntrack are not touched)."""
    fam = hf.family
    width = 2 * hf.layout.host_id_len
    key = host_id_match(hf.layout)
    by_id = ", ".join(f"0x{h.id:0{width}x} : {h.address}" for h in hf.hosts)
    by_hash = ", ".join(f"{i} : {h.address}" for i, h in enumerate(hf.hosts))
    match = f"{fam} daddr {hf.address} udp dport {hf.port}" if hf.address else \
        f"udp dport {hf.port}"
    return "\n".join([
        f"# steerd lb-config{' ' + source if source else ''}: {len(hf.hosts)} host(s), "
        f"host ID {key} ({hf.layout.host_id_len} bytes), balancer {hf.layout.balancer}",
        "# Apply in the balancer: nft -f FILE (needs IP forwarding; hosts route replies back",
        "# through the balancer). Long headers: 4-tuple hash; short headers: host ID; short",
        "# headers with an unknown host ID: dropped.",
        f"table {fam} {TABLE}",
        f"delete table {fam} {TABLE}",
        f"table {fam} {TABLE} {{",
        "\tmap host_by_id {",
        f"\t\ttypeof {key} : {fam} daddr",
        f"\t\telements = {{ {by_id} }}",
        "\t}",
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        f"\t\t{match} @th,{UDP_HEADER_BITS},1 1 dnat to jhash {fam} saddr . udp sport "
        f"mod {len(hf.hosts)} seed 0x{HASH_SEED:x} map {{ {by_hash} }}",
        f"\t\t{match} @th,{UDP_HEADER_BITS},1 0 dnat to {key} map @host_by_id",
        f"\t\t{match} drop",
        "\t}",
        "}",
        "",
    ])


def _lb_config(args: argparse.Namespace) -> int:
    try:
        hf = load_hosts(args.hosts_file)
    except ConfigError as e:
        print(f"steerd lb-config: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(nftables_ruleset(hf, args.hosts_file))
    return 0


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``steerd lb-config HOSTS_FILE``."""
    p = subparsers.add_parser(
        "lb-config", help="a load balancer ruleset routing QUIC to hosts by CID host ID",
        description="Print an nftables ruleset for a Linux balancer in front of the steerd "
        "hosts listed in HOSTS_FILE (TOML: [cid] as in steerd.toml without host_id, "
        "[[host]] id = N, address = \"IP\", optional [balancer] port, address). "
        "Apply with: steerd lb-config hosts.toml | nft -f -",
    )
    p.add_argument("hosts_file", metavar="HOSTS_FILE", help="the hosts file (TOML)")
    p.add_argument("--engine", choices=ENGINES, default="nftables",
                   help="the balancer to configure (default nftables)")
    p.set_defaults(func=_lb_config)
