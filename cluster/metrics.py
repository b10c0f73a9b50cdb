"""Metric helpers shared by the load balancers and the workers.

The message path of every process counts in plain integers and dictionaries and
turns them into metric families only when Prometheus scrapes (see
``lb/_metrics.py`` and ``worker/_metrics.py``): a prometheus_client ``Counter``
or ``Histogram`` takes a lock per update and costs about as much as routing a
message.  This module holds what both need:

* ``message_label``: a message's method (requests) or status class (responses)
  from its first bytes, without parsing it; ``label_values`` expands a label
  into the ``kind``, ``method`` and ``status_class`` label values;
* ``LatencyHistogram``: a histogram observed into a preallocated list of bucket
  counts, exported as a ``HistogramMetricFamily``; ``ETCD_LATENCY`` holds the
  process's etcd request latencies, by operation;
* ``ring_families``: the ring membership gauges (active and draining workers,
  the ring's fingerprint).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from sipcore import KNOWN_METHODS

from .membership import DRAINING, MemberView

__all__ = [
    "ETCD_LATENCY",
    "ETCD_LATENCY_BUCKETS",
    "METHODS",
    "STATUS_CLASSES",
    "LatencyHistogram",
    "LatencyHistograms",
    "label_values",
    "message_label",
    "new_label_counts",
    "response_label",
    "ring_families",
]

METHODS = tuple(sorted(KNOWN_METHODS))
"""The methods counted by name (those sipcore knows); any other request counts as
``other`` (so that junk methods cannot grow the counters without end)."""

OTHER_METHOD = "other"
"""The label of a request whose method is not one of METHODS."""
OTHER_STATUS = "other"
"""The label of a response whose status code does not start with 1 to 6."""

STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx", "6xx")
"""Status class labels, indexed by ``status // 100`` (100 <= status <= 699)."""

# The methods by their first three letters (unique among METHODS), with the
# request line's start that confirms them: one short slice, one lookup and one
# ``startswith`` per request.
_REQUEST_STARTS = {method[:3].encode(): (f"{method} ".encode(), method) for method in METHODS}
assert len(_REQUEST_STARTS) == len(METHODS)
_RESPONSE_LABELS = {str(digit).encode(): STATUS_CLASSES[digit] for digit in range(1, 7)}

_LABEL_VALUES: dict[str, tuple[str, str, str]] = {
    **{method: ("request", method, "") for method in (*METHODS, OTHER_METHOD)},
    **{status: ("response", "", status) for status in STATUS_CLASSES[1:]},
    "other_response": ("response", "", OTHER_STATUS),
}


def message_label(data: bytes) -> str:
    """The method of a request or the status class (``4xx``) of a response, from
    the first bytes of a message (a few slices and a dictionary lookup).

    ``other`` for a request of another method, ``other_response`` for a response
    whose status code is not 1xx to 6xx (the receiving end refuses it).
    """
    start = _REQUEST_STARTS.get(data[:3])
    if start is not None and data.startswith(start[0]):
        return start[1]
    if data.startswith(b"SIP/2.0 "):
        return _RESPONSE_LABELS.get(data[8:9], "other_response")
    return OTHER_METHOD


def response_label(data: bytes) -> str:
    """The status class label of a message known to be a response (its status
    line may spell ``sip/2.0`` in any case)."""
    return _RESPONSE_LABELS.get(data[8:9], "other_response")


def label_values(label: str) -> tuple[str, str, str]:
    """``(kind, method, status_class)`` for a ``message_label``: ``("request",
    "INVITE", "")`` or ``("response", "", "4xx")``."""
    return _LABEL_VALUES.get(label, ("request", OTHER_METHOD, ""))


def new_label_counts() -> dict[str, int]:
    """A zero count for every ``message_label`` value (the hot path then never
    misses a key: ``counts[label] += 1``)."""
    return dict.fromkeys(_LABEL_VALUES, 0)


# ------------------------------------------------------------------ histograms

ETCD_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""Upper bounds (s) of the etcd latency buckets: a Txn on a local etcd takes a
millisecond or two; a fsync-bound disk tens of milliseconds; the request timeout
is seconds."""


class LatencyHistogram:
    """A histogram in plain numbers: ``observe`` is a bisection, a list update and
    an addition, with no lock (the event loop's thread is the only writer)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        """Observations per bucket (not cumulative); the last one is +Inf."""
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (``value <= bound`` falls in that bucket)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """The number of observations."""
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, ``+Inf`` last, as Prometheus wants them."""
        total = 0
        result = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            result.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return result


class LatencyHistograms:
    """Latency histograms by one label (the etcd operation), sharing bounds."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.by_label: dict[str, LatencyHistogram] = {}

    def __getitem__(self, label: str) -> LatencyHistogram:
        """The histogram for ``label``, created on first use."""
        histogram = self.by_label.get(label)
        if histogram is None:
            histogram = self.by_label[label] = LatencyHistogram(self.bounds)
        return histogram

    def family(self, name: str, documentation: str, label: str) -> HistogramMetricFamily:
        """The histograms as one metric family, labelled ``label``."""
        family = HistogramMetricFamily(name, documentation, labels=[label])
        for value, histogram in sorted(self.by_label.items()):
            family.add_metric([value], histogram.buckets(), histogram.sum)
        return family


ETCD_LATENCY = LatencyHistograms(ETCD_LATENCY_BUCKETS)
"""The etcd request latencies of this process (``registry._etcd.call`` records
them), by operation: ``txn`` (the location service's group commits), ``range``
(a read of one AoR), ``lease`` (lease grants), ``other``."""


# ------------------------------------------------------------------------ ring


def ring_families(prefix: str, view: MemberView | None) -> Iterator[Metric]:
    """The ring membership gauges: ``<prefix>_ring_workers{state}`` (active and
    draining workers) and ``<prefix>_ring_info{fingerprint}`` (always 1; the
    fingerprint of the ring of active workers, the same on every process that
    sees the same workers)."""
    workers = GaugeMetricFamily(
        f"{prefix}_ring_workers",
        "workers in the membership, by state (active: in the ring; draining)",
        labels=["state"],
    )
    states: Mapping[str, int] = _count_states(view)
    for state in ("active", DRAINING):
        workers.add_metric([state], states.get(state, 0))
    yield workers
    info = GaugeMetricFamily(
        f"{prefix}_ring_info",
        "the ring in use: its fingerprint (hex) and number of active workers; always 1",
        labels=["fingerprint", "workers"],
    )
    if view is not None:
        info.add_metric([f"{view.ring.fingerprint:016x}", str(len(view.ring.workers))], 1)
    yield info


def _count_states(view: MemberView | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    if view is not None:
        for record in view.workers.values():
            counts[record.state] = counts.get(record.state, 0) + 1
    return counts
