"""The load balancer against real sockets, real ZeroMQ and a real etcd.

Each test runs a ``LoadBalancer`` on uvloop inside the test process (one test
runs ``python -m lb`` as a subprocess) with fake workers: a fake worker binds a
ZeroMQ PULL inbox, puts its ``WorkerRecord`` in etcd under a lease of its own,
collects the frames the load balancer sends and answers with OUTBOUND envelopes
pushed to the inbox named in the load balancer's record in etcd.

Nothing sleeps: every wait is on a queue or a future, with a timeout.  Where the
load balancer learns something asynchronously (a worker joined etcd, a ZeroMQ
pipe connected), the test retransmits its request the way a SIP client does over
UDP (RFC 3261 17.1.2.2, timer E) until it arrives where it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import aetcd
import pytest
import uvloop
import zmq

from cluster.config import HostPort, Listen, Settings
from cluster.etcd import LocalEtcd
from cluster.keys import KeyLayout
from cluster.membership import LBRecord, WorkerRecord, connect_etcd
from cluster.protocol import (
    FramePacer,
    Inbound,
    Kind,
    Outbound,
    inbound_from,
    pack_frame,
    unpack_frame,
)
from cluster.ring import Ring, make_branch_prefix
from lb import LoadBalancer

T = TypeVar("T")
TIMEOUT = 5.0


def run(scenario: Callable[[], Coroutine[Any, Any, T]], timeout: float = 15.0) -> T:
    """Run an async scenario on uvloop, as the load balancer runs in production."""

    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), timeout)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# --------------------------------------------------------------- messages


def request(
    call_id: str = "a84b4c76e66710@pc33.example.com",
    *,
    method: str = "OPTIONS",
    call_id_header: str = "Call-ID: {}",
    transport: str = "UDP",
    branch: str = "z9hG4bK776asdhds",
) -> bytes:
    """A small request; ``call_id_header`` spells the Call-ID line."""
    return (
        f"{method} sip:bob@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 192.0.2.101:5060;branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        "To: <sip:bob@example.com>\r\n"
        "From: <sip:alice@example.com>;tag=1928301774\r\n"
        f"{call_id_header.format(call_id)}\r\n"
        f"CSeq: 1 {method}\r\n"
        "Content-Length: 0\r\n"
        "\r\n"
    ).encode()


def response(call_id: str, branch: str, status: str = "200 OK") -> bytes:
    """A response whose top Via carries ``branch``."""
    return (
        f"SIP/2.0 {status}\r\n"
        f"Via: SIP/2.0/UDP 192.0.2.200:5060;branch={branch}\r\n"
        "Via: SIP/2.0/UDP 192.0.2.101:5060;branch=z9hG4bKclient;received=192.0.2.101\r\n"
        "To: <sip:bob@example.com>;tag=99\r\n"
        "From: <sip:alice@example.com>;tag=1928301774\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n"
        "\r\n"
    ).encode()


def call_id_of(data: bytes) -> str:
    """The Call-ID of a message made by ``request``."""
    return data.split(b"Call-ID: ")[1].split(b"\r")[0].decode()


def call_id_owned_by(ring: Ring, worker: str, tag: str = "") -> str:
    """A fresh Call-ID that ``ring`` gives to ``worker``."""
    for _ in range(10_000):
        call_id = f"{tag}{uuid.uuid4().hex}@test"
        if ring.owner_of(call_id.encode()) == worker:
            return call_id
    raise AssertionError(f"no Call-ID for {worker} in {ring}")


# ----------------------------------------------------------------- workers


class FakeWorker:
    """A worker as the load balancer sees it: an inbox and a record in etcd."""

    def __init__(self, worker_id: str, client: aetcd.Client, keys: KeyLayout) -> None:
        self.id = worker_id
        self.client = client
        self.keys = keys
        self.context = zmq.Context()
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.endpoint = ""
        self.frames: asyncio.Queue[list[list[Any]]] = asyncio.Queue()
        self.unstamped = 0
        self.inbound: asyncio.Queue[Inbound] = asyncio.Queue()
        self.closed: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.lease_id: int | None = None
        self.fd: int | None = None
        self._push: zmq.Socket[bytes] | None = None

    async def start(self, bind: str = "tcp://127.0.0.1:0", state: str = "active") -> None:
        """Bind the inbox and publish the record."""
        self.inbox.bind(bind)
        self.endpoint = cast(bytes, self.inbox.getsockopt(zmq.LAST_ENDPOINT)).decode()
        self.fd = cast(int, self.inbox.getsockopt(zmq.FD))
        loop = asyncio.get_running_loop()
        loop.add_reader(self.fd, self._read)
        loop.call_soon(self._read)
        lease = await self.client.lease(30)
        self.lease_id = lease.id
        await self.publish(state)

    async def publish(self, state: str) -> None:
        """(Re)write the record with ``state``."""
        record = WorkerRecord(id=self.id, endpoint=self.endpoint, state=state, pid=os.getpid())
        await self.client.put(self.keys.worker(self.id), record.to_json(), lease=self.lease_id)

    async def leave(self) -> None:
        """Revoke the lease: the record disappears."""
        if self.lease_id is not None:
            await self.client.revoke_lease(self.lease_id)
            self.lease_id = None

    def _read(self) -> None:
        # The descriptor is edge-triggered: drain until there is nothing left.
        while cast(int, self.inbox.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            envelopes = unpack_frame(self.inbox.recv(zmq.NOBLOCK))
            # Every frame opens with the load balancer's STAMP (worker/overload.py).
            if envelopes[0][0] != Kind.STAMP or envelopes[0][1] > time.time():
                self.unstamped += 1
            envelopes = envelopes[1:]
            self.frames.put_nowait(envelopes)
            for envelope in envelopes:
                if envelope[0] == Kind.INBOUND:
                    self.inbound.put_nowait(inbound_from(envelope[1:]))
                elif envelope[0] == Kind.CONNECTION_CLOSED:
                    self.closed.put_nowait(envelope)

    async def next_inbound(self, timeout: float = TIMEOUT) -> Inbound:
        """The next message the load balancer forwarded."""
        return await asyncio.wait_for(self.inbound.get(), timeout)

    def drain(self) -> list[Inbound]:
        """Everything received and not yet read."""
        items = []
        while not self.inbound.empty():
            items.append(self.inbound.get_nowait())
        return items

    async def send(self, lb_id: str, *envelopes: list[Any]) -> None:
        """Push one frame to the load balancer's inbox, found in its etcd record."""
        if self._push is None:
            stored = await self.client.get(self.keys.lb(lb_id))
            assert stored is not None
            self._push = self.context.socket(zmq.PUSH)
            self._push.setsockopt(zmq.LINGER, 0)
            self._push.connect(LBRecord.from_json(stored.value).endpoint)
        self._push.send(pack_frame(list(envelopes)))

    async def close(self) -> None:
        """Leave and close the sockets."""
        with contextlib.suppress(Exception):
            await self.leave()
        if self.fd is not None:
            asyncio.get_running_loop().remove_reader(self.fd)
        self.context.destroy(linger=0)


