"""Parse the TLS 1.3 ClientHello a QUIC client sends in its Initial CRYPTO stream.

Only what steering needs is extracted (RFC 8446 §4.1.2, RFC 6066 §3, RFC 7301, RFC 9001 §8.2,
draft-ietf-tls-esni): the server name, the ALPN list in the client's order, supported
versions, key-share groups, and whether QUIC transport parameters and ECH are present. Every
length is checked against its enclosing vector and vectors must end exactly where their
parent ends: the answer steers a connection, so a ClientHello that a strict TLS stack would
refuse must not be classified "successfully" here. Every failure is a ``QuicError``.

Choices worth knowing:

* The server name is returned lowercased (DNS names are case-insensitive and steering rules
  compare it). The list must be exactly one ``host_name`` (type 0) entry (RFC 6066 allows one
  name per type and defines no other type); the name must be a dotted ASCII hostname (IDNA
  names arrive as ``xn--`` A-labels), <= 253 bytes. One trailing dot (the absolute form,
  ``example.com.``) is accepted and removed, so such a client reaches the app that claims
  ``example.com`` (the registry compares names without it) instead of being dropped: RFC 6066
  says the name "MUST NOT contain the trailing dot", yet some clients send what their user
  typed, and a server would rather answer them than let them time out.
* ALPN names are bytes on the wire; they are decoded as Latin-1, which never fails and maps
  each byte to one code point, so ``name.encode("latin-1")`` gives the wire bytes back.
* ``sni_is_outer`` is true whenever an ``encrypted_client_hello`` extension is present: the
  server name is then the ECH outer public name, not necessarily the name the client wants.
  Chromium sends GREASE ECH by default, which is indistinguishable from real ECH by design,
  so for Chromium this is true even when the SNI is the real name.
* Duplicate extensions are rejected (RFC 8446 §4.2), as is a ``pre_shared_key`` that is not
  the last extension.
"""

import re
from struct import Struct, unpack_from
from struct import error as StructError
from typing import NamedTuple

from quic.errors import QuicError

HANDSHAKE_CLIENT_HELLO = 1

EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
EXT_PRE_SHARED_KEY = 0x0029
EXT_SUPPORTED_VERSIONS = 0x002B
EXT_KEY_SHARE = 0x0033
EXT_QUIC_TRANSPORT_PARAMETERS = 0x0039
EXT_QUIC_TRANSPORT_PARAMETERS_DRAFT = 0xFFA5
EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}".encode())
MAX_HOSTNAME_LEN = 253
_U16_PAIR = Struct(">HH")
# Pre-compiled ">{n}H" for the vector sizes real ClientHellos use; formatting the struct
# format per call costs more than the unpacking itself.
_U16_VECTORS = tuple(Struct(f">{n}H") for n in range(64))


def _u16_vector(data: bytes, pos: int, count: int) -> tuple[int, ...]:
    if count < 64:
        return _U16_VECTORS[count].unpack_from(data, pos)
    return unpack_from(f">{count}H", data, pos)


class ClientHello(NamedTuple):
    """What a ClientHello says about where its connection should go.

    A NamedTuple (immutable, built by ``tuple.__new__`` in one C call): one is made per
    classified connection, and a frozen 10-field dataclass cost about 11.5k instructions of
    ``object.__setattr__`` calls to build.
    """

    sni: str | None
    alpn: tuple[str, ...]
    supported_versions: tuple[int, ...]
    key_share_groups: tuple[int, ...]
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]  # extension types in wire order (GREASE included)
    has_transport_parameters: bool  # quic_transport_parameters (0x39)
    has_draft_transport_parameters: bool  # the pre-RFC codepoint 0xffa5
    sni_is_outer: bool  # encrypted_client_hello present: sni is the ECH outer public name
    length: int  # the whole handshake message, header included


_new_hello = tuple.__new__


def client_hello_length(header: bytes | bytearray) -> int:
    """Total length (4-byte header included) of the handshake message starting ``header``.

    Lets the assembler know how much CRYPTO data makes a complete ClientHello before it has
    all of it; rejects anything that is not a ClientHello as early as the first byte.
    """
    if len(header) < 4:
        raise QuicError("truncated", "handshake header needs 4 bytes")
    if header[0] != HANDSHAKE_CLIENT_HELLO:
        raise QuicError("not_client_hello", f"handshake type {header[0]} is not ClientHello")
    return 4 + ((header[1] << 16) | (header[2] << 8) | header[3])


def _fail(what: str) -> QuicError:
    return QuicError("bad_client_hello", what)


def _parse_sni(data: bytes, start: int, end: int) -> str:
    if end - start < 5:
        raise _fail("server_name extension too short")
    if start + 2 + ((data[start] << 8) | data[start + 1]) != end:
        raise _fail("server_name list length mismatch")
    # RFC 6066 §3: at most one name per type, and host_name is the only type defined, so the
    # list must be exactly one host_name entry filling the extension.
    if data[start + 2] != 0:
        raise _fail(f"server_name type {data[start + 2]} is not host_name")
    if start + 5 + ((data[start + 3] << 8) | data[start + 4]) != end:
        raise _fail("server_name list is not exactly one host_name")
    raw = data[start + 5 : end]
    if raw[-1:] == b".":
        raw = raw[:-1]  # the absolute form: one dot only ("a.." stays invalid)
    if len(raw) > MAX_HOSTNAME_LEN or _HOSTNAME.fullmatch(raw) is None:
        raise QuicError("bad_sni", f"server name {raw[:64]!r} is not a valid hostname")
    return raw.decode("ascii").lower()


