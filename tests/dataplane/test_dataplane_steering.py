"""The steering program and the XDP guard, loaded for real, fed real packets across a veth
pair between two namespaces the test made (see conftest.py)."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from deploy.netns import NetnsPair, ip
from quic.packet import VERSION_1, VERSION_2, PacketType
from steerd.daemon.reinject import udp_checksum
from tests.dataplane.conftest import (
    LAYOUT,
    MARKER_SLOT,
    OTHER_PORT,
    PORT,
    GroupFactory,
    Loaded,
    delta,
    long_packet,
    new_tag,
    short_packet,
    unknown_version_packet,
)

pytestmark = pytest.mark.root

FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"), pytest.param(socket.AF_INET6, id="ipv6")]


def cid(slot: int) -> bytes:
    return LAYOUT.encode(slot, os.urandom(LAYOUT.nonce_len))


def test_xdp_runs_native_on_veth(loaded: Loaded) -> None:
    assert loaded.xdp_mode == ("native" if loaded.guard == "xdp" else None)


@pytest.mark.parametrize("family", FAMILIES)
def test_short_header_goes_to_the_slot_its_cid_names(
    family: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    slots = [0, 1, 7, 300, 4095]
    group = make_group(workers=slots)
    sends, want = [], {}
    for slot in slots:
        for client in range(6):  # six source ports: the kernel's hash would scatter these
            tag = new_tag()
            sends.append((client, short_packet(cid(slot), tag)))
            want[tag] = f"worker{slot}"
    before = loaded.dp.counters()
    assert group.deliver(family, sends) == want
    n = len(sends) + 1  # + marker
    assert delta(before, loaded.dp.counters()) == {"steer_short_worker": n, "xdp_short": n}


@pytest.mark.parametrize("family", FAMILIES)
def test_long_header_route_hit_goes_to_the_routed_worker(
    family: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    group = make_group(workers=[5, 6])
    dcid_v1, dcid_v2 = os.urandom(8), os.urandom(17)
    loaded.dp.add_route(dcid_v1, 5)
    loaded.dp.add_route(dcid_v2, 6, ttl=None)
    assert loaded.dp.routes()[dcid_v1][0] == 5
    sends, want = [], {}
    for client, (ptype, version, dcid, slot) in enumerate([
        (PacketType.INITIAL, VERSION_1, dcid_v1, 5),
        (PacketType.ZERO_RTT, VERSION_1, dcid_v1, 5),
        (PacketType.INITIAL, VERSION_1, dcid_v1, 5),
        (PacketType.INITIAL, VERSION_2, dcid_v2, 6),
        (PacketType.ZERO_RTT, VERSION_2, dcid_v2, 6),
    ]):
        tag = new_tag()
        sends.append((client, long_packet(ptype, dcid, tag, version=version)))
        want[tag] = f"worker{slot}"
    before = loaded.dp.counters()
    assert group.deliver(family, sends) == want
    assert delta(before, loaded.dp.counters()) == {
        "steer_route_hit": 5, "xdp_initial": 3, "xdp_0rtt": 2,
        "steer_short_worker": 1, "xdp_short": 1,
    }
    assert loaded.dp.delete_route(dcid_v1)
    assert not loaded.dp.delete_route(dcid_v1)


@pytest.mark.parametrize("family", FAMILIES)
def test_long_header_with_our_cid_goes_to_its_worker(
    family: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    group = make_group(workers=[42])
    tags = [new_tag(), new_tag()]
    sends = [
        (0, long_packet(PacketType.HANDSHAKE, cid(42), tags[0], size=300)),
        (1, long_packet(PacketType.HANDSHAKE, cid(42), tags[1], version=VERSION_2, size=300)),
    ]
    before = loaded.dp.counters()
    assert group.deliver(family, sends) == {tags[0]: "worker42", tags[1]: "worker42"}
    assert delta(before, loaded.dp.counters()) == {
        "steer_long_ours_worker": 2, "xdp_handshake": 2, "steer_short_worker": 1, "xdp_short": 1,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_dcids_go_to_one_classifier_per_dcid(
    family: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    group = make_group(workers=[1], classifiers=3)
    dcids = [os.urandom(8 + i % 13) for i in range(24)]
    sends, tag_dcid = [], {}
    for dcid in dcids:
        for client in range(3):  # same DCID from three source ports, and as 0-RTT too
            tag = new_tag()
            ptype = PacketType.INITIAL if client < 2 else PacketType.ZERO_RTT
            sends.append((client, long_packet(ptype, dcid, tag)))
            tag_dcid[tag] = dcid
    before = loaded.dp.counters()
    got = group.deliver(family, sends)
    assert set(got) == set(tag_dcid)
    by_dcid: dict[bytes, set[str]] = {}
    for tag, label in got.items():
        by_dcid.setdefault(tag_dcid[tag], set()).add(label)
    assert all(len(labels) == 1 for labels in by_dcid.values()), by_dcid
    used = set().union(*by_dcid.values())
    assert used <= {"classifier0", "classifier1", "classifier2"}
    assert len(used) >= 2, "24 DCIDs all hashed to one classifier"
    n = len(sends)
    assert delta(before, loaded.dp.counters()) == {
        "steer_long_new": n, "steer_to_classifier": n, "xdp_initial": 2 * len(dcids),
        "xdp_0rtt": len(dcids), "steer_short_worker": 1, "xdp_short": 1,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_foreign_short_header_cids_are_dropped_in_the_kernel(
    family: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    group = make_group(workers=[3])
    ours = cid(3)
    wrong_config = bytes([ours[0] ^ 0x20]) + ours[1:]
    wrong_host = ours[:1] + bytes([ours[1] ^ 0xFF]) + ours[2:]
    tags = [new_tag(), new_tag()]
    before = loaded.dp.counters()
    got = group.deliver(family, [(0, short_packet(wrong_config, tags[0])),
                                 (0, short_packet(wrong_host, tags[1]))])
    assert got == {}  # no worker issued them, and a classifier could only drop them
    assert delta(before, loaded.dp.counters()) == {
        "steer_drop_short_not_ours": 2, "xdp_short": 3, "steer_short_worker": 1,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_dead_worker_slot_goes_to_a_classifier(
    family: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    group = make_group(workers=[10, 11])
    routed = os.urandom(8)
    loaded.dp.add_route(routed, 11)
    group.workers.pop(10).close()  # the kernel empties its sockarray slot on close
    loaded.dp.remove_worker(11)  # and the daemon can empty a slot itself
    tags = [new_tag() for _ in range(3)]
    before = loaded.dp.counters()
    got = group.deliver(family, [
        (0, short_packet(cid(10), tags[0])),
        (1, long_packet(PacketType.HANDSHAKE, cid(10), tags[1], size=200)),
        (2, long_packet(PacketType.INITIAL, routed, tags[2])),
    ])
    assert set(got) == set(tags)
    assert all(label.startswith("classifier") for label in got.values()), got
    assert delta(before, loaded.dp.counters()) == {
        "steer_short_dead_slot": 1, "steer_long_ours_dead_slot": 1, "steer_route_dead_slot": 1,
        "steer_to_classifier": 3, "xdp_short": 2, "xdp_handshake": 1, "xdp_initial": 1,
        "steer_short_worker": 1,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_expired_route_is_ignored(family: int, loaded: Loaded, make_group: GroupFactory) -> None:
    group = make_group(workers=[12])
    dcid = os.urandom(9)
    loaded.dp.add_route(dcid, 12, ttl=-1.0)  # already past its expiry
    tag = new_tag()
    before = loaded.dp.counters()
    got = group.deliver(family, [(0, long_packet(PacketType.INITIAL, dcid, tag))])
    assert got[tag].startswith("classifier")
    assert delta(before, loaded.dp.counters()) == {
        "steer_route_expired": 1, "steer_long_new": 1, "steer_to_classifier": 1,
        "xdp_initial": 1, "steer_short_worker": 1, "xdp_short": 1,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_no_classifier_means_dropped_and_counted(
    family: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    group = make_group(workers=[20], classifiers=0)
    tags = [new_tag() for _ in range(4)]
    before = loaded.dp.counters()
    got = group.deliver(family, [
        (0, long_packet(PacketType.INITIAL, os.urandom(8), tags[0])),
        (1, short_packet(cid(21), tags[1])),  # slot 21 has no worker
        (2, long_packet(PacketType.INITIAL, os.urandom(8), tags[2])),
        (0, short_packet(cid(20), tags[3])),  # a live worker still gets its packets
    ])
    assert got == {tags[3]: "worker20"}
    assert delta(before, loaded.dp.counters()) == {
        "steer_long_new": 2, "steer_short_dead_slot": 1, "steer_drop_no_classifier": 3,
        "xdp_initial": 2, "xdp_short": 3, "steer_short_worker": 2,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_xdp_drops_undersized_initials_and_runts(
    family: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    group = make_group(workers=[30])
    dcid = os.urandom(8)
    loaded.dp.add_route(dcid, 30)
    ok = [new_tag() for _ in range(3)]
    bad = [new_tag() for _ in range(6)]
    before = loaded.dp.counters()
    got = group.deliver(family, [
        (0, long_packet(PacketType.INITIAL, dcid, bad[0], size=1199)),
        (0, long_packet(PacketType.INITIAL, dcid, bad[1], version=VERSION_2, size=600)),
        (0, long_packet(PacketType.INITIAL, dcid, ok[0], size=1200)),
        (0, long_packet(PacketType.INITIAL, dcid, ok[1], version=VERSION_2, size=1250)),
        (0, short_packet(cid(30), b"", size=20)),  # under 21 bytes: not QUIC
        (0, b"\xc0\x00\x00\x00\x01"),  # a 5-byte long header
        (0, unknown_version_packet(os.urandom(8), bad[4], size=1000)),  # too small for a VN
        (0, unknown_version_packet(os.urandom(8), ok[2], size=1200)),
        (0, long_packet(PacketType.HANDSHAKE, bytes(21), bad[5], size=200)),  # DCID > 20
    ])
    assert set(got) == set(ok)
    assert got[ok[0]] == got[ok[1]] == "worker30"
    assert got[ok[2]].startswith("classifier")
    assert delta(before, loaded.dp.counters()) == {
        "xdp_drop_small_initial": 2, "xdp_drop_too_short": 2, "xdp_drop_small_unknown_version": 1,
        "xdp_drop_bad_cid_len": 1, "xdp_initial": 2, "steer_route_hit": 2,
        "xdp_unknown_version": 1, "steer_long_new": 1, "steer_to_classifier": 1,
        "xdp_short": 1, "steer_short_worker": 1,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_flood_guard_limits_initials_per_source_prefix(
    family: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    group = make_group(workers=[40])
    loaded.dp.set_flood_guard(rate=0.5, burst=3)
    tags = [new_tag() for _ in range(6)]
    before = loaded.dp.counters()
    got = group.deliver(family, [
        (i, long_packet(PacketType.INITIAL, os.urandom(8), tag)) for i, tag in enumerate(tags)
    ])
    assert set(got) == set(tags[:3])
    assert delta(before, loaded.dp.counters()) == {
        "xdp_initial": 3, "xdp_drop_rate_limited": 3, "steer_long_new": 3,
        "steer_to_classifier": 3, "xdp_short": 1, "steer_short_worker": 1,
    }
    loaded.dp.disable_flood_guard()
    tag = new_tag()
    assert tag in group.deliver(family, [(0, long_packet(PacketType.INITIAL, os.urandom(8), tag))])


@pytest.mark.parametrize("family", FAMILIES)
def test_other_traffic_passes_untouched(
    family: int, pair: NetnsPair, loaded: Loaded, make_group: GroupFactory
) -> None:
    make_group(workers=[])
    addr = pair.server_addr(family)
    # UDP to another port, with a payload the guard would drop on the service port.
    plain = pair.server_socket(family, socket.SOCK_DGRAM)
    tcp = pair.server_socket(family, socket.SOCK_STREAM)
    client_udp = pair.client_socket(family, socket.SOCK_DGRAM)
    client_tcp = pair.client_socket(family, socket.SOCK_STREAM)
    try:
        plain.bind((addr, OTHER_PORT))
        plain.settimeout(5)
        runt = long_packet(PacketType.INITIAL, os.urandom(8), new_tag(), size=300)
        before = loaded.dp.counters()
        client_udp.sendto(runt, (addr, OTHER_PORT))
        assert plain.recv(65535) == runt
        # TCP to the service port itself: the guard only judges UDP.
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # earlier runs' TIME_WAIT
        tcp.bind((addr, PORT))
        tcp.listen(1)
        client_tcp.settimeout(5)
        client_tcp.connect((addr, PORT))
        conn, _ = tcp.accept()
        client_tcp.sendall(b"hello")
        conn.settimeout(5)
        assert conn.recv(5) == b"hello"
        conn.close()
        assert delta(before, loaded.dp.counters()) == {}
    finally:
        for sock in (plain, tcp, client_udp, client_tcp):
            sock.close()
    # Non-IP traffic (ARP, and NDP for IPv6) passed too: no datagram above could have been
    # delivered without neighbour resolution across the guarded interface.


def test_marker_slot_is_a_valid_slot() -> None:
    assert MARKER_SLOT <= LAYOUT.max_slot


def test_ipv6_extension_headers_are_walked(loaded: Loaded, make_group: GroupFactory) -> None:
    """The guard finds UDP behind hop-by-hop and destination options headers."""
    group = make_group(workers=[50])
    pad6 = bytes([0, 0, 1, 4, 0, 0, 0, 0])  # next header / length filled by the kernel; PadN
    opts = [(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, pad6),
            (socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, pad6)]
    client = group.client(socket.AF_INET6)
    dest = (group.pair.server_v6, PORT)
    small, ok = new_tag(), new_tag()
    before = loaded.dp.counters()
    client.sendmsg([long_packet(PacketType.INITIAL, os.urandom(8), small, size=600)], opts, 0,
                   dest)
    client.sendmsg([long_packet(PacketType.INITIAL, os.urandom(8), ok)], opts, 0, dest)
    got = group.deliver(socket.AF_INET6, [])
    assert set(got) == {ok} and got[ok].startswith("classifier")
    assert delta(before, loaded.dp.counters()) == {
        "xdp_drop_small_initial": 1, "xdp_initial": 1, "steer_long_new": 1,
        "steer_to_classifier": 1, "xdp_short": 1, "steer_short_worker": 1,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_ip_fragments_to_the_service_port_are_dropped(
    family: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    """A datagram larger than the veth MTU arrives in fragments. QUIC sets DF (RFC 9000
    §14), and no fragment can be judged whole: the guard drops the first one (the only one
    with a port), so the datagram never reassembles and reaches no classifier."""
    group = make_group(workers=[51])
    tag = new_tag()
    before = loaded.dp.counters()
    got = group.deliver(family, [(0, long_packet(PacketType.INITIAL, os.urandom(8), tag,
                                                 size=3000))])
    assert got == {}
    assert delta(before, loaded.dp.counters()) == {
        "xdp_drop_fragment": 1,  # the first fragment; later ones carry no UDP port
        "xdp_short": 1, "steer_short_worker": 1,
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("version", [VERSION_1, VERSION_2], ids=["v1", "v2"])
def test_unroutable_handshake_is_dropped_in_the_kernel(
    family: int, version: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    """A Handshake with no route and no CID of ours belongs to no connection: dropped by
    the steering program, not handed to a classifier to drop. An Initial and a 0-RTT with
    such DCIDs still go to a classifier (a first flight)."""
    group = make_group(workers=[52])
    junk, first, early = new_tag(), new_tag(), new_tag()
    before = loaded.dp.counters()
    got = group.deliver(family, [
        (0, long_packet(PacketType.HANDSHAKE, os.urandom(8), junk, version=version)),
        (1, long_packet(PacketType.INITIAL, os.urandom(8), first, version=version)),
        (2, long_packet(PacketType.ZERO_RTT, os.urandom(8), early, version=version)),
    ])
    assert set(got) == {first, early}
    assert all(label.startswith("classifier") for label in got.values())
    assert delta(before, loaded.dp.counters()) == {
        "xdp_handshake": 1, "steer_drop_long_unroutable": 1, "xdp_initial": 1, "xdp_0rtt": 1,
        "steer_long_new": 2, "steer_to_classifier": 2, "xdp_short": 1, "steer_short_worker": 1,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_flood_guard_limits_0rtt_like_initials(
    family: int, loaded: Loaded, make_group: GroupFactory
) -> None:
    """Random-DCID 0-RTT costs a classifier what an Initial does: it spends the same
    per-prefix budget."""
    group = make_group(workers=[53])
    loaded.dp.set_flood_guard(rate=0.5, burst=3)
    try:
        tags = [new_tag() for _ in range(6)]
        before = loaded.dp.counters()
        got = group.deliver(family, [
            (i, long_packet(PacketType.ZERO_RTT, os.urandom(8), tag)) for i, tag in enumerate(tags)
        ])
        assert set(got) == set(tags[:3])
        assert delta(before, loaded.dp.counters()) == {
            "xdp_0rtt": 3, "xdp_drop_rate_limited_0rtt": 3, "steer_long_new": 3,
            "steer_to_classifier": 3, "xdp_short": 1, "steer_short_worker": 1,
        }
    finally:
        loaded.dp.disable_flood_guard()


def test_overlong_ipv6_extension_chain_is_dropped(loaded: Loaded,
                                                  make_group: GroupFactory) -> None:
    """Eight destination-options headers before UDP: longer than the guard walks, so where
    the packet leads stays unknown; nothing real sends one, and it is dropped, not passed
    unjudged. Sent raw (IPv6 header included) from the client namespace."""
    group = make_group(workers=[54])
    pair = group.pair
    tag = new_tag()
    src = socket.inet_pton(socket.AF_INET6, pair.client_v6)
    dst = socket.inet_pton(socket.AF_INET6, pair.server_v6)
    payload = long_packet(PacketType.INITIAL, os.urandom(8), tag)
    length = 8 + len(payload)
    csum = udp_checksum(src, dst, struct.pack("!HHHH", 40000, PORT, length, 0), payload)
    udp = struct.pack("!HHHH", 40000, PORT, length, csum) + payload
    count = 8
    chain = b"".join(bytes([60 if i < count - 1 else socket.IPPROTO_UDP, 0, 1, 4, 0, 0, 0, 0])
                     for i in range(count))
    packet = struct.pack("!IHBB16s16s", 6 << 28, len(chain) + len(udp), 60, 64, src,
                         dst) + chain + udp
    raw = pair.client_socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        before = loaded.dp.counters()
        raw.sendto(packet, (pair.server_v6, 0))
        assert group.deliver(socket.AF_INET6, []) == {}
        assert delta(before, loaded.dp.counters()) == {
            "xdp_drop_ext_chain": 1, "xdp_short": 1, "steer_short_worker": 1,
        }
    finally:
        raw.close()


def test_generic_xdp_mode_and_detach(pair: NetnsPair, loaded: Loaded) -> None:
    """Generic (SKB) mode where asked, visible to iproute2, and gone after detach."""
    assert loaded.dp.attach_xdp("lo", mode="generic", netns=pair.server) == "generic"
    try:
        assert "xdpgeneric" in ip("link", "show", "lo", netns=pair.server)
    finally:
        loaded.dp.detach_xdp("lo", netns=pair.server)
    assert "xdp" not in ip("link", "show", "lo", netns=pair.server)


@pytest.mark.parametrize(("prefix_len", "passed"), [(32, 4), (24, 2)])
def test_flood_guard_budget_is_per_source_prefix(
    prefix_len: int, passed: int, pair: NetnsPair, loaded: Loaded, make_group: GroupFactory
) -> None:
    """Two client addresses in one /24: separate budgets per /32, one shared budget per /24."""
    other = "198.18.0.3"
    ip("addr", "add", f"{other}/24", "dev", pair.client_if, netns=pair.client)
    group = make_group(workers=[41])
    try:
        second = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
        group.clients[(socket.AF_INET, 99)] = second  # closed with the group
        second.bind((other, 0))
        loaded.dp.set_flood_guard(rate=0.5, burst=2, v4_prefix_len=prefix_len)
        tags = [new_tag() for _ in range(6)]
        for tag in tags[:3]:
            group.send(socket.AF_INET, long_packet(PacketType.INITIAL, os.urandom(8), tag))
        for tag in tags[3:]:
            second.sendto(long_packet(PacketType.INITIAL, os.urandom(8), tag),
                          (pair.server_v4, PORT))
        got = group.deliver(socket.AF_INET, [])
        assert len(got) == passed, got
        if prefix_len == 32:  # each address got exactly its own burst of 2
            assert set(got) == {*tags[:2], *tags[3:5]}
    finally:
        loaded.dp.disable_flood_guard()
        ip("addr", "del", f"{other}/24", "dev", pair.client_if, netns=pair.client)


@pytest.mark.parametrize("family", FAMILIES)
def test_flood_guard_total_cap(family: int, loaded: Loaded, make_group: GroupFactory) -> None:
    """Within its prefix's budget but over the total one: the per-prefix table is an LRU,
    so only a cap on all prefixes together bounds a flood from many prefixes. Its state is
    in guard_config, where no eviction resets it."""
    group = make_group(workers=[55])
    loaded.dp.set_flood_guard(rate=1000, burst=1000, total_rate=0.5, total_burst=2)
    try:
        tags = [new_tag() for _ in range(5)]
        before = loaded.dp.counters()
        got = group.deliver(family, [
            (i, long_packet(PacketType.INITIAL if i % 2 else PacketType.ZERO_RTT,
                            os.urandom(8), tag)) for i, tag in enumerate(tags)
        ])
        assert set(got) == set(tags[:2])
        assert delta(before, loaded.dp.counters()) == {
            "xdp_0rtt": 1, "xdp_initial": 1, "xdp_drop_rate_limited_total": 3,
            "steer_long_new": 2, "steer_to_classifier": 2, "xdp_short": 1,
            "steer_short_worker": 1,
        }
    finally:
        loaded.dp.disable_flood_guard()
