"""A local cache of a key range of etcd, kept current by a watch.

The cache reads the whole range once (in pages, at one revision), then follows a
watch from the revision after that read.  When the watch breaks it resumes from
the revision after the last event it applied; when that revision was compacted
away (etcd answers ``compact_revision``) it reads the whole range again and
starts over.  While etcd
is unreachable the cache keeps what it has, so readers go on answering from it.

The cache is ready once the watch has caught up: etcd follows a watch whose start
revision is behind its own ("unsynced": any write in the cluster between the read
and the watch's creation, a membership record included) from a loop that runs
every 100 ms, and meanwhile delivers nothing, so a worker that called itself
ready after the read could answer 480 for a user registered through another
worker in those 100 ms.  etcd answers a progress request only for a synced watch,
with its current revision: the follower asks every PROGRESS_INTERVAL until the
answer comes, and then the cache reflects that revision and is ready.

Events of one etcd revision (one Txn) reach the cache in one watch response and
are applied without yielding to the event loop in between, and the cache's
revision moves once they all are, so a reader never sees half a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aetcd
from aetcd import rpc

from ._errors import StoreUnavailableError

__all__ = ["WatchedRange"]

log = logging.getLogger(__name__)

_RETRY_DELAY_MIN = 0.2
_RETRY_DELAY_MAX = 1.0
"""After an etcd outage a cache misses what was written meanwhile for up to this
long once etcd is back (a call to a user who registered meanwhile, through another
worker, fails for that long); against an absent etcd a retry is one failed
connection attempt, so once a second costs nothing."""
LOAD_PAGE = 5_000
"""Keys per read of a full load (a binding is some 300 bytes)."""
_LOAD_PAGE_TIMEOUT = 30.0
PROGRESS_INTERVAL = 0.02
"""Seconds between two progress requests of a watch that has not caught up."""


class WatchedRange:
    """Base class: keeps a subclass's cache of ``[start, end)`` in step with etcd.

    Subclasses implement ``_reset`` (replace the cache with a full read),
    ``_apply_put`` and ``_apply_delete`` (one watch event each).
    """

    def __init__(self, client: aetcd.Client, start: bytes, end: bytes, *, name: str) -> None:
        self.client = client
        self._range_start = start
        self._range_end = end
        self._name = name
        self.ready = asyncio.Event()
        """Set once the first full read is in the cache and the watch has caught up
        with etcd (module docstring)."""
        self.revision = 0
        """The etcd revision the cache reflects: the last one read or watched."""
        self.reloads = 0
        """How many full reads were made (the first one included)."""
        self._loaded = False
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._stream: Any = None
        # sync(): futures resolved by the progress notification answering the
        # request in flight, and those registered after it was sent (they need
        # a request of their own).
        self._synced_by_flight: list[asyncio.Future[None]] = []
        self._synced_by_next: list[asyncio.Future[None]] = []
        self._flight_expires = 0.0  # when the request in flight counts as lost
        self._sync_timeout = 0.0
        self._askers: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ lifecycle

    async def start(self, timeout: float | None = 10.0) -> None:
        """Start following the range and wait until the cache is ready (``ready``).

        Called again after ``stop``, it resumes the watch from the last revision
        seen (a full read only if that revision was compacted).  Raises
        StoreUnavailableError when the cache is not ready within ``timeout``
        seconds (the follower is stopped again).
        """
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"{self._name}-watch"
            )
        if self.ready.is_set():
            return
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            await self.stop()
            raise StoreUnavailableError(
                f"the {self._name} cache could not load from etcd"
            ) from None

    async def stop(self) -> None:
        """Stop following; the cache keeps its content."""
        task = self._task
        self._task = None
        if task is None:
            return
        # Python 3.11's asyncio.wait_for (aetcd awaits the watch's creation with
        # it) swallows a cancellation that arrives as the awaited call completes,
        # and the follower then goes on watching: cancel until it has ended.
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.5)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def sync(self, timeout: float) -> bool:
        """Wait until the cache reflects every write etcd committed before this
        call (read-your-writes across processes: a binding another worker has
        just written and acknowledged).  Returns False when that could not be
        known within ``timeout`` (no watch, or a watch that has not caught up:
        etcd answers a progress request only for a synced one).

        One progress request serves every caller that arrived before it was
        sent; callers arriving later wait for the next one.  A request left
        unanswered for ``timeout`` is given up, and the next caller asks again.
        """
        stream = self._stream
        if stream is None:
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._sync_timeout = timeout
        if self._synced_by_flight and loop.time() >= self._flight_expires:
            self._synced_by_flight = []  # unanswered: its callers have given up
        if self._synced_by_flight:
            self._synced_by_next.append(future)
        else:
            # Everyone waiting arrived before this request: it serves them all.
            self._synced_by_flight = [*self._synced_by_next, future]
            self._synced_by_next = []
            self._flight_expires = loop.time() + timeout
            await self._ask_progress_once(stream)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return False
        return True

    async def _ask_progress_once(self, stream: Any) -> None:
        with contextlib.suppress(Exception):  # a broken stream: sync times out
            await stream.write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    def _progress_arrived(self) -> None:
        for future in self._synced_by_flight:
            if not future.done():
                future.set_result(None)
        self._synced_by_flight = self._synced_by_next
        self._synced_by_next = []
        if self._synced_by_flight and self._stream is not None:
            loop = asyncio.get_running_loop()
            self._flight_expires = loop.time() + self._sync_timeout
            task = loop.create_task(self._ask_progress_once(self._stream))
            self._askers.add(task)
            task.add_done_callback(self._askers.discard)

    async def wait_for_revision(self, revision: int, timeout: float | None = None) -> None:
        """Wait until the cache reflects etcd revision ``revision`` (or later).

        Only revisions that touch the range advance the cache, so ``revision``
        should be one of a write in the range.  Raises TimeoutError.
        """
        if self.revision >= revision:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, future))
        await asyncio.wait_for(future, timeout)

    # ------------------------------------------------------------ subclass hooks

    def _reset(self, kvs: list[Any], revision: int) -> None:
        """Replace the cache with the key-values of a full read at ``revision``."""
        raise NotImplementedError

    def _apply_put(self, key: bytes, value: bytes, revision: int) -> None:
        """Apply a put of ``key`` at ``revision``."""
        raise NotImplementedError

    def _apply_delete(self, key: bytes, revision: int) -> None:
        """Apply a delete of ``key`` at ``revision``."""
        raise NotImplementedError

    # ------------------------------------------------------------ the follower

    def _advance(self, revision: int) -> None:
        if revision > self.revision:
            self._set_revision(revision)

    def _set_revision(self, revision: int) -> None:
        self.revision = revision
        if self._waiters:
            waiting = []
            for wanted, future in self._waiters:
                if wanted <= revision:
                    if not future.done():
                        future.set_result(None)
                elif not future.done():
                    waiting.append((wanted, future))
            self._waiters = waiting

    async def _run(self) -> None:
        delay = _RETRY_DELAY_MIN
        while True:
            try:
                if not self._loaded:
                    await self._load()
                await self._follow()
                delay = _RETRY_DELAY_MIN
                log.info("%s watch ended; resuming from revision %d", self._name, self.revision)
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                raise
            except aetcd.exceptions.RevisionCompactedError as error:
                # The history since our revision is gone: only a full read can
                # tell what changed (deletions above all).
                log.info(
                    "%s watch: revision %d compacted (%s); reloading",
                    self._name,
                    self.revision + 1,
                    error,
                )
                self._loaded = False
            except Exception as error:
                log.warning(
                    "%s watch interrupted (%s: %s); retrying in %.1f s",
                    self._name,
                    type(error).__name__,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_DELAY_MAX)

    async def _load(self) -> None:
        # In pages of LOAD_PAGE keys, all read at the revision of the first page
        # (one consistent snapshot): one response for the whole range would pass
        # gRPC's 4 MB message limit at some 15,000 bindings.  A revision
        # compacted between two pages fails the read, which starts over.
        client = self.client
        await client.connect()
        stub = rpc.KVStub(client.channel)
        kvs: list[Any] = []
        key, revision = self._range_start, 0
        while True:
            response = await stub.Range(
                rpc.RangeRequest(
                    key=key, range_end=self._range_end, limit=LOAD_PAGE, revision=revision
                ),
                timeout=_LOAD_PAGE_TIMEOUT,
                metadata=client.metadata,
            )
            revision = revision or response.header.revision
            kvs.extend(response.kvs)
            if not response.more or not response.kvs:
                break
            key = response.kvs[-1].key + b"\0"
        # No await between here and the end: readers see the old cache or the new.
        self._reset(kvs, revision)
        self._loaded = True
        self.reloads += 1
        self._set_revision(revision)
        # Ready once the watch has caught up (_follow): the module docstring.

    async def _follow(self) -> None:
        # The watch stream is read straight from gRPC: aetcd's client.watch turns
        # every event into two Python objects and passes it through a callback,
        # a queue and two generators, which costs more than applying it, and
        # every worker pays that for every binding written in the cluster.
        client = self.client
        await client.connect()
        stream = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        self._stream = stream
        delete = rpc.Event.DELETE
        apply_put = self._apply_put
        apply_delete = self._apply_delete
        asker: asyncio.Task[None] | None = None
        try:
            await stream.write(
                rpc.WatchRequest(
                    create_request=rpc.WatchCreateRequest(
                        key=self._range_start,
                        range_end=self._range_end,
                        start_revision=self.revision + 1,
                    )
                )
            )
            if not self.ready.is_set():
                asker = asyncio.get_running_loop().create_task(self._ask_progress(stream))
            async for response in stream:
                if response.compact_revision:
                    raise aetcd.exceptions.RevisionCompactedError(response.compact_revision)
                if response.canceled:
                    log.info("%s watch canceled by etcd: %s", self._name, response.cancel_reason)
                    return
                events = response.events
                if not events:
                    if not response.created:
                        # A progress notification: etcd sends it to a synced watch
                        # only, after every event up to its revision.
                        self._advance(response.header.revision)
                        if not self.ready.is_set():
                            self.ready.set()
                        self._progress_arrived()
                    continue
                # Whole revisions: applied together, then the revision moves once.
                for event in events:
                    kv = event.kv
                    if event.type == delete:
                        apply_delete(kv.key, kv.mod_revision)
                    else:
                        apply_put(kv.key, kv.value, kv.mod_revision)
                self._advance(events[-1].kv.mod_revision)
        finally:
            if asker is not None:
                asker.cancel()
            self._stream = None
            # A new stream: whoever waited asks again through it (or times out).
            self._synced_by_next = self._synced_by_flight + self._synced_by_next
            self._synced_by_flight = []
            stream.cancel()

    async def _ask_progress(self, stream: Any) -> None:
        """Ask for a progress notification until the watch has caught up."""
        request = rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())
        with contextlib.suppress(Exception):  # a broken stream ends _follow as well
            while not self.ready.is_set():
                await stream.write(request)
                await asyncio.sleep(PROGRESS_INTERVAL)
