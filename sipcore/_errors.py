"""The one error hierarchy of the SIP core.

Two families, after h11's ``RemoteProtocolError`` / ``LocalProtocolError``:

* ``RemoteProtocolError``: the peer sent something we cannot accept.  It carries a
  status hint so the caller can answer a request (RFC 3261 8.2 and 16.3: 400, 413,
  416, 420, 483, 505, 513 ...), or ``None`` when the message must be dropped
  silently (a malformed response, or a request whose Via cannot be read, since a
  response could not be routed back: RFC 3261 18.2.2).
* ``LocalProtocolError``: our own code misused the core (an illegal transaction
  transition requested by the transaction user, a header value that cannot be
  serialized ...).  It is a bug, never the peer's fault.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._message import Request, Response

__all__ = [
    "LocalProtocolError",
    "MessageError",
    "RemoteProtocolError",
    "SipError",
]


class SipError(Exception):
    """Base class of every error the SIP core raises."""


class RemoteProtocolError(SipError):
    """The remote peer violated the protocol.

    ``status_hint`` is the SIP status code to answer with (a request), or ``None``
    when the message must be dropped without an answer.  ``reason`` is a reason
    phrase naming the problem, suitable for the status line of that answer.
    """

    def __init__(self, reason: str, status_hint: int | None = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_hint = status_hint


class MessageError(RemoteProtocolError):
    """A received message is malformed.

    ``message`` is the partially parsed message when the start line and the header
    lines could be split, so that the caller can copy Via, From, To, Call-ID and
    CSeq into an error response (RFC 3261 8.2.6); it is ``None`` otherwise.
    ``close_connection`` is true when a stream transport lost its framing and the
    connection must be closed (RFC 3261 18.3: nothing after a framing error can be
    trusted).
    """

    def __init__(
        self,
        reason: str,
        status_hint: int | None = 400,
        *,
        message: Request | Response | None = None,
        close_connection: bool = False,
    ) -> None:
        super().__init__(reason, status_hint)
        self.message = message
        self.close_connection = close_connection


class LocalProtocolError(SipError):
    """Our own code used the SIP core in a way the protocol forbids."""
