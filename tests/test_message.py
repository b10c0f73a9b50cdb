"""Unit tests of the message layer: parsing rules, laziness, forwarding, building."""

from __future__ import annotations

import pytest

from sipcore import (
    AbsoluteURI,
    LocalProtocolError,
    MessageError,
    RemoteProtocolError,
    Request,
    Response,
    SipURI,
    TelURI,
    Via,
    error_response,
    make_ack,
    make_cancel,
    make_response,
    parse_message,
    parse_uri,
    parse_via,
)


def request_bytes(*headers: bytes, start: bytes = b"INVITE sip:bob@example.com SIP/2.0") -> bytes:
    return b"\r\n".join((start, *headers, b"", b""))


BASIC = (
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc",
    b"Max-Forwards: 70",
    b"To: <sip:bob@example.com>",
    b"From: <sip:alice@example.com>;tag=1",
    b"Call-ID: call-1@example.com",
    b"CSeq: 1 INVITE",
    b"Content-Length: 0",
)


def basic(*extra: bytes, start: bytes = b"INVITE sip:bob@example.com SIP/2.0") -> Request:
    message = parse_message(request_bytes(*BASIC, *extra, start=start))
    assert isinstance(message, Request)
    return message


# ------------------------------------------------------------------ header names


def test_compact_and_long_names_are_the_same_header() -> None:
    message = parse_message(
        request_bytes(
            b"v: SIP/2.0/UDP h;branch=z9hG4bK1",
            b"i: compact@example.com",
            b"f: <sip:a@example.com>;tag=x",
            b"t: <sip:b@example.com>",
            b"l: 0",
            b"m: <sip:a@192.0.2.1>",
            b"k: path",
            b"c: application/sdp",
            b"s: hello",
            b"CSeq: 1 INVITE",
        )
    )
    assert (
        message.get("Call-ID")
        == message.get("i")
        == message.get("CALL-id")
        == ("compact@example.com")
    )
    assert message.call_id == "compact@example.com"
    assert message.supported == ("path",)
    assert message.content_type == "application/sdp"
    assert message.get("Subject") == "hello"
    assert len(message.contacts) == 1
    message.validate()


def test_header_names_are_case_insensitive_and_may_have_space_before_the_colon() -> None:
    message = parse_message(request_bytes(b"cAlL-iD  : x@y", b"VIA\t: SIP/2.0/UDP h"))
    assert message.get("call-id") == "x@y"
    assert message.via.host == "h"


def test_unknown_headers_are_kept_byte_exact() -> None:
    odd = b'X-Odd-Header :  ;;,,  "quoted, value" \t'
    message = basic(odd)
    assert message.get("x-odd-header") == ';;,,  "quoted, value"'
    assert odd + b"\r\n" in message.to_bytes()
    # Never split, even with commas.
    assert message.values("X-Odd-Header") == [';;,,  "quoted, value"']


def test_header_folding_is_read_as_one_space() -> None:
    message = basic(b"Subject: first", b" second\t", b"\tthird")
    assert message.get("Subject") == "first second third"
    # ... and written back as it came.
    assert b"Subject: first\r\n second\t\r\n\tthird\r\n" in message.to_bytes()


# --------------------------------------------------------------------- case rules


def test_method_is_case_sensitive() -> None:
    message = basic(start=b"invite sip:bob@example.com SIP/2.0")
    assert message.method == "invite"
    with pytest.raises(MessageError) as caught:
        message.validate()  # CSeq says INVITE: a different method
    assert caught.value.status_hint == 501


def test_sip_version_literal_is_case_insensitive() -> None:
    message = basic(start=b"INVITE sip:bob@example.com sip/2.0")
    message.validate()


def test_tags_and_call_id_are_case_sensitive() -> None:
    first = basic()
    other = parse_message(request_bytes(*[line.replace(b"tag=1", b"tag=A") for line in BASIC]))
    assert first.from_.tag == "1"
    assert other.from_.tag == "A"
    upper = parse_message(request_bytes(*[line.replace(b"call-1", b"CALL-1") for line in BASIC]))
    assert upper.call_id != first.call_id


def test_uri_scheme_host_and_parameter_names_compare_case_insensitively() -> None:
    lower = parse_uri("sip:alice@example.com;transport=udp")
    upper = parse_uri("SIP:alice@EXAMPLE.COM;TRANSPORT=UDP")
    assert isinstance(lower, SipURI)
    assert isinstance(upper, SipURI)
    assert lower.compare_key() == upper.compare_key()
    assert upper.transport == "udp"
    other_user = parse_uri("sip:ALICE@example.com;transport=udp")
    assert isinstance(other_user, SipURI)
    assert other_user.compare_key() != lower.compare_key()


