"""ClientHello parsing: real ClientHellos from aioquic's TLS stack, hand-built edge cases, and
strictness (every length checked, duplicates and misplaced pre_shared_key refused).

``build_client_hello`` and friends are also used by the flight and property tests: they lay
out a ClientHello exactly as RFC 8446 §4.1.2 specifies, so a test can change one field.
"""

import pytest
from aioquic import tls as aioquic_tls
from aioquic.buffer import Buffer

from quic.errors import QuicError
from quic.tls import (
    EXT_ALPN,
    EXT_ENCRYPTED_CLIENT_HELLO,
    EXT_PRE_SHARED_KEY,
    EXT_QUIC_TRANSPORT_PARAMETERS,
    EXT_QUIC_TRANSPORT_PARAMETERS_DRAFT,
    ClientHello,
    client_hello_length,
    parse_client_hello,
)


def ext(etype: int, body: bytes) -> bytes:
    return etype.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes((name_type,)) + len(n).to_bytes(2, "big") + n for n in names)
    return ext(0, len(entries).to_bytes(2, "big") + entries)


def alpn_ext(*names: bytes) -> bytes:
    body = b"".join(bytes((len(n),)) + n for n in names)
    return ext(EXT_ALPN, len(body).to_bytes(2, "big") + body)


def versions_ext(*versions: int) -> bytes:
    body = b"".join(v.to_bytes(2, "big") for v in versions)
    return ext(43, bytes((len(body),)) + body)


def key_share_ext(*groups: int, key_len: int = 32) -> bytes:
    body = b"".join(
        g.to_bytes(2, "big") + key_len.to_bytes(2, "big") + bytes(key_len) for g in groups
    )
    return ext(51, len(body).to_bytes(2, "big") + body)


