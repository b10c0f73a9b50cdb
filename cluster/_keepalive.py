"""Keeps an etcd lease alive from a thread of its own.

A process's main event loop may be busy for a while (a burst of SIP traffic, a
large cache load); its membership must not expire for that.  The thread runs its
own event loop with its own etcd connection and refreshes the lease every third
of its TTL.

A lease can still be lost: etcd expires it when no refresh reached it for its
TTL (etcd was frozen or cut off from this process for that long; a restarted
etcd renews every lease instead).  etcd then answers a refresh with a TTL of 0.
The thread reports that once through ``on_lost(lease_id)`` and stops refreshing
that lease; the owner grants a new one and sets ``lease_id`` to it, and the
thread refreshes that one from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

__all__ = ["KeepaliveThread"]

log = logging.getLogger(__name__)


class KeepaliveThread:
    """Refreshes lease ``lease_id`` on etcd ``url`` every ``ttl / 3`` seconds.

    ``on_lost`` is called (on this thread) with the id of a lease etcd no longer
    has; ``lease_id`` may be set to a new lease from any thread.
    """

    def __init__(
        self,
        url: str,
        lease_id: int,
        ttl: int,
        on_lost: Callable[[int], None] | None = None,
    ) -> None:
        self.url = url
        self.lease_id = lease_id
        self.interval = max(ttl / 3.0, 0.2)
        self.on_lost = on_lost
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._main, name="lease-keepalive", daemon=True)
        self._lost: int | None = None
        self.failures = 0

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing and wait for the thread to end."""
        self._stopped.set()
        self._thread.join(timeout=5.0)

    def _main(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        from .membership import connect_etcd  # noqa: PLC0415 - avoid an import cycle

        client = None
        while not self._stopped.is_set():
            lease_id = self.lease_id
            try:
                if lease_id != self._lost:
                    if client is None:
                        client = await connect_etcd(self.url)
                    reply = await asyncio.wait_for(client.refresh_lease(lease_id), self.interval)
                    self.failures = 0
                    if reply is not None and reply.TTL <= 0:
                        self._report_lost(lease_id)
            except Exception as error:
                self.failures += 1
                log.warning("lease keepalive failed (%s)", error)
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.close()
                client = None
            # Wait for the next refresh, or for stop().
            await asyncio.get_running_loop().run_in_executor(
                None, self._stopped.wait, self.interval
            )
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    def _report_lost(self, lease_id: int) -> None:
        self._lost = lease_id
        log.warning("lease %x expired in etcd: the membership record is gone", lease_id)
        if self.on_lost is not None:
            try:
                self.on_lost(lease_id)
            except Exception:
                log.exception("reporting the loss of lease %x failed", lease_id)
