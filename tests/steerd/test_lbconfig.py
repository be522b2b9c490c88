"""``steerd lb-config``: the hosts file's exact refusals, the generated nftables ruleset as
``nft -c`` (Debian's nftables, the real parser and kernel check) judges it, and the ruleset
at work in network namespaces: client -> balancer -> two hosts running plain UDP receivers.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.netns import LIVE, _delete_netns, ip
from quic.cid import CidLayout
from steerd.daemon.config import ConfigError
from steerd.daemon.dataplane.netns import run_in_netns
from steerd.tools.lbconfig import HostsFile, nftables_ruleset, parse_hosts

NFT = shutil.which("nft") or "/usr/sbin/nft"
needs_nft = pytest.mark.skipif(not os.path.exists(NFT), reason="needs nftables (nft)")

KATRAN_HOSTS = """
[cid]
balancer = "katran-v2"
config_id = 4
host_id_len = 3
[[host]]
id = 2
address = "198.18.12.2"
[[host]]
id = 1
address = "198.18.11.2"
"""


def hosts(text: str) -> HostsFile:
    return parse_hosts(tomllib.loads(text), "hosts.toml")


def error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        hosts(text)
    return str(e.value)


def nft_check(ruleset: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NFT, "-c", "-f", "-"], input=ruleset, capture_output=True,
                          text=True, timeout=30, check=False)


def test_hosts_are_sorted_and_the_host_id_is_read_after_the_first_octet() -> None:
    hf = hosts(KATRAN_HOSTS)
    assert [h.id for h in hf.hosts] == [1, 2]
    text = nftables_ruleset(hf)
    assert "typeof @th,80,24 : ip daddr" in text  # UDP header 64 bits + flags + first octet
    assert "elements = { 0x000001 : 198.18.11.2, 0x000002 : 198.18.12.2 }" in text
    assert "jhash ip saddr . udp sport mod 2 seed 0x5eed map { 0 : 198.18.11.2, 1 : " \
           "198.18.12.2 }" in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[cid]\nhost_id_len = 0\n[[host]]\nid = 0\naddress = \"10.0.0.1\"",
         "hosts.toml: [cid] host_id_len: must be 1..4 for a balancer to route by host ID, "
         "got 0"),
        ("[cid]\nhost_id_len = 1\nhost_id = 1\n[[host]]\nid = 0\naddress = \"10.0.0.1\"",
         "hosts.toml: [cid] host_id: not used in a hosts file (each [[host]] has its own id)"),
        ('[cid]\nbalancer = "katran-v2"\nhost_id_len = 3',
         'hosts.toml: [cid] config_id: balancer "katran-v2" needs the first octet\'s top bits '
         "10, so config_id must be 4 or 5, got 0"),
        ("[cid]\nhost_id_len = 1",
         'hosts.toml: [[host]]: must be a non-empty array of tables ([[host]] id = N, address '
         '= "IP"), got []'),
        ("[cid]\nhost_id_len = 1\n[[host]]\nid = 256\naddress = \"10.0.0.1\"",
         "hosts.toml: [[host]] #1 id: must be an integer 0..255, got 256"),
        ("[cid]\nhost_id_len = 1\n[[host]]\nid = 1",
         "hosts.toml: [[host]] #1 address: missing"),
        ("[cid]\nhost_id_len = 1\n[[host]]\nid = 1\naddress = \"10.0.0.300\"",
         'hosts.toml: [[host]] #1 address: must be an IPv4 or IPv6 address, got "10.0.0.300"'),
        ("[cid]\nhost_id_len = 1\n[[host]]\nid = 1\naddress = \"10.0.0.1\"\n"
         "[[host]]\nid = 1\naddress = \"10.0.0.2\"",
         "hosts.toml: [[host]] #2 id: duplicate host ID 1"),
        ("[cid]\nhost_id_len = 1\n[[host]]\nid = 1\naddress = \"10.0.0.1\"\n"
         "[[host]]\nid = 2\naddress = \"fd00::2\"",
         'hosts.toml: [[host]] #2 address: all hosts must be IPv4 or all IPv6, got "fd00::2" '
         'after "10.0.0.1"'),
        ("[cid]\nhost_id_len = 1\n[[host]]\nid = 1\naddress = \"10.0.0.1\"\nport = 1",
         "hosts.toml: [[host]] #1 port: unknown key (known: address, id)"),
        ("[hosts]\n", "hosts.toml: unknown section [hosts] (known: balancer, cid, host)"),
    ],
)
def test_hosts_file_errors(text: str, message: str) -> None:
    assert error(text) == message


@needs_nft
@pytest.mark.parametrize(
    "text",
    [
        KATRAN_HOSTS,
        '[cid]\nbalancer = "katran-v3"\nconfig_id = 6\nhost_id_len = 4\n'
        '[balancer]\naddress = "fd00:1b::1"\nport = 8443\n'
        '[[host]]\nid = 4294967295\naddress = "fd00:1b::11"\n'
        '[[host]]\nid = 7\naddress = "fd00:1b::12"\n[[host]]\nid = 9\naddress = "fd00:1b::13"\n',
        '[cid]\nbalancer = "quic-lb"\nhost_id_len = 1\n[[host]]\nid = 0\naddress = "10.0.0.1"\n',
    ],
)
def test_ruleset_passes_nft_check(text: str) -> None:
    proc = nft_check(nftables_ruleset(hosts(text)))
    assert proc.returncode == 0, proc.stderr


@needs_nft
def test_cli_output_passes_nft_check(tmp_path: Path) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text(KATRAN_HOSTS)
    out = subprocess.run([sys.executable, "-m", "steerd.cli", "lb-config", str(path),
                          "--engine", "nftables"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"# steerd lb-config {path}: 2 host(s)")
    assert nft_check(out.stdout).returncode == 0
    path.write_text("[cid]\nhost_id_len = 0\n")
    bad = subprocess.run([sys.executable, "-m", "steerd.cli", "lb-config", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == (f"steerd lb-config: {path}: [cid] host_id_len: must be 1..4 for a "
                          "balancer to route by host ID, got 0\n")


# ---- the ruleset at work -------------------------------------------------------------------

VIP = "198.18.1.1"
CLIENT = "198.18.1.2"
HOST_ADDRS = {1: "198.18.11.2", 2: "198.18.12.2"}
PORT = 443
LAYOUT = CidLayout(config_id=4, host_id_len=3, slot_len=2, nonce_len=6, balancer="katran-v2")


@dataclass(frozen=True, slots=True)
class Topology:
    client: str
    balancer: str
    hosts: dict[int, str]  # host ID -> namespace


@contextmanager
def balancer_topology() -> Iterator[Topology]:
    """client -- balancer -- host 1, host 2, each link its own veth and /24; the hosts route
    back through the balancer. Every namespace is deleted on exit (with its veths and the
    balancer's nftables table)."""
    tag = uuid.uuid4().hex[:6]
    topo = Topology(f"steerd-t-lbc-{tag}", f"steerd-t-lbb-{tag}",
                    {i: f"steerd-t-lbh{i}-{tag}" for i in HOST_ADDRS})
    names = [topo.client, topo.balancer, *topo.hosts.values()]
    try:
        for name in names:
            LIVE.add(name)
            ip("netns", "add", name)
            ip("link", "set", "lo", "up", netns=name)
        links = [(topo.client, CLIENT, VIP, "c")]
        links += [(topo.hosts[i], a, a.rsplit(".", 1)[0] + ".1", f"h{i}")
                  for i, a in HOST_ADDRS.items()]
        for ns, addr, gw, short in links:
            inner, outer = f"li{short}{tag}", f"lo{short}{tag}"
            ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer,
               "netns", topo.balancer)
            ip("addr", "add", f"{addr}/24", "dev", inner, netns=ns)
            ip("addr", "add", f"{gw}/24", "dev", outer, netns=topo.balancer)
            ip("link", "set", inner, "up", netns=ns)
            ip("link", "set", outer, "up", netns=topo.balancer)
            if ns != topo.client:
                ip("route", "add", "default", "via", gw, netns=ns)
        subprocess.run(["ip", "netns", "exec", topo.balancer, "sysctl", "-qw",
                        "net.ipv4.ip_forward=1"], check=True, timeout=30)
        yield topo
    finally:
        for name in names:
            _delete_netns(name)


