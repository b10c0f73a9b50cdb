"""The worker's Prometheus metrics.

The message path only adds to plain integers; the numbers become metric families
when Prometheus scrapes (a collector), so that counting costs a dictionary update
per message instead of a labelled, locked counter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["WorkerMetrics"]


class WorkerMetrics:
    """Counters of one worker, exported by a collector."""

    def __init__(
        self,
        *,
        transactions: Callable[[], int],
        bindings: Callable[[], int],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.received: Counter[tuple[str, str]] = Counter()
        """SIP messages received, by (request|response, method)."""
        self.sent: Counter[str] = Counter()
        """SIP messages sent, by transport."""
        self.malformed = 0
        """Messages refused as malformed."""
        self.forwarded = 0
        """Requests forwarded to the worker holding their call (handoff)."""
        self.draining = False
        """Whether the worker is draining."""
        self._transactions = transactions
        self._bindings = bindings
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """The metric families (called by prometheus_client on a scrape)."""
        received = CounterMetricFamily(
            "sipcluster_worker_messages_received",
            "SIP messages received",
            labels=["kind", "method"],
        )
        for (kind, method), count in sorted(self.received.items()):
            received.add_metric([kind, method], count)
        yield received
        sent = CounterMetricFamily(
            "sipcluster_worker_messages_sent", "SIP messages sent", labels=["transport"]
        )
        for transport, count in sorted(self.sent.items()):
            sent.add_metric([transport], count)
        yield sent
        yield CounterMetricFamily(
            "sipcluster_worker_malformed_messages",
            "Messages refused as malformed",
            value=self.malformed,
        )
        yield CounterMetricFamily(
            "sipcluster_worker_handoff_forwarded",
            "Requests forwarded to the worker holding the call",
            value=self.forwarded,
        )
        yield GaugeMetricFamily(
            "sipcluster_worker_transactions", "Live SIP transactions", value=self._transactions()
        )
        yield GaugeMetricFamily(
            "sipcluster_worker_draining",
            "1 while the worker drains (takes no new calls), else 0",
            value=1.0 if self.draining else 0.0,
        )
        yield GaugeMetricFamily(
            "sipcluster_worker_bindings", "Bindings in the location cache", value=self._bindings()
        )
