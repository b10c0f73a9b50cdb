"""Leases shared by every binding that expires in the same time bucket.

A LeaseGrant costs about 100 us of etcd CPU and is a raft entry of its own, and
it cannot go inside a Txn (../shared/PERFORMANCE-NOTES.md): one lease per binding
would cost more than the bindings.  Time is cut into buckets (10 s by default); a
binding expiring at ``t`` goes on the lease of the bucket ending at or after
``t``, granted on demand with a TTL reaching ``margin`` seconds past the bucket's
end, and cached until the bucket ends.  etcd then deletes the bindings of a bucket
with one lease expiry, shortly after the last of them expired.  Readers never rely
on that deletion for correctness: they compare ``expires_at`` with the clock
(after an etcd restart leases are renewed to their full TTL).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable

import aetcd

from cluster.metrics import ETCD_LATENCY

__all__ = ["LeaseBuckets"]


class LeaseBuckets:
    """Grants and caches one lease per expiry bucket, for one etcd client."""

    def __init__(
        self,
        client: aetcd.Client,
        *,
        clock: Callable[[], float],
        bucket_seconds: float = 10.0,
        margin: float = 5.0,
    ) -> None:
        if not bucket_seconds > 0 or margin < 0:
            raise ValueError("bucket_seconds must be positive and margin not negative")
        self.client = client
        self.clock = clock
        self.bucket_seconds = bucket_seconds
        self.margin = margin
        self.granted = 0
        """How many leases were granted so far."""
        self._leases: dict[int, int] = {}
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def bucket_of(self, expires_at: float) -> int:
        """The bucket of an expiry time: the index of the bucket ending at or
        after it."""
        return math.ceil(expires_at / self.bucket_seconds)

    def lease_of(self, bucket: int) -> int:
        """The cached lease of ``bucket``; KeyError when ``ensure`` did not get it."""
        return self._leases[bucket]

    def forget(self) -> None:
        """Drop every cached lease (etcd said one no longer exists)."""
        self._leases.clear()

    async def ensure(self, buckets: Iterable[int]) -> None:
        """Make sure every bucket in ``buckets`` has a lease, granting the missing
        ones concurrently (one grant per bucket even when several callers ask at
        once).  Raises what the grant raises (aetcd errors)."""
        now = self.clock()
        self._drop_ended(now)
        waits = []
        for bucket in set(buckets):
            if bucket in self._leases:
                continue
            pending = self._pending.get(bucket)
            if pending is None:
                pending = asyncio.get_running_loop().create_future()
                self._pending[bucket] = pending
                task = asyncio.get_running_loop().create_task(self._grant(bucket, pending, now))
                # The loop keeps only a weak reference to a task.
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            waits.append(pending)
        if waits:
            await asyncio.gather(*(asyncio.shield(wait) for wait in waits))

    def _drop_ended(self, now: float) -> None:
        ended = now / self.bucket_seconds
        if self._leases and min(self._leases) < ended:
            for bucket in [bucket for bucket in self._leases if bucket < ended]:
                del self._leases[bucket]

    async def _grant(self, bucket: int, pending: asyncio.Future[int], now: float) -> None:
        end = bucket * self.bucket_seconds
        ttl = max(1, math.ceil(end - now + self.margin))
        started = time.perf_counter()
        try:
            lease = await self.client.lease(ttl)
        except asyncio.CancelledError:
            pending.cancel()
            raise
        except Exception as error:
            if not pending.done():
                pending.set_exception(error)
            # Retrieve it so that asyncio does not log it when nobody waits.
            pending.exception()
        else:
            self.granted += 1
            self._leases[bucket] = lease.id
            if not pending.done():
                pending.set_result(lease.id)
        finally:
            ETCD_LATENCY["lease"].observe(time.perf_counter() - started)
            self._pending.pop(bucket, None)
