"""RFC 4475 torture tests at the parser level.

Every message of ``tests/conformance/rfc4475`` either parses (start line, header
split, every header the core understands) or raises MessageError with the status
hint its ``index.json`` entry gives.  Entries whose outcome depends on the role of
the element (proxy, registrar, endpoint) are asserted here as far as parsing goes:
they parse, and the fact the role decides on reads as the RFC describes.  Where
the RFC lets an element choose (``either_ok``) the table below records our choice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sipcore import (
    AbsoluteURI,
    MessageError,
    Request,
    Response,
    SipURI,
    error_response,
    parse_message,
)

DATA = Path(__file__).parent / "conformance" / "rfc4475"
INDEX = {entry["name"]: entry for entry in json.loads((DATA / "index.json").read_text())}

ACCEPT = "accept"
DROP = "drop"
# Outcome at the parser level: ACCEPT, DROP (a response discarded), or the status
# of the answer.  Role-dependent entries are ACCEPT here (see ROLE_DEPENDENT).
EXPECTED: dict[str, str | int] = {
    "wsinv": ACCEPT,
    "intmeth": ACCEPT,
    "esc01": ACCEPT,
    "escnull": ACCEPT,
    "esc02": ACCEPT,
    "lwsdisp": ACCEPT,
    "longreq": ACCEPT,
    "dblreq": ACCEPT,
    "semiuri": ACCEPT,
    "transports": ACCEPT,
    "mpart01": ACCEPT,
    "unreason": ACCEPT,
    "noreason": ACCEPT,
    "badinv01": 400,
    "clerr": 400,
    "ncl": 400,
    "scalar02": 400,
    "scalarlg": DROP,
    "quotbal": 400,  # either_ok: we do not guess the closing quote
    "ltgtruri": 400,  # either_ok
    "lwsruri": 400,  # either_ok
    "lwsstart": 400,  # either_ok
    "trws": 400,  # either_ok
    "escruri": 400,  # either_ok
    "baddate": ACCEPT,  # either_ok: Date does not matter to a proxy or registrar
    "regbadct": 400,  # either_ok
    "badaspec": 400,  # either_ok
    "baddn": 400,  # either_ok
    "badvers": 505,
    "mismatch01": 400,
    "mismatch02": 501,
    "bigcode": DROP,
    "badbranch": ACCEPT,  # either_ok: RFC 2543 matching instead (see test below)
    "insuf": 400,
    "unkscm": ACCEPT,
    "novelsc": ACCEPT,
    "unksm2": ACCEPT,
    "bext01": ACCEPT,
    "invut": ACCEPT,
    "regaut01": ACCEPT,
    "multi01": 400,
    "mcl01": 400,
    "bcast": ACCEPT,
    "zeromf": ACCEPT,
    "cparam01": ACCEPT,
    "cparam02": ACCEPT,
    "regescrt": ACCEPT,
    "sdp01": ACCEPT,
    "inv2543": ACCEPT,
}

# Outcomes decided above the parser (RFC 4475 notes): the data-path tests assert them.
ROLE_DEPENDENT = {
    "intmeth",
    "esc02",
    "unkscm",
    "novelsc",
    "unksm2",
    "bext01",
    "invut",
    "regaut01",
    "bcast",
    "zeromf",
    "sdp01",
}


def load(name: str) -> bytes:
    return (DATA / f"{name}.dat").read_bytes()


def parse_fully(data: bytes) -> Request | Response:
    message = parse_message(data)
    message.parse_all()
    return message


def test_the_table_covers_every_message_and_the_data_is_intact() -> None:
    names = {path.stem for path in DATA.glob("*.dat")}
    assert names == set(INDEX) == set(EXPECTED)
    assert len(names) == 49
    for name, entry in INDEX.items():
        data = load(name)
        assert len(data) == entry["bytes"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name


def test_the_table_agrees_with_the_index() -> None:
    for name, entry in INDEX.items():
        expected = EXPECTED[name]
        if name in ROLE_DEPENDENT:
            assert expected == ACCEPT, name
        elif entry["either_ok"]:
            assert expected in (ACCEPT, int(entry["response_hint"] or 0)), name
        elif entry["expect"] == "accept":
            assert expected == ACCEPT, name
        elif entry["response_hint"] == "drop":
            assert expected == DROP, name
        else:
            assert expected == int(entry["response_hint"]), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parser_outcome(name: str) -> None:
    data = load(name)
    expected = EXPECTED[name]
    if expected == ACCEPT:
        message = parse_fully(data)
        # Forwarding an untouched message writes back the bytes it came in as
        # (up to the end of its body: RFC 3261 18.3 drops what follows in a datagram).
        assert data.startswith(message.to_bytes())
        return
    with pytest.raises(MessageError) as caught:
        parse_fully(data)
    error = caught.value
    if expected == DROP:
        assert error.status_hint is None
        assert error_response(error) is None
        return
    assert error.status_hint == expected
    answer = error_response(error)
    assert answer is not None, "every rejected request here has a readable Via"
    assert answer.status == expected
    # The answer frames as a response and carries the request's Via fields (it
    # copies From, To, Call-ID and CSeq as received, malformed or not).
    reparsed = parse_message(answer.to_bytes())
    assert isinstance(reparsed, Response)
    assert reparsed.status == expected
    assert reparsed.get_all("via") == error.message.get_all("via")  # type: ignore[union-attr]


def test_wsinv_reads_through_folding_and_odd_spelling() -> None:
    message = parse_fully(load("wsinv"))
    assert isinstance(message, Request)
    assert message.method == "INVITE"
    assert message.max_forwards == 68
    assert (message.cseq.number, message.cseq.method) == (9, "INVITE")
    assert message.to.tag == "1918181833n"
    assert message.from_.tag == "98asjd8"
    assert message.from_.display_name == 'J Rosenberg \\"'
    assert message.get("Subject") == ""
    assert message.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert message.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert [via.transport for via in message.vias] == ["UDP", "TCP", "UDP"]
    assert [via.branch for via in message.vias] == ["390skdjuw", "z9hG4bK9ikj8", "z9hG4bK30239"]
    (contact,) = message.contacts
    assert contact.address is not None
    assert contact.address.display_name == 'Quoted string ""'
    assert contact.q == 0.33
    assert contact.param("newparam") == "newvalue"
    assert contact.param("secondparam") == ""
    (route,) = message.routes
    assert isinstance(route.uri, SipURI)
    assert route.uri.loose_route
    assert route.uri.param("unknownwith") == "value"
    assert message.content_length == 150 == len(message.body)
    # The unknown header goes out byte for byte.
    assert b"UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n" in message.to_bytes()


def test_intmeth_keeps_unusual_tokens() -> None:
    message = parse_fully(load("intmeth"))
    assert isinstance(message, Request)
    assert message.method == "!interesting-Method0123456789_*+`.%indeed'~"
    uri = message.uri
    assert isinstance(uri, SipURI)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert message.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert message.from_.display_name == "token1~` token2'+_ token3*%!.-"
    assert message.from_.param("fromParam''~+*_!.-%") == "работающий"
    assert message.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert message.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"


def test_esc01_unescapes_once() -> None:
    message = parse_fully(load("esc01"))
    assert isinstance(message, Request)
    uri = message.uri
    assert isinstance(uri, SipURI)
    assert uri.user == "sips%3Auser%40example.com"
    assert uri.compare_key()[1] == "sips:user@example.com"
    (contact,) = message.contacts
    contact_uri = contact.uri
    assert isinstance(contact_uri, SipURI)
    assert contact_uri.param("name") == "value%41"
    assert contact_uri.has_param("lr")


def test_escnull_keeps_both_contacts() -> None:
    message = parse_fully(load("escnull"))
    users = [contact.uri.compare_key()[1] for contact in message.contacts]  # type: ignore[union-attr]
    assert users == ["\x00", "\x00\x00"]


def test_esc02_is_not_register() -> None:
    message = parse_fully(load("esc02"))
    assert isinstance(message, Request)
    assert message.method == "RE%47IST%45R"
    assert message.to.display_name == "%Z%45"
    assert len(message.contacts) == 2
    assert message.get("C%6Fntact") == "<sip:alias2@host2.example.com>"


def test_lwsdisp_display_name() -> None:
    assert parse_fully(load("lwsdisp")).from_.display_name == "caller"


def test_longreq_reads_every_via_spelling() -> None:
    message = parse_fully(load("longreq"))
    assert len(message.vias) == 34
    assert len(message.to.display_name or "") > 100


def test_dblreq_ignores_octets_after_the_body() -> None:
    data = load("dblreq")
    message = parse_fully(data)
    assert isinstance(message, Request)
    assert message.method == "REGISTER"
    assert message.body == b""
    assert b"INVITE" not in message.to_bytes()


def test_semiuri_userinfo_holds_the_semicolon() -> None:
    message = parse_fully(load("semiuri"))
    assert isinstance(message, Request)
    uri = message.uri
    assert isinstance(uri, SipURI)
    assert uri.user == "user;par=u%40example.net"
    assert uri.host == "example.com"
    assert uri.params == ()
    assert len(message.values("Accept")) == 6


def test_transports_keeps_unknown_transport() -> None:
    message = parse_fully(load("transports"))
    assert [via.transport for via in message.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]


def test_mpart01_binary_body_framed_by_content_length() -> None:
    message = parse_fully(load("mpart01"))
    assert len(message.body) == message.content_length == 553
    assert b"\x00" in message.body


def test_responses_with_odd_reason_phrases() -> None:
    unreason = parse_fully(load("unreason"))
    assert isinstance(unreason, Response)
    assert unreason.status == 200
    assert "\u0441" in unreason.reason or "\u0421" in unreason.reason
    noreason = parse_fully(load("noreason"))
    assert isinstance(noreason, Response)
    assert (noreason.status, noreason.reason) == (100, "")


def test_badbranch_falls_back_to_rfc2543_matching() -> None:
    message = parse_fully(load("badbranch"))
    assert message.via.branch == "z9hG4bK"
    assert not message.via.has_magic_cookie


def test_role_dependent_messages_expose_what_the_role_decides_on() -> None:
    unkscm = parse_fully(load("unkscm"))
    assert isinstance(unkscm, Request)
    assert isinstance(unkscm.uri, AbsoluteURI)
    assert unkscm.uri.scheme == "nobodyknowsthisscheme"
    novelsc = parse_fully(load("novelsc"))
    assert isinstance(novelsc, Request)
    assert novelsc.uri.scheme == "soap.beep"
    unksm2 = parse_fully(load("unksm2"))
    assert isinstance(unksm2.to.uri, AbsoluteURI)
    assert unksm2.to.uri.scheme == "isbn"
    bext01 = parse_fully(load("bext01"))
    assert bext01.require == ("nothingSupportsThis", "nothingSupportsThisEither")
    assert bext01.proxy_require == ("noProxiesSupportThis", "norDoAnyProxiesSupportThis")
    assert parse_fully(load("invut")).content_type == "application/unknownformat"
    (credentials,) = parse_fully(load("regaut01")).authorization
    assert credentials.scheme == "NoOneKnowsThisScheme"
    assert credentials.get("opaque-data") == "here"
    bcast = parse_fully(load("bcast"))
    assert isinstance(bcast, Response)
    assert bcast.vias[1].host == "255.255.255.255"
    assert parse_fully(load("zeromf")).max_forwards == 0
    assert parse_fully(load("sdp01")).get("Accept") == "text/nobodyKnowsThis"
    intmeth = parse_fully(load("intmeth"))
    assert isinstance(intmeth, Request)
    esc02 = parse_fully(load("esc02"))
    assert isinstance(esc02, Request)
    assert esc02.method not in ("REGISTER",)


def test_contact_parameters_belong_where_the_brackets_say() -> None:
    (plain,) = parse_fully(load("cparam01")).contacts
    assert plain.param("unknownparam") == ""
    assert isinstance(plain.uri, SipURI)
    assert not plain.uri.has_param("unknownparam")
    (bracketed,) = parse_fully(load("cparam02")).contacts
    assert bracketed.param("unknownparam") is None
    assert isinstance(bracketed.uri, SipURI)
    assert bracketed.uri.has_param("unknownparam")


def test_regescrt_keeps_the_escaped_route_in_the_contact() -> None:
    (contact,) = parse_fully(load("regescrt")).contacts
    assert isinstance(contact.uri, SipURI)
    assert contact.uri.headers == (("Route", "%3Csip:sip.example.com%3E"),)
    assert str(contact.uri) == "sip:user@example.com?Route=%3Csip:sip.example.com%3E"


def test_inv2543_body_is_the_rest_of_the_datagram() -> None:
    message = parse_fully(load("inv2543"))
    assert message.content_length is None
    assert message.max_forwards is None
    assert message.from_.tag is None
    assert message.via.branch is None
    assert message.body.startswith(b"v=0")
