"""The location service: every binding of the cluster, cached, and written to etcd
in batched compare-and-swap transactions.

Reading
-------
``LocationStore`` caches every binding and every AoR revision (the keys
``bindings/`` and ``aors/`` of ``cluster/keys.py``, read and watched as one range)
so that ``lookup`` and ``aor_state`` answer without I/O, also while etcd is
unreachable.  A binding past its ``expires_at`` is never returned, whether or not
its lease has deleted it yet.  ``fetch_aor_state`` reads one AoR from etcd itself,
for a writer whose compare-and-swap found the cache behind.

Writing
-------
A change of one AoR (``AorChange``) names the AoR revision it was computed from,
the bindings to put and the binding ids to delete.  ``commit`` applies it only if
the AoR is still at that revision (the mod_revision of ``aors/<aor>``; 0, absent,
is compared as version 0), and rewrites ``aors/<aor>`` in the same Txn so that the
revision moves: two workers that computed changes from the same state cannot both
succeed (the loser gets CONFLICT, re-reads and recomputes).

Changes are grouped into one Txn (group commit): a change waits at most
``batch_window`` seconds (10 ms by default; 0: until the end of the current
event-loop pass) for others to join it, and a Txn leaves at once when 128
operations (etcd's limit per Txn) are queued.  A Txn holds one compare per AoR
and all the operations of its changes, and never two changes of one AoR (etcd
refuses a Txn that writes a key twice: the second change waits for the first's
outcome).  Up to ``max_in_flight`` Txns are outstanding at once, so that under
heavy load throughput does not wait on one round trip; while they are, new
changes queue up and leave together.

Why a window: a Txn costs about 0.2 ms of this process's CPU (the gRPC call)
and 0.5 ms of etcd's whatever its size, against some 70 us per change in it, so
at moderate rates the batch size decides the cost.  Measured at 5,000 changes/s
(``registry.benchmark``): no window, 10 changes per Txn, about one core
in all; 10 ms, about 50 per Txn, about half a core.  The 10 ms this adds to a
REGISTER's answer is nothing next to SIP's timers (T1 = 500 ms).

When a Txn's compare fails, its failure branch reads the ``aors/`` key
of every AoR in it, in the same round trip: the AoRs whose revision moved get
CONFLICT, and the others are sent again without them.

The ``aors/<aor>`` key carries the lease of the bucket after the latest expiry
of the AoR's bindings, so it outlives them, and is deleted with the last binding:
"absent" then means "no bindings", which a later writer compares as version 0.

After a commit the store applies the change to its own cache at once
(write-through), so that the next REGISTER of the AoR on this worker sees it even
before the watch event arrives; every cached key remembers the revision it was
written at, and watch events not newer than that are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aetcd

from cluster.keys import KeyLayout, prefix_end

from ._binding import Binding
from ._errors import MalformedRecordError, StoreUnavailableError
from ._etcd import MAX_TXN_OPERATIONS, LeaseNotFoundError, call, response_revision
from ._leases import LeaseBuckets
from ._watched import WatchedRange

__all__ = [
    "AorChange",
    "AorState",
    "CommitOutcome",
    "CommitResult",
    "CommitStatistics",
    "LocationStore",
    "plan_change",
]

log = logging.getLogger(__name__)


class CommitOutcome(enum.Enum):
    """What became of a change."""

    COMMITTED = "committed"
    """Written: durable in etcd."""
    CONFLICT = "conflict"
    """Not written: the AoR had moved past the expected revision."""


@dataclass(frozen=True, slots=True)
class CommitResult:
    """The answer to ``LocationStore.commit``."""

    outcome: CommitOutcome
    """Committed or conflict."""
    revision: int
    """Committed: the etcd revision of the Txn, the AoR's new revision (0 when the
    change removed the last binding).  Conflict: the AoR's revision found in etcd."""

    @property
    def committed(self) -> bool:
        """Whether the change was written."""
        return self.outcome is CommitOutcome.COMMITTED