def build_client_hello(
    extensions: list[bytes], suites: tuple[int, ...] = (0x1301,), session_id: bytes = b""
) -> bytes:
    """A ClientHello handshake message (4-byte header included) with these extensions."""
    exts = b"".join(extensions)
    body = (
        b"\x03\x03"
        + bytes(range(32))
        + bytes((len(session_id),))
        + session_id
        + (2 * len(suites)).to_bytes(2, "big")
        + b"".join(s.to_bytes(2, "big") for s in suites)
        + b"\x01\x00"
        + len(exts).to_bytes(2, "big")
        + exts
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def quic_hello(
    sni: str | None = "example.com", alpn: tuple[str, ...] = ("h3",), pad: int = 0
) -> bytes:
    """A plausible QUIC ClientHello; ``pad`` adds a padding extension (21) to make it long."""
    exts = [key_share_ext(0x001D), versions_ext(0x0304)]
    if sni is not None:
        exts.append(sni_ext(sni.encode()))
    if alpn:
        exts.append(alpn_ext(*(a.encode() for a in alpn)))
    exts.append(ext(EXT_QUIC_TRANSPORT_PARAMETERS, b"\x01\x02\x40\x64"))
    if pad:
        exts.append(ext(21, bytes(pad)))
    return build_client_hello(exts)


def aioquic_hello(alpn: list[str] | None, server_name: str | None) -> bytes:
    """The ClientHello aioquic's own TLS 1.3 stack writes (the bytes its QUIC client sends)."""
    ctx = aioquic_tls.Context(is_client=True, alpn_protocols=alpn, server_name=server_name)
    ctx.handshake_extensions = [(EXT_QUIC_TRANSPORT_PARAMETERS, b"\x01\x02\x40\x64")]
    bufs = {epoch: Buffer(capacity=8192) for epoch in aioquic_tls.Epoch}
    ctx.handle_message(b"", bufs)
    return bufs[aioquic_tls.Epoch.INITIAL].data


@pytest.mark.parametrize(
    ("alpn", "server_name"),
    [(["h3"], "example.com"), (["smb", "h3", "doq"], "Files.Example.ORG"), (["doq"], None)],
)
def test_aioquic_client_hello(alpn: list[str], server_name: str | None) -> None:
    raw = aioquic_hello(alpn, server_name)
    hello = parse_client_hello(raw)
    assert hello.sni == (server_name.lower() if server_name else None)
    assert hello.alpn == tuple(alpn)
    assert hello.supported_versions == (0x0304,)
    assert 0x001D in hello.key_share_groups  # x25519
    assert hello.has_transport_parameters and not hello.has_draft_transport_parameters
    assert not hello.sni_is_outer
    assert hello.length == len(raw)
    # aioquic's own parser reads the same message the same way
    theirs = aioquic_tls.pull_client_hello(Buffer(data=raw))
    assert list(hello.alpn) == theirs.alpn_protocols
    assert hello.sni == (theirs.server_name.lower() if theirs.server_name else None)
    assert list(hello.cipher_suites) == theirs.cipher_suites


def test_result_is_frozen() -> None:
    hello = parse_client_hello(quic_hello())
    assert isinstance(hello, ClientHello)
    with pytest.raises(AttributeError):
        hello.sni = "other"  # type: ignore[misc]


def test_fields() -> None:
    raw = build_client_hello(
        [
            key_share_ext(0x11EC, 0x001D),
            versions_ext(0x0A0A, 0x0304),
            sni_ext(b"xn--bcher-kva.example"),
            alpn_ext(b"smb", b"h3", b"\x0a\x0a"),
            ext(EXT_QUIC_TRANSPORT_PARAMETERS_DRAFT, b""),
            ext(EXT_ENCRYPTED_CLIENT_HELLO, b"\x00\x01\x02"),
        ],
        suites=(0x1301, 0x1302),
        session_id=bytes(32),
    )
    hello = parse_client_hello(raw)
    assert hello.sni == "xn--bcher-kva.example"
    assert hello.alpn == ("smb", "h3", "\n\n")  # Latin-1: always decodable, round-trips
    assert hello.alpn[2].encode("latin-1") == b"\x0a\x0a"
    assert hello.key_share_groups == (0x11EC, 0x001D)
    assert hello.supported_versions == (0x0A0A, 0x0304)
    assert hello.cipher_suites == (0x1301, 0x1302)
    assert hello.has_draft_transport_parameters and not hello.has_transport_parameters
    assert hello.sni_is_outer
    assert hello.extensions == (51, 43, 0, 16, 0xFFA5, 0xFE0D)


def test_no_sni_no_alpn() -> None:
    hello = parse_client_hello(quic_hello(sni=None, alpn=()))
    assert hello.sni is None and hello.alpn == ()


def test_trailing_bytes_after_message_ignored() -> None:
    raw = quic_hello()
    assert parse_client_hello(raw + b"\x02\x00\x00\x00").sni == "example.com"


def test_client_hello_length() -> None:
    raw = quic_hello(pad=3000)
    assert client_hello_length(raw[:4]) == len(raw)
    with pytest.raises(QuicError) as err:
        client_hello_length(b"\x01\x00")
    assert err.value.reason == "truncated"
    with pytest.raises(QuicError) as err:
        client_hello_length(b"\x02\x00\x00\x10")
    assert err.value.reason == "not_client_hello"


def test_every_truncation_rejected() -> None:
    raw = aioquic_hello(["h3"], "example.com")
    for cut in range(len(raw)):
        with pytest.raises(QuicError):
            parse_client_hello(raw[:cut])


def test_every_inner_length_change_rejected() -> None:
    """Inserting or removing one byte anywhere after the random, with the message header kept
    consistent, must fail: every vector's length has to match its contents exactly."""
    body = quic_hello()[4:]
    for at in range(2 + 32, len(body)):
        for mutated in (body[:at] + body[at + 1 :], body[:at] + b"\x00" + body[at:]):
            with pytest.raises(QuicError):
                parse_client_hello(b"\x01" + len(mutated).to_bytes(3, "big") + mutated)


@pytest.mark.parametrize(
    ("extensions", "reason"),
    [
        ([sni_ext(b"a.example"), sni_ext(b"b.example")], "duplicate_extension"),
        ([alpn_ext(b"h3"), alpn_ext(b"h3")], "duplicate_extension"),
        ([ext(EXT_PRE_SHARED_KEY, b"\x00"), alpn_ext(b"h3")], "bad_client_hello"),
        ([alpn_ext(b"h3", b"")], "bad_client_hello"),
        ([ext(EXT_ALPN, b"\x00\x00")], "bad_client_hello"),
        ([ext(EXT_ALPN, b"\x00\x04\x02h3")], "bad_client_hello"),
        ([ext(EXT_ALPN, b"\x00\x03\x05h3")], "bad_client_hello"),
        ([sni_ext(b"example.com..")], "bad_sni"),
        ([sni_ext(b".")], "bad_sni"),
        ([sni_ext(b".example.com")], "bad_sni"),
        ([sni_ext(b"")], "bad_sni"),
        ([sni_ext(b"exa mple.com")], "bad_sni"),
        ([sni_ext("bücher.example".encode())], "bad_sni"),
        ([sni_ext(b"a..b")], "bad_sni"),
        ([sni_ext(b"-a.example")], "bad_sni"),
        ([sni_ext(b"a" * 64 + b".example")], "bad_sni"),
        ([sni_ext(b".".join([b"a" * 63] * 4))], "bad_sni"),  # 255 bytes > 253
        ([sni_ext(b"a.example", b"b.example")], "bad_client_hello"),
        ([sni_ext(b"a.example", name_type=1)], "bad_client_hello"),
        ([ext(0, b"\x00\x00")], "bad_client_hello"),
        ([ext(0, b"\x00")], "bad_client_hello"),
        ([ext(43, b"\x03\x03\x04\x00")], "bad_client_hello"),
        ([ext(43, b"\x00")], "bad_client_hello"),
        ([ext(51, b"\x00\x04\x00\x1d\x00\x00")], "bad_client_hello"),
        ([ext(51, b"\x00\x06\x00\x1d\x00\x05\x00\x00")], "bad_client_hello"),
        ([ext(51, b"\x00\x03\x00\x1d\x00")], "bad_client_hello"),
        ([b"\x00\x10\x00"], "bad_client_hello"),
        ([b"\x00\x10\x00\x09\x00\x03\x02h3"], "bad_client_hello"),
    ],
)
def test_rejected(extensions: list[bytes], reason: str) -> None:
    with pytest.raises(QuicError) as err:
        parse_client_hello(build_client_hello(extensions))
    assert err.value.reason == reason


def test_pre_shared_key_last_is_fine() -> None:
    hello = parse_client_hello(build_client_hello([alpn_ext(b"h3"), ext(EXT_PRE_SHARED_KEY, b"")]))
    assert hello.alpn == ("h3",)


@pytest.mark.parametrize(
    ("wire", "sni"),
    [
        (b"example.com.", "example.com"),
        (b"Example.COM.", "example.com"),
        (b"localhost.", "localhost"),
        (b".".join([b"a" * 63] * 3 + [b"a" * 61]) + b".", ".".join(["a" * 63] * 3 + ["a" * 61])),
    ],
)
def test_sni_trailing_dot_removed(wire: bytes, sni: str) -> None:
    """Issue 12: a client asking for "example.com." (the absolute form) was refused as
    bad_sni, so the classifier dropped its Initial and it waited for its timeout. It now
    parses as "example.com" (253 bytes plus the dot still fits)."""
    hello = parse_client_hello(build_client_hello([sni_ext(wire), alpn_ext(b"h3")]))
    assert (hello.sni, hello.alpn) == (sni, ("h3",))


def test_sni_lowercased_and_underscore_allowed() -> None:
    hello = parse_client_hello(build_client_hello([sni_ext(b"My_Host.Example.COM")]))
    assert hello.sni == "my_host.example.com"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[: 4 + 34] + b"\x21" + b[4 + 35 :],  # session id length 33
        lambda b: b[: 4 + 35] + b"\x00\x00" + b[4 + 37 :],  # no cipher suites
        lambda b: b[: 4 + 35] + b"\x00\x03" + b[4 + 37 :],  # odd cipher suites length
        lambda b: b[: 4 + 39] + b"\x00" + b[4 + 40 :],  # no compression method
        lambda b: b[: 4 + 39] + b"\xff" + b[4 + 40 :],  # compression methods past the end
    ],
)
def test_header_fields_rejected(mutate: object) -> None:
    raw = build_client_hello([alpn_ext(b"h3")])
    with pytest.raises(QuicError) as err:
        parse_client_hello(mutate(raw))  # type: ignore[operator]
    assert err.value.reason == "bad_client_hello"


def test_no_extensions_rejected() -> None:
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    with pytest.raises(QuicError):
        parse_client_hello(b"\x01" + len(body).to_bytes(3, "big") + body)