def _recv_all(socks: dict[int, socket.socket], wait: float) -> dict[int, list[tuple[bytes, tuple]]]:
    """Everything the host sockets receive until ``wait`` seconds pass with nothing new."""
    got: dict[int, list[tuple[bytes, tuple]]] = {i: [] for i in socks}
    by_fd = {s.fileno(): i for i, s in socks.items()}
    while True:
        ready, _, _ = select.select(list(socks.values()), [], [], wait)
        if not ready:
            return got
        for s in ready:
            got[by_fd[s.fileno()]].append(s.recvfrom(2048))


def _short(host_id: int, slot: int) -> bytes:
    """A short-header packet (fixed bit set) whose DCID names ``host_id``."""
    layout = CidLayout(config_id=LAYOUT.config_id, host_id=host_id, host_id_len=3,
                       slot_len=2, nonce_len=6)
    return b"\x40" + layout.encode(slot, os.urandom(6)) + os.urandom(40)


def _initial() -> bytes:
    """A long-header (Initial-typed) datagram; the balancer reads only its first bit."""
    return b"\xc0\x00\x00\x00\x01" + os.urandom(200)


@pytest.mark.root
@needs_nft
def test_balancer_routes_by_host_id_and_hashes_initials() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    hf = hosts(KATRAN_HOSTS + f'[balancer]\naddress = "{VIP}"\nport = {PORT}\n')
    with balancer_topology() as topo:
        load = subprocess.run(["ip", "netns", "exec", topo.balancer, NFT, "-f", "-"],
                              input=nftables_ruleset(hf), capture_output=True, text=True,
                              timeout=30, check=False)
        assert load.returncode == 0, load.stderr
        servers: dict[int, socket.socket] = {}
        clients: list[socket.socket] = []

        def client() -> socket.socket:
            s = run_in_netns(topo.client, lambda: socket.socket(socket.AF_INET,
                                                                socket.SOCK_DGRAM))
            s.bind((CLIENT, 0))
            clients.append(s)
            return s

        try:
            for i, ns in topo.hosts.items():
                servers[i] = run_in_netns(ns, lambda: socket.socket(socket.AF_INET,
                                                                    socket.SOCK_DGRAM))
                servers[i].bind(("0.0.0.0", PORT))
            # Short headers from fresh 4-tuples (as after NAT rebinding): by host ID only.
            sent: dict[int, set[bytes]] = {1: set(), 2: set()}
            for _ in range(6):
                for host_id in (1, 2):
                    pkt = _short(host_id, 7)
                    client().sendto(pkt, (VIP, PORT))
                    sent[host_id].add(pkt)
            # An unknown host ID is dropped, and does not pin its 4-tuple: the next packet
            # from it, naming host 2, reaches host 2.
            stray = client()
            stray.sendto(_short(3, 7), (VIP, PORT))
            time.sleep(0.2)
            pkt = _short(2, 8)
            stray.sendto(pkt, (VIP, PORT))
            sent[2].add(pkt)
            got = _recv_all(servers, 0.5)
            for i in (1, 2):
                assert {p for p, _ in got[i]} == sent[i]
                assert {src[0] for _, src in got[i]} == {CLIENT}  # no SNAT: hosts see clients
            # Replies go back through the balancer, from the address the client sent to.
            _, src = got[2][-1]
            servers[2].sendto(b"reply", src)
            stray.settimeout(2)
            assert stray.recvfrom(100) == (b"reply", (VIP, PORT))
            # Initials: each 4-tuple's datagrams (a ClientHello over three) reach one host,
            # and the hash spreads 4-tuples over both hosts.
            flows = {}
            for _ in range(32):
                s = client()
                burst = [_initial() for _ in range(3)]
                for p in burst:
                    s.sendto(p, (VIP, PORT))
                flows[s.getsockname()[1]] = set(burst)
            got = _recv_all(servers, 0.5)
            where: dict[int, set[int]] = {}
            for i, packets in got.items():
                for p, src in packets:
                    assert p in flows[src[1]]
                    where.setdefault(src[1], set()).add(i)
            assert sorted(where) == sorted(flows)  # none lost
            assert all(len(hosts_) == 1 for hosts_ in where.values())
            assert sum(len(p) for p in got.values()) == 3 * len(flows)
            assert {next(iter(h)) for h in where.values()} == {1, 2}
        finally:
            for s in [*clients, *servers.values()]:
                s.close()
