"""Keeps an etcd lease alive from a thread of its own.

A process's main event loop may be busy for a while (a burst of SIP traffic, a
large cache load); its membership must not expire for that.  The thread runs its
own event loop with its own etcd connection and refreshes the lease every third
of its TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

__all__ = ["KeepaliveThread"]

log = logging.getLogger(__name__)


class KeepaliveThread:
    """Refreshes lease ``lease_id`` on etcd ``url`` every ``ttl / 3`` seconds."""

    def __init__(self, url: str, lease_id: int, ttl: int) -> None:
        self.url = url
        self.lease_id = lease_id
        self.interval = max(ttl / 3.0, 0.2)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._main, name="lease-keepalive", daemon=True)
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
            try:
                if client is None:
                    client = await connect_etcd(self.url)
                await asyncio.wait_for(client.refresh_lease(self.lease_id), self.interval)
                self.failures = 0
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
