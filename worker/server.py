"""The worker process: the SIP logic between ZeroMQ and etcd.

A worker binds a ZeroMQ PULL inbox (its endpoint is in its membership record)
and receives frames of envelopes from the load balancers (``cluster/protocol.py``).
Each SIP message goes through the sans-IO core: ``parse_message`` and
``validate``, the ``TransactionLayer``, then the registrar (REGISTER) or the proxy
(everything else).  What the core wants sent becomes OUTBOUND envelopes, gathered
per load balancer and sent as one frame per event-loop pass.

Warm-up before ready: the worker loads the bindings and the credentials from etcd
(and follows them with watches), then registers itself as a member; the load
balancers start sending to it once they see its record.

Drain (SIGTERM, or ``sipcluster drain`` setting its record's state): the worker
rewrites its record as ``draining`` and its ``/readyz`` turns 503 at once.  The
rings of every process drop it, so new calls go elsewhere, while the handoff
(``worker/handoff.py``) keeps the CANCELs, ACKs and retransmissions of its live
transactions coming to it, and responses reach it by the worker id in their
branch.  Once it has held no transaction for ``DRAIN_QUIET`` seconds, or at the
drain timeout (Timer C + 64*T1 by default, so that a call still ringing
completes), it revokes its lease and exits.  SIGINT, or a second SIGTERM, leaves
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import logging
import math
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from cluster.config import Settings
from cluster.http import HealthServer
from cluster.keys import KeyLayout
from cluster.membership import (
    DRAINING,
    MemberView,
    MemberWatch,
    Registration,
    WorkerRecord,
    connect_etcd,
)
from cluster.notify import notify, notify_ready
from cluster.protocol import (
    FramePacer,
    Inbound,
    Kind,
    Outbound,
    inbound_from,
    pack_frame,
    unpack_frame,
)
from cluster.ring import check_worker_id
from sipcore import (
    DigestAlgorithm,
    DigestServer,
    Event,
    MessageError,
    NonceKeyring,
    Request,
    RequestReceived,
    Response,
    TransactionConfig,
    TransactionLayer,
    TransactionTerminated,
    error_response,
    make_response,
    parse_message,
)

from ._metrics import WorkerMetrics
from .auth import Authenticator
from .handoff import Decision, Handoff
from .overload import OverloadConfig, OverloadControl, refusable, refusal
from .transport import Peer, SocketDirectory, response_peer

__all__ = ["Worker", "main"]

log = logging.getLogger(__name__)

EXIT_STARTUP = 3
_HOLD_SECONDS = 5.0
# Young collections every 2,000 allocations stay short (a millisecond or so).
GC_THRESHOLDS = (2_000, 20, 100)
# Every GC_FREEZE_SECONDS the objects that survived so far are frozen (moved out of
# the collector's generations: reference counting still frees them).  A UDP
# REGISTER's server transaction lives 32 s (Timer J, RFC 3261 17.2.2), so at
# 2,500 REGISTER/s a worker holds some 180,000 tracked objects, and each full
# collection walked them all: 100 ms pauses, measured, in the middle of the load.
# Frozen objects that later become cyclic garbage wait for the sweep: every
# GC_SWEEP_SECONDS everything is unfrozen and collected once.
GC_FREEZE_SECONDS = 0.5
GC_SWEEP_SECONDS = 600.0
_HOLD_LIMIT = 10_000
# How long a request for a user with no binding in the cache waits for the cache
# to catch up with etcd (LocationStore.sync) before the proxy answers it anyway.
_SYNC_TIMEOUT = 0.5
# Retry-After of an overload 503 toward a user agent: 2 s plus up to 8 s of jitter.
_RETRY_AFTER = (2, 9)
# A drained worker stays this long without a transaction before it leaves: every
# load balancer has seen its draining record by then (a watch event, milliseconds),
# so nothing more is on its way to it.
DRAIN_QUIET = 1.0
DRAIN_CHECK = 0.1
# The load in a worker's membership record: measured every LOAD_SECONDS, rewritten
# when it moved by LOAD_STEP (a share of one core) or more.
LOAD_SECONDS = 10.0
LOAD_STEP = 0.05
# The core's timers are run on ticks of TIMER_TICK seconds: a deadline is rounded
# up to the next tick, so the timers of many transactions fire in one wake-up
# instead of one each.  RFC 3261's timers are multiples of T1 (500 ms, 17.1.1.1)
# or T4 (5 s, 17.1.2.2) and are not precise to the millisecond: a timer that
# fires up to 10 ms late changes nothing on the wire.  Measured: calls at
# 1,000/s cost 1,020-1,028 us of server CPU each with a wake-up per deadline,
# 962 us with ticks (docs/performance.md, "Before and after").
TIMER_TICK = 0.01


def _worker_id(settings: Settings) -> str:
    if settings.id:
        return check_worker_id(settings.id)
    return "w" + secrets.token_hex(5)


class Worker:
    """One worker process (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.id = _worker_id(settings)
        self.keys = KeyLayout(settings.etcd_prefix)
        self.sockets = SocketDirectory()
        self.layer = TransactionLayer(
            TransactionConfig(t1=settings.t1, t2=max(4.0, settings.t1), timer_c=settings.timer_c)
        )
        self.handoff = Handoff(self.id)
        self._overload_on = settings.overload_target > 0
        self.overload = OverloadControl(
            OverloadConfig(target=settings.overload_target)
            if self._overload_on
            else OverloadConfig()
        )
        self.view = MemberView()
        self.draining = False
        self.ready = False
        self._drained = asyncio.Event()
        self._load = 0.0
        self._load_task: asyncio.Task[None] | None = None
        self._idle_since: float | None = None
        self._outgoing: dict[str, list[list[Any]]] = {}
        self._to_workers: dict[str, list[list[Any]]] = {}
        self._flush_scheduled = False
        self._pacer = FramePacer(settings.batch_delay)
        self._after_work_scheduled = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._gc_timer: asyncio.TimerHandle | None = None
        self._gc_swept = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._waiting: list[Inbound] = []
        self._transaction_calls: dict[int, bytes] = {}
        self._push: dict[str, tuple[str, zmq.Socket[bytes]]] = {}
        self._stopped = asyncio.Event()
        self._held: dict[str, list[list[Any]]] = {}
        # Requests for users the location cache has no binding for, waiting for it
        # to catch up with etcd (ProxyCore.unbound_user), and the task doing so.
        self._unbound: list[RequestReceived] = []
        self._sync_task: asyncio.Task[None] | None = None
        self._held_since: dict[str, float] = {}
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        # Transaction and handoff timers run on the monotonic clock; bindings'
        # expiry and nonces on the wall clock (shared with other machines).
        self.clock: Callable[[], float] = time.monotonic
        self.wall_clock: Callable[[], float] = time.time
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._inbox: zmq.Socket[bytes] | None = None
        self.endpoint = ""

    def _loop(self) -> asyncio.AbstractEventLoop:
        # asyncio.get_running_loop() makes a getpid() system call on Python 3.11
        # (a fork check): the hot path asks once.
        loop = self._event_loop
        if loop is None:
            loop = self._event_loop = asyncio.get_running_loop()
        return loop

    # ---------------------------------------------------------------- start-up

    async def start(self) -> None:
        """Connect to etcd, warm the caches, bind the inbox and join the cluster.

        Raises ConnectionError (etcd unreachable) or OSError (endpoint in use).
        """
        settings = self.settings
        if not settings.etcd:
            raise ConnectionError("--etcd URL is required")
        self.client = await connect_etcd(settings.etcd)
        from registry import LocationStore, UserStore, load_or_create_nonce_secret  # noqa: PLC0415

        if settings.nonce_secret_file is not None:
            secret = Path(settings.nonce_secret_file).read_bytes().strip()
        else:
            secret = await load_or_create_nonce_secret(self.client, self.keys)
        self.digest = DigestServer(
            NonceKeyring({"k1": secret}, "k1"),
            algorithms=tuple(DigestAlgorithm(name) for name in settings.digest_algorithms),
        )
        self.users = UserStore(self.client, self.keys)
        self.locations = LocationStore(
            self.client, self.keys, clock=self.wall_clock, batch_window=settings.commit_window
        )
        self.metrics = WorkerMetrics(
            transactions=lambda: self.layer.transaction_count,
            bindings=lambda: self.locations.binding_count,
        )
        await self.users.start()
        await self.locations.start()
        authenticator = (
            Authenticator(self.digest, self.users, clock=self.wall_clock)
            if settings.auth == "digest"
            else None
        )
        self.watch = MemberWatch(self.client, self.keys, self._members_changed)
        self.watch.start()
        await asyncio.wait_for(self.watch.ready.wait(), 10.0)
        self._build_cores(authenticator, secret)
        self._bind_inbox()
        # The caches are loaded: keep their objects out of the collector's way
        # (every collection would otherwise walk them all).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self._gc_swept = self.clock()
        self._gc_timer = self._loop().call_later(GC_FREEZE_SECONDS, self._gc_tick)
        # The HTTP endpoint first: its address goes into the membership record.
        self.http = HealthServer(
            settings.http.host, settings.http.port, ready=lambda: self.ready and not self.draining
        )
        await self.http.start()
        self.registration = Registration(
            settings.etcd, self.keys.worker(self.id), settings.lease_ttl
        )
        await self.registration.start(self.client, self._record().to_json())
        self.ready = True
        self._load_task = self._loop().create_task(self._publish_load(), name="load")
        notify_ready(self.id, self.http.address, lease=self.registration.lease_id)
        log.info("worker %s ready: inbox %s, http %s", self.id, self.endpoint, self.http.address)

    def _build_cores(self, authenticator: Authenticator | None, secret: bytes) -> None:
        from worker.proxy import ProxyConfig, ProxyCore  # noqa: PLC0415
        from worker.registrar import Registrar, RegistrarConfig  # noqa: PLC0415

        settings = self.settings
        domains = frozenset(settings.domain) or self._lb_hosts()
        if not domains:
            log.warning("no --domain and no load balancer known: every domain is foreign")
        self.registrar = Registrar(
            RegistrarConfig(
                domains=domains,
                min_expires=settings.min_expires,
                max_expires=settings.max_expires,
                default_expires=settings.default_expires,
                max_contacts=settings.max_contacts,
            ),
            self.locations,
            authenticator,
            is_own_address=self.sockets.is_own_address,
        )
        proxy_config = ProxyConfig.from_settings(settings)
        if not settings.domain:
            proxy_config = dataclasses.replace(proxy_config, domains=domains)
        self.proxy = ProxyCore(
            self.layer,
            worker_id=self.id,
            sockets=self.sockets,
            locator=self.locations,
            known_user=self.users.known,
            authenticator=authenticator,
            config=proxy_config,
            # Every worker signs flow tokens with the same key, so that a dialog's
            # requests verify on whichever worker they reach.
            flow_key=hashlib.blake2b(secret, person=b"sipcluster-flow").digest(),
        )

    def _lb_hosts(self) -> frozenset[str]:
        """The default domains: every load balancer's listen and advertised hosts."""
        hosts = set()
        for record in self.view.lbs.values():
            for lb_socket in record.sockets:
                hosts.add(lb_socket.host.lower())
                hosts.add(lb_socket.advertise_host.lower())
        return frozenset(hosts)

    def _bind_inbox(self) -> None:
        settings = self.settings
        inbox = self._context.socket(zmq.PULL)
        inbox.setsockopt(zmq.RCVHWM, 100_000)
        inbox.setsockopt(zmq.LINGER, 0)
        endpoint = settings.zmq_bind
        if endpoint is None:
            run_dir = Path(settings.data_dir) / "run"
            run_dir.mkdir(parents=True, exist_ok=True)
            endpoint = f"ipc://{run_dir.resolve()}/worker-{self.id}.sock"
        inbox.bind(endpoint)
        bound = inbox.getsockopt_string(zmq.LAST_ENDPOINT)
        self.endpoint = settings.zmq_advertise or bound
        self._inbox = inbox
        descriptor = inbox.getsockopt(zmq.FD)
        assert isinstance(descriptor, int)
        self._inbox_fd = descriptor
        asyncio.get_running_loop().add_reader(descriptor, self._read_inbox)

    def _record(self) -> WorkerRecord:
        return WorkerRecord(
            id=self.id,
            endpoint=self.endpoint,
            state=DRAINING if self.draining else "active",
            pid=os.getpid(),
            host=socket.gethostname(),
            http=self.http.address if hasattr(self, "http") else "",
            load=round(self._load, 2),
        )

    # -------------------------------------------------------------- membership

    def _members_changed(self, view: MemberView) -> None:
        self.view = view
        own = view.workers.get(self.id)
        if own is not None and own.state == DRAINING and not self.draining and self.ready:
            # ``sipcluster drain`` wrote our record: the same as a SIGTERM.
            log.info("worker %s: drain requested through etcd", self.id)
            self._signals.put_nowait(signal.SIGTERM)
        self.sockets.update(view.lbs)
        alive = set(view.workers)
        for worker in list(self.handoff.alive - alive):
            if self.handoff.member_left(worker):
                self._release_waiting()
        if view.ring.fingerprint != self.handoff.ring.fingerprint:
            claims = self.handoff.ring_changed(view.ring, alive, self.clock())
            for worker, call_ids in claims.items():
                self._send_to_worker(
                    worker,
                    [Kind.CLAIMS, view.ring.fingerprint, self.id, True, list(call_ids)],
                )
            self._arm_timer()
        self._update_push_sockets()

    def _update_push_sockets(self) -> None:
        wanted = {lb.id: lb.endpoint for lb in self.view.lbs.values()}
        wanted.update({w.id: w.endpoint for w in self.view.workers.values() if w.id != self.id})
        for member, (endpoint, sock) in list(self._push.items()):
            if wanted.get(member) != endpoint:
                sock.close(linger=0)
                del self._push[member]
        for member, endpoint in wanted.items():
            if member not in self._push:
                sock = self._context.socket(zmq.PUSH)
                sock.setsockopt(zmq.SNDHWM, 100_000)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(endpoint)
                self._push[member] = (endpoint, sock)
        if self._held:
            self._release_held()

    # ------------------------------------------------------------------- inbox

    def _read_inbox(self) -> None:
        inbox = self._inbox
        assert inbox is not None
        while int(inbox.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                frame = inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                envelopes = unpack_frame(frame)
            except ValueError as error:
                log.warning("dropping a malformed frame: %s", error)
                continue
            for envelope in envelopes:
                self._handle_envelope(envelope)
        self._after_work()

    def _handle_envelope(self, envelope: list[Any]) -> None:
        kind = envelope[0]
        try:
            if kind == Kind.INBOUND:
                self._handle_inbound(inbound_from(envelope[1:]))
            elif kind == Kind.STAMP:
                if self._overload_on:
                    self.overload.delay_observed(self.wall_clock() - envelope[1], self.clock())
            elif kind == Kind.CLAIMS:
                _, ring, worker, _complete, call_ids = envelope
                if self.handoff.claims_received(ring, worker, call_ids):
                    self._release_waiting()
            elif kind == Kind.RELEASES:
                _, worker, call_ids = envelope
                self.handoff.releases_received(worker, call_ids)
            elif kind == Kind.SEND_FAILED:
                self._send_failed(envelope[2])
        except (ValueError, TypeError, IndexError) as error:
            log.warning("dropping a malformed envelope: %s", error)
        except Exception:
            # A bug met by one message must not stop the others.
            log.exception("failed to handle an envelope of kind %s", kind)

    def _send_failed(self, data: bytes) -> None:
        """A load balancer could not send this request of ours: its client
        transaction reports the transport error (RFC 3261 17.1.4), which the proxy
        takes as a 503 from that branch (16.9)."""
        try:
            request = parse_message(data)
        except MessageError:
            return
        if not isinstance(request, Request):
            return
        transaction_id = self.layer.client_transaction_of(request)
        if transaction_id is not None:
            self.layer.transport_failed(transaction_id, self.clock())

    def _handle_inbound(self, inbound: Inbound) -> None:
        data = inbound.data
        peer = Peer(
            inbound.lb_id,
            inbound.socket_id,
            inbound.transport,
            inbound.source_host,
            inbound.source_port,
            inbound.connection_id,
        )
        try:
            message = parse_message(data, datagram=inbound.transport == "udp")
            message.validate()
        except MessageError as error:
            self.metrics.malformed += 1
            answer = error_response(error)
            if answer is not None:
                destination = peer
                request = error.message
                if isinstance(request, Request):
                    with contextlib.suppress(MessageError):
                        destination = response_peer(peer, request.via)
                self.layer.send_stateless(answer, destination)
            return
        now = self.clock()
        if isinstance(message, Response):
            self.metrics.received["response", message.cseq.method, message.status // 100] += 1
            self.layer.receive_response(message, peer, now)
            return
        self.metrics.received["request", message.method, 0] += 1
        if message.method == "REGISTER":
            answer = self.registrar.answer_statelessly(message, peer, self.wall_clock())
            if answer is not None:
                # RFC 3261 8.2.7: challenged without a transaction.
                self.layer.send_stateless(answer, response_peer(peer, message.via))
                return
        call_id = message.call_id.encode("utf-8", "surrogateescape")
        route = self.handoff.route(call_id, inbound.ring, inbound.hops)
        if route.decision is Decision.FORWARD and route.worker is not None:
            self.metrics.forwarded += 1
            forwarded = inbound._replace(hops=(*inbound.hops, self.id))
            self._send_to_worker(route.worker, forwarded.pack())
            return
        if route.decision is Decision.WAIT:
            self._waiting.append(inbound)
            self._arm_timer()
            return
        self.layer.receive_request(message, peer, reliable=peer.reliable, now=now)

    def _release_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for inbound in waiting:
            self._handle_inbound(inbound)

    # ------------------------------------------------------------ the SIP core

    def _after_work(self) -> None:
        """Run the core's events, queue what it sends, re-arm the timer."""
        layer = self.layer
        now = self.clock()
        while (event := layer.next_event()) is not None:
            self._dispatch(event, now)
        sent = self.metrics.sent
        label = self.metrics.message_label
        for outgoing in layer.messages_to_send():
            peer: Peer = outgoing.destination  # type: ignore[assignment]
            sent[peer.transport, label(outgoing.data)] += 1
            envelope = Outbound(
                peer.socket_id,
                peer.transport,
                peer.host,
                peer.port,
                peer.connection_id,
                outgoing.data,
            ).pack()
            self._outgoing.setdefault(peer.lb_id, []).append(envelope)
        self._schedule_flush()
        self._arm_timer()

    def _dispatch(self, event: Event, now: float) -> None:
        if isinstance(event, RequestReceived):
            call_id = event.request.call_id.encode("utf-8", "surrogateescape")
            self._transaction_calls[event.transaction_id] = call_id
            self.handoff.transaction_started(call_id)
            if self.overload.refused_fraction and self._refuse(event):
                return
            if event.request.method == "REGISTER" and self.registrar.serves(event.request):
                self._register(event)
                return
            if self.proxy.unbound_user(event.request) is not None:
                self._route_once_synced(event)
                return
        elif isinstance(event, TransactionTerminated):
            call_id_ended = self._transaction_calls.pop(event.transaction_id, None)
            if call_id_ended is not None:
                released = self.handoff.transaction_ended(call_id_ended)
                if released is not None:
                    worker, call_id = released
                    self._send_to_worker(worker, [Kind.RELEASES, self.id, [call_id]])
        self.proxy.handle_event(event, now)

    def _route_once_synced(self, event: RequestReceived) -> None:
        """Hand a request for a user without binding to the proxy once the location
        cache has caught up with etcd: the user may have just registered through
        another worker (read-your-writes; ``ProxyCore.unbound_user``).  One sync
        serves every request that arrived before it started."""
        self._unbound.append(event)
        if self._sync_task is None:
            self._sync_task = self._loop().create_task(self._sync_then_route())

    async def _sync_then_route(self) -> None:
        try:
            while self._unbound:
                waiting, self._unbound = self._unbound, []
                await self.locations.sync(_SYNC_TIMEOUT)
                now = self.clock()
                for event in waiting:
                    try:
                        self.proxy.handle_event(event, now)
                    except Exception:
                        log.exception("failed to route a request")
                self._after_work()
        finally:
            self._sync_task = None

    def _refuse(self, event: RequestReceived) -> bool:
        """Overload control (worker/overload.py): refuse a share of the requests
        that start new work; returns whether this one was refused.  The 503 goes
        through the server transaction, which absorbs the request's
        retransmissions instead of processing them again."""
        request = event.request
        if not refusable(request) or not self.overload.refuse():
            return False
        self.metrics.overload_rejected[request.method] += 1
        retry_after = _RETRY_AFTER[0] + secrets.randbelow(_RETRY_AFTER[1])
        self.layer.send_response(
            event.transaction_id,
            refusal(request, retry_after),
            self.clock(),
            destination=response_peer(event.source, request.via),  # type: ignore[arg-type]
        )
        return True

    def _register(self, event: RequestReceived) -> None:
        """Hand a REGISTER to the registrar; its answer comes back through a
        callback once the commit is decided, so that the commits of one loop pass
        share an etcd transaction (group commit) without a task per REGISTER."""
        request = event.request
        peer: Peer = event.source  # type: ignore[assignment]

        def answer(response: Response) -> None:
            with contextlib.suppress(Exception):
                self.layer.send_response(
                    event.transaction_id,
                    response,
                    self.clock(),
                    destination=response_peer(peer, request.via),
                )
            self._after_work_soon()

        try:
            self.registrar.handle_nowait(request, peer, self.wall_clock(), answer)
        except Exception:
            log.exception("REGISTER failed")
            answer(make_response(request, 500, headers=[("Retry-After", 5)]))

    def _after_work_soon(self) -> None:
        """One ``_after_work`` for every answer given in this loop pass."""
        if not self._after_work_scheduled:
            self._after_work_scheduled = True
            self._loop().call_soon(self._after_work_pass)

    def _after_work_pass(self) -> None:
        self._after_work_scheduled = False
        self._after_work()

    # ---------------------------------------------------------------- output

    def _send_to_worker(self, worker: str, envelope: list[Any]) -> None:
        self._to_workers.setdefault(worker, []).append(envelope)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and (self._outgoing or self._to_workers):
            self._flush_scheduled = True
            self._pacer.schedule(self._loop(), self._flush, time.perf_counter())

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._pacer.flushed(time.perf_counter())
        for queues in (self._outgoing, self._to_workers):
            for member, envelopes in queues.items():
                entry = self._push.get(member)
                if entry is None:
                    self._hold(member, envelopes)
                    continue
                with contextlib.suppress(zmq.Again):
                    entry[1].send(pack_frame(envelopes), zmq.NOBLOCK)
            queues.clear()

    def _hold(self, member: str, envelopes: list[list[Any]]) -> None:
        """Keep envelopes for a member this worker has not seen in etcd yet.

        A load balancer can forward a request before this worker's membership
        watch has shown it that load balancer's record: the answer waits for the
        record (a few milliseconds) instead of being lost.  Bounded in count and
        time; members that never appear drop their envelopes.
        """
        held = self._held.setdefault(member, [])
        room = _HOLD_LIMIT - len(held)
        if room <= 0:
            return
        held.extend(envelopes[:room])
        self._held_since.setdefault(member, self.clock())
        self._loop().call_later(_HOLD_SECONDS, self._expire_held, member)

    def _expire_held(self, member: str) -> None:
        since = self._held_since.get(member)
        if since is not None and self.clock() - since >= _HOLD_SECONDS:
            dropped = self._held.pop(member, [])
            del self._held_since[member]
            log.warning("no member %s appeared: dropped %d envelopes", member, len(dropped))

    def _release_held(self) -> None:
        for member in [member for member in self._held if member in self._push]:
            envelopes = self._held.pop(member)
            self._held_since.pop(member, None)
            queue = self._outgoing if member in self.view.lbs else self._to_workers
            queue.setdefault(member, []).extend(envelopes)
        self._schedule_flush()

    def _arm_timer(self) -> None:
        deadlines = [
            deadline
            for deadline in (
                self.layer.get_timer(),
                self.handoff.get_timer(),
                self.proxy.get_timer() if hasattr(self, "proxy") else None,
            )
            if deadline is not None
        ]
        deadline = min(deadlines, default=None)
        if deadline is not None:
            deadline = math.ceil(deadline / TIMER_TICK) * TIMER_TICK
        if deadline == self._timer_deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = deadline
        if deadline is None:
            return
        loop = self._loop()
        delay = max(deadline - self.clock(), 0.0)
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline = None
        now = self.clock()
        self.layer.handle_timer(now)
        self.proxy.handle_timer(now)
        if self.handoff.handle_timer(now):
            self._release_waiting()
        self._after_work()

    def _gc_tick(self) -> None:
        now = self.clock()
        if now - self._gc_swept >= GC_SWEEP_SECONDS:
            self._gc_swept = now
            gc.unfreeze()
            gc.collect()
        gc.freeze()
        self._gc_timer = self._loop().call_later(GC_FREEZE_SECONDS, self._gc_tick)

    # ---------------------------------------------------------------- running

    async def run(self) -> int:
        """Serve until a signal stops the worker; returns the exit code.

        SIGTERM drains first (see the module docstring); SIGINT leaves at once.
        """
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._signals.put_nowait, signum)
        try:
            await self.start()
        except (ConnectionError, OSError, TimeoutError, zmq.ZMQError) as error:
            log.error("worker could not start: %s", error)
            return EXIT_STARTUP
        if await self._signals.get() == signal.SIGTERM:
            await self.drain()
        await self.leave()
        return 0

    async def drain(self) -> None:
        """Stop taking new calls, finish the transactions held here.

        Returns once none has been left for ``DRAIN_QUIET`` seconds, at the drain
        timeout, or when another signal asks to leave at once.
        """
        self.draining = True
        self.metrics.draining = True
        notify("draining", id=self.id)
        timeout = self.settings.drain_seconds
        log.info(
            "worker %s draining: %d transactions; leaving when none is owed (at most %.0f s)",
            self.id,
            self.layer.transaction_count,
            timeout,
        )
        try:
            await self.registration.update(self._record().to_json())
        except Exception as error:
            # etcd unreachable: the load balancers keep routing by their last ring;
            # the drain still waits for this worker's transactions.
            log.warning("worker %s could not publish its draining state: %s", self.id, error)
        started = self.clock()
        self._check_drained()
        drained = asyncio.ensure_future(self._drained.wait())
        interrupted = asyncio.ensure_future(self._signals.get())
        await asyncio.wait(
            {drained, interrupted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in (drained, interrupted):
            waiter.cancel()
        left = self.layer.owed_count()
        elapsed = self.clock() - started
        if self._drained.is_set():
            log.info("worker %s drained in %.1f s", self.id, elapsed)
        elif interrupted.done() and not interrupted.cancelled():
            log.warning("worker %s: drain interrupted with %d transactions left", self.id, left)
        else:
            log.warning(
                "worker %s: drain timeout (%.0f s) with %d transactions left",
                self.id,
                elapsed,
                left,
            )

    def _check_drained(self) -> None:
        """Every DRAIN_CHECK seconds while draining: set ``_drained`` once no
        transaction has owed anything for DRAIN_QUIET seconds.

        A client transaction that only waits for retransmitted responses (Timer D
        is 32 s) is not waited for: another worker forwards such a response
        statelessly (RFC 3261 16.7).  Counting is a pass over the transactions,
        hence the period instead of a check per event-loop pass.
        """
        if self._drained.is_set():
            return
        now = self.clock()
        if self._waiting or self.layer.owed_count():
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= DRAIN_QUIET * 0.99:
            self._drained.set()
            return
        self._loop().call_later(DRAIN_CHECK, self._check_drained)

    async def _publish_load(self) -> None:
        """Every LOAD_SECONDS, the share of a core this process used; rewritten
        into the membership record when it moved by LOAD_STEP or more (for
        ``sipcluster status`` and the operators' dashboards)."""
        published = self._load
        cpu, wall = time.process_time(), self.clock()
        while True:
            await asyncio.sleep(LOAD_SECONDS)
            cpu_now, wall_now = time.process_time(), self.clock()
            self._load = (cpu_now - cpu) / max(wall_now - wall, 1e-9)
            cpu, wall = cpu_now, wall_now
            if abs(self._load - published) >= LOAD_STEP:
                try:
                    await self.registration.update(self._record().to_json())
                    published = self._load
                except Exception as error:
                    log.debug("load not published: %s", error)

    async def leave(self) -> None:
        """Leave the cluster (revoke the lease: the record disappears) and stop."""
        self.ready = False
        if self._load_task is not None:
            self._load_task.cancel()
        if self._gc_timer is not None:
            self._gc_timer.cancel()
        with contextlib.suppress(Exception):
            await self.registration.stop()
        with contextlib.suppress(Exception):
            await self.watch.stop()
        self._flush()
        if self._inbox is not None:
            asyncio.get_running_loop().remove_reader(self._inbox_fd)
            self._inbox.close(linger=0)
        for _, sock in self._push.values():
            sock.close(linger=0)
        with contextlib.suppress(Exception):
            await self.http.stop()
        if self._sync_task is not None:
            self._sync_task.cancel()
        with contextlib.suppress(Exception):
            await self.locations.stop()
        with contextlib.suppress(Exception):
            await self.users.stop()
        with contextlib.suppress(Exception):
            await self.client.close()


def main(settings: Settings) -> int:
    """Run one worker until SIGTERM; returns the exit code."""
    import uvloop  # noqa: PLC0415

    return uvloop.run(Worker(settings).run())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
