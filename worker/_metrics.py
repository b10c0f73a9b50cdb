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

from cluster.membership import MemberView, last_published_view
from cluster.metrics import (
    ETCD_LATENCY,
    STATUS_CLASSES,
    LatencyHistograms,
    label_values,
    message_label,
    ring_families,
)

from .auth import AUTH_COUNTERS, AuthCounters

__all__ = ["WorkerMetrics"]


class WorkerMetrics:
    """Counters of one worker, exported by a collector."""

    message_label = staticmethod(message_label)
    """``cluster.metrics.message_label``, for the message path: the key of ``sent``."""

    def __init__(
        self,
        *,
        transactions: Callable[[], int],
        bindings: Callable[[], int],
        registry: CollectorRegistry = REGISTRY,
        auth: AuthCounters = AUTH_COUNTERS,
        etcd_latency: LatencyHistograms = ETCD_LATENCY,
        view: Callable[[], MemberView | None] = last_published_view,
    ) -> None:
        """``auth``, ``etcd_latency`` and ``view`` default to the process's own
        (one worker per process): its authenticators' counters, its etcd calls'
        latencies and its membership watch's view."""
        self.received: Counter[tuple[str, str, int]] = Counter()
        """SIP messages received, by (request|response, method, status // 100):
        ``("request", "INVITE", 0)``, ``("response", "INVITE", 1)`` (a
        response's method is its CSeq method)."""
        self.sent: Counter[tuple[str, str]] = Counter()
        """SIP messages sent, by (transport, ``cluster.metrics.message_label``)."""
        self.malformed = 0
        """Messages refused as malformed."""
        self.forwarded = 0
        """Requests forwarded to the worker holding their call (handoff)."""
        self.draining = False
        """Whether the worker is draining."""
        self.overload_rejected: Counter[str] = Counter()
        """New requests refused with 503 by overload control, by method."""
        self._transactions = transactions
        self._bindings = bindings
        self._auth = auth
        self._etcd_latency = etcd_latency
        self._view = view
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """The metric families (called by prometheus_client on a scrape)."""
        received = CounterMetricFamily(
            "sipcluster_worker_messages_received",
            "SIP messages received, by kind, method (a response's CSeq method) and "
            "status class (responses)",
            labels=["kind", "method", "status_class"],
        )
        for (kind, method, status_class), count in sorted(self.received.items()):
            received.add_metric(
                [kind, method, STATUS_CLASSES[status_class] if status_class else ""], count
            )
        yield received
        sent = CounterMetricFamily(
            "sipcluster_worker_messages_sent",
            "SIP messages sent, by transport, kind, method (requests) and status class (responses)",
            labels=["transport", "kind", "method", "status_class"],
        )
        for (transport, label), count in sorted(self.sent.items()):
            sent.add_metric([transport, *label_values(label)], count)
        yield sent
        yield from self._auth_families()
        yield self._etcd_latency.family(
            "sipcluster_worker_etcd_request_duration_seconds",
            "etcd request latency, by operation (txn: the location service's group "
            "commits; range: an AoR read; lease: a lease grant)",
            "operation",
        )
        yield from ring_families("sipcluster_worker", self._view())
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
        rejected = CounterMetricFamily(
            "sipcluster_worker_overload_rejections",
            "New requests refused with 503 by overload control",
            labels=["method"],
        )
        for method, count in sorted(self.overload_rejected.items()):
            rejected.add_metric([method], count)
        yield rejected
        yield GaugeMetricFamily(
            "sipcluster_worker_draining",
            "1 while the worker drains (takes no new calls), else 0",
            value=1.0 if self.draining else 0.0,
        )
        yield GaugeMetricFamily(
            "sipcluster_worker_bindings", "Bindings in the location cache", value=self._bindings()
        )

    def _auth_families(self) -> Iterator[Metric]:
        challenges = CounterMetricFamily(
            "sipcluster_worker_auth_challenges",
            "Digest challenges sent to requests without credentials or with a stale "
            "nonce, by status (401, 407) and reason",
            labels=["status", "reason"],
        )
        for (status, reason), count in sorted(self._auth.challenges.items()):
            challenges.add_metric([str(status), reason], count)
        yield challenges
        failures = CounterMetricFamily(
            "sipcluster_worker_auth_failures",
            "Requests whose credentials failed (401, 407: wrong, unknown user, bad "
            "nonce ...; 400: malformed) or whose authenticated user was refused (403), "
            "by status and reason",
            labels=["status", "reason"],
        )
        for (status, reason), count in sorted(self._auth.failures.items()):
            failures.add_metric([str(status), reason], count)
        yield failures
