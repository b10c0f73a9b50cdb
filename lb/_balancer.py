"""The load balancer: SIP sockets in front, workers behind ZeroMQ, no call state.

Flow of a request (the hot path)::

    datagram_received -> classify (start line only) -> Call-ID -> slot -> ring owner
        -> append the INBOUND envelope to that worker's batch
    one loop.call_soon per event-loop pass: each batch -> one frame -> PUSH (NOBLOCK)

and back::

    inbox FD readable -> recv frames (NOBLOCK) until zmq.Again -> each OUTBOUND
        envelope -> sendto / TCP write from the socket the worker named

Batching is what makes the hop cheap (../shared/PERFORMANCE-NOTES.md): every
message received during one pass of the event loop goes to its worker in one
frame.  Outbound messages are written at once, without batching.

What a message costs depends on how many share a frame.  Under heavy load a pass
holds dozens and the load balancer spends ~4.5 us of CPU per message, most of it
in the recvmsg/sendmsg system calls.  At a moderate rate a pass holds one to
three messages and each frame costs a wake-up of ZeroMQ's I/O thread, of the
worker and back: per message that is several times dearer.  ``flush_delay``
(2 ms in a cluster, ``--batch-delay``) paces the frames: at most one flush per
``flush_delay``, so that under load a frame gathers several passes, while a
message after a quiet spell leaves at the end of its pass
(``cluster.protocol.FramePacer``).

Routing (no per-call state, every load balancer gives the same answer):

* a request goes to the ring owner of its Call-ID's slot (a message without a
  Call-ID: of its source ``host:port``), stamped with the ring's fingerprint;
* a response goes to the worker named in its top Via branch when that worker is a
  member (active or draining); otherwise to the ring owner of its Call-ID, which
  forwards it statelessly (RFC 3261 16.11).

Membership comes from etcd only (``MemberWatch``); while etcd is unreachable the
last ring seen keeps routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import itertools
import logging
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aetcd
import zmq

from cluster.config import Settings
from cluster.http import HealthServer
from cluster.keys import KeyLayout
from cluster.membership import (
    LBRecord,
    LBSocket,
    MemberView,
    MemberWatch,
    Registration,
    connect_etcd,
)
from cluster.metrics import message_label, response_label
from cluster.notify import notify_ready
from cluster.protocol import FramePacer, Kind, pack_frame, unpack_frame
from cluster.ring import Ring, branch_worker, slot_of
from sipcore import extract_call_id, top_via_branch

from ._classify import (
    PING,
    PONG,
    REQUEST_LINE_RE,
    address_key,
    looks_like_request,
    looks_like_response,
)
from ._metrics import Counters, Metrics
from ._tcp import TcpConnection, open_connection

__all__ = [
    "CONNECT_TIMEOUT",
    "IDLE_TIMEOUT",
    "ExitCode",
    "LoadBalancer",
    "StartupError",
    "UdpEndpoint",
]

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 300.0
"""Seconds without traffic after which a TCP connection is closed."""
CONNECT_TIMEOUT = 10.0
"""Seconds an outgoing TCP connection may take to open."""
PUSH_HIGH_WATER_MARK = 100_000
"""Frames queued per worker before sends fail with zmq.Again: UDP messages are then
dropped (counted as zmq_full), the others held back (``LoadBalancer._hold_back``)."""
HOLD_BACK_RETRY = 0.005
"""Seconds between attempts to send what was held back for a full worker queue."""
INBOX_HIGH_WATER_MARK = 100_000
"""Frames the inbox queues before the workers' sends to it fail."""
FRAMES_PER_READ = 256
"""Frames read from the inbox in one callback, so that sockets get their turn."""
UDP_BUFFER_SIZE = 4 * 1024 * 1024
"""Requested kernel buffer of each UDP socket (capped by net.core.rmem_max/wmem_max)."""
UDP_WRITE_BUFFER_HIGH = 1024 * 1024
"""Bytes a UDP socket may hold in user space before sends to it are dropped."""
TCP_BACKLOG = 1024
CLOSE_TIMEOUT = 1.0
"""Seconds the TCP connections get to write what they buffered when stopping."""

_INBOUND = int(Kind.INBOUND)
_OUTBOUND = int(Kind.OUTBOUND)
_CONNECTION_CLOSED = int(Kind.CONNECTION_CLOSED)
_SEND_FAILED = int(Kind.SEND_FAILED)
_ID_RE = re.compile(r"[A-Za-z0-9]{1,64}")


class ExitCode(enum.IntEnum):
    """The exit codes of ``sipcluster lb``."""

    OK = 0
    """Stopped in order (SIGTERM or SIGINT)."""
    FAILED = 1
    """An unexpected error."""
    CONFIG = 2
    """A setting cannot be used (the command line's usage code)."""
    STARTUP_FAILED = 3
    """etcd did not answer, or a SIP, ZeroMQ or HTTP socket could not be bound: not
    worth a restart loop (the supervisor's EXIT_STARTUP)."""
    FORCED = 4
    """A second signal arrived during the orderly stop."""