@dataclass(frozen=True, slots=True)
class AorState:
    """The bindings of one AoR at one revision: what a change is computed from."""

    aor: str
    """The address-of-record."""
    revision: int
    """The mod_revision of ``aors/<aor>``; 0 when the AoR has no bindings."""
    bindings: tuple[Binding, ...] = ()
    """Every stored binding, expired ones included (their leases may not have
    deleted them yet)."""

    def active(self, now: float) -> list[Binding]:
        """The bindings that have not expired at ``now``."""
        return [binding for binding in self.bindings if binding.expires_at > now]


@dataclass(frozen=True, slots=True, kw_only=True)
class AorChange:
    """A change of one AoR's bindings, applied only if the AoR is still at
    ``expected_revision``."""

    aor: str
    """The address-of-record."""
    expected_revision: int
    """The revision the change was computed from (``AorState.revision``)."""
    put: tuple[Binding, ...] = ()
    """Bindings to write (new ones and refreshed ones)."""
    delete: tuple[str, ...] = ()
    """Binding ids to remove."""
    keep_until: float | None = None
    """The latest ``expires_at`` among the AoR's bindings after the change; None
    when none remain (the AoR key is then deleted)."""

    @property
    def operations(self) -> int:
        """The Txn operations the change takes (its puts, deletes and the AoR key)."""
        return len(self.put) + len(self.delete) + 1


def plan_change(state: AorState, bindings: Iterable[Binding]) -> AorChange:
    """The change that turns ``state`` into exactly ``bindings``.

    Bindings equal to the stored ones are not rewritten; stored bindings not in
    ``bindings`` (expired ones included) are deleted.
    """
    stored = {binding.binding_id: binding for binding in state.bindings}
    wanted = {binding.binding_id: binding for binding in bindings}
    return AorChange(
        aor=state.aor,
        expected_revision=state.revision,
        put=tuple(
            binding for binding_id, binding in wanted.items() if stored.get(binding_id) != binding
        ),
        delete=tuple(binding_id for binding_id in stored if binding_id not in wanted),
        keep_until=max((binding.expires_at for binding in wanted.values()), default=None),
    )


@dataclass(slots=True)
class CommitStatistics:
    """Counters of the commit path (for metrics and benchmarks)."""

    transactions: int = 0
    """Txns sent (retries included)."""
    changes: int = 0
    """Changes committed."""
    conflicts: int = 0
    """Changes answered CONFLICT."""
    operations: int = 0
    """Operations in the Txns sent."""
    failed_compares: int = 0
    """Txns whose compare failed (and were split)."""
    largest_transaction: int = 0
    """The most operations sent in one Txn."""


@dataclass(slots=True)
class _Pending:
    change: AorChange
    future: asyncio.Future[CommitResult]
    queued_at: float
    encoded: list[bytes] = field(default_factory=list)
    put_keys: list[bytes] = field(default_factory=list)


