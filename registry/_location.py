"""The location service: every binding of the cluster, cached, and written to etcd
in batched compare-and-swap transactions.

Reading
-------
``LocationStore`` caches every binding (the keys ``bindings/<aor>/<binding id>``
of ``cluster/keys.py``, read and watched as one range) so that ``lookup`` and
``aor_state`` answer without I/O, also while etcd is unreachable.  A binding past
its ``expires_at`` is never returned, whether or not its lease has deleted it
yet.  ``fetch_aor_state`` reads one AoR from etcd itself, for a writer whose
compare-and-swap found the cache behind.

The cache keeps a binding another worker wrote as etcd delivered it (its msgpack
value and mod_revision) and decodes it only when a reader asks for its AoR,
replacing the raw entry by the decoded one: with N workers every binding written
reaches N caches, and most are read rarely, if ever.  A value that does not decode
is dropped then (and logged), as if the key were absent.

Writing
-------
A change of one AoR (``AorChange``) is computed from an ``AorState``: the AoR's
bindings as of one etcd revision R, each with the mod_revision of its key.
``commit`` writes it in one Txn only if the AoR is still as it was at R, which the
Txn checks on the binding keys themselves:

* for each binding of the state, ``mod_revision(key) == its mod_revision``: no
  binding was changed or deleted since (a deleted key compares as 0);
* ``mod_revision(bindings/<aor>/ .. its prefix end) < R + 1``: no binding was added
  or changed after R (etcd applies a compare with a range end to every key in the
  range; an empty range passes).

The Txn then puts and deletes the change's bindings; there is no other key to
write, so a registration costs one etcd write and one watch event per worker.
Two workers that computed changes from the same state cannot both succeed: the
first one moves a mod_revision (or adds a key) that the second one's compares
check, and the loser gets CONFLICT, re-reads and recomputes.

Changes are grouped into one Txn (group commit): a change waits at most
``batch_window`` seconds (10 ms by default; 0: until the end of the current
event-loop pass) for others to join it, and a Txn leaves at once when it is
full.  etcd takes at most 128 entries in each of a Txn's three lists; a change
takes one compare per binding of its state plus one, one success operation per
binding put or deleted, and one failure read, and a Txn is full when any of the
three lists would overflow.  A Txn never holds two changes of one AoR (etcd
refuses a Txn that writes a key twice: the second change waits for the first's
outcome).  Up to ``max_in_flight`` Txns are outstanding at once, so that under
heavy load throughput does not wait on one round trip; while they are, new
changes queue up and leave together.

Why a window: a Txn costs about 0.5 ms of this process's CPU (the gRPC call and
the wake-ups around it) and 0.55 ms of etcd's whatever its size, against some
60 us (this process, the benchmark's own work included) and 30 us (etcd) per
change in it, so at moderate rates the batch size decides the cost.  Measured at
5,000 changes/s (``python -m loadtest.bench_registry``): no window, 8 changes per
Txn, 1.1 cores in all; 10 ms, 54 per Txn, half a core.  The 10 ms this adds to
a REGISTER's answer is nothing next to SIP's timers (T1 = 500 ms).

When a Txn's compares fail, its failure branch reads the binding keys (keys and
mod_revisions only) of every AoR in it, in the same round trip: the AoRs whose
compares fail on what was read get CONFLICT, and the others are sent again
without them.

After a commit the store applies the change to its own cache at once
(write-through, decoded bindings), so that the next REGISTER of the AoR on this
worker sees it even before the watch event arrives; every cached key remembers
the revision it was written at, and watch events not newer than that are skipped.
A state is only as good as its revision R: it must hold every binding that
existed at R, or a commit from it could pass its compares while ignoring one.
The cache is complete as of the revision its watch reached; an AoR that this
store's own commit changed is complete as of that commit's revision only when
the change was computed from what the cache held (see ``_write_through``).
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
from typing import Any, cast

import aetcd
from aetcd import rpc

from cluster.keys import KeyLayout, prefix_end

from ._binding import Binding
from ._errors import MalformedRecordError, StoreUnavailableError
from ._etcd import MAX_TXN_OPERATIONS, LeaseNotFoundError, call, send_txn
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

_MOD = rpc.Compare.MOD
_EQUAL = rpc.Compare.EQUAL
_LESS = rpc.Compare.LESS


class CommitOutcome(enum.Enum):
    """What became of a change."""

    COMMITTED = "committed"
    """Written: durable in etcd."""
    CONFLICT = "conflict"
    """Not written: a binding of the AoR was added, changed or deleted since the
    state the change was computed from."""


@dataclass(frozen=True, slots=True)
class CommitResult:
    """The answer to ``LocationStore.commit``."""

    outcome: CommitOutcome
    """Committed or conflict."""
    revision: int
    """Committed: the etcd revision of the Txn (the AoR's state is known exactly
    as of it).  Conflict: the etcd revision at which the AoR was found changed."""

    @property
    def committed(self) -> bool:
        """Whether the change was written."""
        return self.outcome is CommitOutcome.COMMITTED


@dataclass(frozen=True, slots=True)
class AorState:
    """The bindings of one AoR as of one etcd revision: what a change is computed
    from, and the compare-and-swap token its commit checks.

    Raises ValueError when ``mod_revisions`` does not match ``bindings``.
    """

    aor: str
    """The address-of-record."""
    revision: int
    """The etcd revision R the state reflects: it holds every binding of the AoR
    that existed at R, and a commit from it fails if a binding was written after
    R.  (0 with no bindings: the AoR must have none at all.)"""
    bindings: tuple[Binding, ...] = ()
    """Every stored binding, expired ones included (their leases may not have
    deleted them yet)."""
    mod_revisions: tuple[int, ...] = ()
    """The mod_revision of each binding's key, in the order of ``bindings``."""

    def __post_init__(self) -> None:
        if len(self.mod_revisions) != len(self.bindings):
            raise ValueError("an AorState needs one mod_revision per binding")

    def active(self, now: float) -> list[Binding]:
        """The bindings that have not expired at ``now``."""
        return [binding for binding in self.bindings if binding.expires_at > now]


