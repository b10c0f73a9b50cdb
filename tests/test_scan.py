"""The load balancer's byte scans: Call-ID, top Via branch, request or response."""

from __future__ import annotations

import pytest

from sipcore import extract_call_id, is_response, parse_message, top_via_branch

REQUEST = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKtop, SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK2\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.3;branch=z9hG4bK3\r\n"
    b"To: <sip:bob@example.com>\r\n"
    b"From: <sip:alice@example.com>;tag=1\r\n"
    b"Call-ID: abc-123@example.com\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Content-Length: 26\r\n"
    b"\r\n"
    b"Call-ID: not-this-one\r\nx\r\n"
)


@pytest.mark.parametrize(
    "line",
    [
        b"Call-ID: abc-123@example.com",
        b"i: abc-123@example.com",
        b"CALL-ID:abc-123@example.com",
        b"call-id   :   abc-123@example.com  \t",
        b"I :\tabc-123@example.com",
        b"Call-ID: abc-123@example.com\r\n ",
    ],
)
def test_call_id_spellings_give_the_same_value(line: bytes) -> None:
    data = REQUEST.replace(b"Call-ID: abc-123@example.com", line)
    assert extract_call_id(data) == b"abc-123@example.com"


def test_folded_call_id_is_unfolded() -> None:
    data = REQUEST.replace(b"Call-ID: abc-123@example.com", b"Call-ID:\r\n  abc-123@example.com")
    assert extract_call_id(data) == b"abc-123@example.com"


def test_call_id_in_the_body_is_not_read() -> None:
    data = REQUEST.replace(b"Call-ID: abc-123@example.com\r\n", b"")
    assert extract_call_id(data) is None


def test_the_scan_agrees_with_the_parser() -> None:
    message = parse_message(REQUEST)
    assert extract_call_id(REQUEST) == message.call_id.encode()
    assert top_via_branch(REQUEST) == (message.via.branch or "").encode()


def test_top_via_branch() -> None:
    assert top_via_branch(REQUEST) == b"z9hG4bKtop"
    compact = REQUEST.replace(
        b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKtop,",
        b"v: SIP/2.0/UDP h ;\r\n BRANCH = z9hG4bKc ,",
    )
    assert top_via_branch(compact) == b"z9hG4bKc"
    no_branch = REQUEST.replace(b";branch=z9hG4bKtop", b"")
    assert top_via_branch(no_branch) is None
    assert top_via_branch(b"OPTIONS sip:x SIP/2.0\r\n\r\n") is None


def test_is_response() -> None:
    assert is_response(b"SIP/2.0 200 OK\r\n\r\n")
    assert is_response(b"sip/2.0 200 OK\r\n\r\n")
    assert not is_response(REQUEST)
