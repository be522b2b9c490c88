"""Turn the raw UDP datagrams of clients' first flights into steering decisions.

API (what ``steerd classify``, the daemon and the benchmark use)::

    asm = FirstFlightAssembler(AssemblerConfig())      # all limits have sane defaults
    result = asm.feed(datagram, addr, now)              # now: caller's clock, seconds
    result = asm.feed(datagram, origin, now, origin.client)  # or: key on part of addr
    match result:
        case Ready():     # result.version, .dcid, .scid, .client_hello (.sni, .alpn, ...),
                          # .datagrams: every accepted datagram of the flight as (bytes, addr),
                          # in arrival order -> route the connection, re-inject them all;
                          # .started: arrival of the flight's first datagram
        case NeedMore():  # buffered; nothing to do yet
        case VersionNegotiationNeeded():  # .version, .dcid, .scid -> answer with VN
        case Rejected():  # .reason (stable token), .dcid (or None), .detail;
                          # .connection_dropped: the pending connection went with it
    asm.expire(now)     # drop pending connections older than the TTL (feed does it too)
    asm.pending_count, asm.pending_bytes, asm.early_count, asm.early_bytes, asm.stats

The assembler never does I/O and never reads a clock.

Keys. A pending connection is keyed by the client's original Destination Connection ID AND
the client's address: ``feed``'s ``peer`` argument (any hashable: the daemon passes the
client's (IP, port)), or ``addr`` itself when ``peer`` is not given. So a sender who learns or
guesses a client's DCID but sends from another address cannot touch that client's pending
flight: its datagrams (conflicting CRYPTO data that would drop the connection, a 0-RTT
datagram, bytes that would eat the connection's budget) open, extend or drop an entry of its
own. The price: a client whose NAT rebinds in the middle of its first flight (rare: a flight
lasts a round trip at most) becomes two pending entries, each completing or expiring on its
own; the client's retransmissions from its new address complete the second. Once a
connection is decided (Ready or Rejected with ``connection_dropped``) the assembler forgets
it: later datagrams of that key are the caller's to route (feeding one anyway just starts a
new pending entry; nothing breaks).

What a pending connection holds, and why:

* Initial packets: opened with keys derived once per connection (cached in the entry); their
  CRYPTO frames go into a bounded :class:`~quic.reassembly.CryptoReassembler`. As soon as the
  gap-free prefix holds a whole ClientHello, it is parsed and the answer is Ready — in
  whatever order the datagrams came and however the client cut its CRYPTO frames. (A new
  connection whose single CRYPTO frame holds the whole ClientHello skips the reassembler and
  the pending table altogether: the common one-datagram case stays cheap.)
* 0-RTT packets (and Initial retransmissions) of the same key: kept verbatim, to be forwarded
  with the flight so the chosen server sees everything the client sent.
* 0-RTT before any Initial (reordering): kept in a table of its own, the *early* table
  (``max_early`` entries, ``max_early_bytes``), until an Initial of the same key arrives; then
  the early entry's datagrams move, in arrival order, to the head of a normal pending entry
  (or of the Ready answer). Anyone can send 0-RTT datagrams with random DCIDs at no cost (no
  encryption to get right), so the two tables never compete: a flood of them evicts only
  other early entries (oldest first), never a half-assembled flight holding Initial data.

Limits: ``max_pending`` connections with Initial data, ``max_bytes_per_connection`` and
``max_bytes_total`` (buffered datagrams plus reassembly buffers, so a tiny fragment at a large
offset is charged for the buffer it causes), and a TTL counted from the connection's first
Initial-bearing datagram (an early entry's from its first 0-RTT datagram; promoted, the
connection starts a TTL of its own). When full, the oldest pending connection is evicted
first: a flood of half-flights can only push out other half-flights, never an already decided
connection. The early table has the same rules with its own caps, so memory is bounded by
``max_bytes_total + max_early_bytes``. ``pending_count``/``pending_bytes`` describe the main
table, ``early_count``/``early_bytes`` the early one; ``stats`` counts evictions and expiries
of each separately (``evicted``/``expired`` and ``evicted_early``/``expired_early``).

Per-datagram rules (RFC 9000): a datagram carrying an Initial must be at least 1200 bytes
(§14.1) and its DCID at least 8 bytes (§7.2); an unsupported version gets Version
Negotiation only for datagrams of at least 1200 bytes (§6.1, §14.1); coalesced packets with
another DCID than the first are ignored (§12.2); Handshake packets and short headers are never
part of a client's first flight. An Initial that fails to decrypt is dropped alone (§12.2:
packets that fail authentication are discarded) and does not hurt the pending connection; a
decrypted Initial that breaks the protocol (forbidden frame, conflicting CRYPTO data, data
beyond the cap, a malformed ClientHello) drops the whole pending connection of its key (with
its early datagrams, if any).

``Rejected.reason`` is one of :data:`REJECT_REASONS` (stable tokens: metrics labels and
``steerd classify`` output).
"""

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from quic.crypto import PacketKeys, derive_initial_keys, open_initial
from quic.errors import QuicError
from quic.frames import parse_initial_frames
from quic.packet import VERSION_1, VERSION_2, LongHeader, PacketType, parse_long_header
from quic.reassembly import DEFAULT_CRYPTO_CAP, DEFAULT_MAX_RANGES, CryptoReassembler
from quic.tls import ClientHello, client_hello_length, parse_client_hello

