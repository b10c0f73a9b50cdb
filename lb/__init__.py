"""lb: the load balancer process.

It owns the SIP sockets, hashes each request's Call-ID onto the ring of active
workers, and carries messages to and from the workers over ZeroMQ in batched
msgpack frames (``cluster/protocol.py``).  ``main(settings)`` runs it as
``sipcluster lb``; ``LoadBalancer`` is the same thing inside a running event loop.
"""

from ._balancer import (
    CONNECT_TIMEOUT,
    IDLE_TIMEOUT,
    ExitCode,
    LoadBalancer,
    StartupError,
)
from ._classify import DatagramKind, classify_datagram
from ._main import main
from ._metrics import DROP_REASONS, Counters

__all__ = [
    "CONNECT_TIMEOUT",
    "DROP_REASONS",
    "IDLE_TIMEOUT",
    "Counters",
    "DatagramKind",
    "ExitCode",
    "LoadBalancer",
    "StartupError",
    "classify_datagram",
    "main",
]
