"""The envelopes load balancers and workers exchange over ZeroMQ.

Every process binds one PULL socket, its inbox, and reaches a peer through a PUSH
socket connected to the peer's inbox (endpoints are published in etcd).  A frame
is a msgpack array of envelopes: a sender gathers what it has for a peer and sends
it as one frame (batching is what makes the hop cheap:
../shared/PERFORMANCE-NOTES.md), paced by ``FramePacer``.

Each envelope is a msgpack array whose first element is its kind:

``INBOUND`` (load balancer -> worker, or worker -> worker when forwarded)::

    [INBOUND, ring, lb_id, socket_id, transport, advertised,
     source_host, source_port, connection_id, data, hops]

``OUTBOUND`` (worker -> load balancer)::

    [OUTBOUND, socket_id, transport, destination_host, destination_port,
     connection_id, data]

``CLAIMS`` (worker -> worker, when ownership moved)::

    [CLAIMS, ring, from_worker, complete, [call_id, ...]]

``RELEASES`` (worker -> worker; Call-IDs travel as bytes)::

    [RELEASES, from_worker, [call_id, ...]]

``CONNECTION_CLOSED`` (load balancer -> worker)::

    [CONNECTION_CLOSED, lb_id, connection_id]

``SEND_FAILED`` (load balancer -> the worker named in the request's top Via
branch): a request of an OUTBOUND envelope that could not be sent (the TCP
connection to its destination could not be opened)::

    [SEND_FAILED, lb_id, data]

``STAMP`` (load balancer -> worker, the first envelope of every frame): the
wall-clock time (seconds since the epoch) the frame's first message arrived at
the load balancer; the worker's overload control measures queueing with it::

    [STAMP, time]

Field meanings: ``ring`` is a ring fingerprint (``cluster/ring.py``);
``complete`` in CLAIMS says the sender has listed every call it holds whose owner
moved to the receiver under that ring; ``transport`` is "udp" or "tcp"; ``advertised`` is the
``host:port`` written into Via and Record-Route for the socket the message
arrived on; ``connection_id`` is an int for TCP (unique per load balancer
incarnation, never reused) and None for UDP; ``hops`` lists the workers an
inbound envelope was forwarded through (a forwarded envelope is never forwarded
back to a worker already in it).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import msgpack

__all__ = [
    "ConnectionClosed",
    "FramePacer",
    "Inbound",
    "Kind",
    "Outbound",
    "Peer",
    "inbound_from",
    "pack_frame",
    "unpack_frame",
]


class Kind(enum.IntEnum):
    """The first element of every envelope."""

    INBOUND = 0
    OUTBOUND = 1
    CLAIMS = 2
    RELEASES = 3
    CONNECTION_CLOSED = 4
    SEND_FAILED = 5
    STAMP = 6


class Peer(NamedTuple):
    """A remote SIP element and the load balancer socket used to reach it."""

    lb_id: str
    """The load balancer owning the socket (and the TCP connection, if any)."""
    socket_id: int
    """The socket on that load balancer."""
    transport: str
    """"udp" or "tcp"."""
    host: str
    """The remote address (IPv6 without brackets)."""
    port: int
    """The remote port."""
    connection_id: int | None = None
    """The TCP connection to use when it still exists (a hint), None for UDP."""

    @property
    def reliable(self) -> bool:
        """Whether the transport is reliable (RFC 3261 17: no retransmissions)."""
        return self.transport != "udp"


class Inbound(NamedTuple):
    """A SIP message received by a load balancer, on its way to a worker."""

    ring: int
    """The fingerprint of the ring the load balancer routed it by."""
    lb_id: str
    """The load balancer that received it (and owns the socket or connection)."""
    socket_id: int
    """The load balancer's socket it arrived on."""
    transport: str
    """"udp" or "tcp"."""
    advertised: str
    """The advertised ``host:port`` of that socket."""
    source_host: str
    """The address it came from."""
    source_port: int
    """The port it came from."""
    connection_id: int | None
    """The TCP connection it came on; None for UDP."""
    data: bytes
    """The raw message."""
    hops: tuple[str, ...] = ()
    """The workers it was forwarded through."""

    def pack(self) -> list[Any]:
        """The envelope as a msgpack-ready list."""
        return [Kind.INBOUND, *self[:-1], list(self.hops)]