def _parse_alpn(data: bytes, start: int, end: int) -> tuple[str, ...]:
    if end - start < 2:
        raise _fail("ALPN extension too short")
    if start + 2 + ((data[start] << 8) | data[start + 1]) != end or end == start + 2:
        raise _fail("ALPN list length mismatch")
    names: list[str] = []
    pos = start + 2
    while pos < end:
        n = data[pos]
        if n == 0:
            raise _fail("empty ALPN protocol name")
        pos += 1 + n
        if pos > end:
            raise _fail("ALPN protocol name past its list")
        names.append(data[pos - n : pos].decode("latin-1"))
    return tuple(names)


def _parse_u16_list(data: bytes, start: int, end: int, prefix: int, what: str) -> tuple[int, ...]:
    """A vector of uint16 with a ``prefix``-byte length that must fill the extension."""
    if end - start < prefix:
        raise _fail(f"{what} extension too short")
    n = data[start] if prefix == 1 else (data[start] << 8) | data[start + 1]
    pos = start + prefix
    if pos + n != end or n % 2 or n == 0:
        raise _fail(f"{what} length mismatch")
    return _u16_vector(data, pos, n >> 1)


def _parse_key_share(data: bytes, start: int, end: int) -> tuple[int, ...]:
    if end - start < 2 or start + 2 + ((data[start] << 8) | data[start + 1]) != end:
        raise _fail("key_share length mismatch")
    groups: list[int] = []
    append = groups.append
    pos = start + 2
    unpack = _U16_PAIR.unpack_from
    while pos < end:
        try:  # an entry header straddling ``end`` fails ``pos > end`` below
            group, klen = unpack(data, pos)
        except StructError:
            raise _fail("key_share entry truncated") from None
        pos += 4 + klen
        if not klen or pos > end:
            raise _fail("empty key_exchange" if not klen else "key_exchange past its list")
        append(group)
    return tuple(groups)


def parse_client_hello(msg: bytes) -> ClientHello:
    """Parse one complete ClientHello handshake message (header included; trailing bytes
    after the message, such as a following handshake message, are ignored)."""
    n = len(msg)
    if n < 4:
        raise QuicError("truncated", "handshake header needs 4 bytes")
    if msg[0] != HANDSHAKE_CLIENT_HELLO:
        raise QuicError("not_client_hello", f"handshake type {msg[0]} is not ClientHello")
    total = end = 4 + ((msg[1] << 16) | (msg[2] << 8) | msg[3])
    if n < total:
        raise QuicError("truncated", f"ClientHello of {total} bytes, {n} held")
    data = msg if type(msg) is bytes else bytes(msg)
    # legacy_version(2) random(32) session_id<0..32>
    pos = 4 + 2 + 32
    if pos + 1 > end:
        raise _fail("truncated before legacy_session_id")
    sid_len = data[pos]
    if sid_len > 32:
        raise _fail("legacy_session_id longer than 32")
    pos += 1 + sid_len
    if pos + 2 > end:
        raise _fail("truncated before cipher_suites")
    cs_len = (data[pos] << 8) | data[pos + 1]
    if cs_len == 0 or cs_len % 2 or pos + 2 + cs_len > end:
        raise _fail("cipher_suites length mismatch")
    half = cs_len >> 1
    suites = (
        _U16_VECTORS[half].unpack_from(data, pos + 2)
        if half < 64
        else unpack_from(f">{half}H", data, pos + 2)
    )
    pos += 2 + cs_len
    if pos + 1 > end:
        raise _fail("truncated before compression_methods")
    cm_len = data[pos]
    pos += 1 + cm_len
    if cm_len == 0 or pos > end:
        raise _fail("legacy_compression_methods length mismatch")
    if pos + 2 > end:
        raise _fail("no extensions (TLS 1.3 requires them)")
    if pos + 2 + ((data[pos] << 8) | data[pos + 1]) != end:
        raise _fail("extensions length does not match the message length")
    pos += 2

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()
    types: list[int] = []
    append = types.append
    unpack = _U16_PAIR.unpack_from
    # Literal codepoints below (0, 16, 43, 51 = EXT_SERVER_NAME, EXT_ALPN,
    # EXT_SUPPORTED_VERSIONS, EXT_KEY_SHARE): global lookups cost on this, the hottest loop.
    while pos < end:
        # An extension header straddling ``end`` is caught by ``pos > end`` below (or, at the
        # very end of ``data``, by struct.error): one check per extension instead of two.
        try:
            etype, elen = unpack(data, pos)
        except StructError:
            raise _fail("extension header truncated") from None
        estart = pos + 4
        pos = estart + elen
        if pos > end:
            raise _fail(f"extension 0x{etype:04x} past the message end")
        append(etype)
        if etype <= 51:  # one compare skips the many extensions not parsed here
            if etype == 0:
                sni = _parse_sni(data, estart, pos)
            elif etype == 16:
                alpn = _parse_alpn(data, estart, pos)
            elif etype == 43:
                versions = _parse_u16_list(data, estart, pos, 1, "supported_versions")
            elif etype == 51:
                groups = _parse_key_share(data, estart, pos)
    seen = set(types)
    if len(seen) != len(types):
        dup = next(t for i, t in enumerate(types) if t in types[:i])
        raise QuicError("duplicate_extension", f"extension 0x{dup:04x} appears twice")
    # literals: 0x29 = EXT_PRE_SHARED_KEY, 0x39 / 0xffa5 = the transport parameters, 0xfe0d =
    # EXT_ENCRYPTED_CLIENT_HELLO
    if 0x29 in seen and types[-1] != 0x29:
        raise _fail("pre_shared_key is not the last extension")

    return _new_hello(
        ClientHello,
        (
            sni,
            alpn,
            versions,
            groups,
            suites,
            tuple(types),
            0x39 in seen,
            0xFFA5 in seen,
            0xFE0D in seen,
            total,
        ),
    )
