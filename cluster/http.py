"""A small HTTP endpoint for health checks and metrics: /healthz, /readyz, /metrics.

Each process serves its own (the Helm chart probes them) and the supervisor of
``sipcluster run`` serves one for the whole node.  Only GET and HEAD, one request
per connection: probes and Prometheus need nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

__all__ = ["HealthServer"]

log = logging.getLogger(__name__)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class HealthServer:
    """Serves /healthz (alive), /readyz (``ready()`` says) and /metrics."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ready: Callable[[], bool],
        metrics: Callable[[], Awaitable[bytes]] | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.host = host
        self.port = port
        self.ready = ready
        self.registry = registry
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; ``port`` 0 picks a free port, read back from ``self.port``."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        """``host:port`` being served."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            status, content_type, body = await self._answer(request_line)
            method = request_line.split(b" ", 1)[0]
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head if method == b"HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, request_line: bytes) -> tuple[int, str, bytes]:
        parts = request_line.split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if target == b"/healthz":
            return 200, "text/plain", b"ok\n"
        if target == b"/readyz":
            if self.ready():
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"not ready\n"
        if target == b"/metrics":
            if self._metrics is not None:
                return 200, CONTENT_TYPE_LATEST, await self._metrics()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return 404, "text/plain", b"not found\n"