@dataclass(frozen=True, slots=True, kw_only=True)
class AorChange:
    """A change of one AoR's bindings, applied only if the AoR is still as in the
    state it was computed from (``plan_change`` fills the expectations in)."""

    aor: str
    """The address-of-record."""
    expected_revision: int
    """``AorState.revision`` of that state: no binding may have been written
    after it."""
    expected_bindings: tuple[tuple[str, int], ...] = ()
    """(binding id, mod_revision) of every binding of that state: each must still
    be there at that mod_revision."""
    put: tuple[Binding, ...] = ()
    """Bindings to write (new ones and refreshed ones)."""
    delete: tuple[str, ...] = ()
    """Binding ids to remove."""

    @property
    def operations(self) -> int:
        """The Txn operations the change takes (its puts and deletes)."""
        return len(self.put) + len(self.delete)

    @property
    def compares(self) -> int:
        """The Txn compares the change takes (one per expected binding, one for
        the AoR's key range)."""
        return len(self.expected_bindings) + 1


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
        expected_bindings=tuple(zip(stored, state.mod_revisions, strict=True)),
        put=tuple(
            binding for binding_id, binding in wanted.items() if stored.get(binding_id) != binding
        ),
        delete=tuple(binding_id for binding_id in stored if binding_id not in wanted),
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
    """Operations (puts and deletes) in the Txns sent."""
    failed_compares: int = 0
    """Txns whose compares failed (and were split)."""
    largest_transaction: int = 0
    """The most operations sent in one Txn."""
    most_compares: int = 0
    """The most compares sent in one Txn."""


@dataclass(slots=True)
class _Pending:
    change: AorChange
    future: asyncio.Future[CommitResult]
    queued_at: float
    operations: int
    compares: int
    prefix: bytes = b""
    encoded: list[bytes] = field(default_factory=list)
    put_keys: list[bytes] = field(default_factory=list)