class Outbound(NamedTuple):
    """A SIP message a worker asks a load balancer to send."""

    socket_id: int
    """The load balancer's socket to send from."""
    transport: str
    """"udp" or "tcp"."""
    destination_host: str
    """Where to send it."""
    destination_port: int
    """Where to send it."""
    connection_id: int | None
    """For TCP: the connection to use when it still exists (a hint)."""
    data: bytes
    """The raw message."""

    def pack(self) -> list[Any]:
        """The envelope as a msgpack-ready list."""
        return [Kind.OUTBOUND, *self]


class ConnectionClosed(NamedTuple):
    """A load balancer's TCP connection closed."""

    lb_id: str
    """The load balancer."""
    connection_id: int
    """The connection."""

    def pack(self) -> list[Any]:
        """The envelope as a msgpack-ready list."""
        return [Kind.CONNECTION_CLOSED, *self]


class _Scheduler(Protocol):
    def call_soon(self, callback: Callable[[], object], /) -> object: ...

    def call_later(self, delay: float, callback: Callable[[], object], /) -> object: ...


class FramePacer:
    """When a process sends its gathered envelopes: at most one flush per
    ``interval`` seconds.

    After a quiet spell (the last flush ``interval`` or more ago) a message leaves
    at the end of the event-loop pass that produced it, with no added delay; under
    load the flushes come ``interval`` apart and each frame holds what gathered
    meanwhile.  A frame costs a wake-up of the receiver and of ZeroMQ's I/O
    threads, so the pace bounds that cost per message at high rates while light
    traffic waits for nothing.  (Waiting ``interval`` after the first message of
    each batch instead delays every message, even a lone one, and under load
    gives the same frame rate at half the interval's latency budget: the frames
    come one interval plus one arrival apart.)  Times are the caller's clock, in
    seconds; the pacer reads none.
    """

    __slots__ = ("_last", "interval")

    def __init__(self, interval: float) -> None:
        if interval < 0:
            raise ValueError("a flush interval is 0 or more seconds")
        self.interval = interval
        self._last = -math.inf

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until the next flush may go (0: at the end of this pass)."""
        return max(0.0, self._last + self.interval - now)

    def flushed(self, now: float) -> None:
        """Note a flush at ``now``."""
        self._last = now

    def schedule(self, loop: _Scheduler, flush: Callable[[], object], now: float) -> None:
        """Have ``loop`` (an asyncio event loop) call ``flush`` when the next flush
        may go: at the end of this pass, or when the interval since the last ends."""
        wait = self.wait(now)
        if wait > 0:
            loop.call_later(wait, flush)
        else:
            loop.call_soon(flush)


_packer = msgpack.Packer(use_bin_type=True)


def pack_frame(envelopes: list[list[Any]]) -> bytes:
    """One frame holding ``envelopes`` (lists made by the ``pack`` methods)."""
    frame: bytes = _packer.pack(envelopes)
    return frame


def unpack_frame(frame: bytes) -> list[list[Any]]:
    """The envelopes of a frame, as lists; raises ValueError on a malformed frame."""
    try:
        envelopes = msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=True)
    except (msgpack.UnpackException, ValueError) as error:
        raise ValueError(f"malformed frame: {error}") from None
    if not isinstance(envelopes, list):
        raise ValueError("malformed frame: not an array")
    return envelopes


def inbound_from(fields: list[Any]) -> Inbound:
    """An Inbound from an unpacked envelope (its kind element removed)."""
    *head, hops = fields
    return Inbound._make([*head, tuple(hops)])