# ------------------------------------------------------------------ clients


class UdpClient(asyncio.DatagramProtocol):
    """A UDP user agent: sends datagrams, queues what comes back with its source."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[Any, ...]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, host: str = "127.0.0.1") -> UdpClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_datagram_endpoint(cls, local_addr=(host, 0))
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop: no subclass

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.put_nowait((data, addr))

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        name = self.transport.get_extra_info("sockname")
        return name[0], name[1]

    def send(self, data: bytes, destination: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, destination)

    async def receive(self, timeout: float = TIMEOUT) -> tuple[bytes, tuple[Any, ...]]:
        return await asyncio.wait_for(self.received.get(), timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def until_arrives(
    send: Callable[[], None],
    worker: FakeWorker,
    matches: Callable[[Inbound], bool],
    *,
    others: tuple[FakeWorker, ...] = (),
    interval: float = 0.05,
    timeout: float = TIMEOUT,
) -> Inbound:
    """Send, and send again every ``interval`` (as UDP clients retransmit) until
    ``worker`` receives a matching message; what ``others`` receive meanwhile is
    discarded (it was routed by a ring the load balancer no longer has)."""

    async def wait() -> Inbound:
        while True:
            send()
            with contextlib.suppress(TimeoutError):
                while True:
                    inbound = await worker.next_inbound(interval)
                    if matches(inbound):
                        return inbound

    try:
        return await asyncio.wait_for(wait(), timeout)
    finally:
        for other in others:
            other.drain()


async def warm_up(
    lb: LoadBalancer, client: UdpClient, workers: tuple[FakeWorker, ...], port: int
) -> None:
    """Wait until the load balancer's pipe to each worker carries messages (ZeroMQ
    connects asynchronously and IMMEDIATE drops what comes earlier)."""
    for worker in workers:
        call_id = call_id_owned_by(lb.ring, worker.id, "warm-")
        data = request(call_id)
        await until_arrives(
            lambda data=data: client.send(data, ("127.0.0.1", port)),  # type: ignore[misc]
            worker,
            lambda inbound, data=data: inbound.data == data,  # type: ignore[misc]
        )
    for worker in workers:
        worker.drain()


# ------------------------------------------------------------------ set-up


def lb_settings(
    etcd_server: LocalEtcd,
    key_layout: KeyLayout,
    data_dir: Path,
    *listen: str,
    advertise: tuple[HostPort, ...] = (),
    zmq_bind: str | None = "tcp://127.0.0.1:0",
) -> Settings:
    listens = []
    for text in listen or ("udp:127.0.0.1:0",):
        transport, _, rest = text.partition(":")
        host, _, port = rest.rpartition(":")
        listens.append(Listen(transport, host.strip("[]"), int(port)))
    return Settings(
        etcd=etcd_server.url,
        etcd_prefix=key_layout.prefix.decode(),
        listen=tuple(listens),
        advertise=advertise,
        http=HostPort("127.0.0.1", 0),
        data_dir=data_dir,
        zmq_bind=zmq_bind,
        lease_ttl=5,
    )


class Cluster:
    """An etcd client, fake workers and a load balancer, for one test."""

    def __init__(self, client: aetcd.Client, keys: KeyLayout) -> None:
        self.client = client
        self.keys = keys
        self.workers: list[FakeWorker] = []
        self.lb: LoadBalancer | None = None

    async def add_worker(self, worker_id: str, **start: Any) -> FakeWorker:
        worker = FakeWorker(worker_id, self.client, self.keys)
        await worker.start(**start)
        self.workers.append(worker)
        return worker

    async def udp_tcp_lb(
        self, etcd_server: LocalEtcd, tmp_path: Path, **options: Any
    ) -> tuple[FakeWorker, LoadBalancer, UdpClient]:
        """Worker "wa" and a load balancer on UDP and TCP, its pipe to the worker
        warmed up; returns them and the UDP client used."""
        worker = await self.add_worker("wa")
        settings = lb_settings(
            etcd_server, self.keys, tmp_path, "udp:127.0.0.1:0", "tcp:127.0.0.1:0"
        )
        lb = await self.start_lb(settings, **options)
        udp = await UdpClient.open()
        await warm_up(lb, udp, (worker,), self.port(0))
        return worker, lb, udp

    async def start_lb(self, settings: Settings, **options: Any) -> LoadBalancer:
        self.lb = LoadBalancer(settings, **options)
        await self.lb.start()
        return self.lb

    def port(self, socket_id: int = 0) -> int:
        assert self.lb is not None
        return self.lb.sockets[socket_id].port


@contextlib.asynccontextmanager
async def cluster(etcd_server: LocalEtcd, key_layout: KeyLayout) -> AsyncIterator[Cluster]:
    client = await connect_etcd(etcd_server.url)
    state = Cluster(client, key_layout)
    try:
        yield state
    finally:
        if state.lb is not None:
            await state.lb.stop()
        for worker in state.workers:
            await worker.close()
        await client.close()


async def http_get(address: str, path: str) -> tuple[int, bytes]:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# ------------------------------------------------------------------- tests


def test_request_goes_to_the_ring_owner_of_its_call_id(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            first = await state.add_worker("wa")
            second = await state.add_worker("wb", bind=f"ipc://{tmp_path}/wb.sock")
            lb = await state.start_lb(lb_settings(etcd_server, key_layout, tmp_path))
            expected_ring = Ring(["wa", "wb"])
            assert lb.ring == expected_ring
            client = await UdpClient.open()
            await warm_up(lb, client, (first, second), state.port())
            by_id = {"wa": first, "wb": second}

            # One Call-ID, spelt three ways: the same worker every time.
            call_id = "f81d4fae-7dec-11d0-a765-00a0c91e6bf6@foo.bar.com"
            owner = by_id[str(expected_ring.owner_of(call_id.encode()))]
            spellings = ("Call-ID: {}", "i: {}", "call-id  :   {}  ", "CALL-ID:\t{}")
            for spelling in spellings:
                data = request(call_id, call_id_header=spelling)
                client.send(data, ("127.0.0.1", state.port()))
                inbound = await owner.next_inbound()
                assert inbound.data == data
            inbound_fields = inbound._replace(data=b"")
            assert inbound_fields == Inbound(
                ring=expected_ring.fingerprint,
                lb_id=lb.id,
                socket_id=0,
                transport="udp",
                advertised=f"127.0.0.1:{state.port()}",
                source_host="127.0.0.1",
                source_port=client.address[1],
                connection_id=None,
                data=b"",
                hops=(),
            )

            # Many Call-IDs: each to its owner, and both workers get some.
            call_ids = [f"spread-{index}@example.com" for index in range(40)]
            for each in call_ids:
                client.send(request(each), ("127.0.0.1", state.port()))
            for worker in (first, second):
                owned = {c for c in call_ids if expected_ring.owner_of(c.encode()) == worker.id}
                assert owned, f"{worker.id} owns none of the calls"
                got = [call_id_of((await worker.next_inbound()).data) for _ in owned]
                assert set(got) == owned
            client.close()

    run(scenario)


def test_response_goes_to_its_branch_worker_else_to_the_ring_owner(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            first = await state.add_worker("wa")
            second = await state.add_worker("wb")
            lb = await state.start_lb(lb_settings(etcd_server, key_layout, tmp_path))
            client = await UdpClient.open()
            await warm_up(lb, client, (first, second), state.port())
            destination = ("127.0.0.1", state.port())
            ring = lb.ring

            # Owned by wa, sent by wb's client transaction: back to wb.
            call_id = call_id_owned_by(ring, "wa")
            data = response(call_id, make_branch_prefix("wb") + "1a2b")
            client.send(data, destination)
            assert (await second.next_inbound()).data == data

            # A branch naming no member, or no worker at all: the Call-ID's owner.
            for branch in (make_branch_prefix("wgone") + "1", "z9hG4bKplain", "z9hG4bK-x"):
                data = response(call_id, branch)
                client.send(data, destination)
                assert (await first.next_inbound()).data == data

            # A draining worker leaves the ring but still gets its responses.
            await second.publish("draining")
            moved = call_id_owned_by(ring, "wb", "moved-")
            await until_arrives(
                lambda: client.send(request(moved), destination),
                first,
                lambda inbound: inbound.data == request(moved),
                others=(second,),
            )
            assert lb.ring.workers == ("wa",)
            data = response(moved, make_branch_prefix("wb") + "2")
            client.send(data, destination)
            assert (await second.next_inbound()).data == data
            client.close()

    run(scenario)


def test_udp_replies_leave_from_the_socket_the_client_used(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            worker = await state.add_worker("wa")
            settings = lb_settings(
                etcd_server,
                key_layout,
                tmp_path,
                "udp:127.0.0.1:0",
                "udp:127.0.0.1:0",
                advertise=(HostPort("192.0.2.1", 5060),),
                zmq_bind=None,  # the default: an ipc socket under data_dir/run
            )
            lb = await state.start_lb(settings)
            assert lb.endpoint == f"ipc://{tmp_path.resolve()}/run/lb-{lb.id}.sock"
            stored = await state.client.get(key_layout.lb(lb.id))
            assert stored is not None
            record = LBRecord.from_json(stored.value)
            assert record.endpoint == lb.endpoint
            assert [s.advertised for s in record.sockets] == [
                "192.0.2.1:5060",
                f"127.0.0.1:{state.port(1)}",
            ]
            client = await UdpClient.open()
            await warm_up(lb, client, (worker,), state.port(0))

            for socket_id, advertised in ((0, "192.0.2.1:5060"), (1, f"127.0.0.1:{state.port(1)}")):
                data = request(f"reply-{socket_id}@test")
                client.send(data, ("127.0.0.1", state.port(socket_id)))
                inbound = await worker.next_inbound()
                assert (inbound.socket_id, inbound.advertised) == (socket_id, advertised)
                answer = response(f"reply-{socket_id}@test", "z9hG4bK776asdhds")
                await worker.send(
                    lb.id,
                    Outbound(
                        inbound.socket_id,
                        "udp",
                        inbound.source_host,
                        inbound.source_port,
                        None,
                        answer,
                    ).pack(),
                )
                received, source = await client.receive()
                assert received == answer
                assert source[:2] == ("127.0.0.1", state.port(socket_id))
            assert lb.counters.udp_responses_sent == 2

            # An envelope the load balancer cannot use is counted, not fatal.
            await worker.send(lb.id, [Kind.OUTBOUND, 7, "udp", "127.0.0.1", 1, None, b"x"])
            await worker.send(
                lb.id, Outbound(0, "udp", "127.0.0.1", client.address[1], None, b"after").pack()
            )
            assert (await client.receive())[0] == b"after"
            assert lb.counters.bad_envelope == 1
            client.close()
            await lb.stop()
            assert not (tmp_path / "run" / f"lb-{lb.id}.sock").exists()

    run(scenario)


def test_tcp_messages_and_replies_use_the_client_connection(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            worker, lb, udp = await state.udp_tcp_lb(etcd_server, tmp_path)
            reader, writer = await asyncio.open_connection("127.0.0.1", state.port(1))
            local_port = writer.get_extra_info("sockname")[1]

            # A request split over two writes arrives whole, with its connection id.
            data = request("tcp-1@test", transport="TCP")
            writer.write(data[:30])
            await writer.drain()
            writer.write(data[30:])
            inbound = await worker.next_inbound()
            assert inbound.data == data
            assert (inbound.transport, inbound.socket_id) == ("tcp", 1)
            assert (inbound.source_host, inbound.source_port) == ("127.0.0.1", local_port)
            assert isinstance(inbound.connection_id, int)
            assert lb.tcp_connections == 1

            # RFC 3261 18.2.2: the response goes back over that connection, by id...
            answer = response("tcp-1@test", "z9hG4bK776asdhds")
            await worker.send(
                lb.id, Outbound(1, "tcp", "127.0.0.1", 1, inbound.connection_id, answer).pack()
            )
            assert await asyncio.wait_for(reader.readexactly(len(answer)), TIMEOUT) == answer
            # ... and, with a stale id, by the client's address.
            await worker.send(
                lb.id, Outbound(1, "tcp", "127.0.0.1", local_port, 10**12, answer).pack()
            )
            assert await asyncio.wait_for(reader.readexactly(len(answer)), TIMEOUT) == answer
            assert lb.tcp_connections == 1

            # RFC 5626 4.4.1: CRLFCRLF is answered with CRLF; a lone CRLF is not.
            writer.write(b"\r\n")
            writer.write(b"\r\n\r\n")
            assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"\r\n"

            # Closing the connection tells the workers.
            writer.close()
            closed = await asyncio.wait_for(worker.closed.get(), TIMEOUT)
            assert closed == [Kind.CONNECTION_CLOSED, lb.id, inbound.connection_id]
            assert lb.tcp_connections == 0
            assert lb.counters.keepalives_answered == 1
            assert lb.counters.tcp_requests_received == 1
            assert lb.counters.tcp_responses_sent == 2
            udp.close()

    run(scenario)


def test_tcp_to_a_new_destination_opens_a_connection_from_the_listen_host(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            worker, lb, udp = await state.udp_tcp_lb(etcd_server, tmp_path)

            accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
            accepted = asyncio.Queue()

            async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await accepted.put((reader, writer))

            server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
            server_port = server.sockets[0].getsockname()[1]
            invite = request("out-1@test", method="INVITE", transport="TCP")
            for _ in range(2):  # the second request reuses the connection (RFC 3261 18.1.1)
                await worker.send(
                    lb.id, Outbound(1, "tcp", "127.0.0.1", server_port, None, invite).pack()
                )
            reader, writer = await asyncio.wait_for(accepted.get(), TIMEOUT)
            assert writer.get_extra_info("peername")[0] == "127.0.0.1"
            received = await asyncio.wait_for(reader.readexactly(2 * len(invite)), TIMEOUT)
            assert received == invite * 2
            assert accepted.empty()
            assert lb.tcp_connections == 1

            # The connection is read like an accepted one.
            ringing = response("out-1@test", make_branch_prefix("wa") + "1", "180 Ringing")
            writer.write(ringing)
            inbound = await worker.next_inbound()
            assert inbound.data == ringing
            assert (inbound.transport, inbound.socket_id) == ("tcp", 1)
            assert (inbound.source_host, inbound.source_port) == ("127.0.0.1", server_port)
            assert isinstance(inbound.connection_id, int)

            writer.close()
            server.close()
            await server.wait_closed()
            udp.close()

    run(scenario)


def test_a_request_a_tcp_peer_never_answered_goes_back_when_it_resets(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    """The peer reads our INVITE and resets the connection without a byte back
    (a phone that went away): the request goes back to the worker named in its
    branch as not sent, so that its client transaction fails now (RFC 3261 18.4)
    instead of after Timer B."""

    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            worker, lb, udp = await state.udp_tcp_lb(etcd_server, tmp_path)
            while not worker.frames.empty():
                worker.frames.get_nowait()

            invite = request(
                "gone-1@test",
                method="INVITE",
                transport="TCP",
                branch=make_branch_prefix("wa") + "1",
            )
            read: asyncio.Queue[bytes] = asyncio.Queue()

            async def read_then_reset(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter
            ) -> None:
                await read.put(await reader.readexactly(len(invite)))
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()

            server = await asyncio.start_server(read_then_reset, "127.0.0.1", 0)
            server_port = server.sockets[0].getsockname()[1]
            await worker.send(
                lb.id, Outbound(1, "tcp", "127.0.0.1", server_port, None, invite).pack()
            )
            assert await asyncio.wait_for(read.get(), TIMEOUT) == invite

            async def send_failed() -> list[Any]:
                while True:
                    for envelope in await worker.frames.get():
                        if envelope[0] == Kind.SEND_FAILED:
                            return envelope

            envelope = await asyncio.wait_for(send_failed(), TIMEOUT)
            assert envelope[1:] == [lb.id, invite]
            server.close()
            await server.wait_closed()
            udp.close()

    run(scenario)


def test_tcp_framing_failure_is_answered_then_closed(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            await state.add_worker("wa")
            lb = await state.start_lb(
                lb_settings(etcd_server, key_layout, tmp_path, "tcp:127.0.0.1:0")
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", state.port())
            # RFC 3261 18.3: Content-Length is mandatory on a stream.
            writer.write(
                request("broken@test", transport="TCP").replace(b"Content-Length: 0\r\n", b"")
            )
            answer = await asyncio.wait_for(reader.read(), TIMEOUT)  # until the LB closes
            assert answer.startswith(b"SIP/2.0 400 ")
            assert b"Call-ID: broken@test\r\n" in answer
            writer.close()
            assert lb.counters.tcp_requests_received == 0

    run(scenario)


def test_idle_tcp_connections_are_closed(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            worker, lb, udp = await state.udp_tcp_lb(etcd_server, tmp_path, idle_timeout=0.3)
            udp.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", state.port(1))
            writer.write(b"\r\n\r\n")
            assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"\r\n"
            assert lb.tcp_connections == 1
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed by the LB
            await asyncio.wait_for(worker.closed.get(), TIMEOUT)
            assert lb.tcp_connections == 0
            writer.close()

    run(scenario)


def test_keepalives_answered_and_junk_dropped_over_udp(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            worker = await state.add_worker("wa")
            lb = await state.start_lb(lb_settings(etcd_server, key_layout, tmp_path))
            client = await UdpClient.open()
            await warm_up(lb, client, (worker,), state.port())
            destination = ("127.0.0.1", state.port())

            client.send(b"\r\n", destination)  # a pong: ignored
            client.send(b"\r\n\r\n", destination)  # a ping (RFC 5626 4.4.1)
            assert await client.receive() == (b"\r\n", destination)

            junk = [
                b"hello",
                b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
                b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12),  # a STUN binding request
                b"INVITE sip:bob@example.com HTTP/1.1\r\n\r\n",
            ]
            for data in junk:
                client.send(data, destination)
            valid = request("after-junk@test")
            client.send(valid, destination)
            assert (await worker.next_inbound()).data == valid  # the first one after warm-up
            assert worker.inbound.empty()
            assert lb.counters.not_sip == len(junk)
            status, body = await http_get(lb.health.address if lb.health else "", "/metrics")
            assert status == 200
            assert f'sipcluster_lb_dropped_total{{reason="not_sip"}} {len(junk)}.0'.encode() in body
            assert b"sipcluster_lb_keepalives_answered_total 1.0" in body
            client.close()

    run(scenario)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_udp(etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            worker = await state.add_worker("wa")
            settings = lb_settings(
                etcd_server, key_layout, tmp_path, "udp:127.0.0.1:0", "udp:[::1]:0"
            )
            lb = await state.start_lb(settings)
            warm = await UdpClient.open()
            await warm_up(lb, warm, (worker,), state.port(0))
            client = await UdpClient.open("::1")
            data = request("v6@test")
            client.send(data, ("::1", state.port(1)))
            inbound = await worker.next_inbound()
            assert inbound.data == data
            assert inbound.socket_id == 1
            assert inbound.advertised == f"[::1]:{state.port(1)}"
            assert (inbound.source_host, inbound.source_port) == ("::1", client.address[1])
            answer = response("v6@test", "z9hG4bK776asdhds")
            await worker.send(
                lb.id,
                Outbound(1, "udp", inbound.source_host, inbound.source_port, None, answer).pack(),
            )
            received, source = await client.receive()
            assert received == answer
            assert source[:2] == ("::1", state.port(1))
            client.close()
            warm.close()

    run(scenario)


def test_workers_joining_and_leaving_change_the_routing(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            first = await state.add_worker("wa")
            lb = await state.start_lb(lb_settings(etcd_server, key_layout, tmp_path))
            client = await UdpClient.open()
            destination = ("127.0.0.1", state.port())
            await warm_up(lb, client, (first,), state.port())
            both = Ring(["wa", "wb"])
            for_second = call_id_owned_by(both, "wb")
            client.send(request(for_second), destination)
            assert (await first.next_inbound()).data == request(for_second)

            second = await state.add_worker("wb")
            arrived = await until_arrives(
                lambda: client.send(request(for_second), destination),
                second,
                lambda inbound: inbound.data == request(for_second),
                others=(first,),
            )
            assert arrived.ring == both.fingerprint
            assert lb.ring == both

            for_first = call_id_owned_by(both, "wa")
            await first.leave()
            arrived = await until_arrives(
                lambda: client.send(request(for_first), destination),
                second,
                lambda inbound: inbound.data == request(for_first),
                others=(first,),
            )
            assert arrived.ring == Ring(["wb"]).fingerprint
            assert lb.ring.workers == ("wb",)
            client.close()

    run(scenario)


def test_health_endpoints(etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            lb = await state.start_lb(lb_settings(etcd_server, key_layout, tmp_path))
            assert lb.health is not None
            address = lb.health.address
            assert await http_get(address, "/healthz") == (200, b"ok\n")
            assert (await http_get(address, "/readyz"))[0] == 503  # no worker yet
            status, body = await http_get(address, "/metrics")
            assert status == 200
            for name in (
                b"sipcluster_lb_messages_received_total",
                b"sipcluster_lb_messages_sent_total",
                b"sipcluster_lb_dropped_total",
                b"sipcluster_lb_frame_envelopes_bucket",
                b"sipcluster_lb_forwarding_latency_seconds_bucket",
                b"sipcluster_lb_active_workers 0.0",
                b"sipcluster_lb_tcp_connections 0.0",
            ):
                assert name in body

            await state.add_worker("wa")
            await asyncio.wait_for(lb.wait_ready(), TIMEOUT)
            assert (await http_get(address, "/readyz"))[0] == 200
            assert b"sipcluster_lb_active_workers 1.0" in (await http_get(address, "/metrics"))[1]

    run(scenario)


def test_back_to_back_datagrams_share_frames(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            worker = await state.add_worker("wa")
            lb = await state.start_lb(lb_settings(etcd_server, key_layout, tmp_path))
            client = await UdpClient.open()
            await warm_up(lb, client, (worker,), state.port())
            while not worker.frames.empty():
                worker.frames.get_nowait()

            # Sent from a blocking socket without yielding: they all wait in the
            # load balancer's socket buffer before its loop runs again.
            count = 30
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blaster:
                for index in range(count):
                    blaster.sendto(request(f"batch-{index}@test"), ("127.0.0.1", state.port()))
            frames = 0
            envelopes = 0
            while envelopes < count:
                frame = await asyncio.wait_for(worker.frames.get(), TIMEOUT)
                frames += 1
                envelopes += len(frame)
            assert envelopes == count
            assert frames < count
            assert worker.unstamped == 0

    run(scenario)


def test_frames_are_paced_by_the_flush_delay(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    """A message after a quiet spell leaves at once; what follows within the
    interval waits for it and shares one frame (cluster.protocol.FramePacer)."""
    delay = 1.0

    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            worker = await state.add_worker("wa")
            lb = await state.start_lb(lb_settings(etcd_server, key_layout, tmp_path))
            client = await UdpClient.open()
            await warm_up(lb, client, (worker,), state.port())
            loop = asyncio.get_running_loop()
            # A pacer that never flushed: as after a quiet spell.
            lb.pacer = FramePacer(delay)
            while not worker.frames.empty():
                worker.frames.get_nowait()

            client.send(request("alone@test"), ("127.0.0.1", state.port()))
            # Not held back for the interval: under the interval's half.
            frame = await asyncio.wait_for(worker.frames.get(), delay / 2)
            first = loop.time()
            assert [inbound_from(envelope[1:]).data for envelope in frame] == [
                request("alone@test")
            ]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blaster:
                for index in range(2):
                    blaster.sendto(request(f"paced-{index}@test"), ("127.0.0.1", state.port()))
            frame = await asyncio.wait_for(worker.frames.get(), TIMEOUT)
            assert loop.time() - first >= delay * 0.75
            assert [inbound_from(envelope[1:]).data for envelope in frame] == [
                request(f"paced-{index}@test") for index in range(2)
            ]

    run(scenario)


def test_sigterm_stops_the_subprocess_and_removes_its_record(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            await state.add_worker("wa")
            read_end, write_end = os.pipe()
            environment = dict(os.environ, SIPCLUSTER_NOTIFY_FD=str(write_end))
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lb",
                "--etcd",
                etcd_server.url,
                "--etcd-prefix",
                key_layout.prefix.decode(),
                "--listen",
                "udp:127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--data-dir",
                str(tmp_path),
                "--zmq-bind",
                "tcp://127.0.0.1:0",
                pass_fds=(write_end,),
                env=environment,
                stderr=asyncio.subprocess.PIPE,
            )
            os.close(write_end)
            try:
                loop = asyncio.get_running_loop()
                reader = asyncio.StreamReader()
                pipe, _ = await loop.connect_read_pipe(
                    lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb")
                )
                line = await asyncio.wait_for(reader.readline(), 10.0)
                ready = json.loads(line)
                assert ready["event"] == "ready"
                assert isinstance(ready["lease"], int)
                assert await state.client.get(key_layout.lb(ready["id"])) is not None
                assert (await http_get(ready["http"], "/readyz"))[0] == 200

                process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(process.wait(), 10.0) == 0
                assert await reader.read() == b""  # the descriptor closed with the process
                pipe.close()
                assert await state.client.get(key_layout.lb(ready["id"])) is None
                assert process.stderr is not None
                assert b"Traceback" not in await process.stderr.read()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    run(scenario, timeout=30.0)


def test_tcp_messages_wait_for_a_full_worker_queue_and_are_never_dropped(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that stops reading fills its queue: UDP messages would be dropped
    (their senders retransmit), but what arrives over TCP waits, in order, while
    the load balancer stops reading that connection (TCP flow control); all of it
    reaches the worker once it reads again."""
    monkeypatch.setattr("lb._balancer.PUSH_HIGH_WATER_MARK", 1)

    async def scenario() -> None:
        async with cluster(etcd_server, key_layout) as state:
            worker = FakeWorker("wa", state.client, state.keys)
            worker.inbox.setsockopt(zmq.RCVHWM, 1)
            await worker.start(bind=f"ipc://{tmp_path}/wa.sock")
            state.workers.append(worker)
            settings = lb_settings(
                etcd_server, key_layout, tmp_path, "udp:127.0.0.1:0", "tcp:127.0.0.1:0"
            )
            lb = await state.start_lb(settings, flush_delay=0)  # a frame per loop pass
            udp = await UdpClient.open()
            await warm_up(lb, udp, (worker,), state.port(0))
            loop = asyncio.get_running_loop()
            assert worker.fd is not None
            loop.remove_reader(worker.fd)  # the worker stops reading

            count = 20000
            _, writer = await asyncio.open_connection("127.0.0.1", state.port(1))
            for start in range(0, count, 100):
                writer.write(
                    b"".join(
                        request(f"held-{index}@test", transport="TCP")
                        for index in range(start, start + 100)
                    )
                )
                await asyncio.sleep(0)  # let the load balancer read it: one frame each
            # The load balancer exposes no event for it: its counter is polled,
            # bounded in time.
            deadline = loop.time() + TIMEOUT
            while lb.counters.held_back == 0:
                assert loop.time() < deadline, (
                    "nothing was held back",
                    lb.counters.tcp_requests_received,
                    lb.counters.zmq_full,
                    lb.counters.no_worker,
                    worker.inbound.qsize(),
                )
                await asyncio.sleep(0.01)

            loop.add_reader(worker.fd, worker._read)  # it reads again
            worker._read()
            received = [(await worker.next_inbound()).data for _ in range(count)]
            assert received == [
                request(f"held-{index}@test", transport="TCP") for index in range(count)
            ]
            assert lb.counters.zmq_full == 0
            writer.close()
            udp.close()

    run(scenario)