# A cache entry: the binding (or, until it is read, its stored value) and the
# mod_revision of its key.
_Entry = tuple[Binding | bytes, int]


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
        super().__init__(client, keys.bindings, prefix_end(keys.bindings), name="location")
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
        # The cache: aor -> binding id -> (binding or raw value, mod_revision).
        self._bindings: dict[str, dict[str, _Entry]] = {}
        # Binding keys this store deleted (write-through) -> the revision of the
        # delete, until the watch passes it: an older put arriving later must not
        # revive the key.
        self._tombstones: dict[bytes, int] = {}
        self._tombstone_order: deque[tuple[int, bytes]] = deque()
        # AoRs whose entries a write-through made exact as of a revision the
        # watch has not reached yet -> that revision (see _write_through).
        self._exact_ahead: dict[str, int] = {}
        self._exact_ahead_order: deque[tuple[int, str]] = deque()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        # The commit queue, and what its changes take of each list of a Txn.
        self._queue: deque[_Pending] = deque()
        self._queued_operations = 0
        self._queued_compares = 0
        self._busy: set[str] = set()
        self._in_flight = 0
        self._dispatch_handle: asyncio.Handle | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()

    # ================================================================ reading

    def lookup(self, aor: str) -> list[Binding]:
        """The active bindings of ``aor`` (canonical ``user@domain``), highest q
        first (no q counts as 1.0), then the most recently registered.  No I/O."""
        entries = self._read(aor)
        if not entries:
            return []
        now = self.clock()
        active = [binding for binding, _ in entries.values() if binding.expires_at > now]
        active.sort(key=_preference)
        return active

    def aor_state(self, aor: str) -> AorState:
        """The cached state of ``aor`` for computing a change.  No I/O; may lag
        behind etcd (a commit from it then gets CONFLICT)."""
        entries = self._read(aor)
        revision = self.revision
        if self._exact_ahead:
            # This store's own commit, at a revision the watch has not reached
            # yet, made the AoR's entries exact as of that revision.
            ahead = self._exact_ahead.get(aor)
            if ahead is not None and ahead > revision:
                revision = ahead
        if not entries:
            return AorState(aor, revision)
        bindings = []
        mod_revisions = []
        for binding, mod_revision in entries.values():
            bindings.append(binding)
            mod_revisions.append(mod_revision)
        return AorState(aor, revision, tuple(bindings), tuple(mod_revisions))

    async def fetch_aor_state(self, aor: str) -> AorState:
        """Read the state of ``aor`` from etcd (one linearizable range read).
        Raises StoreUnavailableError."""
        prefix = self.keys.aor_bindings(aor)
        response = await call(
            self.client.get_range(prefix, prefix_end(prefix)), self.request_timeout, "range"
        )
        bindings = []
        mod_revisions = []
        start = len(prefix)
        for kv in response.kvs:
            binding = self._decode(aor, kv.key[start:].decode(errors="replace"), kv.value)
            if binding is not None:
                bindings.append(binding)
                mod_revisions.append(kv.mod_revision)
        return AorState(aor, response.header.revision, tuple(bindings), tuple(mod_revisions))

    @property
    def binding_count(self) -> int:
        """How many bindings the cache holds (expired ones included, and values
        not decoded yet, which may turn out malformed)."""
        return sum(len(entries) for entries in self._bindings.values())

    def _read(self, aor: str) -> dict[str, tuple[Binding, int]] | None:
        """The cache entries of ``aor``, every one decoded."""
        entries = self._bindings.get(aor)
        if entries is None:
            return None
        for value, _ in entries.values():
            if value.__class__ is bytes:
                return self._decode_entries(aor, entries)
        return cast(dict[str, tuple[Binding, int]], entries)

    def _decode_entries(
        self, aor: str, entries: dict[str, _Entry]
    ) -> dict[str, tuple[Binding, int]] | None:
        # Each raw value is decoded once and replaced: by the binding, or, when
        # it is malformed, by nothing.
        for binding_id, (value, mod_revision) in list(entries.items()):
            if isinstance(value, bytes):
                binding = self._decode(aor, binding_id, value)
                if binding is None:
                    del entries[binding_id]
                else:
                    entries[binding_id] = (binding, mod_revision)
        if not entries:
            del self._bindings[aor]
            return None
        return cast(dict[str, tuple[Binding, int]], entries)

    def _decode(self, aor: str, binding_id: str, value: bytes) -> Binding | None:
        try:
            binding = Binding.decode(value)
        except (MalformedRecordError, ValueError) as error:
            log.warning("ignoring a malformed binding %s of %s: %s", binding_id, aor, error)
            return None
        if binding.aor != aor or binding.binding_id != binding_id:
            log.warning("ignoring a binding stored under the wrong key: %s of %s", binding_id, aor)
            return None
        return binding

    # ------------------------------------------------------------ cache upkeep

    def _reset(self, kvs: list[Any], revision: int) -> None:
        bindings: dict[str, dict[str, _Entry]] = {}
        split_binding = self.keys.split_binding
        for kv in kvs:
            try:
                aor, binding_id = split_binding(kv.key)
            except ValueError:
                continue
            entries = bindings.get(aor)
            if entries is None:
                entries = bindings[aor] = {}
            entries[binding_id] = (kv.value, kv.mod_revision)
        self._bindings = bindings
        self._tombstones.clear()
        self._tombstone_order.clear()
        self._exact_ahead.clear()
        self._exact_ahead_order.clear()

    def _prune_tombstones(self, revision: int) -> None:
        order = self._tombstone_order
        while order and order[0][0] <= revision:
            tombstone_revision, key = order.popleft()
            if self._tombstones.get(key) == tombstone_revision:
                del self._tombstones[key]

    def _apply_put(self, key: bytes, value: bytes, revision: int) -> None:
        if self._tombstone_order:
            self._prune_tombstones(revision - 1)
            tombstone = self._tombstones.get(key)
            if tombstone is not None and revision <= tombstone:
                return
        try:
            aor, binding_id = self.keys.split_binding(key)
        except ValueError:
            return
        entries = self._bindings.get(aor)
        if entries is None:
            # Kept as it came: decoded when its AoR is read (if ever).
            self._bindings[aor] = {binding_id: (value, revision)}
            return
        current = entries.get(binding_id)
        if current is None or current[1] < revision:
            entries[binding_id] = (value, revision)

    def _apply_delete(self, key: bytes, revision: int) -> None:
        if self._tombstone_order:
            self._prune_tombstones(revision - 1)
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

    def _write_through(self, pending: _Pending, revision: int) -> None:
        """Apply a committed change to the cache at ``revision``.

        The Txn succeeded, so just before it etcd held exactly the bindings the
        change expected (given a state that was complete as of its revision, as
        ``aor_state`` and ``fetch_aor_state`` give).  When the cache held just
        those as well, it now holds the AoR exactly as of ``revision``, and
        ``aor_state`` says so even before the watch gets there.  Otherwise (the
        change was computed from etcd because the cache lagged) the cache may
        still miss bindings written meanwhile: its state stays at the watch's
        revision, where the bindings this commit wrote fail the range compare,
        until the watch has caught up.
        """
        change = pending.change
        aor = change.aor
        entries = self._bindings.get(aor)
        exact_ahead = self._exact_ahead
        if exact_ahead:
            order = self._exact_ahead_order
            while order and order[0][0] <= self.revision:
                ahead, ahead_aor = order.popleft()
                if exact_ahead.get(ahead_aor) == ahead:
                    del exact_ahead[ahead_aor]
        if revision <= self.revision:
            # The watch (or a full read) already brought this revision and maybe
            # later ones: applying it again could revive a key deleted since.
            # Only swap the raw values of this very write for their bindings.
            if entries:
                for binding in change.put:
                    current = entries.get(binding.binding_id)
                    if current is not None and current[1] == revision:
                        entries[binding.binding_id] = (binding, revision)
            return
        if _holds_exactly(entries, change.expected_bindings):
            exact_ahead[aor] = revision
            self._exact_ahead_order.append((revision, aor))
        else:
            exact_ahead.pop(aor, None)
        if entries is None:
            entries = self._bindings[aor] = {}
        for binding in change.put:
            current = entries.get(binding.binding_id)
            if current is None or current[1] <= revision:
                entries[binding.binding_id] = (binding, revision)
        prefix = pending.prefix
        for binding_id in change.delete:
            current = entries.get(binding_id)
            if current is not None and current[1] < revision:
                del entries[binding_id]
            self._add_tombstone(prefix + binding_id.encode(), revision)
        if not entries:
            del self._bindings[aor]

    def _add_tombstone(self, key: bytes, revision: int) -> None:
        if self._tombstones.get(key, 0) < revision:
            self._tombstones[key] = revision
            self._tombstone_order.append((revision, key))

    # ================================================================ writing

    async def commit(self, change: AorChange) -> CommitResult:
        """Apply ``change`` if its AoR is still as in the state it was computed
        from (no binding added, changed or deleted since).

        Returns COMMITTED (durable in etcd) with the Txn's revision, or CONFLICT.
        Raises StoreUnavailableError when etcd cannot be reached or does not answer
        (nothing of the change is written, or, after a timeout, it is unknown
        whether all of it was); ValueError when the change is not well-formed
        (more operations or compares than one Txn takes, a binding id twice, a
        binding of another AoR).
        """
        return await self.submit(change)

    def submit(self, change: AorChange) -> asyncio.Future[CommitResult]:
        """``commit`` without a coroutine: queue ``change`` and return the future
        of its result (the same outcomes and errors as ``commit``; ValueError is
        raised at once).  Cancelling the future withdraws a change not yet sent."""
        _check_change(change)
        loop = self._event_loop
        if loop is None:
            # Once: get_running_loop() makes a getpid() system call on 3.11.
            loop = self._event_loop = asyncio.get_running_loop()
        pending = _Pending(
            change, loop.create_future(), loop.time(), change.operations, change.compares
        )
        self._queue.append(pending)
        self._queued_operations += pending.operations
        self._queued_compares += pending.compares
        self._schedule(loop)
        return pending.future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._in_flight >= self.max_in_flight or not self._queue:
            return
        # Full: one of the Txn's three lists (compares, operations, one failure
        # read per change) is.
        full = (
            self._queued_operations >= MAX_TXN_OPERATIONS
            or self._queued_compares >= MAX_TXN_OPERATIONS
            or len(self._queue) >= MAX_TXN_OPERATIONS
        )
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
        loop = self._event_loop or asyncio.get_running_loop()
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
        compares = 0
        in_batch: set[str] = set()
        kept: deque[_Pending] = deque()
        queue = self._queue
        while queue:
            pending = queue.popleft()
            change = pending.change
            if pending.future.done():  # the caller gave up
                self._queued_operations -= pending.operations
                self._queued_compares -= pending.compares
                continue
            if change.aor in self._busy or change.aor in in_batch:
                # One change per AoR per Txn (etcd refuses a key written twice);
                # the later one waits for the earlier one's outcome.
                kept.append(pending)
                continue
            if (
                operations + pending.operations > MAX_TXN_OPERATIONS
                or compares + pending.compares > MAX_TXN_OPERATIONS
                or len(batch) == MAX_TXN_OPERATIONS  # one failure read each
            ):
                kept.append(pending)
                kept.extend(queue)
                queue.clear()
                break
            batch.append(pending)
            operations += pending.operations
            compares += pending.compares
            in_batch.add(change.aor)
        self._queue = kept
        self._queued_operations -= operations
        self._queued_compares -= compares
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
            for pending in batch:
                self._busy.discard(pending.change.aor)
            if self._queue:
                self._schedule(self._event_loop or asyncio.get_running_loop())

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        remaining = [pending for pending in batch if not pending.future.done()]
        lease_retried = False
        statistics = self.statistics
        while remaining:
            await call(self.leases.ensure(self._buckets(remaining)), self.request_timeout)
            request = self._build_txn(remaining)
            statistics.transactions += 1
            operations = len(request.success)
            statistics.operations += operations
            statistics.largest_transaction = max(statistics.largest_transaction, operations)
            statistics.most_compares = max(statistics.most_compares, len(request.compare))
            try:
                response = await call(
                    send_txn(self.client, request, self.request_timeout),
                    self.request_timeout,
                    "txn",
                )
            except LeaseNotFoundError:
                # A cached lease is gone (etcd restored, or revoked by hand).
                if lease_retried:
                    raise
                lease_retried = True
                self.leases.forget()
                continue
            revision = response.header.revision
            if response.succeeded:
                statistics.changes += len(remaining)
                for pending in remaining:
                    self._write_through(pending, revision)
                    if not pending.future.done():
                        pending.future.set_result(CommitResult(CommitOutcome.COMMITTED, revision))
                return
            # The failure branch read every AoR's binding keys: the changes whose
            # compares fail on them conflict.
            statistics.failed_compares += 1
            still: list[_Pending] = []
            for pending, found in zip(remaining, response.responses, strict=True):
                if _compares_hold(pending, found.response_range.kvs):
                    still.append(pending)
                else:
                    statistics.conflicts += 1
                    if not pending.future.done():
                        pending.future.set_result(CommitResult(CommitOutcome.CONFLICT, revision))
            if len(still) == len(remaining):
                # Cannot happen (the reads run atomically with the compares);
                # never loop on it.
                for pending in still:
                    statistics.conflicts += 1
                    if not pending.future.done():
                        pending.future.set_result(CommitResult(CommitOutcome.CONFLICT, revision))
                return
            remaining = [pending for pending in still if not pending.future.done()]

    def _buckets(self, batch: list[_Pending]) -> set[int]:
        bucket_of = self.leases.bucket_of
        return {
            bucket_of(binding.expires_at) for pending in batch for binding in pending.change.put
        }

    def _build_txn(self, batch: list[_Pending]) -> Any:
        # The TxnRequest is filled in place (see send_txn): no Python object per
        # compare or operation.
        request = rpc.TxnRequest()
        add_compare = request.compare.add
        add_success = request.success.add
        add_failure = request.failure.add
        keys = self.keys
        lease_of = self.leases.lease_of
        bucket_of = self.leases.bucket_of
        for pending in batch:
            change = pending.change
            prefix = pending.prefix
            if not prefix:
                # The key of a binding is its AoR's prefix and its id.
                prefix = pending.prefix = keys.aor_bindings(change.aor)
                pending.encoded = [binding.encode() for binding in change.put]
                pending.put_keys = [prefix + binding.binding_id.encode() for binding in change.put]
            end = prefix_end(prefix)
            for binding_id, mod_revision in change.expected_bindings:
                compare = add_compare()
                compare.key = prefix + binding_id.encode()
                compare.target = _MOD
                compare.result = _EQUAL
                compare.mod_revision = mod_revision
            compare = add_compare()
            compare.key = prefix
            compare.range_end = end
            compare.target = _MOD
            compare.result = _LESS
            compare.mod_revision = change.expected_revision + 1
            for binding, key, value in zip(
                change.put, pending.put_keys, pending.encoded, strict=True
            ):
                put = add_success().request_put
                put.key = key
                put.value = value
                put.lease = lease_of(bucket_of(binding.expires_at))
            for binding_id in change.delete:
                add_success().request_delete_range.key = prefix + binding_id.encode()
            read = add_failure().request_range
            read.key = prefix
            read.range_end = end
            read.keys_only = True
        return request

    async def stop(self) -> None:
        """Stop following etcd; commits in flight are left to finish."""
        await super().stop()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._batch_tasks, return_exceptions=True)


