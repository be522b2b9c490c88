"""steerd.daemon.config: every setting parses, every mistake gets its exact message."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from quic.cid import CidLayout
from steerd.daemon.config import (
    AclRule,
    Config,
    ConfigError,
    ControlConfig,
    FloodConfig,
    LimitsConfig,
    ListenConfig,
    PolicyConfig,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "steerd.toml"


def parse(text: str) -> Config:
    return parse_config(tomllib.loads(text), "steerd.toml")


def error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse(text)
    return str(e.value)


def test_empty_file_is_the_defaults() -> None:
    c = parse("")
    assert c.listen == ListenConfig(addresses=("0.0.0.0", "::"), port=443)
    assert c.cid == CidLayout()
    assert c.control == ControlConfig("/run/steerd/control.sock", 0o660, None)
    assert (c.metrics.enabled, c.metrics.address, c.metrics.port) == (True, "127.0.0.1", 9443)
    assert c.acl == ()
    assert c.policy == PolicyConfig("close", None, "client", ())
    assert c.limits == LimitsConfig()
    assert Config().listen == c.listen  # the daemon runs with no file at all


def test_full_config_parses() -> None:
    c = parse(
        """
        [listen]
        addresses = ["192.0.2.1", "2001:DB8::1"]
        port = 8443
        [xdp]
        interfaces = ["eth0", "veth-s"]
        mode = "generic"
        [cid]
        config_id = 2
        host_id = 513
        host_id_len = 2
        slot_len = 1
        nonce_len = 8
        [control]
        path = "/tmp/s.sock"
        mode = 0o600
        group = "steerd"
        [metrics]
        address = "::1"
        port = 9100
        [[acl]]
        users = ["www-data"]
        uids = [1000]
        alpn = ["h3"]
        server_names = ["Example.COM", "*.example.com"]
        [[acl]]
        groups = ["smb"]
        gids = [3000]
        alpn = ["smb"]
        [policy]
        no_owner = "default_app"
        default_app = "web"
        alpn_preference = "server"
        alpn_order = ["smb", "h3"]
        [limits]
        pending_connections = 100
        pending_ttl = 1
        route_ttl = 2.5
        classifiers = 2
        worker_slots = 200
        """
    )
    assert c.listen.addresses == ("192.0.2.1", "2001:db8::1")
    assert c.listen.port == 8443
    assert c.xdp.interfaces == ("eth0", "veth-s") and c.xdp.mode == "generic"
    assert c.cid == CidLayout(config_id=2, host_id=513, host_id_len=2, slot_len=1, nonce_len=8)
    assert c.cid.cid_len == 12
    assert c.control == ControlConfig("/tmp/s.sock", 0o600, "steerd")
    assert (c.metrics.address, c.metrics.port) == ("::1", 9100)
    assert c.acl == (
        AclRule(uids=(1000,), users=("www-data",), alpn=("h3",),
                server_names=("example.com", "*.example.com")),
        AclRule(gids=(3000,), groups=("smb",), alpn=("smb",), server_names=("*",)),
    )
    assert c.policy == PolicyConfig("default_app", "web", "server", ("smb", "h3"))
    assert c.limits.pending_connections == 100 and c.limits.pending_ttl == 1.0
    assert c.limits.route_ttl == 2.5 and c.limits.classifiers == 2
    assert c.limits.worker_slots == 200


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[listen]\nport = "x"', '[listen] port: must be an integer 1..65535, got "x"'),
        ("[listen]\nport = 0", "[listen] port: must be an integer 1..65535, got 0"),
        ("[listen]\nport = true", "[listen] port: must be an integer 1..65535, got true"),
        ("[listen]\nprot = 443",
         "[listen] prot: unknown key (known: addresses, port)"),
        ("[lsiten]\nport = 443",
         "unknown section [lsiten] (known: acl, cid, control, flood, limits, listen, metrics, "
         "policy, security, xdp)"),
        ("listen = 3", "[listen]: must be a table, got 3"),
        ('[listen]\naddresses = ["10.0.0.300"]',
         '[listen] addresses: each item must be an IPv4 or IPv6 address, got "10.0.0.300"'),
        ("[listen]\naddresses = []",
         "[listen] addresses: must be a non-empty list of IP addresses, got []"),
        ('[listen]\naddresses = "::"',
         '[listen] addresses: must be a non-empty list of IP addresses, got "::"'),
        ('[listen]\naddresses = ["::1", "0::1"]', '[listen] addresses: duplicate item "0::1"'),
        ('[xdp]\ninterfaces = ["a/b"]',
         '[xdp] interfaces: each item must be an interface name of 1..15 characters, '
         'got "a/b"'),
        ('[xdp]\nmode = "fast"',
         '[xdp] mode: must be one of "auto", "native", "generic", "tc", got "fast"'),
        ("[cid]\nconfig_id = 7", "[cid] config_id: must be an integer 0..6, got 7"),
        ("[cid]\nnonce_len = 3", "[cid] nonce_len: must be an integer 4..18, got 3"),
        ("[cid]\nslot_len = 0", "[cid] slot_len: must be an integer 1..4, got 0"),
        ("[cid]\nhost_id_len = 1\nhost_id = 256",
         "[cid] host_id: must be an integer 0..255, got 256"),
        ("[cid]\nhost_id = 1", "[cid] host_id: must be an integer 0..0, got 1"),
        ("[cid]\nhost_id_len = 4\nslot_len = 4\nnonce_len = 12",
         "[cid]: 1 + host_id_len + slot_len + nonce_len must be at most 20, got 21"),
        ('[control]\npath = "run/x.sock"',
         '[control] path: must be an absolute path of at most 107 bytes, got "run/x.sock"'),
        ('[control]\nmode = "0660"',
         '[control] mode: must be an integer 0o000..0o777 (write 0o660), got "0660"'),
        ("[control]\nmode = 0o1777",
         "[control] mode: must be an integer 0o000..0o777 (write 0o660), got 1023"),
        ('[control]\ngroup = "bad group"',
         '[control] group: must be a group name or gid, got "bad group"'),
        ('[metrics]\naddress = "localhost"',
         '[metrics] address: must be an IPv4 or IPv6 address, got "localhost"'),
        ('[metrics]\nenabled = "yes"', '[metrics] enabled: must be true or false, got "yes"'),
        ("acl = 1", "[acl]: must be an array of tables ([[acl]]), got 1"),
        ('[[acl]]\nalpn = ["h3"]',
         "[[acl]] #1: must name at least one of uids, gids, users, groups"),
        ("[[acl]]\nuids = [1]",
         '[[acl]] #1 alpn: missing (a list of the ALPNs this rule allows, or ["*"])'),
        ('[[acl]]\nuids = [1]\nalpn = ["h3"]\n[[acl]]\nuids = [-1]\nalpn = ["h3"]',
         "[[acl]] #2 uids: each item must be an integer 0..4294967294, got -1"),
        ('[[acl]]\nuids = [1]\nalpn = ["h3"]\nserver_name = ["a"]',
         "[[acl]] #1 server_name: unknown key (known: alpn, gids, groups, server_names, uids, "
         "users)"),
        ('[[acl]]\nuids = [1]\nalpn = ["h3"]\nserver_names = ["a..b"]',
         '[[acl]] #1 server_names: each item must be a DNS name, "*.suffix" or "*", got "a..b"'),
        ('[[acl]]\nuids = [1]\nalpn = [""]',
         '[[acl]] #1 alpn: each item must be a string of 1..255 bytes, got ""'),
        ('[[acl]]\nusers = ["r:oot"]\nalpn = ["h3"]',
         '[[acl]] #1 users: each item must be a user or group name, got "r:oot"'),
        ('[policy]\nno_owner = "drop"',
         '[policy] no_owner: must be one of "close", "default_app", got "drop"'),
        ('[policy]\nno_owner = "default_app"',
         '[policy] default_app: missing: no_owner = "default_app" needs an app name'),
        ('[policy]\ndefault_app = "web"',
         '[policy] default_app: is set but no_owner is "close" (set no_owner = "default_app")'),
        ('[policy]\nalpn_preference = "mine"',
         '[policy] alpn_preference: must be one of "client", "server", got "mine"'),
        ('[policy]\nno_owner = "default_app"\ndefault_app = "a b"',
         "[policy] default_app: must be 1..64 characters of letters, digits, '.', '_' or '-', "
         'starting with a letter or digit, got "a b"'),
        ('[limits]\npending_ttl = "2s"',
         '[limits] pending_ttl: must be a number of seconds 0.01..60, got "2s"'),
        ("[limits]\nclassifiers = 0", "[limits] classifiers: must be an integer 1..64, got 0"),
        ("[cid]\nslot_len = 1\n[limits]\nworker_slots = 257",
         "[limits] worker_slots: must be an integer 1..256, got 257"),
        ("[limits]\nworkers_per_app = 200",
         "[limits] workers_per_app: 200 workers x 2 listen addresses = 400 sockets, more than "
         "the 253 one control message can carry"),
        ("[limits]\nuid_worker_slots = 257", "[limits] uid_worker_slots: must be an integer "
         "1..256 (at most [limits] worker_slots), got 257"),
        ("[limits]\nworker_slots = 32\nuid_worker_slots = 33", "[limits] uid_worker_slots: "
         "must be an integer 1..32 (at most [limits] worker_slots), got 33"),
        ("[limits]\nuid_worker_slots = 0", "[limits] uid_worker_slots: must be an integer "
         "1..256 (at most [limits] worker_slots), got 0"),
        ('[limits]\nuid_worker_slots = "64"', "[limits] uid_worker_slots: must be an integer "
         '1..256 (at most [limits] worker_slots), got "64"'),
        ("[limits]\napp_generations = 1",
         "[limits] app_generations: must be an integer 2..64, got 1"),
        ("[limits]\ncontrol_connections = 8\nuid_control_connections = 9",
         "[limits] uid_control_connections: must be an integer 1..8 (at most [limits] "
         "control_connections), got 9"),
        ("[limits]\nuid_control_connections = true", "[limits] uid_control_connections: must "
         "be an integer 1..64 (at most [limits] control_connections), got true"),
        ("[limits]\ncontrol_rate = 0", "[limits] control_rate: must be a number of messages "
         "per second 0.1..100000, got 0"),
        ('[flood]\nretry = "on"',
         '[flood] retry: must be one of "off", "auto", "always", got "on"'),
        ("[flood]\nretry_pending_fraction = 0",
         "[flood] retry_pending_fraction: must be a number of pending/cap 0.01..1, got 0"),
        ("[flood]\nretry_initial_rate = 0.5", "[flood] retry_initial_rate: must be a number of "
         "Initials per second 1..1e+07, got 0.5"),
        ("[flood]\nretry_hold = -1",
         "[flood] retry_hold: must be a number of seconds 0..3600, got -1"),
        ("[flood]\nretry_rate = 0",
         "[flood] retry_rate: must be a number of Retries per second 1..1e+07, got 0"),
        ("[flood]\nretry_burst = 0", "[flood] retry_burst: must be an integer 1..10000000, got 0"),
        ("[flood]\ntoken_lifetime = 61",
         "[flood] token_lifetime: must be a number of seconds 1..60, got 61"),
        ("[flood]\nguard_rate = 100",
         "[flood] guard_rate: needs the guard: set [xdp] interfaces (or guard_rate = 0)"),
        ("[flood]\nguard_burst = 0", "[flood] guard_burst: must be an integer 1..10000000, got 0"),
        ("[flood]\nguard_v4_prefix_len = 33",
         "[flood] guard_v4_prefix_len: must be an integer 0..32, got 33"),
        ("[flood]\nguard_v6_prefix_len = 129",
         "[flood] guard_v6_prefix_len: must be an integer 0..128, got 129"),
        ("[flood]\nretries = 1",
         "[flood] retries: unknown key (known: guard_burst, guard_rate, guard_total_burst, "
         "guard_total_rate, guard_v4_prefix_len, guard_v6_prefix_len, retry, retry_burst, "
         "retry_hold, retry_initial_rate, retry_pending_fraction, retry_proven_rate, "
         "retry_proven_ttl, retry_rate, token_lifetime)"),
        ('[xdp]\ninterfaces = ["eth0"]\n[flood]\nguard_total_rate = 100',
         "[flood] guard_total_rate: needs the per-prefix bucket: set guard_rate too"),
    ],
)
def test_error_messages_are_exact(text: str, message: str) -> None:
    assert error(text) == "steerd.toml: " + message


PENDING_BYTES_ERROR = (
    "steerd.toml: [limits] pending_bytes: must be an integer 17584..1048576 (one pending "
    "connection holds at least a 1200-byte Initial datagram and 16384 bytes of CRYPTO data), "
    "got {}"
)


@pytest.mark.parametrize("value", ["16384", "17583", "1200", "1048577", "true", '"17584"'])
def test_pending_bytes_below_one_connection_is_refused(value: str) -> None:
    """Issue 12: a pending_bytes below what one connection needs used to be accepted and
    then raised silently by the daemon (max(pending_bytes, 1200 + 16384)). Now the config
    refuses it, naming the minimum."""
    assert error(f"[limits]\npending_bytes = {value}") == PENDING_BYTES_ERROR.format(value)


def test_pending_bytes_minimum_is_what_the_assembler_needs() -> None:
    """The default is the minimum, and the minimum is exactly what quic.flight's assembler
    accepts as max_bytes_per_connection with its default CRYPTO cap, so the daemon can pass
    pending_bytes through as it is."""
    from quic.flight import MIN_INITIAL_DATAGRAM, AssemblerConfig
    from steerd.daemon.config import MIN_PENDING_BYTES

    assert MIN_PENDING_BYTES == MIN_INITIAL_DATAGRAM + AssemblerConfig().crypto_cap == 17584
    assert LimitsConfig().pending_bytes == parse("").limits.pending_bytes == MIN_PENDING_BYTES
    assert parse("[limits]\npending_bytes = 17584").limits.pending_bytes == 17584
    assert parse("[limits]\npending_bytes = 1048576").limits.pending_bytes == 1048576
    AssemblerConfig(max_bytes_per_connection=LimitsConfig().pending_bytes)
    with pytest.raises(ValueError):
        AssemblerConfig(max_bytes_per_connection=MIN_PENDING_BYTES - 1)


def test_load_config_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "none.toml"
    with pytest.raises(ConfigError) as e:
        load_config(missing)
    assert str(e.value) == f"{missing}: cannot read: No such file or directory"
    bad = tmp_path / "bad.toml"
    bad.write_text("[listen\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value).startswith(f"{bad}: invalid TOML: ")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as e:
        load_config(binary)
    assert str(e.value) == f"{binary}: invalid TOML: not UTF-8"


def test_example_config_is_valid_and_documents_every_key() -> None:
    c = load_config(EXAMPLE)
    assert c.source == str(EXAMPLE)
    text = EXAMPLE.read_text()
    for cls in (ListenConfig, ControlConfig, PolicyConfig, LimitsConfig, FloodConfig):
        for name in cls.__dataclass_fields__:
            assert f"{name} =" in text, f"deploy/steerd.toml does not document {name}"
    for name in ("interfaces", "config_id", "host_id_len", "slot_len", "nonce_len", "enabled",
                 "uids", "gids", "users", "groups", "alpn", "server_names"):
        assert f"{name} =" in text, f"deploy/steerd.toml does not document {name}"


def test_flood_section_parses() -> None:
    c = parse('[xdp]\ninterfaces = ["eth0"]\n[flood]\nretry = "always"\nguard_rate = 50\n'
              "guard_burst = 10\nguard_v4_prefix_len = 16\ntoken_lifetime = 5\n")
    assert c.flood == FloodConfig(retry="always", guard_rate=50.0, guard_burst=10,
                                  guard_v4_prefix_len=16, token_lifetime=5.0)
    assert parse("").flood == FloodConfig() and FloodConfig().retry == "auto"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "steerd.cli", *args], cwd=cwd, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60,
    )


def test_check_config_command(tmp_path: Path) -> None:
    (tmp_path / "steerd.toml").write_text('[listen]\nport = "x"\n')
    r = run_cli("check-config", "steerd.toml", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == 'steerd.toml: [listen] port: must be an integer 1..65535, got "x"\n'

    (tmp_path / "good.toml").write_text('[listen]\naddresses = ["127.0.0.1"]\nport = 4433\n')
    r = run_cli("check-config", "good.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "ok: good.toml"
    assert "  listen: 127.0.0.1 port 4433" in lines
    assert "  metrics: 127.0.0.1:9443" in lines

    (tmp_path / "names.toml").write_text(
        '[control]\ngroup = "no-such-group"\n[[acl]]\nusers = ["nobody", "no-such-user"]\n'
        'groups = ["users", "no-such-group"]\nalpn = ["h3"]\n'
    )
    r = run_cli("check-config", "names.toml", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("ok: names.toml\n")
    assert r.stderr.splitlines() == [
        'warning: [[acl]] #1 users: no user "no-such-user" on this host',
        'warning: [[acl]] #1 groups: no group "no-such-group" on this host',
        'warning: [control] group: no group "no-such-group" on this host (the daemon will not '
        "start)",
    ]

    r = run_cli("check-config", "missing.toml", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, "missing.toml: cannot read: No such file or directory\n")


def test_route_tables_are_sized_for_the_first_flight_rate() -> None:
    """65536 routes for 10 s evicted live handshakes above ~6.5k new connections/s: the
    tables now follow [limits] first_flight_rate x route_ttl (plus a quarter), as a power of
    two, between 4096 and 2**22."""
    from steerd.daemon.config import LimitsConfig, first_flight_capacity

    assert first_flight_capacity(LimitsConfig()) == 131072  # 10000/s x 10 s x 1.25
    assert first_flight_capacity(LimitsConfig(first_flight_rate=20000)) == 262144
    assert first_flight_capacity(LimitsConfig(first_flight_rate=10, route_ttl=1)) == 4096
    assert first_flight_capacity(LimitsConfig(first_flight_rate=10**6, route_ttl=3600)) == 2**22
    config = parse_config({"limits": {"first_flight_rate": 20000}}, "t.toml")
    assert config.limits.first_flight_rate == 20000


def test_tenant_limits_parse_with_defaults_below_the_global_ones() -> None:
    """Per-uid shares of the pool and the connections: 64 of 256 slots, 16 of 64
    connections and 3 generations per app by default, so one tenant at its limits leaves
    most to the others; a smaller global limit lowers an unset share to it, and a share
    written above it is an error (above)."""
    d = parse("").limits
    assert (d.uid_worker_slots, d.app_generations, d.uid_control_connections) == (64, 3, 16)
    small = parse("[limits]\nworker_slots = 8\ncontrol_connections = 4").limits
    assert (small.uid_worker_slots, small.uid_control_connections) == (8, 4)
    set_ = parse("[limits]\nuid_worker_slots = 256\napp_generations = 64\n"
                 "uid_control_connections = 1").limits
    assert (set_.uid_worker_slots, set_.app_generations, set_.uid_control_connections) == (
        256, 64, 1)
    from steerd.daemon.config import summary

    assert ("tenant limits: per uid other than 0, 64 worker slots (draining generations "
            "included) and 16 control connections; 3 generations per app") in summary(parse(""))


def test_learned_tables_must_hold_every_learned_slot() -> None:
    """Issue 18: the learned tables (65536 = 16 slots x 4096) could be filled. Now each
    learned-mode slot needs its quota plus its unproven budget, and the tables must hold
    that for every slot that may be in learned mode at once (learned_slots, which the
    registry enforces): unset, it is what the tables hold; written, it is checked."""
    d = parse("").limits
    assert (d.learned_unproven_ttl, d.learned_unproven_quota, d.learned_slots) == (3.0, 2048, 10)
    assert LimitsConfig().learned_slots == d.learned_slots
    assert parse("[limits]\nlearned_quota = 1024\nlearned_unproven_quota = 1024"
                 ).limits.learned_slots == 32
    assert parse("[limits]\nworker_slots = 4").limits.learned_slots == 4
    big = parse("[limits]\nlearned_slots = 16\nlearned_capacity = 98304").limits
    assert big.learned_slots == 16
    for text, message in [
        ("[limits]\nlearned_slots = 16",
         "[limits] learned_capacity: 65536 entries cannot hold learned_slots 16 x (learned_quota "
         "4096 + learned_unproven_quota 2048 = 6144 entries per learned-mode slot) = 98304: "
         "raise learned_capacity or lower learned_slots, learned_quota or learned_unproven_quota"),
        ("[limits]\nlearned_capacity = 4096",
         "[limits] learned_capacity: 4096 entries cannot hold one learned-mode slot "
         "(learned_quota 4096 + learned_unproven_quota 2048 = 6144 entries per learned-mode "
         "slot): raise learned_capacity or lower learned_quota or learned_unproven_quota"),
        ("[limits]\nlearned_slots = 257", "[limits] learned_slots: must be an integer 1..256 "
         "(at most [limits] worker_slots), got 257"),
        ("[limits]\nlearned_slots = 0", "[limits] learned_slots: must be an integer 1..256 "
         "(at most [limits] worker_slots), got 0"),
        ("[limits]\nlearned_unproven_ttl = 0.1",
         "[limits] learned_unproven_ttl: must be a number of seconds 0.5..60, got 0.1"),
        ("[limits]\nlearned_unproven_quota = 8",
         "[limits] learned_unproven_quota: must be an integer 16..4194304, got 8"),
    ]:
        assert error(text) == "steerd.toml: " + message
