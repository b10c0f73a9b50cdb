"""Membership in etcd: who is in the cluster, and the ring it makes.

Every load balancer and worker writes a record under ``members/`` (see
``cluster/keys.py``) attached to a lease of its own that it keeps alive; when the
process dies the lease expires and the record disappears, and a supervisor that
sees a child die revokes the lease at once.  A lease that etcd expired while the
process lives (etcd frozen or cut off from it for longer than the TTL) is
replaced by a new one and the record written again (``Registration``).

``MemberWatch`` keeps an up-to-date view of the records: it reads them all, then
follows a prefix watch from the next revision, and starts over from a fresh read
when the watch breaks or its revision was compacted.  While etcd is unreachable
the view keeps the last membership it saw.  The view's ``version`` is the etcd
revision of the last change it applied, identical on every process that applied
the same changes; the ring of active workers is computed from it
(``cluster/ring.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aetcd

from .keys import KeyLayout
from .notify import notify
from .ring import Ring

__all__ = [
    "LBRecord",
    "LBSocket",
    "MemberView",
    "MemberWatch",
    "Registration",
    "WorkerRecord",
    "connect_etcd",
    "last_published_view",
]

log = logging.getLogger(__name__)

ACTIVE = "active"
DRAINING = "draining"

_last_published: MemberView | None = None


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker's membership record."""

    id: str
    """The worker id (letters and digits; it travels in Via branches)."""
    endpoint: str
    """The ZeroMQ endpoint of its inbox."""
    state: str = ACTIVE
    """"active" (takes new calls) or "draining" (finishes what it has)."""
    pid: int = 0
    """Its process id."""
    host: str = ""
    """The machine it runs on."""
    http: str = ""
    """Its health and metrics endpoint, host:port."""
    load: float = 0.0
    """Its recent load, a fraction of one core."""

    def to_json(self) -> bytes:
        """The record as stored in etcd."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> WorkerRecord:
        """Read a stored record; raises ValueError when it is not one."""
        return cls(**_fields_of(cls, data))


@dataclass(frozen=True, slots=True)
class LBSocket:
    """One SIP socket of a load balancer."""

    id: int
    """Its index in the load balancer's socket list."""
    transport: str
    """"udp" or "tcp"."""
    host: str
    """The listen address."""
    port: int
    """The listen port."""
    advertise_host: str
    """The host written into Via and Record-Route."""
    advertise_port: int
    """The port written into Via and Record-Route."""

    @property
    def advertised(self) -> str:
        """``host:port`` as written in a Via sent-by (IPv6 in brackets)."""
        host = self.advertise_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.advertise_port}"

    @property
    def ipv6(self) -> bool:
        """Whether the socket is IPv6."""
        return ":" in self.host