def test_escaped_user_compares_unescaped() -> None:
    plain = parse_uri("sip:alice@example.com")
    escaped = parse_uri("sip:%61lice@example.com")
    assert isinstance(plain, SipURI)
    assert isinstance(escaped, SipURI)
    assert plain.compare_key() == escaped.compare_key()


def test_parameter_names_in_headers_are_case_insensitive() -> None:
    message = basic(b"Contact: <sip:a@192.0.2.1>;EXPIRES=60;Q=0.5")
    (contact,) = message.contacts
    assert contact.expires == 60
    assert contact.q == 0.5


# ---------------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    ("text", "user", "password", "host", "port", "params", "headers"),
    [
        ("sip:example.com", None, None, "example.com", None, (), ()),
        ("sip:alice@example.com:5070", "alice", None, "example.com", 5070, (), ()),
        ("sips:alice:secret@192.0.2.4", "alice", "secret", "192.0.2.4", None, (), ()),
        (
            "sip:[2001:db8::1]:5060;transport=tcp",
            None,
            None,
            "[2001:db8::1]",
            5060,
            (("transport", "tcp"),),
            (),
        ),
        (
            "sip:+1-212-555-1212:1234@gw.example.com;user=phone",
            "+1-212-555-1212",
            "1234",
            "gw.example.com",
            None,
            (("user", "phone"),),
            (),
        ),
        (
            "sip:bob@example.com;lr;maddr=239.255.255.1;ttl=15",
            "bob",
            None,
            "example.com",
            None,
            (("lr", None), ("maddr", "239.255.255.1"), ("ttl", "15")),
            (),
        ),
        (
            "sip:bob@example.com?subject=project%20x&priority=urgent",
            "bob",
            None,
            "example.com",
            None,
            (),
            (("subject", "project%20x"), ("priority", "urgent")),
        ),
        (
            "sip:host-1.sub_domain.example.com.",
            None,
            None,
            "host-1.sub_domain.example.com.",
            None,
            (),
            (),
        ),
    ],
)
def test_sip_uris_parse(
    text: str,
    user: str | None,
    password: str | None,
    host: str,
    port: int | None,
    params: tuple[tuple[str, str | None], ...],
    headers: tuple[tuple[str, str], ...],
) -> None:
    uri = parse_uri(text)
    assert isinstance(uri, SipURI)
    assert (uri.user, uri.password, uri.host, uri.port, uri.params, uri.headers) == (
        user,
        password,
        host,
        port,
        params,
        headers,
    )
    assert str(uri) == text


def test_tel_and_other_uris() -> None:
    tel = parse_uri("tel:+1-201-555-0123;phone-context=example.com")
    assert isinstance(tel, TelURI)
    assert tel.is_global
    assert tel.param("phone-context") == "example.com"
    assert str(tel) == "tel:+1-201-555-0123;phone-context=example.com"
    other = parse_uri("mailto:alice@example.com")
    assert isinstance(other, AbsoluteURI)
    assert (other.scheme, other.rest) == ("mailto", "alice@example.com")


