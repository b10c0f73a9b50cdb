"""``sipcluster lb``: run one load balancer until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys

import uvloop

from cluster.config import Settings

from ._balancer import ExitCode, LoadBalancer, StartupError

__all__ = ["main"]

log = logging.getLogger(__name__)


def _configure_logging(level: str) -> None:
    """Log to stderr at ``level`` unless the caller (the CLI) configured logging."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )


def main(settings: Settings) -> int:
    """Run a load balancer on uvloop with ``settings`` until SIGTERM or SIGINT.

    Returns the exit code: 0 after an orderly stop, a named non-zero ``ExitCode``
    (with one error line logged) when it cannot start: etcd unreachable, a socket
    that cannot be bound, an unusable setting.
    """
    _configure_logging(settings.log_level)
    try:
        balancer = LoadBalancer(
            settings,
            idle_timeout=settings.tcp_idle_timeout,
            flush_delay=settings.batch_delay,
        )
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(balancer.serve())
    except StartupError as error:
        log.error("sipcluster lb: %s", error)
        return int(error.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.FORCED)
