"""What the load balancer reads of a datagram before routing it: almost nothing.

A datagram is a request, a response, a keepalive or junk.  The tests look at the
start line only (RFC 3261 7.1, 7.2); the rest of the message is the worker's
business, which parses it fully and answers a malformed one.  Junk is never
forwarded: a worker must not spend a frame slot on a port scan.
"""

from __future__ import annotations

import enum
import re

__all__ = [
    "PING",
    "PONG",
    "REQUEST_LINE_RE",
    "DatagramKind",
    "address_key",
    "classify_datagram",
    "looks_like_request",
    "looks_like_response",
]

# Request-Line = Method SP Request-URI SP SIP-Version CRLF   (RFC 3261 7.1, 25.1)
# Method is a token; SIP-Version is case-insensitive (RFC 3261 7.1).  The test is
# deliberately loose beyond that shape: a request with extra whitespace in its
# Request-Line or another SIP version is still SIP, and the worker answers it (400,
# 505: RFC 4475 3.1.2.8-3.1.2.10, 3.1.2.16); only what is not SIP at all is junk.
REQUEST_LINE_RE = re.compile(
    rb"[-!%*_+`'~.0-9A-Za-z]+ [^\r\n]*[ \t][Ss][Ii][Pp]/[0-9]+\.[0-9]+[ \t]*\r\n"
)
"""Matches a request line at the start of a message (``match``, not ``search``)."""
# Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF   (RFC 3261 7.2)
_STATUS_LINE_RE = re.compile(rb"[Ss][Ii][Pp]/2\.0 [1-6][0-9][0-9] ")

PING = b"\r\n\r\n"
"""The CRLFCRLF keepalive ping (RFC 5626 4.4.1)."""
PONG = b"\r\n"
"""The CRLF keepalive pong (RFC 5626 4.4.1)."""


class DatagramKind(enum.Enum):
    """What a datagram is, as far as the load balancer cares."""

    REQUEST = "request"
    RESPONSE = "response"
    PING = "ping"
    PONG = "pong"
    JUNK = "junk"


def looks_like_response(data: bytes) -> bool:
    """Whether ``data`` starts with a SIP/2.0 status line (RFC 3261 7.2)."""
    # The exact upper-case spelling first: every implementation sends it (RFC 3261 7.1).
    return data.startswith(b"SIP/2.0 ") or _STATUS_LINE_RE.match(data) is not None


def looks_like_request(data: bytes) -> bool:
    """Whether ``data`` starts with a request line: ``TOKEN SP ... SP SIP/x.y CRLF``
    (RFC 3261 7.1), whitespace in between tolerated."""
    return REQUEST_LINE_RE.match(data) is not None


def classify_datagram(data: bytes) -> DatagramKind:
    """The kind of a received datagram (the reference the fast path agrees with)."""
    if looks_like_response(data):
        return DatagramKind.RESPONSE
    if looks_like_request(data):
        return DatagramKind.REQUEST
    if data == PING:
        return DatagramKind.PING
    if data == PONG:
        return DatagramKind.PONG
    return DatagramKind.JUNK


def address_key(host: str, port: int) -> bytes:
    """The routing key of a message without a Call-ID: its source, ``host:port``."""
    return f"{host}:{port}".encode()