def _holds_exactly(
    entries: dict[str, _Entry] | None, expected: tuple[tuple[str, int], ...]
) -> bool:
    """Whether the cache ``entries`` of an AoR are the bindings ``expected``
    (binding id, mod_revision), no more, no fewer."""
    if not entries:
        return not expected
    if len(entries) != len(expected):
        return False
    for binding_id, mod_revision in expected:
        entry = entries.get(binding_id)
        if entry is None or entry[1] != mod_revision:
            return False
    return True


def _compares_hold(pending: _Pending, kvs: Iterable[Any]) -> bool:
    """Whether the compares of ``pending`` hold on the keys etcd holds (``kvs``
    of its AoR's range: keys and mod_revisions)."""
    change = pending.change
    found = {kv.key: kv.mod_revision for kv in kvs}
    limit = change.expected_revision
    if any(mod_revision > limit for mod_revision in found.values()):
        return False
    prefix = pending.prefix
    return all(
        found.get(prefix + binding_id.encode(), 0) == mod_revision
        for binding_id, mod_revision in change.expected_bindings
    )


def _preference(binding: Binding) -> tuple[float, float]:
    return (-(binding.q if binding.q is not None else 1.0), -binding.registered_at)


def _check_change(change: AorChange) -> None:
    if change.operations > MAX_TXN_OPERATIONS or change.compares > MAX_TXN_OPERATIONS:
        raise ValueError(
            f"a change of {change.operations} operations and {change.compares} compares "
            f"does not fit in one Txn ({MAX_TXN_OPERATIONS} of each at most)"
        )
    binding_ids = [binding.binding_id for binding in change.put]
    binding_ids.extend(change.delete)
    if len(set(binding_ids)) != len(binding_ids):
        raise ValueError(f"a change of {change.aor} names a binding twice")
    expected = [binding_id for binding_id, _ in change.expected_bindings]
    if len(set(expected)) != len(expected):
        raise ValueError(f"a change of {change.aor} expects a binding twice")
    for binding in change.put:
        if binding.aor != change.aor:
            raise ValueError(f"a change of {change.aor} holds a binding of {binding.aor}")