class StartupError(Exception):
    """The load balancer cannot start; ``exit_code`` says why, the message how."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _slot_of_message(data: bytes, host: str, port: int) -> int:
    """The ring slot of a message: by its Call-ID, or by its source without one."""
    call_id = extract_call_id(data)
    return slot_of(call_id if call_id is not None else address_key(host, port))


async def _stop_watch(watch: MemberWatch, attempts: int = 20) -> None:
    """Stop ``watch``, cancelling its task again until it ends.

    One cancellation is not always enough: on Python 3.11, ``asyncio.wait_for``
    (which aetcd uses while it creates a watch) swallows a cancellation that
    lands as the awaited future completes, and the task goes on waiting for
    events.  Each ``MemberWatch.stop()`` call cancels the task once more.
    """
    loop = asyncio.get_running_loop()
    stoppers: set[asyncio.Task[None]] = set()
    for _ in range(attempts):
        stoppers.add(loop.create_task(watch.stop()))
        done, _ = await asyncio.wait(stoppers, timeout=0.1)
        if done:
            break
    else:
        log.warning("the membership watch did not stop")
    for stopper in stoppers:
        stopper.cancel()


def _discard_datagram(data: bytes, address: tuple[Any, ...], endpoint: UdpEndpoint) -> None:
    """Where datagrams go once the load balancer stops reading."""


class UdpEndpoint(asyncio.DatagramProtocol):
    """One UDP socket of the load balancer."""

    def __init__(self, balancer: LoadBalancer, socket_id: int, advertised: str) -> None:
        self.socket_id = socket_id
        self.advertised = advertised
        self.transport: asyncio.DatagramTransport | None = None
        self.receive: Callable[[bytes, tuple[Any, ...], UdpEndpoint], None] = (
            balancer.receive_datagram
        )
        self._balancer = balancer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's transports do not derive from asyncio's classes: no isinstance.
        self.transport = cast(asyncio.DatagramTransport, transport)
        # uvloop's UDPTransport has write buffer limits; asyncio's type does not say so.
        transport.set_write_buffer_limits(high=UDP_WRITE_BUFFER_HIGH)  # type: ignore[attr-defined]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Hand the datagram to the load balancer."""
        self.receive(data, addr, self)

    def error_received(self, exc: Exception) -> None:
        """A send failed (the socket reports it asynchronously)."""
        self._balancer.counters.send_failed += 1
        log.debug("UDP socket %d: %s", self.socket_id, exc)

    def pause_writing(self) -> None:
        """The user-space send buffer is full: drop sends until it drains (UDP is
        lossy anyway and SIP retransmits, RFC 3261 17.1.1.2)."""
        self._balancer.udp_writing_paused(self, paused=True)

    def resume_writing(self) -> None:
        """The send buffer drained."""
        self._balancer.udp_writing_paused(self, paused=False)

    def stop_reading(self) -> None:
        """Ignore every datagram from now on."""
        self.receive = _discard_datagram


