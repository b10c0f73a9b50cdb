"""A bounded memo for the value parsers.

The same values recur on a worker: every message of a dialog carries the same
From, To and Route set, every REGISTER refresh the same To and Contact, and the
Route to the cluster is the same for everyone (the load balancer sends all
messages of a call to one worker).  Parsed values are immutable named tuples, so
one parse can serve every later message.  Errors are never memoized; the memo is
emptied when full, which bounds its memory whatever the traffic.

The default size, 32,768 values, holds a worker's share of the To and Contact
values of some 15,000 registered devices: refreshes from one device keep their
Call-ID (RFC 3261 10.2.4), so the load balancer sends them to one worker.  A
working set larger than the memo empties it before anything is reused (about
30 us more per REGISTER, measured); its memory is some tens of megabytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["memoized"]

T = TypeVar("T")


def memoized(parser: Callable[..., T], size: int = 32768) -> Callable[..., T]:
    """Return ``parser`` with a bounded memo keyed by the text it parses (its first
    argument; further arguments only shape error messages)."""
    memo: dict[str, T] = {}
    get = memo.get

    def parse(text: str, *args: str) -> T:
        value = get(text)
        if value is None:
            value = parser(text, *args)
            if len(memo) >= size:
                memo.clear()
            memo[text] = value
        return value

    parse.__doc__ = parser.__doc__
    parse.__name__ = parser.__name__
    parse.cache_clear = memo.clear  # type: ignore[attr-defined]
    return parse
