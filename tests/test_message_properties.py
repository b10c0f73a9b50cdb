"""Hypothesis: serialize-then-parse is the identity; arbitrary bytes never crash.

Examples are bounded so that CI stays fast (see the settings on each test).
"""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipcore import (
    COMPACT_FORMS,
    CSeq,
    NameAddr,
    Request,
    Response,
    SipError,
    SipURI,
    StreamFramer,
    Via,
    parse_message,
)

TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
tokens = st.text(TOKEN_ALPHABET, min_size=1, max_size=12)
labels = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
hostnames = st.lists(labels, min_size=1, max_size=3).map(".".join)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda octets: ".".join(map(str, octets)))
ipv6 = st.sampled_from(["[2001:db8::1]", "[::1]", "[fe80::1:2:3]"])
hosts = st.one_of(hostnames, ipv4, ipv6)
ports = st.none() | st.integers(1, 65535)
users = st.from_regex(r"[a-zA-Z0-9_.!~*'()&=+$,;?/-]{1,12}", fullmatch=True)
param_names = st.from_regex(r"[a-z][a-z0-9-]{0,7}", fullmatch=True)
param_values = st.none() | st.from_regex(r"[a-zA-Z0-9._-]{1,10}", fullmatch=True)


@st.composite
def params(draw: st.DrawFn, max_size: int = 3) -> tuple[tuple[str, str | None], ...]:
    names = draw(st.lists(param_names, max_size=max_size, unique_by=str.lower))
    return tuple((name, draw(param_values)) for name in names)


@st.composite
def sip_uris(draw: st.DrawFn) -> SipURI:
    return SipURI(
        draw(hosts),
        draw(st.none() | users),
        None,
        draw(ports),
        draw(params()),
        (),
        draw(st.sampled_from(["sip", "sips"])),
    )


display_names = st.none() | st.text(
    st.characters(blacklist_categories=("Cs", "Cc")), max_size=20
).map(str.strip)


@st.composite
def name_addrs(draw: st.DrawFn, tag: bool = False) -> NameAddr:
    header_params = draw(params())
    if tag:
        header_params = (
            *(p for p in header_params if p[0].lower() != "tag"),
            ("tag", draw(tokens)),
        )
    display = draw(display_names)
    return NameAddr(draw(sip_uris()), display or None, header_params)


@st.composite
def vias(draw: st.DrawFn) -> Via:
    extra = tuple(
        p
        for p in draw(params())
        if p[0].lower() not in ("branch", "received", "rport", "ttl", "maddr")
    )
    via_params = (("branch", "z9hG4bK" + draw(tokens)), *extra)
    if draw(st.booleans()):
        via_params = (*via_params, ("rport", None))
    return Via(
        draw(st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "WS"])),
        draw(hosts),
        draw(ports),
        via_params,
    )


KNOWN = (
    set(COMPACT_FORMS)
    | set(COMPACT_FORMS.values())
    | {
        "call-id",
        "cseq",
        "max-forwards",
        "content-length",
        "route",
        "record-route",
        "expires",
        "min-expires",
        "require",
        "proxy-require",
        "unsupported",
        "allow",
        "authorization",
        "proxy-authorization",
        "www-authenticate",
        "proxy-authenticate",
        "timestamp",
    }
)
unknown_names = st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True).filter(
    lambda name: name.lower() not in KNOWN
)
unknown_values = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\r\n"), max_size=30
).map(lambda text: text.strip(" \t"))


@st.composite
def messages(draw: st.DrawFn) -> tuple[Request | Response, dict[str, object]]:
    via_list = draw(st.lists(vias(), min_size=1, max_size=3))
    from_ = draw(name_addrs(tag=True))
    to = draw(name_addrs())
    call_id = draw(tokens) + "@" + draw(hostnames)
    method = draw(st.sampled_from(["INVITE", "REGISTER", "OPTIONS", "BYE", "MESSAGE"]) | tokens)
    cseq = CSeq(draw(st.integers(0, 2**31 - 1)), method)
    max_forwards = draw(st.integers(0, 255))
    routes = draw(st.lists(name_addrs(), max_size=2))
    headers: list[tuple[str, object]] = [("Via", via) for via in via_list]
    headers += [
        ("From", from_),
        ("To", to),
        ("Call-ID", call_id),
        ("CSeq", cseq),
        ("Max-Forwards", max_forwards),
    ]
    headers += [("Route", route) for route in routes]
    headers += draw(st.lists(st.tuples(unknown_names, unknown_values), max_size=3))
    body = draw(st.binary(max_size=64))
    expected: dict[str, object] = {
        "vias": via_list,
        "from_": from_,
        "to": to,
        "call_id": call_id,
        "cseq": cseq,
        "max_forwards": max_forwards,
        "routes": routes,
    }
    message: Request | Response
    if draw(st.booleans()):
        message = Request(method, draw(sip_uris()), headers, body)
    else:
        message = Response(draw(st.integers(100, 699)), draw(tokens), headers, body)
    return message, expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_parse_of_serialize_is_identity(
    generated: tuple[Request | Response, dict[str, object]],
) -> None:
    message, expected = generated
    data = message.to_bytes()
    parsed = parse_message(data)
    assert parsed == message
    parsed.parse_all()
    for attribute, value in expected.items():
        assert getattr(parsed, attribute) == value, attribute
    # Over a stream, the framer finds the same message.
    framer = StreamFramer()
    framer.receive_data(data + data)
    first, second = framer.next_event(), framer.next_event()
    assert first == second
    assert parse_message(data, datagram=False) == message


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_sip_errors(data: bytes) -> None:
    with contextlib.suppress(SipError):
        parse_message(data).parse_all()


SEED = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"Route: <sip:p.example.com;lr>\r\n"
    b'To: "Bob" <sip:bob@example.com>\r\n'
    b"From: <sip:alice@example.com>;tag=1\r\n"
    b"Call-ID: x@y\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:alice@192.0.2.1>;expires=60\r\n"
    b'Authorization: Digest username="a", realm="r", nonce="n", uri="sip:b", response="0"\r\n'
    b"Content-Length: 4\r\n"
    b"\r\n"
    b"body"
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(SEED)), st.binary(max_size=3)), min_size=1, max_size=4)
)
def test_mutated_messages_raise_only_sip_errors(edits: list[tuple[int, bytes]]) -> None:
    data = SEED
    for position, replacement in edits:
        data = data[:position] + replacement + data[position + len(replacement) :]
    with contextlib.suppress(SipError):
        parse_message(data).parse_all()
    framer = StreamFramer()
    framer.receive_data(data)
    while framer.next_event() is not None:
        pass