@pytest.mark.parametrize(
    "text",
    [
        "sip:",
        "sip:@example.com",
        "sip:alice@",
        "sip:alice@exa mple.com",
        "sip:alice@example.com:99999",
        "sip:alice@example.com:",
        "sip:alice@256.1.1.1",
        "sip:alice@1.2.3",
        "sip:alice@[::g]",
        "sip:alice@-bad.example.com",
        "sip:al%zzice@example.com",
        "sip:alice@example.com;;lr",
        "sip:alice@example.com?",
        "<sip:alice@example.com>",
        "not a uri",
        "tel:",
        "1sip:foo",
    ],
)
def test_malformed_uris_are_refused(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_uri(text)


# ----------------------------------------------------------------------- values


def test_via_parameters() -> None:
    message = basic(
        b"Via: SIP/2.0/TCP [2001:db8::9]:5070;branch=z9hG4bKx;received=192.0.2.7;rport=5071;"
        b"maddr=224.2.0.1;ttl=16",
        b"Via: SIP/2.0/UDP gw.example.com;rport;branch=z9hG4bKy",
    )
    first, second, third = message.vias
    assert (first.transport, first.host, first.port) == ("UDP", "192.0.2.1", 5060)
    assert (second.transport, second.host, second.port) == ("TCP", "[2001:db8::9]", 5070)
    assert second.received == "192.0.2.7"
    assert second.rport == 5071
    assert second.maddr == "224.2.0.1"
    assert second.ttl == 16
    assert second.reliable
    assert third.has_rport
    assert third.rport is None
    assert third.sent_by == ("gw.example.com", 5060)


@pytest.mark.parametrize(
    "via",
    [
        b"Via: SIP/2.0/UDP",
        b"Via: SIP/2.0 host",
        b"Via: SIP/2.0/UDP host;ttl=300",
        b"Via: SIP/2.0/UDP host;received=not-an-address",
        b"Via: SIP/2.0/UDP host;rport=abc",
        b"Via: SIP/2.0/UDP host;branch=",
        b"Via: SIP/2.0/UDP host:70000",
        b"Via: SIP/2.0/UDP host;;branch=z9hG4bK1",
    ],
)
def test_malformed_via_is_a_400(via: bytes) -> None:
    message = parse_message(request_bytes(via, *BASIC[1:]))
    with pytest.raises(MessageError) as caught:
        message.validate()
    assert caught.value.status_hint == 400


def test_name_addr_and_addr_spec() -> None:
    message = basic(
        b'Reply-To: "Alice \\"A\\" Smith" <sip:alice@example.com;transport=tcp>;x=1',
        b"Contact: sip:alice@192.0.2.1;expires=30",
        b"Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>",
        b"Route: <sip:p3.example.com;lr>",
        b"Record-Route: <sip:rr.example.com;lr>",
    )
    assert message.to.display_name is None
    assert message.from_.tag == "1"
    (contact,) = message.contacts
    # addr-spec: ";expires" is a header parameter, not a URI parameter.
    assert contact.expires == 30
    assert isinstance(contact.uri, SipURI)
    assert contact.uri.params == ()
    assert [str(route.uri) for route in message.routes] == [
        "sip:p1.example.com;lr",
        "sip:p2.example.com;lr",
        "sip:p3.example.com;lr",
    ]
    assert message.record_routes[0].uri.loose_route  # type: ignore[union-attr]


def test_contact_star_and_its_rules() -> None:
    star = basic(b"Contact: *", b"Expires: 0", start=b"REGISTER sip:example.com SIP/2.0")
    assert star.contacts[0].is_star
    with pytest.raises(RemoteProtocolError):
        star.contacts[0].uri  # noqa: B018
    mixed = basic(b"Contact: *, <sip:a@192.0.2.1>")
    with pytest.raises(MessageError):
        mixed.contacts  # noqa: B018


@pytest.mark.parametrize(
    "contact",
    [b"Contact: <sip:a@h>;q=2", b"Contact: <sip:a@h>;q=0.1234", b"Contact: <sip:a@h>;expires=x"],
)
def test_malformed_contact_parameters(contact: bytes) -> None:
    with pytest.raises(MessageError):
        basic(contact).contacts  # noqa: B018


def test_quoted_strings_keep_escapes_and_commas() -> None:
    message = basic(b'Contact: "Smith, John \\\\ \\"JJ\\"" <sip:j@h>, <sip:k@h>')
    first, second = message.contacts
    assert first.address is not None
    assert first.address.display_name == 'Smith, John \\ "JJ"'
    assert str(second.uri) == "sip:k@h"


def test_numbers() -> None:
    message = basic(b"Expires: 99999999999999", b"Min-Expires: 60")
    assert message.expires == 2**32 - 1
    assert message.min_expires == 60
    assert message.max_forwards == 70
    assert message.content_length == 0
    assert message.cseq.number == 1
    with pytest.raises(MessageError):
        basic(b"Expires: soon").expires  # noqa: B018
    too_many_hops = parse_message(
        request_bytes(*[b"Max-Forwards: 256" if b"Max" in line else line for line in BASIC])
    )
    with pytest.raises(MessageError):
        too_many_hops.validate()


def test_authentication_headers_are_never_split() -> None:
    message = basic(
        b'Authorization: Digest username="alice", realm="example.com", nonce="n,1", '
        b'uri="sip:bob@example.com", response="0123", algorithm=MD5',
        b'Proxy-Authenticate: Digest realm="example.com", nonce="abc", qop="auth,auth-int"',
    )
    (credentials,) = message.authorization
    assert credentials.get("nonce") == "n,1"
    assert credentials.get("username") == "alice"
    (challenge,) = message.proxy_authenticate
    assert challenge.get("qop") == "auth,auth-int"
    assert len(message.values("Authorization")) == 1


def test_token_lists() -> None:
    message = basic(b"Require: 100rel, timer", b"Require: path", b"Proxy-Require: sec-agree")
    assert message.require == ("100rel", "timer", "path")
    assert message.proxy_require == ("sec-agree",)
    with pytest.raises(MessageError):
        basic(b"Supported: a b").supported  # noqa: B018


# --------------------------------------------------------------- lazy parsing


def test_values_are_decoded_only_when_asked() -> None:
    message = basic()
    # Framing reads Content-Length (RFC 3261 18.3); nothing else is decoded yet.
    decoded = [value is not None for value in message._values]
    assert decoded == [name == "content-length" for name in message._names]
    message.call_id  # noqa: B018
    decoded = [value is not None for value in message._values]
    assert decoded == [name in ("call-id", "content-length") for name in message._names]


def test_a_malformed_header_fails_only_when_read() -> None:
    message = basic(b"Contact: <not a uri")
    message.validate()  # the proxy's checks do not read Contact
    with pytest.raises(MessageError) as caught:
        message.contacts  # noqa: B018
    assert caught.value.status_hint == 400


def test_forwarding_changes_only_what_was_touched() -> None:
    original = (
        request_bytes(
            b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc",
            b"Route: <sip:p1.example.com;lr>,<sip:p2.example.com;lr>",
            b"Max-Forwards: 70",
            b"To: Bob   <sip:bob@example.com>",
            b"From:<sip:alice@example.com>;tag=1",
            b"Call-ID: call-1@example.com",
            b"CSeq: 1 INVITE",
            b"X-Weird :   kept   as is",
            b"Content-Length: 4",
        )
        + b"body"
    )
    message = parse_message(original)
    assert isinstance(message, Request)
    message.validate()
    # RFC 3261 16.6: decrement Max-Forwards, pop our Route, add our Via.
    message.set("Max-Forwards", message.max_forwards - 1)  # type: ignore[operator]
    assert message.pop_first("route") == "<sip:p1.example.com;lr>"
    message.prepend("via", "SIP/2.0/UDP 192.0.2.99;branch=z9hG4bKproxy")
    expected = (
        request_bytes(
            b"Via: SIP/2.0/UDP 192.0.2.99;branch=z9hG4bKproxy",
            b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc",
            b"Route: <sip:p2.example.com;lr>",
            b"Max-Forwards: 69",
            b"To: Bob   <sip:bob@example.com>",
            b"From:<sip:alice@example.com>;tag=1",
            b"Call-ID: call-1@example.com",
            b"CSeq: 1 INVITE",
            b"X-Weird :   kept   as is",
            b"Content-Length: 4",
        )
        + b"body"
    )
    assert message.to_bytes() == expected
    assert [via.branch for via in message.vias] == ["z9hG4bKproxy", "z9hG4bKabc"]


def test_untouched_message_is_written_back_byte_for_byte() -> None:
    data = request_bytes(b"v:SIP/2.0/UDP h;branch=z9hG4bK1", b"i:   spaced  ", b"t:<sip:a@b>")
    assert parse_message(data).to_bytes() == data


def test_changing_the_request_uri() -> None:
    message = basic()
    message.uri = parse_uri("sip:bob@192.0.2.50:5062")
    assert message.to_bytes().startswith(b"INVITE sip:bob@192.0.2.50:5062 SIP/2.0\r\n")


def test_header_mutators() -> None:
    message = basic(b"X-A: 1", b"X-A: 2")
    assert message.count("x-a") == 2
    message.set("X-A", "3")
    assert message.get_all("X-A") == ["3"]
    message.add("X-B", "4")
    message.remove("x-a")
    assert not message.has("X-A")
    assert message.get("x-b") == "4"
    message.replace_first("Via", Via("TCP", "192.0.2.1", 5060, (("branch", "z9hG4bKabc"),)))
    assert message.via.transport == "TCP"
    assert message.pop_first("x-none") is None
    with pytest.raises(LocalProtocolError):
        message.set("X-Inject", "a\r\nVia: evil")
    with pytest.raises(LocalProtocolError):
        message.replace_first("Record-Route", "<sip:x>")


def test_set_body_updates_content_length() -> None:
    message = basic()
    message.set_body(b"v=0\r\n", "application/sdp")
    reparsed = parse_message(message.to_bytes())
    assert reparsed.body == b"v=0\r\n"
    assert reparsed.content_length == 5
    assert reparsed.content_type == "application/sdp"


# ------------------------------------------------------------------ framing rules


def test_datagram_octets_after_content_length_are_ignored() -> None:
    data = request_bytes(*BASIC) + b"garbage after the message"
    message = parse_message(data)
    assert message.body == b""


def test_datagram_without_content_length_takes_the_rest() -> None:
    headers = [line for line in BASIC if not line.startswith(b"Content-Length")]
    message = parse_message(request_bytes(*headers) + b"xyz")
    assert message.body == b"xyz"


def test_stream_message_needs_content_length() -> None:
    headers = [line for line in BASIC if not line.startswith(b"Content-Length")]
    with pytest.raises(MessageError) as caught:
        parse_message(request_bytes(*headers), datagram=False)
    assert caught.value.close_connection
    assert caught.value.status_hint == 400


def test_leading_crlfs_are_ignored() -> None:
    message = parse_message(b"\r\n\r\n" + request_bytes(*BASIC))
    assert isinstance(message, Request)


@pytest.mark.parametrize(
    "data",
    [
        b"SIP/2.0 99 Low\r\n\r\n",
        b"SIP/3.0 200 OK\r\n\r\n",
        b"SIP/2.0 2000 OK\r\n\r\n",
        b"SIP/2.0 OK\r\n\r\n",
    ],
)
def test_malformed_status_lines_are_dropped(data: bytes) -> None:
    with pytest.raises(MessageError) as caught:
        parse_message(data)
    assert caught.value.status_hint is None
    assert error_response(caught.value) is None


def test_a_response_without_a_reason_phrase_parses_and_an_incomplete_one_is_dropped() -> None:
    message = parse_message(b"SIP/2.0 200\r\n\r\n")
    assert isinstance(message, Response)
    assert (message.status, message.reason) == (200, "")
    with pytest.raises(MessageError) as caught:
        message.validate()  # no Via, From, To ...
    assert caught.value.status_hint is None


def test_garbage_without_a_via_gets_no_answer() -> None:
    with pytest.raises(MessageError) as caught:
        parse_message(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert error_response(caught.value) is None


def test_ack_is_never_answered() -> None:
    message = basic(start=b"ACK sip:bob@example.com SIP/2.0")
    with pytest.raises(MessageError) as caught:
        message.validate()
    assert error_response(caught.value) is None


# ---------------------------------------------------------------------- building


def test_make_response_copies_the_request_fields() -> None:
    message = basic(b"Timestamp: 54", b"Via: SIP/2.0/UDP second.example.com;branch=z9hG4bK2")
    ringing = make_response(message, 180, to_tag="totag")
    data = ringing.to_bytes()
    assert data.startswith(b"SIP/2.0 180 Ringing\r\n")
    reparsed = parse_message(data)
    assert reparsed.get_all("via") == message.get_all("via")
    assert reparsed.to.tag == "totag"
    assert reparsed.from_.tag == "1"
    assert reparsed.call_id == message.call_id
    assert reparsed.cseq == message.cseq
    assert reparsed.get("Timestamp") is None
    assert reparsed.content_length == 0
    trying = make_response(message, 100, to_tag="ignored")
    assert trying.to.tag is None
    assert trying.get("Timestamp") == "54"
    # The request's own bytes are reused for the copied fields.
    assert b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc\r\n" in data


def test_make_response_keeps_an_existing_to_tag() -> None:
    message = parse_message(
        request_bytes(
            *[b"To: <sip:bob@example.com>;tag=old" if b"To:" in line else line for line in BASIC]
        )
    )
    assert isinstance(message, Request)
    assert make_response(message, 200, to_tag="new").to.tag == "old"


def test_make_response_with_headers_and_body() -> None:
    response = make_response(
        basic(), 200, "Fine", to_tag="t", headers=[("Contact", "<sip:bob@h>")], body=b"abc"
    )
    reparsed = parse_message(response.to_bytes())
    assert isinstance(reparsed, Response)
    assert (reparsed.status, reparsed.reason) == (200, "Fine")
    assert reparsed.body == b"abc"
    assert str(reparsed.contacts[0].uri) == "sip:bob@h"


def test_error_response_names_the_problem() -> None:
    data = request_bytes(*[line for line in BASIC if not line.startswith(b"From")])
    with pytest.raises(MessageError) as caught:
        parse_message(data).validate()
    answer = error_response(caught.value)
    assert answer is not None
    assert (answer.status, answer.reason) == (400, "Bad Request - Missing From header")


def test_make_ack_and_cancel() -> None:
    invite = basic(b"Route: <sip:p1.example.com;lr>")
    busy = make_response(invite, 486, to_tag="callee")
    ack = make_ack(invite, busy)
    assert ack.method == "ACK"
    assert ack.uri_text == invite.uri_text
    assert len(ack.vias) == 1
    assert ack.via == invite.via
    assert ack.to.tag == "callee"
    assert (ack.cseq.number, ack.cseq.method) == (1, "ACK")
    assert ack.routes == invite.routes
    parse_message(ack.to_bytes()).validate()
    cancel = make_cancel(invite)
    assert (cancel.cseq.number, cancel.cseq.method) == (1, "CANCEL")
    assert cancel.via.branch == invite.via.branch
    assert cancel.to.tag is None
    parse_message(cancel.to_bytes()).validate()


def test_build_a_request_from_scratch() -> None:
    request = Request(
        "OPTIONS",
        "sip:bob@example.com",
        [
            ("Via", "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKnew"),
            ("Max-Forwards", 70),
            ("To", "<sip:bob@example.com>"),
            ("From", "<sip:alice@example.com>;tag=a"),
            ("Call-ID", "new@example.com"),
            ("CSeq", "7 OPTIONS"),
        ],
    )
    data = request.to_bytes()
    assert data.endswith(b"Content-Length: 0\r\n\r\n")
    reparsed = parse_message(data)
    reparsed.validate()
    assert reparsed == request
    with pytest.raises(LocalProtocolError):
        Request("BAD METHOD", "sip:x")
    with pytest.raises(LocalProtocolError):
        Response(700)


def test_changing_the_via_updates_the_top_via() -> None:
    message = basic()
    assert message.via.host == "192.0.2.1"
    message.replace_first("Via", "SIP/2.0/TCP 192.0.2.9;branch=z9hG4bKnew")
    assert message.via.host == "192.0.2.9"
    message.prepend("Via", "SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKtop")
    assert message.via.host == "192.0.2.10"
    message.pop_first("Via")
    assert message.via.host == "192.0.2.9"


def test_copy_is_independent() -> None:
    message = basic(b"Route: <sip:p1.example.com;lr>")
    message.routes  # noqa: B018 - parsed values are shared, fields are not
    clone = message.copy()
    clone.pop_first("Route")
    clone.uri = parse_uri("sip:bob@192.0.2.7")
    clone.set("Max-Forwards", 69)
    assert message.routes
    assert not clone.routes
    assert message.uri_text == "sip:bob@example.com"
    assert message.max_forwards == 70
    assert clone.max_forwards == 69
    assert parse_message(clone.to_bytes()).uri_text == "sip:bob@192.0.2.7"
    response = make_response(message, 180)
    response_clone = response.copy()
    response_clone.pop_first("Via")
    assert response.has("Via")
    assert not response_clone.has("Via")


def test_ipv6_received_parameter_without_brackets() -> None:
    # RFC 3261 25.1: via-received = "received" EQUAL (IPv4address / IPv6address).
    message = basic(b"Via: SIP/2.0/UDP [2001:db8::9]:5070;branch=z9hG4bKv6;received=2001:db8::9")
    assert message.vias[1].received == "2001:db8::9"
    malformed = basic(b"Via: SIP/2.0/UDP [2001:db8::9]:5070;branch=z9hG4bKv6;received=::g")
    with pytest.raises(MessageError):
        malformed.vias  # noqa: B018


def test_a_via_parsed_once_is_shared_and_a_malformed_one_fails_every_time() -> None:
    """The response's top Via is the text this element wrote into the request: the
    second parse is the memo's (sipcore/_memo.py); errors are never memoized."""
    text = "SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bK-w1-memo;rport"
    request = parse_message(request_bytes(b"Via: " + text.encode(), *BASIC[1:]))
    response = parse_message(
        request_bytes(b"Via: " + text.encode(), *BASIC[2:], start=b"SIP/2.0 180 Ringing")
    )
    assert request.via is response.via is parse_via(text)
    assert response.via.branch == "z9hG4bK-w1-memo"
    for _ in range(2):
        with pytest.raises(RemoteProtocolError):
            parse_via("SIP/2.0/UDP 203.0.113.1:99999;branch=z9hG4bK-w1-memo")
