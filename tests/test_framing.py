"""Stream framing: whole, byte by byte, with trailing data, keepalives, limits."""

from __future__ import annotations

import pytest

from sipcore import (
    FramingEvent,
    FramingFailed,
    KeepalivePingReceived,
    KeepalivePongReceived,
    LocalProtocolError,
    MessageFramed,
    StreamFramer,
    error_response,
    parse_message,
)

HEAD = (
    b"MESSAGE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK1\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: <sip:bob@example.com>\r\n"
    b"From: <sip:alice@example.com>;tag=1\r\n"
    b"Call-ID: framing@example.com\r\n"
    b"CSeq: 1 MESSAGE\r\n"
)
BODY = b"hello\r\n\r\nworld"
MESSAGE = HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
SECOND = MESSAGE.replace(b"hello", b"HELLO")


def drain(framer: StreamFramer) -> list[FramingEvent]:
    events = []
    while (event := framer.next_event()) is not None:
        events.append(event)
    return events


def feed(data: bytes, chunk: int, framer: StreamFramer | None = None) -> list[FramingEvent]:
    framer = framer or StreamFramer()
    events: list[FramingEvent] = []
    for start in range(0, len(data), chunk):
        framer.receive_data(data[start : start + chunk])
        events.extend(drain(framer))
    return events


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 10_000])
def test_messages_are_framed_however_the_bytes_arrive(chunk: int) -> None:
    events = feed(MESSAGE + SECOND, chunk)
    assert events == [MessageFramed(data=MESSAGE), MessageFramed(data=SECOND)]
    assert parse_message(MESSAGE, datagram=False).body == BODY


def test_trailing_partial_message_waits() -> None:
    framer = StreamFramer()
    framer.receive_data(MESSAGE + SECOND[:20])
    assert drain(framer) == [MessageFramed(data=MESSAGE)]
    assert framer.buffered == 20
    framer.receive_data(SECOND[20:])
    assert drain(framer) == [MessageFramed(data=SECOND)]
    assert framer.buffered == 0


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_keepalives_between_messages(chunk: int) -> None:
    # RFC 5626 4.4.1: CRLFCRLF is a ping, a lone CRLF a pong.
    data = b"\r\n\r\n" + MESSAGE + b"\r\n" + SECOND + b"\r\n\r\n"
    events = feed(data, chunk)
    assert events == [
        KeepalivePingReceived(),
        MessageFramed(data=MESSAGE),
        KeepalivePongReceived(),
        MessageFramed(data=SECOND),
        KeepalivePingReceived(),
    ]


def test_a_half_ping_waits_for_its_other_half() -> None:
    framer = StreamFramer()
    framer.receive_data(b"\r\n")
    assert framer.next_event() is None
    framer.receive_data(b"\r\n")
    assert framer.next_event() == KeepalivePingReceived()


def test_missing_content_length_fails_with_a_400_and_closes() -> None:
    framer = StreamFramer()
    framer.receive_data(HEAD + b"\r\n")
    event = framer.next_event()
    assert isinstance(event, FramingFailed)
    assert event.error.status_hint == 400
    assert event.error.close_connection
    answer = error_response(event.error)
    assert answer is not None
    assert answer.status == 400
    assert framer.failed
    assert framer.next_event() is None
    with pytest.raises(LocalProtocolError):
        framer.receive_data(MESSAGE)


@pytest.mark.parametrize(
    "length", [b"Content-Length: -1", b"Content-Length: ten", b"l: 5\r\nContent-Length: 6"]
)
def test_bad_content_length_fails(length: bytes) -> None:
    framer = StreamFramer()
    framer.receive_data(HEAD + length + b"\r\n\r\n")
    event = framer.next_event()
    assert isinstance(event, FramingFailed)
    assert event.error.status_hint == 400


def test_header_section_over_the_limit_is_a_513_without_buffering_more() -> None:
    framer = StreamFramer(max_header_size=512)
    framer.receive_data(HEAD)
    assert framer.next_event() is None
    framer.receive_data(b"X-Filler: " + b"a" * 600 + b"\r\n")
    event = framer.next_event()
    assert isinstance(event, FramingFailed)
    assert event.error.status_hint == 513
    assert framer.buffered == 0
    answer = error_response(event.error)
    assert answer is not None
    assert answer.status == 513


def test_complete_header_section_over_the_limit_is_a_513() -> None:
    framer = StreamFramer(max_header_size=64)
    framer.receive_data(MESSAGE)
    event = framer.next_event()
    assert isinstance(event, FramingFailed)
    assert event.error.status_hint == 513


def test_body_over_the_limit_is_a_413_before_it_arrives() -> None:
    framer = StreamFramer(max_body_size=1024)
    framer.receive_data(HEAD + b"Content-Length: 1000000\r\n\r\n")
    event = framer.next_event()
    assert isinstance(event, FramingFailed)
    assert event.error.status_hint == 413
    assert framer.buffered == 0


def test_garbage_header_section_gives_no_answer() -> None:
    framer = StreamFramer(max_header_size=64)
    framer.receive_data(b"\x16\x03\x01" + b"\x00" * 100)
    event = framer.next_event()
    assert isinstance(event, FramingFailed)
    assert error_response(event.error) is None
