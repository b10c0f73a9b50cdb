"""Overload control: refuse part of the new work before the queue grows without end.

After RFC 6357 (the problem: a SIP server that takes more than it can serve
answers everything late, so every transaction fails) and, in spirit, RFC 7339's
loss-based control (the overloaded server decides what fraction of the new
requests to drop).  Only workers refuse, and only requests that match no
transaction and no dialog (the worker glue checks: no To tag, not ACK or
CANCEL): the work already accepted is finished, so that calls that started
complete.  A refusal is a 503 through a server transaction, which then absorbs
the request's retransmissions instead of processing them again.

The signal is queueing delay.  Each frame a load balancer sends carries its send
time; the worker reads it when it takes the frame from its inbox.  The lowest
delay seen over a long window is the base (clock offset between machines plus
the batching delay); what exceeds the base is queueing.  Every ``interval`` the
controller looks at the *lowest* queueing delay of the interval (50 ms) (a queue that
never empties within an interval is a standing queue, CoDel's insight; a burst
that drains is not overload): above ``target`` for ``persist`` intervals in a
row it refuses a larger fraction,
below half of it a smaller one.  Refusals are spread evenly (a fraction
accumulator, not a coin), so that the refused share is exact.

Sans-IO: delays and times go in, decisions come out; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sipcore import Request, Response, make_response

__all__ = ["OverloadConfig", "OverloadControl", "refusable", "refusal"]


@dataclass(frozen=True, slots=True)
class OverloadConfig:
    """The controller's parameters."""

    target: float = 0.020
    """Queueing delay (s) above which the worker is overloaded: well under the
    500 ms of T1, so that refusing starts before UAs retransmit."""
    interval: float = 0.050
    """How often (s) the refused fraction is adjusted."""
    persist: int = 2
    """Consecutive intervals over the target before the refused share rises: a
    stall of a few tens of milliseconds (a collection, a slow etcd answer) leaves a
    backlog that drains by itself and must not turn new calls away."""
    increase: float = 0.5
    """Each overloaded interval (from the ``persist``-th on) refuses this share of
    what is still accepted more."""
    decrease: float = 0.05
    """Each calm interval refuses this much less (an absolute fraction)."""
    maximum: float = 0.95
    """The largest fraction ever refused (some new work always gets through, so
    that the controller keeps measuring)."""
    base_window: float = 60.0
    """How long (s) the lowest delay seen stays the base."""

    def __post_init__(self) -> None:
        if not (self.target > 0 and self.interval > 0 and self.base_window > 0):
            raise ValueError("target, interval and base_window must be positive")
        if not (0 < self.increase <= 1 and 0 < self.decrease <= 1 and 0 < self.maximum < 1):
            raise ValueError("increase and decrease in (0, 1], maximum in (0, 1)")
        if self.persist < 1:
            raise ValueError("persist must be at least 1")


@dataclass(slots=True)
class OverloadControl:
    """Decides which new requests a worker refuses (see the module docstring)."""

    config: OverloadConfig = field(default_factory=OverloadConfig)
    refused_fraction: float = 0.0
    """The share of new requests refused now."""
    _interval_end: float | None = None
    _interval_min: float | None = None
    _base: float | None = None
    _base_since: float = 0.0
    _next_base: float | None = None
    _credit: float = 0.0
    _over: int = 0
    """Consecutive intervals over the target so far."""

    def delay_observed(self, delay: float, now: float) -> None:
        """A frame sent ``delay`` seconds ago (by the sender's clock) was read now."""
        config = self.config
        # The base: the lowest delay of the current window, or of the previous
        # one while the current one is young (so that the base can rise again
        # when clocks are stepped, yet never forgets its minimum at once).
        if self._base is None or delay < self._base:
            self._base = delay
        if self._next_base is None or delay < self._next_base:
            self._next_base = delay
        if now - self._base_since >= config.base_window:
            self._base = self._next_base
            self._next_base = delay
            self._base_since = now
        queueing = max(delay - self._base, 0.0)
        if self._interval_min is None or queueing < self._interval_min:
            self._interval_min = queueing
        if self._interval_end is None:
            self._interval_end = now + config.interval
        elif now >= self._interval_end:
            # Intervals without any frame (an idle inbox) were calm.
            calm = int((now - self._interval_end) / config.interval)
            self._adjust(self._interval_min)
            if calm:
                self._over = 0
            self.refused_fraction = max(self.refused_fraction - calm * config.decrease, 0.0)
            self._interval_min = None
            self._interval_end = now + config.interval

    def _adjust(self, standing: float) -> None:
        config = self.config
        if standing > config.target:
            self._over += 1
            if self._over >= config.persist:
                fraction = self.refused_fraction + (1.0 - self.refused_fraction) * config.increase
                self.refused_fraction = min(fraction, config.maximum)
            return
        self._over = 0
        if standing < config.target / 2:
            self.refused_fraction = max(self.refused_fraction - config.decrease, 0.0)

    def refuse(self) -> bool:
        """Whether to refuse the next new request (call once per such request)."""
        if self.refused_fraction <= 0.0:
            return False
        self._credit += self.refused_fraction
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False


def refusable(request: Request) -> bool:
    """Whether overload control may refuse ``request``: only one that starts new
    work.  Never an ACK or a CANCEL (they end work already accepted), nor a
    request inside a dialog (a To tag, RFC 3261 12.2): calls that started are
    finished (RFC 6357 section 4)."""
    return request.method not in ("ACK", "CANCEL") and request.to.tag is None


def refusal(request: Request, retry_after: int) -> Response:
    """The 503 refusing ``request``.

    Toward a user agent (one Via) it carries Retry-After (``retry_after``
    seconds: the caller draws it with jitter, so that the refused do not all come
    back at once).  Toward another server (more than one Via) none: a proxy that
    gets a 503 with Retry-After sends nothing more to this server for that long
    (RFC 3261 21.5.4), which would shun the whole cluster behind this address.
    """
    if len(request.vias) > 1:
        return make_response(request, 503)
    return make_response(request, 503, headers=[("Retry-After", retry_after)])