@dataclass(frozen=True, slots=True)
class LBRecord:
    """A load balancer's membership record."""

    id: str
    """The load balancer id (unique per incarnation)."""
    endpoint: str
    """The ZeroMQ endpoint of its inbox."""
    sockets: tuple[LBSocket, ...] = ()
    """Its SIP sockets."""
    pid: int = 0
    """Its process id."""
    host: str = ""
    """The machine it runs on."""
    http: str = ""
    """Its health and metrics endpoint, host:port."""

    def to_json(self) -> bytes:
        """The record as stored in etcd."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LBRecord:
        """Read a stored record; raises ValueError when it is not one."""
        values = _fields_of(cls, data)
        values["sockets"] = tuple(LBSocket(**socket) for socket in values.get("sockets", ()))
        return cls(**values)


def _fields_of(cls: type, data: bytes) -> dict[str, Any]:
    try:
        values = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"not a {cls.__name__}: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"not a {cls.__name__}")
    known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    return {key: value for key, value in values.items() if key in known}


@dataclass(slots=True)
class MemberView:
    """The members a process currently knows, and the ring they make."""

    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    """Every worker, active or draining, by id."""
    lbs: dict[str, LBRecord] = field(default_factory=dict)
    """Every load balancer, by id."""
    version: int = 0
    """The etcd revision of the last change applied."""
    ring: Ring = field(default_factory=lambda: Ring(()))
    """The ring of the active workers, at ``version``."""

    def active_workers(self) -> list[str]:
        """The ids of the workers that take new calls."""
        return sorted(w.id for w in self.workers.values() if w.state == ACTIVE)


def last_published_view() -> MemberView | None:
    """The view a ``MemberWatch`` of this process published last (None before the
    first): a worker has one watch, and its metrics read the ring from here."""
    return _last_published


_CHANNEL_OPTIONS = {
    # gRPC waits before reconnecting a lost channel, 1 s at first and growing to
    # 120 s by default; meanwhile every call fails at once.  After an etcd outage
    # the caches (registry/_watched.py) and the commits would stay cut off that
    # long once etcd is back: reconnect within a second instead.
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
}


async def connect_etcd(url: str, timeout: float = 5.0) -> aetcd.Client:
    """Connect to etcd at ``url`` (http://host:port) and check it answers.

    Raises ConnectionError with a message naming the URL when it does not.
    """
    host, port = _split_url(url)
    client = aetcd.Client(host=host, port=port, timeout=timeout, options=dict(_CHANNEL_OPTIONS))
    try:
        await client.connect()
        await asyncio.wait_for(client.status(), timeout)
    except (TimeoutError, aetcd.exceptions.ClientError, OSError) as error:
        with contextlib.suppress(Exception):
            await client.close()
        raise ConnectionError(f"etcd at {url} is unreachable: {error}") from None
    return client


def _split_url(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[-1].rstrip("/")
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]:")
    else:
        host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"an etcd URL is http://HOST:PORT, not {url!r}")
    return host, int(port)


class Registration:
    """This process's record in etcd, under a lease kept alive until ``stop``.

    The keepalive runs on its own thread with its own event loop and etcd
    connection, so that a busy main loop never makes the lease expire.  When etcd
    expired the lease all the same (it was frozen or cut off from this process
    for longer than the TTL), the thread reports it and the record is written
    again, the last value given, under a new lease granted on the main loop
    (retried until etcd answers); a supervisor is told the new lease
    (``cluster/notify.py``) so that it can still revoke it should the process die.
    """

    def __init__(self, url: str, key: bytes, ttl: int) -> None:
        self.url = url
        self.key = key
        self.ttl = ttl
        self.lease_id: int | None = None
        self.renewals = 0
        """How many times a lost lease was replaced."""
        self._client: aetcd.Client | None = None
        self._value = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._renewing: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self, client: aetcd.Client, value: bytes) -> None:
        """Grant the lease and write the record; raises aetcd errors."""
        self._value = value
        lease = await client.lease(self.ttl)
        self.lease_id = lease.id
        await client.put(self.key, value, lease=lease.id)
        self._client = client
        self._loop = asyncio.get_running_loop()
        from ._keepalive import KeepaliveThread  # noqa: PLC0415 - thread only when used

        self._keepalive = KeepaliveThread(self.url, lease.id, self.ttl, self._lost_threadsafe)
        self._keepalive.start()

    async def update(self, value: bytes) -> None:
        """Rewrite the record (same lease); raises aetcd errors.  The value is kept
        even when the write fails: a record written again after a lost lease has it."""
        assert self._client is not None
        self._value = value
        await self._client.put(self.key, value, lease=self.lease_id)

    async def stop(self) -> None:
        """Stop the keepalive and revoke the lease: the record disappears at once."""
        self._stopped = True
        renewing = self._renewing
        if renewing is not None and not renewing.done():
            renewing.cancel()
            await asyncio.wait({renewing}, timeout=1.0)
        keepalive = getattr(self, "_keepalive", None)
        if keepalive is not None:
            keepalive.stop()
        if self._client is not None and self.lease_id is not None:
            with contextlib.suppress(Exception):
                await self._client.revoke_lease(self.lease_id)

    def _lost_threadsafe(self, lease_id: int) -> None:
        """The keepalive thread found ``lease_id`` gone (called on that thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._lost, lease_id)

    def _lost(self, lease_id: int) -> None:
        if self._stopped or lease_id != self.lease_id:
            return
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.get_running_loop().create_task(
                self._renew(), name="membership-renew"
            )

    async def _renew(self) -> None:
        """Grant a new lease and write the record under it, until it worked."""
        assert self._client is not None
        delay = 0.2
        while not self._stopped:
            try:
                lease = await asyncio.wait_for(self._client.lease(self.ttl), 5.0)
                self.lease_id = lease.id
                self._keepalive.lease_id = lease.id
                value = None
                while value is not self._value:  # an update() during the put: again
                    value = self._value
                    await asyncio.wait_for(self._client.put(self.key, value, lease=lease.id), 5.0)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("cannot write the membership record again (%s); retrying", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.renewals += 1
            log.warning("membership record %s written again under a new lease", self.key.decode())
            notify("lease", lease=lease.id)
            return


class MemberWatch:
    """Follows ``members/`` in etcd and calls ``on_change(view)`` after each change."""

    def __init__(
        self,
        client: aetcd.Client,
        keys: KeyLayout,
        on_change: Callable[[MemberView], None] | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.view = MemberView()
        self.on_change = on_change
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start following (a task on the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="member-watch")

    async def stop(self) -> None:
        """Stop following."""
        task = self._task
        if task is None:
            return
        # A cancellation can be swallowed when it lands just as an awaited future
        # completes (asyncio.wait_for inside aetcd, Python 3.11): cancel until the
        # task is really done.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if not task.cancelled() and task.exception() is not None:
            log.warning("membership watch ended with %r", task.exception())

    def _apply(self, key: bytes, value: bytes | None, revision: int) -> bool:
        view = self.view
        try:
            if key.startswith(self.keys.workers):
                member_id = key[len(self.keys.workers) :].decode()
                if value is None:
                    return view.workers.pop(member_id, None) is not None
                view.workers[member_id] = WorkerRecord.from_json(value)
                return True
            if key.startswith(self.keys.lbs):
                member_id = key[len(self.keys.lbs) :].decode()
                if value is None:
                    return view.lbs.pop(member_id, None) is not None
                view.lbs[member_id] = LBRecord.from_json(value)
                return True
        except (ValueError, TypeError) as error:
            log.warning("ignoring malformed member record %r: %s", key, error)
        return False

    def _publish(self, revision: int) -> None:
        view = self.view
        view.version = revision
        active = view.active_workers()
        if list(view.ring.workers) != active:
            view.ring = Ring(active, revision)
        global _last_published  # noqa: PLW0603 - one view per process, for its metrics
        _last_published = view
        if self.on_change is not None:
            self.on_change(view)

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("membership watch interrupted (%s); retrying", error)
                await asyncio.sleep(1.0)

    async def _follow(self) -> None:
        members = await self.client.get_prefix(self.keys.members)
        revision = members.header.revision
        self.view.workers.clear()
        self.view.lbs.clear()
        for kv in members:
            self._apply(kv.key, kv.value, revision)
        self._publish(revision)
        self.ready.set()
        watch = await self.client.watch_prefix(self.keys.members, start_revision=revision + 1)
        try:
            async for event in watch:
                deleted = event.kind == aetcd.rtypes.EventKind.DELETE
                if self._apply(event.kv.key, None if deleted else event.kv.value, 0):
                    self._publish(event.kv.mod_revision)
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()