Addr = Any  # whatever the caller uses for a peer address; stored and handed back untouched
_Key = tuple[bytes, Hashable]  # (original DCID, client address): see the module docstring

REJECT_REASONS = frozenset(
    {
        # the datagram itself (quic.packet)
        "not_long_header",  # short header or empty: never a first flight
        "truncated",  # also frames and ClientHello cut short
        "bad_cid_length",
        "fixed_bit_clear",
        "bad_length",
        "unexpected_version_negotiation",
        "short_unknown_version",  # < 1200 bytes: no Version Negotiation (RFC 9000 §6.1)
        "unexpected_packet_type",  # Handshake or Retry from a client
        "short_dcid",  # < 8 bytes (RFC 9000 §7.2)
        "short_initial",  # < 1200 bytes (RFC 9000 §14.1)
        "version_mismatch",  # another version than the connection's earlier packets
        "connection_over_budget",
        "decrypt_failed",
        "client_closed",  # CONNECTION_CLOSE in the client's Initial
        # the frames (quic.frames)
        "no_frames",
        "forbidden_frame",
        "frame_encoding",
        # the CRYPTO stream (quic.reassembly)
        "crypto_over_cap",
        "crypto_conflict",
        "crypto_fragmented",
        # the ClientHello (quic.tls)
        "not_client_hello",
        "bad_client_hello",
        "bad_sni",
        "duplicate_extension",
    }
)

MIN_INITIAL_DATAGRAM = 1200  # RFC 9000 §14.1
MIN_CLIENT_DCID_LEN = 8  # RFC 9000 §7.2
# Module constants for feed(): attribute lookups on the enum class cost on every datagram.
_INITIAL, _ZERO_RTT = PacketType.INITIAL, PacketType.ZERO_RTT
_V1, _V2 = VERSION_1, VERSION_2  # quic.packet.SUPPORTED_VERSIONS