class LocationStore(WatchedRange):
    """Every binding of the cluster: a watched cache for reads, batched
    compare-and-swap Txns for writes (see the module docstring).

    ``clock`` returns the current time in seconds since the epoch (bindings'
    expiry is wall-clock time shared by all machines); tests inject their own.
    """

    def __init__(
        self,
        client: aetcd.Client,
        keys: KeyLayout,
        *,
        clock: Callable[[], float] = time.time,
        bucket_seconds: float = 10.0,
        lease_margin: float = 5.0,
        max_in_flight: int = 4,
        batch_window: float = 0.010,
        request_timeout: float = 5.0,
    ) -> None:
        # aors/ and bindings/ are read and watched as one range; keys between
        # them that are neither are ignored.
        super().__init__(client, keys.aors, prefix_end(keys.bindings), name="location")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.keys = keys
        self.clock = clock
        self.max_in_flight = max_in_flight
        self.batch_window = batch_window
        self.request_timeout = request_timeout
        self.statistics = CommitStatistics()
        self.leases = LeaseBuckets(
            client, clock=clock, bucket_seconds=bucket_seconds, margin=lease_margin
        )
        # The cache: aor -> binding id -> (binding, mod_revision).
        self._bindings: dict[str, dict[str, tuple[Binding, int]]] = {}
        # aors/<aor> key -> its mod_revision.
        self._aor_revisions: dict[bytes, int] = {}
        # Keys this store deleted (write-through) -> the revision of the delete,
        # until the watch passes it: an older put arriving later must not revive
        # the key.
        self._tombstones: dict[bytes, int] = {}
        self._tombstone_order: deque[tuple[int, bytes]] = deque()
        # The commit queue.
        self._queue: deque[_Pending] = deque()
        self._queued_operations = 0
        self._busy: set[str] = set()
        self._in_flight = 0
        self._dispatch_handle: asyncio.Handle | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()
        # Binding keys in Txns in flight -> (value, binding): the watch event of
        # our own write often arrives before the Txn's reply, and then needs no
        # decoding.
        self._in_flight_puts: dict[bytes, tuple[bytes, Binding]] = {}

    # ================================================================ reading

    def lookup(self, aor: str) -> list[Binding]:
        """The active bindings of ``aor`` (canonical ``user@domain``), highest q
        first (no q counts as 1.0), then the most recently registered.  No I/O."""
        entries = self._bindings.get(aor)
        if not entries:
            return []
        now = self.clock()
        active = [binding for binding, _ in entries.values() if binding.expires_at > now]
        active.sort(key=_preference)
        return active

    def aor_state(self, aor: str) -> AorState:
        """The cached state of ``aor`` for computing a change.  No I/O; may lag
        behind etcd (a commit from it then gets CONFLICT)."""
        entries = self._bindings.get(aor)
        return AorState(
            aor,
            self._aor_revisions.get(self.keys.aor(aor), 0),
            tuple(binding for binding, _ in entries.values()) if entries else (),
        )

    async def fetch_aor_state(self, aor: str) -> AorState:
        """Read the state of ``aor`` from etcd (one linearizable Txn of two range
        reads).  Raises StoreUnavailableError."""
        transactions = self.client.transactions
        prefix = self.keys.aor_bindings(aor)
        _, responses = await call(
            self.client.transaction(
                compare=[],
                success=[
                    transactions.get(self.keys.aor(aor)),
                    transactions.get(prefix, prefix_end(prefix)),
                ],
                failure=[],
            ),
            self.request_timeout,
        )
        aor_values, binding_values = responses
        revision = aor_values[0][1].mod_revision if aor_values else 0
        bindings = []
        for value, metadata in binding_values:
            binding = self._decode(metadata.key, value)
            if binding is not None:
                bindings.append(binding)
        return AorState(aor, revision, tuple(bindings))

    @property
    def binding_count(self) -> int:
        """How many bindings the cache holds (expired ones included)."""
        return sum(len(entries) for entries in self._bindings.values())

    def _decode(self, key: bytes, value: bytes) -> Binding | None:
        try:
            aor, binding_id = self.keys.split_binding(key)
            binding = Binding.decode(value)
        except (MalformedRecordError, ValueError) as error:
            log.warning("ignoring a malformed binding at %r: %s", key, error)
            return None
        if binding.aor != aor or binding.binding_id != binding_id:
            log.warning("ignoring a binding stored under the wrong key %r", key)
            return None
        return binding

    # ------------------------------------------------------------ cache upkeep

    def _reset(self, kvs: list[Any], revision: int) -> None:
        bindings: dict[str, dict[str, tuple[Binding, int]]] = {}
        aor_revisions: dict[bytes, int] = {}
        aors_prefix = self.keys.aors
        bindings_prefix = self.keys.bindings
        for kv in kvs:
            key = kv.key
            if key.startswith(aors_prefix):
                aor_revisions[key] = kv.mod_revision
            elif key.startswith(bindings_prefix):
                binding = self._decode(key, kv.value)
                if binding is not None:
                    bindings.setdefault(binding.aor, {})[binding.binding_id] = (
                        binding,
                        kv.mod_revision,
                    )
        self._bindings = bindings
        self._aor_revisions = aor_revisions
        self._tombstones.clear()
        self._tombstone_order.clear()

    def _floor(self, key: bytes, cached: int) -> int:
        """The revision an event for ``key`` must exceed to be applied."""
        tombstone = self._tombstones.get(key)
        return cached if tombstone is None or tombstone < cached else tombstone

    def _prune_tombstones(self, revision: int) -> None:
        order = self._tombstone_order
        while order and order[0][0] <= revision:
            tombstone_revision, key = order.popleft()
            if self._tombstones.get(key) == tombstone_revision:
                del self._tombstones[key]

    def _apply_put(self, key: bytes, value: bytes, revision: int) -> None:
        if self._tombstone_order:
            self._prune_tombstones(revision - 1)
        if key.startswith(self.keys.aors):
            if revision > self._floor(key, self._aor_revisions.get(key, 0)):
                self._aor_revisions[key] = revision
            return
        if not key.startswith(self.keys.bindings):
            return
        ours = self._in_flight_puts.get(key)
        if ours is not None and ours[0] == value:
            aor, binding_id = ours[1].aor, ours[1].binding_id
        else:
            ours = None
            try:
                aor, binding_id = self.keys.split_binding(key)
            except ValueError:
                return
        entries = self._bindings.get(aor)
        current = entries.get(binding_id) if entries else None
        if revision <= self._floor(key, current[1] if current else 0):
            return
        binding = ours[1] if ours is not None else self._decode(key, value)
        if binding is None:
            # The key now holds something we cannot read: the old binding is gone.
            if entries is not None and current is not None:
                del entries[binding_id]
                if not entries:
                    del self._bindings[aor]
            return
        self._bindings.setdefault(aor, {})[binding_id] = (binding, revision)

    def _apply_delete(self, key: bytes, revision: int) -> None:
        if self._tombstone_order:
            self._prune_tombstones(revision - 1)
        if key.startswith(self.keys.aors):
            if revision > self._floor(key, self._aor_revisions.get(key, 0)):
                self._aor_revisions.pop(key, None)
            return
        if not key.startswith(self.keys.bindings):
            return
        try:
            aor, binding_id = self.keys.split_binding(key)
        except ValueError:
            return
        entries = self._bindings.get(aor)
        current = entries.get(binding_id) if entries else None
        if entries is None or current is None or revision <= current[1]:
            return
        del entries[binding_id]
        if not entries:
            del self._bindings[aor]

    def _write_through(self, change: AorChange, revision: int) -> None:
        """Apply a committed change to the cache at ``revision``."""
        if revision <= self.revision:
            # The watch (or a full read) already brought this revision and maybe
            # later ones: applying it again could revive a key deleted since.
            return
        aor = change.aor
        keys = self.keys
        entries = self._bindings.setdefault(aor, {})
        for binding in change.put:
            current = entries.get(binding.binding_id)
            if current is None or current[1] < revision:
                entries[binding.binding_id] = (binding, revision)
        for binding_id in change.delete:
            current = entries.get(binding_id)
            if current is not None and current[1] < revision:
                del entries[binding_id]
            self._add_tombstone(keys.binding(aor, binding_id), revision)
        if not entries:
            del self._bindings[aor]
        aor_key = keys.aor(aor)
        if self._aor_revisions.get(aor_key, 0) < revision:
            if change.keep_until is None:
                self._aor_revisions.pop(aor_key, None)
                self._add_tombstone(aor_key, revision)
            else:
                self._aor_revisions[aor_key] = revision

    def _add_tombstone(self, key: bytes, revision: int) -> None:
        if revision <= self.revision:
            return  # the watch already passed the delete
        if self._tombstones.get(key, 0) < revision:
            self._tombstones[key] = revision
            self._tombstone_order.append((revision, key))

    # ================================================================ writing

    async def commit(self, change: AorChange) -> CommitResult:
        """Apply ``change`` if its AoR is still at ``change.expected_revision``.

        Returns COMMITTED (durable in etcd) with the new revision, or CONFLICT.
        Raises StoreUnavailableError when etcd cannot be reached or does not answer
        (nothing of the change is written, or, after a timeout, it is unknown
        whether all of it was); ValueError when the change is not well-formed
        (more operations than one Txn takes, a binding id twice, a binding of
        another AoR).
        """
        _check_change(change)
        loop = asyncio.get_running_loop()
        pending = _Pending(change, loop.create_future(), loop.time())
        self._queue.append(pending)
        self._queued_operations += change.operations
        self._schedule(loop)
        return await pending.future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._in_flight >= self.max_in_flight or not self._queue:
            return
        full = self._queued_operations >= MAX_TXN_OPERATIONS
        handle = self._dispatch_handle
        if handle is not None:
            if full and isinstance(handle, asyncio.TimerHandle):
                handle.cancel()  # a full Txn leaves at once
            else:
                return
        delay = 0.0 if full else self._queue[0].queued_at + self.batch_window - loop.time()
        if delay > 0:
            self._dispatch_handle = loop.call_later(delay, self._dispatch)
        else:
            # After the current pass: every change submitted in it joins the batch.
            self._dispatch_handle = loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_handle = None
        loop = asyncio.get_running_loop()
        while self._queue and self._in_flight < self.max_in_flight:
            batch = self._take_batch()
            if not batch:
                break  # everything queued waits behind a change in flight
            self._in_flight += 1
            task = loop.create_task(self._run_batch(batch))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        operations = 0
        in_batch: set[str] = set()
        kept: deque[_Pending] = deque()
        queue = self._queue
        while queue:
            pending = queue.popleft()
            change = pending.change
            if pending.future.done():  # the caller gave up
                self._queued_operations -= change.operations
                continue
            if change.aor in self._busy or change.aor in in_batch:
                # One change per AoR per Txn (etcd refuses a key written twice);
                # the later one waits for the earlier one's outcome.
                kept.append(pending)
                continue
            if operations + change.operations > MAX_TXN_OPERATIONS:
                kept.append(pending)
                kept.extend(queue)
                queue.clear()
                break
            batch.append(pending)
            operations += change.operations
            in_batch.add(change.aor)
        self._queue = kept
        self._queued_operations -= operations
        self._busy |= in_batch
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            await self._commit_batch(batch)
        except Exception as error:
            if not isinstance(error, StoreUnavailableError):
                log.exception("commit of %d changes failed", len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
        finally:
            self._in_flight -= 1
            in_flight_puts = self._in_flight_puts
            for pending in batch:
                self._busy.discard(pending.change.aor)
                for key in pending.put_keys:
                    in_flight_puts.pop(key, None)
            if self._queue:
                self._schedule(asyncio.get_running_loop())

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        remaining = [pending for pending in batch if not pending.future.done()]
        lease_retried = False
        while remaining:
            await call(self.leases.ensure(self._buckets(remaining)), self.request_timeout)
            compare, success, failure = self._build_txn(remaining)
            statistics = self.statistics
            statistics.transactions += 1
            statistics.operations += len(success)
            statistics.largest_transaction = max(statistics.largest_transaction, len(success))
            try:
                succeeded, responses = await call(
                    self.client.transaction(compare=compare, success=success, failure=failure),
                    self.request_timeout,
                )
            except LeaseNotFoundError:
                # A cached lease is gone (etcd restored, or revoked by hand).
                if lease_retried:
                    raise
                lease_retried = True
                self.leases.forget()
                continue
            if succeeded:
                revision = response_revision(responses[0])
                statistics.changes += len(remaining)
                for pending in remaining:
                    self._write_through(pending.change, revision)
                    if not pending.future.done():
                        pending.future.set_result(CommitResult(CommitOutcome.COMMITTED, revision))
                return
            # The failure branch read every AoR key: those that moved conflict.
            statistics.failed_compares += 1
            still: list[_Pending] = []
            for pending, found in zip(remaining, responses, strict=True):
                current = found[0][1].mod_revision if found else 0
                if current == pending.change.expected_revision:
                    still.append(pending)
                else:
                    statistics.conflicts += 1
                    if not pending.future.done():
                        pending.future.set_result(CommitResult(CommitOutcome.CONFLICT, current))
            if len(still) == len(remaining):
                # Cannot happen (the reads run atomically with the compares);
                # never loop on it.
                for pending in still:
                    statistics.conflicts += 1
                    if not pending.future.done():
                        pending.future.set_result(CommitResult(CommitOutcome.CONFLICT, 0))
                return
            remaining = [pending for pending in still if not pending.future.done()]

    def _buckets(self, batch: list[_Pending]) -> set[int]:
        bucket_of = self.leases.bucket_of
        buckets = set()
        for pending in batch:
            change = pending.change
            for binding in change.put:
                buckets.add(bucket_of(binding.expires_at))
            if change.keep_until is not None:
                buckets.add(bucket_of(change.keep_until) + 1)
        return buckets

    def _build_txn(self, batch: list[_Pending]) -> tuple[list[Any], list[Any], list[Any]]:
        transactions = self.client.transactions
        put = transactions.put
        delete = transactions.delete
        keys = self.keys
        lease_of = self.leases.lease_of
        bucket_of = self.leases.bucket_of
        compare: list[Any] = []
        success: list[Any] = []
        failure: list[Any] = []
        for pending in batch:
            change = pending.change
            aor = change.aor
            aor_key = keys.aor(aor)
            if change.expected_revision == 0:
                compare.append(transactions.version(aor_key) == 0)
            else:
                compare.append(transactions.mod(aor_key) == change.expected_revision)
            if not pending.encoded:
                pending.encoded = [binding.encode() for binding in change.put]
                pending.put_keys = [keys.binding(aor, binding.binding_id) for binding in change.put]
            for binding, key, value in zip(
                change.put, pending.put_keys, pending.encoded, strict=True
            ):
                success.append(put(key, value, lease=lease_of(bucket_of(binding.expires_at))))
                self._in_flight_puts[key] = (value, binding)
            for binding_id in change.delete:
                success.append(delete(keys.binding(aor, binding_id)))
            if change.keep_until is None:
                success.append(delete(aor_key))
            else:
                success.append(put(aor_key, b"", lease=lease_of(bucket_of(change.keep_until) + 1)))
            failure.append(transactions.get(aor_key))
        return compare, success, failure

    async def stop(self) -> None:
        """Stop following etcd; commits in flight are left to finish."""
        await super().stop()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._batch_tasks, return_exceptions=True)


def _preference(binding: Binding) -> tuple[float, float]:
    return (-(binding.q if binding.q is not None else 1.0), -binding.registered_at)


def _check_change(change: AorChange) -> None:
    if change.operations > MAX_TXN_OPERATIONS:
        raise ValueError(
            f"a change of {change.operations} operations does not fit in one Txn "
            f"({MAX_TXN_OPERATIONS} at most)"
        )
    binding_ids = [binding.binding_id for binding in change.put]
    binding_ids.extend(change.delete)
    if len(set(binding_ids)) != len(binding_ids):
        raise ValueError(f"a change of {change.aor} names a binding twice")
    for binding in change.put:
        if binding.aor != change.aor:
            raise ValueError(f"a change of {change.aor} holds a binding of {binding.aor}")
    if change.put and (
        change.keep_until is None
        or change.keep_until < max(binding.expires_at for binding in change.put)
    ):
        raise ValueError("keep_until must cover the latest expiry of the bindings put")
