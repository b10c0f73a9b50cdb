"""A bounded memo for the value parsers.

The same values recur on a worker: every message of a dialog carries the same
From, To and Route set, every REGISTER refresh the same To and Contact, and the
Route to the cluster is the same for everyone (the load balancer sends all
messages of a call to one worker).  Parsed values are immutable named tuples, so
one parse can serve every later message.  Errors are never memoized.

The memo is a least-recently-used cache (``functools.lru_cache``, in C): when it
is full, each new value pushes out the one unused for longest.  Values seen once
(a REGISTER's From carries a new tag each time) pass through it without
evicting what recurs, and memory stays bounded without ever freeing everything
at once: the first memo emptied itself when full, and freeing its 32,768 values
stalled a worker's event loop 20-30 ms every 13 s at 2,500 REGISTER/s per worker
(measured; docs/performance.md, "Before and after").

The default size, 32,768 values, holds a worker's share of the To and Contact
values of some 15,000 registered devices: refreshes from one device keep their
Call-ID (RFC 3261 10.2.4), so the load balancer sends them to one worker.  Its
memory is some tens of megabytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

__all__ = ["memoized"]

T = TypeVar("T")


def memoized(parser: Callable[..., T], size: int = 32768) -> Callable[..., T]:
    """Return ``parser`` with a bounded memo keyed by its arguments (the text it
    parses; further arguments only shape error messages).  The result has
    ``cache_clear()``."""
    return functools.lru_cache(maxsize=size)(parser)