class LoadBalancer:
    """The load balancer process's state: see the module docstring.

    ``start()`` binds everything and joins the cluster, ``stop()`` leaves in
    order; ``serve()`` does both around a signal loop and returns the exit code.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        flush_delay: float = 0.0,
    ) -> None:
        """Prepare (nothing is bound yet); raises StartupError for an unusable id.

        ``flush_delay`` is the shortest interval between two flushes of the
        workers' batches (``cluster.protocol.FramePacer``): 0 sends each batch at
        the end of the event-loop pass that started it; a positive interval
        (libuv timers have millisecond resolution) gathers several passes into one
        frame under load, trading up to that much latency for fewer wake-ups
        (module docstring).
        """
        self.settings = settings
        if settings.id is not None:
            if _ID_RE.fullmatch(settings.id) is None:
                raise StartupError(
                    f"--id {settings.id!r}: an id is 1 to 64 letters or digits", ExitCode.CONFIG
                )
            self.id = settings.id
            # The id does not change across restarts: number connections from the
            # clock so a restarted load balancer never reuses an id a worker may
            # still hold as a hint.
            first_connection_id = time.time_ns() // 1000
        else:
            # A new id for each incarnation: a restarted load balancer is a new member.
            self.id = "lb" + secrets.token_hex(6)
            first_connection_id = 1
        self.keys = KeyLayout(settings.etcd_prefix)
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.pacer = FramePacer(flush_delay)
        """Paces the frames to the workers: at most one flush per ``flush_delay``."""
        self.counters = Counters()
        self.sockets: tuple[LBSocket, ...] = ()
        """The SIP sockets, by id, with their real ports (after ``start``)."""
        self.endpoint = ""
        """The advertised ZeroMQ endpoint of the inbox (after ``start``)."""
        self.health: HealthServer | None = None

        self._loop: asyncio.AbstractEventLoop | None = None
        self._ring = Ring(())
        self._udp_endpoints: list[UdpEndpoint] = []
        self._udp_senders: dict[int, Callable[[bytes, tuple[str, int]], None]] = {}
        self._tcp_servers: list[asyncio.Server] = []
        self._connection_ids = itertools.count(first_connection_id)
        self._connections: dict[int, TcpConnection] = {}
        self._by_remote: dict[tuple[str, int], TcpConnection] = {}
        self._connect_tasks: set[asyncio.Task[None]] = set()
        self._no_connections = asyncio.Event()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._inbox: zmq.Socket[bytes] | None = None
        self._inbox_fd: int | None = None
        self._ipc_path: str | None = None
        self._pushers: dict[str, zmq.Socket[bytes]] = {}
        self._pusher_endpoints: dict[str, str] = {}
        self._batches: dict[str, list[list[Any]]] = {}
        self._pass_started = 0.0
        self._held_back: dict[str, list[list[Any]]] = {}
        self._held_connections: set[TcpConnection] = set()
        self._retry_timer: asyncio.TimerHandle | None = None
        self._client: aetcd.Client | None = None
        self._registration: Registration | None = None
        self._watch: MemberWatch | None = None
        self._started = False
        self._stopped = False
        self._ready = asyncio.Event()
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._should_exit = False
        self.metrics = Metrics(
            self.counters,
            active_workers=lambda: len(self._ring.workers),
            tcp_connections=lambda: len(self._connections),
            view=lambda: self._watch.view if self._watch is not None else None,
        )
        """The Prometheus registry and histograms (served on /metrics)."""

    # ------------------------------------------------------------------ state

    @property
    def ring(self) -> Ring:
        """The ring requests are routed by (the last one seen)."""
        return self._ring

    @property
    def ready(self) -> bool:
        """Sockets bound, registered in etcd and at least one active worker in the ring."""
        return self._started and not self._stopped and bool(self._ring.workers)

    async def wait_ready(self) -> None:
        """Return once the load balancer has been ready (see ``ready``)."""
        await self._ready.wait()

    @property
    def tcp_connections(self) -> int:
        """How many TCP connections are open (or opening)."""
        return len(self._connections)

    # --------------------------------------------------------------- start-up

    async def start(self) -> None:
        """Bind the SIP sockets, the ZeroMQ inbox and the HTTP endpoint; register in
        etcd and follow the membership.

        Raises StartupError (CONFIG, STARTUP_FAILED); whatever was opened is closed
        again.
        """
        self._loop = asyncio.get_running_loop()
        try:
            self._check_settings()
            await self._open_sip_sockets()
            self._open_inbox()
            self.health = HealthServer(
                self.settings.http.host,
                self.settings.http.port,
                ready=lambda: self.ready,
                registry=self.metrics.registry,
            )
            try:
                await self.health.start()
            except OSError as error:
                self.health = None
                raise StartupError(
                    f"cannot bind the HTTP endpoint {self.settings.http}: "
                    f"{error.strerror or error}",
                    ExitCode.STARTUP_FAILED,
                ) from None
            await self._join_cluster()
        except BaseException:
            await self.stop()
            raise
        self._started = True
        self._schedule_idle_sweep()
        self._update_ready()
        log.info(
            "load balancer %s: SIP on %s, inbox %s, HTTP on %s",
            self.id,
            ", ".join(f"{s.transport}:{s.advertised}" for s in self.sockets),
            self.endpoint,
            self.health.address,
        )

    def _check_settings(self) -> None:
        settings = self.settings
        if not settings.etcd:
            raise StartupError("no etcd to join: pass --etcd URL", ExitCode.CONFIG)
        if not settings.listen:
            raise StartupError("no SIP socket: pass --listen", ExitCode.CONFIG)
        if len(settings.advertise) > len(settings.listen):
            raise StartupError(
                f"{len(settings.advertise)} --advertise values for "
                f"{len(settings.listen)} --listen sockets",
                ExitCode.CONFIG,
            )

    async def _open_sip_sockets(self) -> None:
        loop = self._running_loop()
        sockets: list[LBSocket] = []
        for socket_id, listen in enumerate(self.settings.listen):
            ipv6 = ":" in listen.host
            family = socket.AF_INET6 if ipv6 else socket.AF_INET
            kind = socket.SOCK_DGRAM if listen.transport == "udp" else socket.SOCK_STREAM
            sock = socket.socket(family, kind)
            try:
                if ipv6:
                    # [::] and 0.0.0.0 are separate sockets, each its own --listen.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if listen.transport == "tcp":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                else:
                    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                        with contextlib.suppress(OSError):
                            sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER_SIZE)
                sock.bind((listen.host, listen.port))
                sock.setblocking(False)
            except OSError as error:
                sock.close()
                raise StartupError(
                    f"cannot bind {listen}: {error.strerror or error}", ExitCode.STARTUP_FAILED
                ) from None
            port = sock.getsockname()[1]
            if socket_id < len(self.settings.advertise):
                advertise = self.settings.advertise[socket_id]
                advertise_host, advertise_port = advertise.host, advertise.port
            else:
                advertise_host, advertise_port = listen.host, port
                if ipaddress.ip_address(listen.host).is_unspecified:
                    log.warning("%s listens on a wildcard address: give --advertise for it", listen)
            record = LBSocket(
                id=socket_id,
                transport=listen.transport,
                host=listen.host,
                port=port,
                advertise_host=advertise_host,
                advertise_port=advertise_port,
            )
            sockets.append(record)
            advertised = record.advertised
            if listen.transport == "udp":
                transport, endpoint = await loop.create_datagram_endpoint(
                    self._udp_factory(socket_id, advertised), sock=sock
                )
                endpoint.transport = transport  # connection_made comes one pass later
                self._udp_endpoints.append(endpoint)
                self._udp_senders[socket_id] = transport.sendto
            else:
                server = await loop.create_server(
                    self._tcp_factory(socket_id, advertised), sock=sock, backlog=TCP_BACKLOG
                )
                self._tcp_servers.append(server)
        self.sockets = tuple(sockets)

    def _udp_factory(self, socket_id: int, advertised: str) -> Callable[[], UdpEndpoint]:
        return lambda: UdpEndpoint(self, socket_id, advertised)

    def _tcp_factory(self, socket_id: int, advertised: str) -> Callable[[], TcpConnection]:
        # Accepted connections are numbered by the same counter as opened ones.
        return lambda: TcpConnection(self, next(self._connection_ids), socket_id, advertised)

    def _open_inbox(self) -> None:
        settings = self.settings
        bind = settings.zmq_bind
        if bind is None:
            run_dir = Path(settings.data_dir).resolve() / "run"
            run_dir.mkdir(parents=True, exist_ok=True)
            bind = f"ipc://{run_dir}/lb-{self.id}.sock"
        self._context = zmq.Context()
        inbox = self._context.socket(zmq.PULL)
        inbox.setsockopt(zmq.LINGER, 0)
        inbox.setsockopt(zmq.RCVHWM, INBOX_HIGH_WATER_MARK)
        try:
            inbox.bind(bind)
        except zmq.ZMQError as error:
            inbox.close()
            raise StartupError(
                f"cannot bind the ZeroMQ inbox {bind}: {error}", ExitCode.STARTUP_FAILED
            ) from None
        self._inbox = inbox
        bound = inbox.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(bound, bytes)
        if bound.startswith(b"ipc://"):
            self._ipc_path = bound[len(b"ipc://") :].decode()
        self.endpoint = settings.zmq_advertise or bound.decode()
        wildcard = "0.0.0.0" in self.endpoint or "[::]" in self.endpoint
        if settings.zmq_advertise is None and wildcard:
            log.warning("the inbox %s is a wildcard: give --zmq-advertise", self.endpoint)
        # Read the inbox on its file descriptor, without zmq.asyncio: the descriptor
        # is edge-triggered (it signals a change of the socket's state, not that a
        # message waits), so every wake-up drains until zmq.Again, and a read that
        # stops early reschedules itself (_read_inbox).
        fd = inbox.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self._inbox_fd = fd
        loop = self._running_loop()
        loop.add_reader(fd, self._read_inbox)
        loop.call_soon(self._read_inbox)  # frames may have come before the reader

    async def _join_cluster(self) -> None:
        url = self.settings.etcd
        assert url is not None
        try:
            self._client = await connect_etcd(url)
        except (ConnectionError, ValueError) as error:
            raise StartupError(str(error), ExitCode.STARTUP_FAILED) from None
        assert self.health is not None
        record = LBRecord(
            id=self.id,
            endpoint=self.endpoint,
            sockets=self.sockets,
            pid=os.getpid(),
            host=socket.gethostname(),
            http=self.health.address,
        )
        registration = Registration(url, self.keys.lb(self.id), self.settings.lease_ttl)
        try:
            await registration.start(self._client, record.to_json())
        except Exception as error:
            raise StartupError(
                f"cannot register in etcd at {url}: {error}", ExitCode.STARTUP_FAILED
            ) from None
        self._registration = registration
        self._watch = MemberWatch(self._client, self.keys, on_change=self._membership_changed)
        self._watch.start()
        try:
            await asyncio.wait_for(self._watch.ready.wait(), 10.0)
        except TimeoutError:
            raise StartupError(
                f"cannot read the members from etcd at {url}", ExitCode.STARTUP_FAILED
            ) from None

    # ------------------------------------------------------------- membership

    def _membership_changed(self, view: MemberView) -> None:
        """Follow the workers: one PUSH socket per member (active or draining),
        the ring from the active ones."""
        if self._context is None:  # stopping
            return
        workers = view.workers
        for worker_id in list(self._pushers):
            record = workers.get(worker_id)
            if record is None or record.endpoint != self._pusher_endpoints[worker_id]:
                self._pushers.pop(worker_id).close(linger=0)
                del self._pusher_endpoints[worker_id]
                log.info("worker %s left", worker_id)
        for worker_id, record in workers.items():
            if worker_id in self._pushers:
                continue
            pusher = self._context.socket(zmq.PUSH)
            # No IMMEDIATE: what is sent while the connection to a new worker is still
            # being made waits for it (up to the high-water mark) instead of being
            # lost; a TCP message is never retransmitted.  A worker that never comes
            # up leaves the membership within its lease TTL, which closes this socket
            # and drops the queue.
            pusher.setsockopt(zmq.LINGER, 0)
            pusher.setsockopt(zmq.SNDHWM, PUSH_HIGH_WATER_MARK)
            try:
                pusher.connect(record.endpoint)
            except zmq.ZMQError as error:
                pusher.close()
                log.warning(
                    "worker %s: cannot connect to %s: %s", worker_id, record.endpoint, error
                )
                continue
            self._pushers[worker_id] = pusher
            self._pusher_endpoints[worker_id] = record.endpoint
            log.info("worker %s joined at %s (%s)", worker_id, record.endpoint, record.state)
        if view.ring != self._ring:
            log.info(
                "ring %016x: %d active workers %s",
                view.ring.fingerprint,
                len(view.ring.workers),
                ", ".join(view.ring.workers),
            )
        self._ring = view.ring
        self._update_ready()

    def _update_ready(self) -> None:
        if self.ready and not self._ready.is_set():
            self._ready.set()

    # --------------------------------------------------------- inbound: UDP

    def receive_datagram(
        self, data: bytes, address: tuple[Any, ...], endpoint: UdpEndpoint
    ) -> None:
        """Route one datagram received on ``endpoint`` from ``address`` (the hot path)."""
        counters = self.counters
        ring = self._ring
        if data.startswith(b"SIP/2.0 "):
            counters.udp_received[response_label(data)] += 1
            worker = self._response_owner(data, address[0], address[1])
        elif REQUEST_LINE_RE.match(data) is not None:
            counters.udp_received[message_label(data)] += 1
            call_id = extract_call_id(data)
            worker = ring.owner(
                slot_of(call_id if call_id is not None else address_key(address[0], address[1]))
            )
        else:
            self._receive_other_datagram(data, address, endpoint)
            return
        if worker is None:
            counters.no_worker += 1
            return
        envelope = [
            _INBOUND,
            ring.fingerprint,
            self.id,
            endpoint.socket_id,
            "udp",
            endpoint.advertised,
            address[0],
            address[1],
            None,
            data,
            (),
        ]
        batch = self._batches.get(worker)
        if batch is not None:
            batch.append(envelope)
        else:
            self._start_batch(worker, envelope)

    def _receive_other_datagram(
        self, data: bytes, address: tuple[Any, ...], endpoint: UdpEndpoint
    ) -> None:
        if data == PING:
            # RFC 5626 4.4.1: a CRLFCRLF ping is answered with a CRLF pong.  Defined
            # for streams, UAs send it over UDP as well to keep their NAT binding.
            if endpoint.transport is not None:
                endpoint.transport.sendto(PONG, address)
            self.counters.keepalives_answered += 1
        elif data == PONG:
            pass  # a pong, or a stray CRLF (RFC 3261 7.5): nothing to do
        elif looks_like_response(data):  # a lower-case "sip/2.0" (RFC 3261 7.1)
            self.counters.udp_received[response_label(data)] += 1
            host, port = address[0], address[1]
            self._forward(data, True, host, port, endpoint.socket_id, "udp", endpoint.advertised)
        else:
            self.counters.not_sip += 1

    def _response_owner(self, data: bytes, host: str, port: int) -> str | None:
        """The worker a response goes to: the one in its top Via branch if it is a
        member, else the ring owner of its Call-ID."""
        branch = top_via_branch(data)
        if branch is not None:
            worker = branch_worker(branch)
            if worker is not None and worker in self._pushers:
                return worker
        return self._ring.owner(_slot_of_message(data, host, port))

    def _forward(
        self,
        data: bytes,
        response: bool,
        host: str,
        port: int,
        socket_id: int,
        transport: str,
        advertised: str,
        connection_id: int | None = None,
    ) -> None:
        """Route a message and queue its envelope (the general, slower path)."""
        ring = self._ring
        if response:
            worker = self._response_owner(data, host, port)
        else:
            worker = ring.owner(_slot_of_message(data, host, port))
        if worker is None:
            self.counters.no_worker += 1
            return
        self._enqueue(
            worker,
            [
                _INBOUND,
                ring.fingerprint,
                self.id,
                socket_id,
                transport,
                advertised,
                host,
                port,
                connection_id,
                data,
                (),
            ],
        )

    # --------------------------------------------------------------- batching

    def _enqueue(self, worker: str, envelope: list[Any]) -> None:
        batch = self._batches.get(worker)
        if batch is not None:
            batch.append(envelope)
        else:
            self._start_batch(worker, envelope)

    def _start_batch(self, worker: str, envelope: list[Any]) -> None:
        if not self._batches:
            # The first message since the last flush (cluster.protocol.FramePacer).
            now = time.perf_counter()
            self.pacer.schedule(self._running_loop(), self._flush, now)
            self._pass_started = now
        # Each frame opens with the time its first message arrived: the worker
        # measures its queueing delay with it (worker/overload.py).
        self._batches[worker] = [[Kind.STAMP, time.time()], envelope]

    def _flush(self) -> None:
        """Send each worker's batch as one frame (NOBLOCK; a full queue drops it)."""
        batches = self._batches
        if not batches:
            return
        self._batches = {}
        started = self._pass_started
        self.pacer.flushed(time.perf_counter())
        pushers = self._pushers
        counters = self.counters
        observe_size = self.metrics.frame_envelopes.observe
        observe_latency = self.metrics.forwarding_latency.observe
        for worker, envelopes in batches.items():
            pusher = pushers.get(worker)
            if pusher is None:  # it left between the receipt and now
                counters.no_worker += len(envelopes)
                continue
            if worker in self._held_back:
                # Nothing overtakes what waits for this worker (TCP order).
                self._hold_back(worker, envelopes[1:])
                continue
            try:
                pusher.send(pack_frame(envelopes), zmq.NOBLOCK)
            except zmq.Again:
                self._hold_back(worker, envelopes[1:])
                continue
            except zmq.ZMQError as error:
                counters.zmq_full += len(envelopes)
                log.warning("cannot send to worker %s: %s", worker, error)
                continue
            observe_latency(time.perf_counter() - started)
            observe_size(len(envelopes) - 1)  # not the stamp

    def _hold_back(self, worker: str, envelopes: list[list[Any]]) -> None:
        """A worker's queue is full.  Messages that came over UDP are dropped: their
        senders retransmit (RFC 3261 17.1.1.2, 17.1.2.2).  What came over TCP is
        never retransmitted (RFC 3261 17.1.1.1): it waits, in order, with the
        control envelopes, and the connections it came on are not read until it
        is sent, so that TCP's flow control slows their senders down."""
        held = self._held_back.get(worker)
        if held is None:
            held = self._held_back[worker] = []
        connections = self._connections
        for envelope in envelopes:
            if envelope[0] == _INBOUND:
                if envelope[4] == "udp":
                    self.counters.zmq_full += 1
                    continue
                connection = connections.get(envelope[8])
                if connection is not None and connection not in self._held_connections:
                    connection.hold_reading()
                    self._held_connections.add(connection)
            self.counters.held_back += 1
            held.append(envelope)
        if not held:
            del self._held_back[worker]
        elif self._retry_timer is None:
            self._retry_timer = self._running_loop().call_later(
                HOLD_BACK_RETRY, self._send_held_back
            )

    def _send_held_back(self) -> None:
        self._retry_timer = None
        for worker, held in list(self._held_back.items()):
            pusher = self._pushers.get(worker)
            if pusher is None:  # the worker left
                self.counters.no_worker += len(held)
                del self._held_back[worker]
                continue
            try:
                pusher.send(pack_frame([[Kind.STAMP, time.time()], *held]), zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            del self._held_back[worker]
        if self._held_back:
            self._retry_timer = self._running_loop().call_later(
                HOLD_BACK_RETRY, self._send_held_back
            )
            return
        held_connections, self._held_connections = self._held_connections, set()
        for connection in held_connections:
            connection.release_reading()

    # --------------------------------------------------------- inbound: TCP

    def connection_opened(self, connection: TcpConnection) -> None:
        """Index a connection by id and by remote address."""
        self._no_connections.clear()
        self._connections[connection.id] = connection
        self._by_remote[(connection.host, connection.port)] = connection

    def connection_closed(self, connection: TcpConnection) -> None:
        """Forget a connection and tell every worker it is gone."""
        if self._connections.pop(connection.id, None) is None:
            return
        key = (connection.host, connection.port)
        if self._by_remote.get(key) is connection:
            del self._by_remote[key]
        if not self._connections:
            self._no_connections.set()
        envelope = [_CONNECTION_CLOSED, self.id, connection.id]
        for worker in self._pushers:
            self._enqueue(worker, envelope)

    def messages_not_sent(self, connection: TcpConnection, messages: list[bytes]) -> None:
        """Hand each request that could not be sent back to the worker named in its
        top Via branch, whose client transaction then reports a transport error
        (RFC 3261 17.1.4, 18.4) instead of waiting for its timeout."""
        for data in messages:
            self.counters.send_failed += 1
            if not looks_like_request(data):
                continue  # a response's transaction has no other way to send it
            branch = top_via_branch(data)
            worker = None if branch is None else branch_worker(branch)
            if worker is not None and worker in self._pushers:
                self._enqueue(worker, [_SEND_FAILED, self.id, data])

    def stream_message_received(self, connection: TcpConnection, data: bytes) -> None:
        """Route a message framed on a TCP connection."""
        if looks_like_response(data):
            self.counters.tcp_received[response_label(data)] += 1
            response = True
        elif looks_like_request(data):
            self.counters.tcp_received[message_label(data)] += 1
            response = False
        else:
            # Not SIP: the stream is not a SIP stream; never forward junk.
            self.counters.not_sip += 1
            connection.close()
            return
        self._forward(
            data,
            response,
            connection.host,
            connection.port,
            connection.socket_id,
            "tcp",
            connection.advertised,
            connection.id,
        )

    def keepalive_answered(self, connection: TcpConnection) -> None:
        """Count an answered ping."""
        self.counters.keepalives_answered += 1

    def write_overflowed(self, connection: TcpConnection) -> None:
        """Count a connection closed for a full write buffer."""
        self.counters.tcp_overflow += 1

    def _schedule_idle_sweep(self) -> None:
        interval = max(min(self.idle_timeout / 4, 30.0), 0.05)
        self._idle_timer = self._running_loop().call_later(interval, self._sweep_idle)

    def _sweep_idle(self) -> None:
        deadline = time.monotonic() - self.idle_timeout
        for connection in list(self._connections.values()):
            if connection.last_activity < deadline:
                log.debug("closing idle connection %d", connection.id)
                connection.close()
        self._schedule_idle_sweep()

    # ---------------------------------------------------- outbound (workers)

    def _read_inbox(self) -> None:
        """Read the frames waiting in the inbox (edge-triggered: drain until Again)."""
        inbox = self._inbox
        if inbox is None:
            return
        for _ in range(FRAMES_PER_READ):
            try:
                frame = inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle_frame(frame)
        # Stopped early: the descriptor will not signal the frames still waiting.
        events = inbox.getsockopt(zmq.EVENTS)
        assert isinstance(events, int)
        if events & zmq.POLLIN:
            self._running_loop().call_soon(self._read_inbox)

    def _handle_frame(self, frame: bytes) -> None:
        try:
            envelopes = unpack_frame(frame)
        except ValueError as error:
            self.counters.bad_envelope += 1
            log.debug("bad frame in the inbox: %s", error)
            return
        counters = self.counters
        senders = self._udp_senders
        for envelope in envelopes:
            try:
                kind, socket_id, transport, host, port, connection_id, data = envelope
                if kind != _OUTBOUND:
                    raise ValueError(f"unexpected envelope kind {kind!r}")
                label = message_label(data)
                if transport == "udp":
                    # From the socket the worker named: the one the client sent to, so
                    # the reply passes its NAT binding (RFC 3581 4, RFC 3261 18.2.2).
                    sender = senders.get(socket_id)
                    if sender is None:
                        raise ValueError(f"no UDP socket {socket_id!r}")
                    sender(data, (host, port))
                    counters.udp_sent[label] += 1
                elif transport == "tcp":
                    if self._send_tcp(socket_id, host, port, connection_id, data):
                        counters.tcp_sent[label] += 1
                    else:
                        counters.send_failed += 1
                else:
                    raise ValueError(f"unknown transport {transport!r}")
            except (ValueError, TypeError, AttributeError, OverflowError) as error:
                counters.bad_envelope += 1
                log.debug("unusable envelope from a worker: %s", error)
            except OSError as error:
                counters.send_failed += 1
                log.debug("send failed: %s", error)

    def _send_tcp(
        self, socket_id: int, host: str, port: int, connection_id: int | None, data: bytes
    ) -> bool:
        """Send over TCP (RFC 3261 18.2.2 for responses, 18.1.1 for requests): on the
        named connection if it still exists, else on one to host:port, else on a new
        one.  Raises ValueError for an address that is not an IP address."""
        connection = None if connection_id is None else self._connections.get(connection_id)
        if connection is None:
            connection = self._by_remote.get((host, port))
            if connection is None:
                connection = self._connect(socket_id, host, port)
        return connection.send(data)

    def _connect(self, socket_id: int, host: str, port: int) -> TcpConnection:
        address = ipaddress.ip_address(host)  # workers resolve names; we never block on DNS
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port!r}")
        host = address.compressed
        existing = self._by_remote.get((host, port))
        if existing is not None:
            return existing
        socket_id, local_host = self._origin(socket_id, address.version == 6)
        connection = TcpConnection(
            self,
            next(self._connection_ids),
            socket_id,
            self.sockets[socket_id].advertised,
            remote=(host, port),
        )
        self.connection_opened(connection)
        task = self._running_loop().create_task(
            open_connection(connection, local_host, self.connect_timeout),
            name=f"connect-{connection.id}",
        )
        self._connect_tasks.add(task)
        task.add_done_callback(self._connect_tasks.discard)
        return connection

    def _origin(self, socket_id: int, ipv6: bool) -> tuple[int, str | None]:
        """The socket a new connection belongs to and the host it is opened from: the
        named socket's listen host when the address family fits, else the first TCP
        (then any) socket of that family; None binds nothing."""
        sockets = self.sockets
        candidates = []
        if isinstance(socket_id, int) and 0 <= socket_id < len(sockets):
            candidates.append(sockets[socket_id])
        candidates += [s for s in sockets if s.transport == "tcp"]
        candidates += list(sockets)
        for candidate in candidates:
            if candidate.ipv6 == ipv6:
                unspecified = ipaddress.ip_address(candidate.host).is_unspecified
                return candidate.id, None if unspecified else candidate.host
        fallback = socket_id if isinstance(socket_id, int) and 0 <= socket_id < len(sockets) else 0
        return fallback, None

    def udp_writing_paused(self, endpoint: UdpEndpoint, *, paused: bool) -> None:
        """Drop sends on ``endpoint`` while its send buffer is over its high-water mark."""
        if paused:
            log.warning("UDP socket %d: send buffer full, dropping", endpoint.socket_id)

            def drop(data: bytes, address: tuple[str, int]) -> None:
                self.counters.send_failed += 1

            self._udp_senders[endpoint.socket_id] = drop
        elif endpoint.transport is not None:
            self._udp_senders[endpoint.socket_id] = endpoint.transport.sendto

    # ------------------------------------------------------------ stopping

    async def stop(self) -> None:
        """Leave in order: stop reading the sockets, flush the batches, revoke the
        lease (the record disappears), send what the workers already sent us, close
        ZeroMQ (LINGER 0) and the sockets.  Safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        for endpoint in self._udp_endpoints:
            endpoint.stop_reading()
        for server in self._tcp_servers:
            server.close()
        for connection in list(self._connections.values()):
            connection.stop_reading()
        self._flush()
        if self._watch is not None:
            await _stop_watch(self._watch)
        if self._registration is not None:
            await self._registration.stop()
        self._read_inbox()  # the replies already here still go out
        self._close_zmq()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        for task in list(self._connect_tasks):
            task.cancel()
        for connection in list(self._connections.values()):
            connection.close()  # after what is buffered is written
        if self._connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_connections.wait(), CLOSE_TIMEOUT)
            for connection in list(self._connections.values()):
                connection.abort()
        for endpoint in self._udp_endpoints:
            if endpoint.transport is not None:
                endpoint.transport.close()
        for server in self._tcp_servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self.health is not None:
            await self.health.stop()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        if self._started:
            log.info("load balancer %s stopped", self.id)

    def _close_zmq(self) -> None:
        if self._inbox_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._inbox_fd)
            self._inbox_fd = None
        self._batches = {}
        for pusher in self._pushers.values():
            pusher.close(linger=0)
        self._pushers = {}
        if self._inbox is not None:
            self._inbox.close(linger=0)
            self._inbox = None
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._ipc_path is not None:  # libzmq leaves the socket file behind
            with contextlib.suppress(OSError):
                os.unlink(self._ipc_path)
            self._ipc_path = None

    # ---------------------------------------------------- signals (uvicorn)

    async def serve(self) -> int:
        """Start, run until SIGTERM or SIGINT, stop in order; return the exit code.

        The signal handlers only queue the signal; this loop dispatches it to
        ``handle_sigterm``/``handle_sigint``.  A second signal exits at once.
        Once ready, tells the parent process (``lb.notify``).  Raises StartupError.
        """
        await self.start()
        loop = self._running_loop()
        handled = (signal.SIGTERM, signal.SIGINT)
        for signum in handled:
            loop.add_signal_handler(signum, self._signals.put_nowait, signum)
        notifier = loop.create_task(self._notify_when_ready(), name="notify-ready")
        try:
            while not self._should_exit:
                self._dispatch_signal(await self._signals.get())
            stopping = loop.create_task(self.stop(), name="stop")
            while not stopping.done():
                next_signal = loop.create_task(self._signals.get())
                await asyncio.wait({stopping, next_signal}, return_when=asyncio.FIRST_COMPLETED)
                if next_signal.done():
                    self._dispatch_signal(next_signal.result())
                else:
                    next_signal.cancel()
            await stopping
        finally:
            notifier.cancel()
            for signum in handled:
                loop.remove_signal_handler(signum)
        return ExitCode.OK

    def _dispatch_signal(self, signum: int) -> None:
        if signum == signal.SIGTERM:
            self.handle_sigterm()
        elif signum == signal.SIGINT:
            self.handle_sigint()

    def handle_sigterm(self) -> None:
        """SIGTERM: stop in order; during the stop, exit at once."""
        self._handle_exit("SIGTERM")

    def handle_sigint(self) -> None:
        """SIGINT (Ctrl-C): like SIGTERM."""
        self._handle_exit("SIGINT")

    def _handle_exit(self, name: str) -> None:
        if self._should_exit:
            log.warning("%s again: exiting at once", name)
            logging.shutdown()
            os._exit(ExitCode.FORCED)
        log.info("%s: stopping", name)
        self._should_exit = True

    async def _notify_when_ready(self) -> None:
        await self.wait_ready()
        assert self.health is not None
        lease = None if self._registration is None else self._registration.lease_id
        notify_ready(self.id, self.health.address, lease=lease)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "start() first"
        return self._loop
