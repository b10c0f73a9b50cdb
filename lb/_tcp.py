"""TCP connections: they end at the load balancer.

Each connection, accepted or opened by the load balancer, cuts its byte stream
into messages with a ``StreamFramer`` and hands each to its owner (the load
balancer), which forwards it to a worker with the connection's id.  Workers send
back through a connection by naming its id (RFC 3261 18.2.2: a response goes back
over the connection its request came on).

Nothing is buffered without limit: the framer bounds a message's header section
and body; the write buffer pauses reading from the peer above
``WRITE_BUFFER_HIGH`` (a client that does not read its responses must not keep
sending requests) and closes the connection above ``WRITE_BUFFER_LIMIT``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Protocol, cast

from sipcore import (
    FramingFailed,
    KeepalivePingReceived,
    LocalProtocolError,
    MessageFramed,
    StreamFramer,
    error_response,
)

__all__ = [
    "MAX_BODY_SIZE",
    "MAX_HEADER_SIZE",
    "WRITE_BUFFER_HIGH",
    "WRITE_BUFFER_LIMIT",
    "ConnectionOwner",
    "TcpConnection",
    "open_connection",
]

log = logging.getLogger(__name__)

MAX_HEADER_SIZE = 16384
"""The longest start line and header section accepted (longer: 513, RFC 3261 21.5.14)."""
MAX_BODY_SIZE = 65536
"""The longest body accepted (longer: 413, RFC 3261 21.4.11)."""
WRITE_BUFFER_HIGH = 256 * 1024
"""Above this many unsent bytes the connection stops reading from its peer."""
WRITE_BUFFER_LIMIT = 1024 * 1024
"""Above this many unsent bytes the connection is closed."""

_PONG = b"\r\n"
_UNANSWERED_KEPT = 16  # messages remembered per connection until the peer answers


class ConnectionOwner(Protocol):
    """What a connection tells the load balancer."""

    def connection_opened(self, connection: TcpConnection) -> None:
        """The connection is established (its remote address is known)."""

    def connection_closed(self, connection: TcpConnection) -> None:
        """The connection is gone (or could not be opened)."""

    def stream_message_received(self, connection: TcpConnection, data: bytes) -> None:
        """A whole message arrived on the connection."""

    def keepalive_answered(self, connection: TcpConnection) -> None:
        """A CRLFCRLF ping arrived and was answered."""

    def write_overflowed(self, connection: TcpConnection) -> None:
        """The write buffer overflowed; the connection is being closed."""

    def messages_not_sent(self, connection: TcpConnection, messages: list[bytes]) -> None:
        """The connection could not be opened: these writes are dropped."""


class TcpConnection(asyncio.Protocol):
    """One TCP connection of the load balancer (see the module docstring)."""

    def __init__(
        self,
        owner: ConnectionOwner,
        connection_id: int,
        socket_id: int,
        advertised: str,
        remote: tuple[str, int] | None = None,
    ) -> None:
        """A connection numbered ``connection_id``, belonging to socket ``socket_id``;
        ``remote`` is given for a connection the load balancer opens itself."""
        self.id = connection_id
        """Unique within this load balancer incarnation; never reused."""
        self.socket_id = socket_id
        """The listen socket it was accepted on, or opened for."""
        self.advertised = advertised
        """That socket's advertised host:port."""
        self.host, self.port = remote if remote is not None else ("", 0)
        self.outbound = remote is not None
        """Whether the load balancer opened it."""
        self.last_activity = time.monotonic()
        """When bytes last went in or out (for the idle timeout)."""
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._owner = owner
        self._framer = StreamFramer(max_header_size=MAX_HEADER_SIZE, max_body_size=MAX_BODY_SIZE)
        self._pending: list[bytes] = []  # written while connecting
        self._pending_size = 0
        # Messages written since the peer last sent a byte (the newest
        # _UNANSWERED_KEPT): when the peer closes or resets the connection before
        # answering, they may never have been read, and go back to their workers.
        self._unanswered: list[bytes] = []
        self._closed_here = False
        self._reading_stopped = False
        self._reading_held = False
        self._writing_paused = False

    def __repr__(self) -> str:
        return f"<TcpConnection {self.id} {self.host}:{self.port}>"

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Take the transport; flush what was written while connecting."""
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.closed:  # closed while it was opening (stop, idle sweep)
            transport.close()
            return
        self.transport = transport
        if not self.outbound:
            peer = transport.get_extra_info("peername")
            self.host, self.port = peer[0], peer[1]
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self._owner.connection_opened(self)
        pending, self._pending, self._pending_size = self._pending, [], 0
        for data in pending:
            self.send(data)

    def data_received(self, data: bytes) -> None:
        """Frame the bytes; forward messages, answer pings, fail on broken framing."""
        self.last_activity = time.monotonic()
        if self._unanswered:
            self._unanswered.clear()  # the peer is there and reading
        framer = self._framer
        try:
            framer.receive_data(data)
        except LocalProtocolError:
            return  # framing already failed: the connection is closing
        while (event := framer.next_event()) is not None:
            if type(event) is MessageFramed:
                self._owner.stream_message_received(self, event.data)
                if self.transport is None or self.transport.is_closing():
                    return  # the owner closed the connection (not SIP)
            elif type(event) is KeepalivePingReceived:
                # RFC 5626 4.4.1: a CRLFCRLF ping is answered with one CRLF pong.
                self.send(_PONG)
                self._owner.keepalive_answered(self)
            elif type(event) is FramingFailed:
                # RFC 3261 18.3: after a framing error nothing on the stream can be
                # trusted; answer the broken request if it can be, then close.
                response = error_response(event.error)
                log.debug("connection %d: %s; closing", self.id, event.error.reason)
                if response is not None:
                    self.send(bytes(response))
                self.close()
                return
            # A lone CRLF (KeepalivePongReceived) is ignored (RFC 3261 7.5, RFC 5626 4.4.1).

    def eof_received(self) -> bool | None:
        """The peer closed its side: close ours too."""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Tell the owner the connection is gone, and which messages written to it
        the peer may never have read (RFC 3261 18.4: the transport error reaches
        the client transaction now, not after Timer B)."""
        if not self.closed:
            self.closed = True
            unanswered, self._unanswered = self._unanswered, []
            if unanswered and not self._closed_here:
                self._owner.messages_not_sent(self, unanswered)
            self._owner.connection_closed(self)

    def pause_writing(self) -> None:
        """The write buffer passed WRITE_BUFFER_HIGH: stop reading from the peer."""
        self._writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The write buffer drained: read again (unless reading is stopped or held)."""
        self._writing_paused = False
        self._resume_reading()

    def _resume_reading(self) -> None:
        transport = self.transport
        if (
            transport is not None
            and not transport.is_closing()
            and not (self._reading_stopped or self._reading_held or self._writing_paused)
        ):
            transport.resume_reading()

    # used by the load balancer

    def send(self, data: bytes) -> bool:
        """Write ``data``; returns False when the connection cannot take it (closed,
        or its write buffer overflowed, which closes it)."""
        if self.closed:
            return False
        self.last_activity = time.monotonic()
        transport = self.transport
        if transport is None:  # still connecting
            if self._pending_size + len(data) > WRITE_BUFFER_LIMIT:
                self._overflow()
                return False
            self._pending.append(data)
            self._pending_size += len(data)
            return True
        if transport.is_closing():
            return False
        transport.write(data)
        if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self._overflow()
            return False
        if data is not _PONG:
            unanswered = self._unanswered
            if len(unanswered) >= _UNANSWERED_KEPT:
                del unanswered[0]
            unanswered.append(data)
        return True

    def hold_reading(self) -> None:
        """Read nothing until ``release_reading``: a message from this connection
        waits for room in a worker's queue, and TCP's flow control makes the peer
        wait too, instead of anything being dropped."""
        self._reading_held = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def release_reading(self) -> None:
        """Read again after ``hold_reading``."""
        self._reading_held = False
        self._resume_reading()

    def stop_reading(self) -> None:
        """Read nothing more (the load balancer is stopping)."""
        self._reading_stopped = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def abort(self) -> None:
        """Close at once, dropping what is buffered."""
        self._closed_here = True
        if self.transport is not None:
            self.transport.abort()
        else:
            self.connect_failed(None)

    def close(self) -> None:
        """Close after flushing what is buffered."""
        self._closed_here = True
        if self.transport is not None:
            self.transport.close()
        else:
            self.connect_failed(None)

    def connect_failed(self, error: BaseException | None) -> None:
        """Opening the connection failed: drop what was written to it."""
        if error is not None:
            log.info("cannot connect to %s:%d: %s", self.host, self.port, error)
        pending, self._pending, self._pending_size = self._pending, [], 0
        if pending:
            self._owner.messages_not_sent(self, pending)
        self.connection_lost(None)

    @property
    def pending_messages(self) -> int:
        """How many writes wait for the connection to open."""
        return len(self._pending)

    def _overflow(self) -> None:
        log.warning(
            "connection %d to %s:%d: write buffer over %d bytes; closing",
            self.id,
            self.host,
            self.port,
            WRITE_BUFFER_LIMIT,
        )
        self._owner.write_overflowed(self)
        if self.transport is not None:
            self.transport.abort()
        else:
            self.connect_failed(None)


async def open_connection(
    connection: TcpConnection, local_host: str | None, timeout: float
) -> None:
    """Connect ``connection`` to its remote address from ``local_host`` (any port).

    On failure, ``connection.connect_failed`` is called and nothing is raised
    (except cancellation).
    """
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in connection.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if local_host is not None:
            sock.bind((local_host, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (connection.host, connection.port)), timeout)
        await loop.create_connection(lambda: connection, sock=sock)
    except (OSError, TimeoutError) as error:
        sock.close()
        connection.connect_failed(error)
    except BaseException:
        sock.close()
        connection.connect_failed(None)
        raise
