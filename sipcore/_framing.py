"""Framing SIP messages on stream transports (TCP, TLS, WebSocket's byte stream).

Bytes go in with ``receive_data``; events come out of ``next_event``:

* ``MessageFramed``: the bytes of exactly one message, header section and body;
* ``KeepalivePingReceived``: a CRLFCRLF ping between messages (RFC 5626 4.4.1);
  the caller answers it with a single CRLF pong;
* ``KeepalivePongReceived``: a lone CRLF between messages (the pong to a ping we
  sent, RFC 5626 4.4.1; RFC 3261 7.5 says CRLFs before a start line are ignored);
* ``FramingFailed``: the stream broke a rule it cannot recover from.  The error's
  status hint says how to answer (if ``error.message`` is a request whose Via
  can be read) and the connection must be closed afterwards.

Buffers are bounded: a header section longer than ``max_header_size`` is refused
with 513 (RFC 3261 21.5.14) and a body longer than ``max_body_size`` with 413
(RFC 3261 21.4.11), without buffering the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias

from ._errors import LocalProtocolError, MessageError
from ._message import Request, Response, parse_message

__all__ = [
    "FramingEvent",
    "FramingFailed",
    "KeepalivePingReceived",
    "KeepalivePongReceived",
    "MessageFramed",
    "StreamFramer",
]

# Content-Length or its compact form "l", at the start of a header line.
_CONTENT_LENGTH_RE = re.compile(
    rb"\r\n(?:[Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][Nn][Gg][Tt][Hh]|[Ll])[ \t]*:[ \t]*([^\r\n]*)"
)
_DIGITS_RE = re.compile(rb"[0-9]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageFramed:
    """One whole message was received."""

    data: bytes
    """The message: start line, header section, empty line and body."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepalivePingReceived:
    """A CRLFCRLF keepalive ping was received (RFC 5626 4.4.1): answer with CRLF."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepalivePongReceived:
    """A single CRLF was received between messages: a pong (RFC 5626 4.4.1)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FramingFailed:
    """The stream cannot be framed any more; answer if possible, then close."""

    error: MessageError
    """What went wrong; ``error.message`` is the partial message when known."""


FramingEvent: TypeAlias = (
    MessageFramed | KeepalivePingReceived | KeepalivePongReceived | FramingFailed
)


def _partial(head: bytes) -> Request | Response | None:
    """Parse a header section (without its empty line) as far as it goes."""
    try:
        return parse_message(head + b"\r\n\r\n")
    except MessageError as error:
        return error.message


class StreamFramer:
    """Cuts a byte stream into SIP messages (RFC 3261 18.3: by Content-Length)."""

    def __init__(self, *, max_header_size: int = 16384, max_body_size: int = 65536) -> None:
        """``max_header_size`` bounds the start line and headers, ``max_body_size``
        the body; both in bytes."""
        self._buffer = bytearray()
        self._scanned = 0  # header bytes already searched for the empty line
        self._failed = False
        self._max_header_size = max_header_size
        self._max_body_size = max_body_size

    @property
    def failed(self) -> bool:
        """Whether framing failed; the connection must be closed."""
        return self._failed

    @property
    def buffered(self) -> int:
        """How many bytes are waiting for the rest of their message."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the stream.

        Raises LocalProtocolError after a FramingFailed event: nothing after a
        framing error can be trusted.
        """
        if self._failed:
            raise LocalProtocolError("the stream failed framing; close the connection")
        self._buffer += data

    def _fail(self, error: MessageError) -> FramingFailed:
        self._failed = True
        self._buffer.clear()
        return FramingFailed(error=error)

    def next_event(self) -> FramingEvent | None:
        """Return the next event, or None when more bytes are needed."""
        if self._failed:
            return None
        buffer = self._buffer
        if self._scanned == 0 and buffer[:1] == b"\r":
            if len(buffer) < 4 and b"\r\n\r\n".startswith(buffer):
                return None  # a ping, or a pong, still arriving: wait for more bytes
            if buffer[:4] == b"\r\n\r\n":
                del buffer[:4]
                return KeepalivePingReceived()
            if buffer[:2] == b"\r\n":
                del buffer[:2]
                return KeepalivePongReceived()
        end = buffer.find(b"\r\n\r\n", max(self._scanned - 3, 0))
        if end < 0:
            if len(buffer) > self._max_header_size:
                head = bytes(buffer[: self._max_header_size])
                partial = _partial(head[: head.rfind(b"\r\n")])
                return self._fail(
                    MessageError(
                        "header section too long",
                        513,
                        message=partial,
                        close_connection=True,
                    )
                )
            self._scanned = len(buffer)
            return None
        body_start = end + 4
        if end > self._max_header_size:
            return self._fail(
                MessageError(
                    "header section too long",
                    513,
                    message=_partial(bytes(buffer[:end])),
                    close_connection=True,
                )
            )
        lengths = {
            match.group(1).strip(b" \t")
            for match in _CONTENT_LENGTH_RE.finditer(buffer, 0, end + 2)
        }
        if len(lengths) != 1:
            # RFC 3261 18.3 and 20.14: Content-Length is mandatory on streams; two
            # different ones leave the framing unknowable (RFC 4475 3.3.9).
            reason = (
                "Missing Content-Length" if not lengths else "Conflicting Content-Length headers"
            )
            return self._fail(
                MessageError(
                    reason, 400, message=_partial(bytes(buffer[:end])), close_connection=True
                )
            )
        (length_text,) = lengths
        if _DIGITS_RE.fullmatch(length_text) is None:
            # RFC 4475 3.1.2.3: a negative or non-numeric length.
            return self._fail(
                MessageError(
                    "Malformed Content-Length",
                    400,
                    message=_partial(bytes(buffer[:end])),
                    close_connection=True,
                )
            )
        length = int(length_text)
        if length > self._max_body_size:
            return self._fail(
                MessageError(
                    "body too large",
                    413,
                    message=_partial(bytes(buffer[:end])),
                    close_connection=True,
                )
            )
        total = body_start + length
        if len(buffer) < total:
            self._scanned = end + 1  # keep the found end: rescanning finds it again
            return None
        data = bytes(buffer[:total])
        del buffer[:total]
        self._scanned = 0
        return MessageFramed(data=data)