@dataclass(frozen=True, slots=True)
class AssemblerConfig:
    """Limits of one assembler; the defaults suit a busy public server."""

    crypto_cap: int = DEFAULT_CRYPTO_CAP  # CRYPTO bytes per connection (RFC 9000 §7.5: >= 4096)
    max_crypto_ranges: int = DEFAULT_MAX_RANGES  # CRYPTO holes open at once per connection
    max_pending: int = 4096  # pending connections
    max_bytes_per_connection: int = 64 * 1024  # datagrams + reassembly buffer, one connection
    max_bytes_total: int = 32 * 1024 * 1024  # the same over all pending connections
    ttl: float = 10.0  # seconds from a connection's first datagram to its eviction
    # The early table (0-RTT seen, no Initial yet); 0 = derived from the limits above:
    max_early: int = 0  # entries; 0: max(64, max_pending // 8)
    max_early_bytes: int = 0  # 0: max(max_bytes_total // 8, max_bytes_per_connection)

    def __post_init__(self) -> None:
        if self.crypto_cap < 4096:
            raise ValueError("crypto_cap must be at least 4096 (RFC 9000 §7.5)")
        if self.max_pending < 1 or self.ttl <= 0:
            raise ValueError("max_pending and ttl must be positive")
        if self.max_bytes_per_connection < MIN_INITIAL_DATAGRAM + self.crypto_cap:
            raise ValueError("max_bytes_per_connection must hold a datagram and the CRYPTO cap")
        if self.max_bytes_total < self.max_bytes_per_connection:
            raise ValueError("max_bytes_total must be at least max_bytes_per_connection")
        # Frozen: the derived defaults are written once, here, so readers see plain numbers.
        if self.max_early == 0:
            object.__setattr__(self, "max_early", max(64, self.max_pending // 8))
        if self.max_early_bytes == 0:
            early_bytes = max(self.max_bytes_total // 8, self.max_bytes_per_connection)
            object.__setattr__(self, "max_early_bytes", early_bytes)
        if self.max_early < 1:
            raise ValueError("max_early must be positive")
        if self.max_early_bytes < self.max_bytes_per_connection:
            raise ValueError("max_early_bytes must be at least max_bytes_per_connection")


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The datagram was buffered with its connection; the ClientHello is not complete yet."""

    dcid: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """A complete ClientHello: everything needed to steer, and the datagrams to forward."""

    version: int
    dcid: bytes
    scid: bytes
    client_hello: ClientHello
    datagrams: tuple[tuple[bytes, Addr], ...]  # arrival order, this datagram included
    started: float = 0.0  # ``now`` of the flight's first datagram (0-RTT ones included)

    @property
    def sni(self) -> str | None:
        return self.client_hello.sni

    @property
    def alpn(self) -> tuple[str, ...]:
        return self.client_hello.alpn


@dataclass(frozen=True, slots=True)
class Rejected:
    """The datagram is not accepted; ``reason`` is a stable lower_snake_case token."""

    reason: str
    dcid: bytes | None
    detail: str = ""
    connection_dropped: bool = False  # a pending connection of this DCID was discarded too


@dataclass(frozen=True, slots=True)
class VersionNegotiationNeeded:
    """A datagram large enough to start a connection, in a version we do not speak."""

    version: int
    dcid: bytes
    scid: bytes


FeedResult = NeedMore | Ready | Rejected | VersionNegotiationNeeded
_DECIDED = (Rejected, VersionNegotiationNeeded)  # what feed's first step may answer with


@dataclass(slots=True)
class AssemblerStats:
    """Counters since creation (monotonic, for metrics)."""

    ready: int = 0
    rejected: int = 0
    evicted: int = 0  # connections with Initial data pushed out by the count or byte limits
    expired: int = 0  # connections with Initial data past their TTL
    version_negotiation: int = 0
    evicted_early: int = 0  # early-table entries (0-RTT only, no Initial yet) pushed out
    expired_early: int = 0  # early-table entries past their TTL


class _Pending:
    """One undecided connection that has sent Initial data (the main table)."""

    __slots__ = ("bytes", "created", "datagrams", "keys", "reasm", "scid", "started", "version")

    def __init__(self, version: int, created: float, cfg: AssemblerConfig) -> None:
        self.version = version
        self.created = created  # TTL and eviction order
        self.started = created  # its first datagram, an early 0-RTT one included
        self.keys: PacketKeys | None = None
        self.scid: bytes | None = None
        self.reasm = CryptoReassembler(cfg.crypto_cap, cfg.max_crypto_ranges)
        self.datagrams: list[tuple[bytes, Addr]] = []
        self.bytes = 0  # datagram bytes + reassembly buffer, as charged to the budgets


class _Early:
    """A connection seen only through 0-RTT so far (the early table): its datagrams, no
    reassembler (it has no CRYPTO data), so a flood of them costs little besides the bytes."""

    __slots__ = ("bytes", "created", "datagrams", "version")

    def __init__(self, version: int, created: float) -> None:
        self.version = version
        self.created = created
        self.datagrams: list[tuple[bytes, Addr]] = []
        self.bytes = 0


@dataclass(slots=True)
class FirstFlightAssembler:
    """Bounded store of pending first flights; see the module docstring for the contract."""

    config: AssemblerConfig = field(default_factory=AssemblerConfig)
    stats: AssemblerStats = field(default_factory=AssemblerStats)
    # Both tables: insertion order = age order (TTL and eviction walk them from the front).
    # A key is in one table at most: an early entry moves to the main one with its Initial.
    _pending: dict[_Key, _Pending] = field(default_factory=dict, init=False, repr=False)
    _early: dict[_Key, _Early] = field(default_factory=dict, init=False, repr=False)
    _bytes: int = field(default=0, init=False)
    _early_bytes: int = field(default=0, init=False)

    @property
    def pending_count(self) -> int:
        """Pending connections with Initial data (the main table, at most ``max_pending``)."""
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes charged to the main table (at most ``max_bytes_total``)."""
        return self._bytes

    @property
    def early_count(self) -> int:
        """Connections seen only through 0-RTT so far (at most ``max_early``)."""
        return len(self._early)

    @property
    def early_bytes(self) -> int:
        """Bytes charged to the early table (at most ``max_early_bytes``)."""
        return self._early_bytes

    def is_pending(self, dcid: bytes, peer: Hashable) -> bool:
        """Whether a connection of this DCID from this client is being assembled (in either
        table); ``peer`` as passed to :meth:`feed` (``addr`` when ``feed`` got no ``peer``)."""
        key = (dcid, peer)
        return key in self._pending or key in self._early

    def expire(self, now: float) -> int:
        """Drop pending connections (either table) whose TTL has passed; return how many."""
        deadline = now - self.config.ttl
        pending = self._pending
        n = 0
        while pending:
            key = next(iter(pending))
            entry = pending[key]
            if entry.created > deadline:
                break
            del pending[key]
            self._bytes -= entry.bytes
            n += 1
        self.stats.expired += n
        early = self._early
        m = 0
        while early:
            key = next(iter(early))
            held = early[key]
            if held.created > deadline:
                break
            del early[key]
            self._early_bytes -= held.bytes
            m += 1
        self.stats.expired_early += m
        return n + m

    def _drop(self, key: _Key) -> bool:
        """Forget the connection of ``key``, in whichever table; whether there was one."""
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._bytes -= entry.bytes
            return True
        held = self._early.pop(key, None)
        if held is not None:
            self._early_bytes -= held.bytes
            return True
        return False

    def _reject(
        self, reason: str, dcid: bytes | None, detail: str = "", key: _Key | None = None
    ) -> Rejected:
        """Refuse the datagram and, with ``key``, drop that pending connection."""
        dropped = key is not None and self._drop(key)
        self.stats.rejected += 1
        return Rejected(reason, dcid, detail, dropped)

    def _make_room(self, need: int, new_connection: bool, keep: _Key | None = None,
                   early: bool = False) -> None:
        """Evict oldest-first (never ``keep``) from one table until the connection and
        ``need`` bytes fit its caps: the main table or, with ``early``, the early one. Each
        table only ever evicts its own entries."""
        cfg = self.config
        table = self._early if early else self._pending
        cap, byte_cap = ((cfg.max_early, cfg.max_early_bytes) if early
                         else (cfg.max_pending, cfg.max_bytes_total))
        extra = 1 if new_connection else 0
        while len(table) + extra > cap or (
                self._early_bytes if early else self._bytes) + need > byte_cap:
            victim = next((key for key in table if key != keep), None)
            if victim is None:
                return
            freed = table.pop(victim).bytes
            if early:
                self._early_bytes -= freed
                self.stats.evicted_early += 1
            else:
                self._bytes -= freed
                self.stats.evicted += 1

    def _feed_early(
        self,
        key: _Key,
        held: _Early | None,
        version: int,
        datagram: bytes,
        addr: Addr,
        now: float,
    ) -> NeedMore:
        """A 0-RTT-only datagram of a key with no Initial data yet: into the early table."""
        size = len(datagram)
        if held is None:
            self._make_room(size, True, early=True)
            held = self._early[key] = _Early(version, now)
        elif self._early_bytes + size > self.config.max_early_bytes:
            self._make_room(size, False, keep=key, early=True)
        held.datagrams.append((datagram, addr))
        held.bytes += size
        self._early_bytes += size
        return NeedMore(key[0])

    def feed(
        self, datagram: bytes, addr: Addr, now: float, peer: Hashable | None = None
    ) -> FeedResult:
        """Take one datagram from ``addr`` received at ``now``; see the module docstring.

        ``peer`` is the client's address as the connection key knows it (any hashable, e.g.
        the (IP, port) inside a richer ``addr``); ``None`` keys on ``addr`` itself, which must
        then be hashable. Datagrams of one DCID from different peers are different
        connections.

        Written for the per-datagram cost (bench/classify): enum members are module
        constants, a datagram with one packet (the usual case) skips the coalescing walk, a
        new connection whose ClientHello fits one CRYPTO frame never enters the tables, and
        a connection's CRYPTO data goes straight to its reassembler.
        """
        if self._pending or self._early:
            self._expire_due(now)
        headers = self._flight_packets(datagram)
        if isinstance(headers, _DECIDED):
            return headers  # refused, or to be answered with Version Negotiation
        first = headers[0]
        version, dcid = first.version, first.dcid
        size = len(datagram)
        key = (dcid, addr if peer is None else peer)
        entry = self._pending.get(key) if self._pending else None
        held = self._early.get(key) if entry is None and self._early else None
        has_initial = self._check_datagram(
            headers, entry if entry is not None else held, version, size, key
        )
        if isinstance(has_initial, Rejected):
            return has_initial
        if not has_initial:  # 0-RTT only: kept with the flight it belongs to
            if entry is None:
                return self._feed_early(key, held, version, datagram, addr, now)
            return self._feed_pending(entry, [], datagram, addr, key)
        keys = entry.keys if entry is not None else None
        if keys is None:
            keys = derive_initial_keys(dcid, version, server=False)
        opened = self._open_initials(datagram, headers, keys, key)
        if isinstance(opened, Rejected):
            return opened
        crypto, scid = opened
        if entry is None:
            ready = self._ready_at_once(crypto, version, scid, datagram, addr, now, key, held)
            if ready is not None:
                return ready
            entry = self._admit(key, held, version, now, keys, scid, size)
        return self._feed_pending(entry, crypto, datagram, addr, key)

    # The steps of feed, in the order it takes them. A step that can decide the datagram
    # (refuse it, answer it, or find the flight Ready) returns that result instead of its
    # value. They take and return plain values: the only object made just to hand values
    # from one step to the next is _open_initials' (frames, SCID) pair.

    def _expire_due(self, now: float) -> None:
        """Feed expires too, so an assembler whose owner never calls :meth:`expire` is
        still bounded in time; it looks only at each table's oldest entry (the front), so
        a datagram pays a lookup, not a walk, unless something is actually due."""
        deadline = now - self.config.ttl
        pending, early_table = self._pending, self._early
        if (pending and pending[next(iter(pending))].created <= deadline) or (
            early_table and early_table[next(iter(early_table))].created <= deadline
        ):
            self.expire(now)

    def _flight_packets(
        self, datagram: bytes
    ) -> tuple[LongHeader, ...] | list[LongHeader] | Rejected | VersionNegotiationNeeded:
        """The packets of the datagram that can belong to a client's first flight. Only a
        long header can open a connection, and only its invariant fields mean anything
        before the version is known: a version we do not speak gets Version Negotiation
        (when the datagram is big enough to deserve an answer, RFC 9000 §6.1, §14.1).
        Coalesced packets of another DCID or version are someone else's business, and so
        is whatever follows a packet that does not parse (§12.2). A datagram of one packet
        (the usual case; zero padding, if any, follows it) skips the walk."""
        size = len(datagram)
        if size == 0 or not datagram[0] & 0x80:
            return self._reject("not_long_header", None, "short header or empty datagram")
        try:
            first = parse_long_header(datagram, 0)
        except QuicError as e:
            return self._reject(e.reason, None, e.detail)
        version, _ptype, dcid, scid, _token, _start, _pn_offset, pos = first
        if version != _V1 and version != _V2:
            if version == 0:
                return self._reject("unexpected_version_negotiation", None)
            if size < MIN_INITIAL_DATAGRAM:
                return self._reject("short_unknown_version", None, f"{size} bytes")
            self.stats.version_negotiation += 1
            return VersionNegotiationNeeded(version, dcid, scid)
        if pos >= size or not datagram[pos] & 0x80:
            return (first,)
        headers = [first]
        while pos < size and datagram[pos] & 0x80:
            try:
                h = parse_long_header(datagram, pos)
            except QuicError:
                break  # RFC 9000 §12.2: the rest of the datagram is not ours to judge
            if h.dcid == dcid and h.version == version:
                headers.append(h)
            pos = h.end
        return headers

    def _check_datagram(
        self,
        headers: tuple[LongHeader, ...] | list[LongHeader],
        known: _Pending | _Early | None,
        version: int,
        size: int,
        key: _Key,
    ) -> bool | Rejected:
        """Everything that refuses a datagram before any work (decryption) is spent on it.
        A first flight holds Initial and 0-RTT packets only, from a DCID of at least 8
        bytes (RFC 9000 §7.2), in datagrams of at least 1200 bytes when they carry an
        Initial (§14.1, the anti-amplification floor): anything else is not a client
        starting a connection and takes its key's pending connection down with it. Then
        the key's connection, if any: it keeps the version it started with and its byte
        budget; breaking those refuses only the datagram. Returns whether the datagram
        carries an Initial."""
        dcid = key[0]
        has_initial = False
        for h in headers:
            ptype = h.packet_type
            if ptype is _INITIAL:
                has_initial = True
            elif ptype is not _ZERO_RTT:
                name = ptype.name.lower() if ptype is not None else "unknown"
                return self._reject(
                    "unexpected_packet_type", dcid, f"{name} in a first flight", key
                )
        if len(dcid) < MIN_CLIENT_DCID_LEN:
            return self._reject("short_dcid", dcid, f"{len(dcid)}-byte DCID", key)
        if has_initial and size < MIN_INITIAL_DATAGRAM:
            return self._reject("short_initial", dcid, f"{size}-byte datagram", key)
        if known is not None:
            if known.version != version:
                detail = f"0x{version:08x} after 0x{known.version:08x}"
                return self._reject("version_mismatch", dcid, detail)
            if known.bytes + size > self.config.max_bytes_per_connection:
                return self._reject("connection_over_budget", dcid,
                                    f"{known.bytes} bytes buffered")
        return has_initial

    def _open_initials(
        self,
        datagram: bytes,
        headers: tuple[LongHeader, ...] | list[LongHeader],
        keys: PacketKeys,
        key: _Key,
    ) -> tuple[list[tuple[int, bytes]], bytes] | Rejected:
        """Anyone can send an Initial that does not decrypt, so such a packet is dropped
        alone (RFC 9000 §12.2) and hurts nobody's pending connection; one that decrypts is
        the client's own word, so a protocol violation in it drops the connection. Returns
        the CRYPTO frames of the packets opened, in order, and the SCID of the last one."""
        dcid = key[0]
        crypto: list[tuple[int, bytes]] | None = None  # the first packet's list, then grown
        scid = b""
        for h in headers:
            if h.packet_type is not _INITIAL:
                continue
            try:
                payload = open_initial(datagram, h.start, h.pn_offset, h.end, keys)
            except QuicError:
                continue  # undecryptable: discard this packet only
            try:
                frames, closed = parse_initial_frames(payload)
            except QuicError as e:
                return self._reject(e.reason, dcid, e.detail, key)
            if closed:
                return self._reject("client_closed", dcid, "CONNECTION_CLOSE in Initial", key)
            if crypto:
                crypto += frames
            else:
                crypto = frames
            scid = h.scid
        if crypto is None:
            self.stats.rejected += 1
            return Rejected("decrypt_failed", dcid, "no Initial packet could be opened")
        return crypto, scid

    def _ready_at_once(
        self,
        crypto: list[tuple[int, bytes]],
        version: int,
        scid: bytes,
        datagram: bytes,
        addr: Addr,
        now: float,
        key: _Key,
        held: _Early | None,
    ) -> Ready | Rejected | None:
        """The common case (aioquic, ngtcp2, most stacks): a new connection whose one CRYPTO
        frame holds the whole ClientHello. Same checks as the reassembled path, but nothing
        is stored, so the one-datagram flight stays cheap. None: not that case."""
        if len(crypto) != 1 or crypto[0][0] != 0:
            return None
        data = crypto[0][1]
        n = len(data)
        dcid = key[0]
        try:
            if n > self.config.crypto_cap:
                raise QuicError("crypto_over_cap", f"{n} CRYPTO bytes > cap")
            if n >= 4 and n >= client_hello_length(data):
                hello = parse_client_hello(data)
                self.stats.ready += 1
                if held is None:
                    return Ready(version, dcid, scid, hello, ((datagram, addr),), now)
                self._drop(key)  # its 0-RTT datagrams go first, in arrival order
                datagrams = (*held.datagrams, (datagram, addr))
                return Ready(version, dcid, scid, hello, datagrams, held.created)
        except QuicError as e:
            return self._reject(e.reason, dcid, e.detail, key)
        return None

    def _admit(
        self,
        key: _Key,
        held: _Early | None,
        version: int,
        now: float,
        keys: PacketKeys,
        scid: bytes,
        size: int,
    ) -> _Pending:
        """A connection's first Initial data makes it a main-table entry, with its keys
        (derived once per connection) and the client's SCID. An early entry of the key moves
        over with it, its datagrams (and their bytes) first: the flight is forwarded in
        arrival order. Room is made first, so the newcomer never evicts itself."""
        pending = self._pending
        cfg = self.config
        carried = 0
        if held is not None:
            carried = held.bytes
            del self._early[key]
            self._early_bytes -= carried
        need = size + carried
        if len(pending) >= cfg.max_pending or self._bytes + need > cfg.max_bytes_total:
            self._make_room(need, True)
        entry = _Pending(version, now, cfg)
        entry.keys = keys
        if held is not None:
            entry.started = held.created
            entry.datagrams = held.datagrams
            entry.bytes = carried
            self._bytes += carried
        pending[key] = entry
        entry.scid = scid
        return entry

    def _feed_pending(
        self,
        entry: _Pending,
        crypto: list[tuple[int, bytes]],
        datagram: bytes,
        addr: Addr,
        key: _Key,
    ) -> FeedResult:
        """A main-table connection keeps every datagram (to forward them all once decided)
        and its CRYPTO data, both charged to its budget and the table's: what a flood of
        half-flights can make the assembler hold is bounded here."""
        cfg = self.config
        size = len(datagram)
        reasm = entry.reasm
        buf = reasm._buf
        before = len(buf)
        try:
            have = reasm.extend(crypto)
        except QuicError as e:
            return self._reject(e.reason, key[0], e.detail, key)
        grown = size + len(buf) - before
        if entry.bytes + grown > cfg.max_bytes_per_connection:
            return self._reject("connection_over_budget", key[0], "CRYPTO buffer too large", key)
        entry.datagrams.append((datagram, addr))
        entry.bytes += grown
        self._bytes += grown
        if self._bytes > cfg.max_bytes_total:
            # Evict others (oldest first) rather than the connection that just made progress.
            self._make_room(0, False, keep=key)
        return self._complete(entry, have, key)

    def _complete(self, entry: _Pending, have: int, key: _Key) -> FeedResult:
        """The flight is decided as soon as the gap-free prefix holds a whole ClientHello,
        in whatever order its pieces came; a ClientHello announcing more than the CRYPTO cap
        can never complete, so it is refused now rather than left to expire."""
        dcid = key[0]
        if have < 4:
            return NeedMore(dcid)
        reasm = entry.reasm
        try:
            total = client_hello_length(reasm._buf)
            if total > reasm.cap:
                raise QuicError("crypto_over_cap", f"ClientHello of {total} bytes > cap")
            if have < total:
                return NeedMore(dcid)
            hello = parse_client_hello(reasm.data(total))
        except QuicError as e:
            return self._reject(e.reason, dcid, e.detail, key)
        self._drop(key)
        self.stats.ready += 1
        return Ready(entry.version, dcid, entry.scid or b"", hello, tuple(entry.datagrams),
                     entry.started)

