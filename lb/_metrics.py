"""The load balancer's metrics.

The hot path counts in plain integer attributes (``Counters``): a
prometheus_client ``Counter.inc()`` takes a lock and would cost about as much as
routing the message.  A collector turns the integers into metric families when
Prometheus scrapes.  The two histograms are observed once per frame, not once
per message.

Each load balancer has a registry of its own, so that several can live in one
process (the tests run them side by side).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cluster.membership import MemberView
from cluster.metrics import label_values, new_label_counts, ring_families

__all__ = ["DROP_REASONS", "Counters", "Metrics"]

DROP_REASONS = (
    "not_sip",
    "no_worker",
    "zmq_full",
    "bad_envelope",
    "send_failed",
    "tcp_overflow",
)
"""Why a message was dropped: it was not SIP; the ring was empty (or its worker
left before the flush); the worker's ZeroMQ queue was full or not connected; a
worker sent an envelope the load balancer cannot use; the socket refused the
send (UDP buffer full, TCP connection failed); a TCP connection's write buffer
overflowed and the connection was closed."""


class Counters:
    """Plain integers the hot path increments; read at scrape time.

    Messages count by transport and direction in dictionaries keyed by
    ``cluster.metrics.message_label`` (the method of a request, the status class
    of a response), which hold every label from the start:
    ``counters.udp_received[message_label(data)] += 1``.
    """

    __slots__ = (
        "bad_envelope",
        "held_back",
        "keepalives_answered",
        "no_worker",
        "not_sip",
        "send_failed",
        "tcp_overflow",
        "tcp_received",
        "tcp_sent",
        "udp_received",
        "udp_sent",
        "zmq_full",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        self.udp_received = new_label_counts()
        self.tcp_received = new_label_counts()
        self.udp_sent = new_label_counts()
        self.tcp_sent = new_label_counts()

    udp_received: dict[str, int]
    """Messages received over UDP, by label."""
    tcp_received: dict[str, int]
    """Messages received over TCP, by label."""
    udp_sent: dict[str, int]
    """Messages sent over UDP, by label."""
    tcp_sent: dict[str, int]
    """Messages sent over TCP, by label."""
    keepalives_answered: int
    not_sip: int
    no_worker: int
    zmq_full: int
    bad_envelope: int
    send_failed: int
    tcp_overflow: int
    held_back: int
    """Messages that waited for room in a full worker queue (TCP and control
    envelopes; UDP ones are dropped as zmq_full)."""

    @property
    def udp_requests_received(self) -> int:
        """Requests received over UDP."""
        return _total(self.udp_received, "request")

    @property
    def udp_responses_received(self) -> int:
        """Responses received over UDP."""
        return _total(self.udp_received, "response")

    @property
    def tcp_requests_received(self) -> int:
        """Requests received over TCP."""
        return _total(self.tcp_received, "request")

    @property
    def tcp_responses_received(self) -> int:
        """Responses received over TCP."""
        return _total(self.tcp_received, "response")

    @property
    def udp_requests_sent(self) -> int:
        """Requests sent over UDP."""
        return _total(self.udp_sent, "request")

    @property
    def udp_responses_sent(self) -> int:
        """Responses sent over UDP."""
        return _total(self.udp_sent, "response")

    @property
    def tcp_requests_sent(self) -> int:
        """Requests sent over TCP."""
        return _total(self.tcp_sent, "request")

    @property
    def tcp_responses_sent(self) -> int:
        """Responses sent over TCP."""
        return _total(self.tcp_sent, "response")

    def dropped(self, reason: str) -> int:
        """The count of drops for ``reason`` (one of DROP_REASONS)."""
        value: int = getattr(self, reason)
        return value


def _total(counts: dict[str, int], kind: str) -> int:
    return sum(count for label, count in counts.items() if label_values(label)[0] == kind)


class _CounterCollector:
    """Turns ``Counters`` and the gauges' sources into metric families."""

    def __init__(
        self,
        counters: Counters,
        active_workers: Callable[[], int],
        tcp_connections: Callable[[], int],
        view: Callable[[], MemberView | None],
    ) -> None:
        self._counters = counters
        self._active_workers = active_workers
        self._tcp_connections = tcp_connections
        self._view = view

    def collect(self) -> Iterable[Metric]:
        """The current values (called by the registry at scrape time)."""
        counters = self._counters
        labels = ["transport", "direction", "method", "status_class"]
        received = CounterMetricFamily(
            "sipcluster_lb_messages_received",
            "SIP messages received from clients, by transport, direction (request, "
            "response), method (requests) and status class (responses)",
            labels=labels,
        )
        sent = CounterMetricFamily(
            "sipcluster_lb_messages_sent",
            "SIP messages sent to clients on the workers' behalf, by transport, "
            "direction, method (requests) and status class (responses)",
            labels=labels,
        )
        for family, by_transport in (
            (received, (("udp", counters.udp_received), ("tcp", counters.tcp_received))),
            (sent, (("udp", counters.udp_sent), ("tcp", counters.tcp_sent))),
        ):
            for transport, counts in by_transport:
                for label, count in counts.items():
                    if count:
                        family.add_metric([transport, *label_values(label)], count)
        dropped = CounterMetricFamily(
            "sipcluster_lb_dropped",
            "messages dropped, by reason (not_sip, no_worker, zmq_full, bad_envelope, "
            "send_failed, tcp_overflow)",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], counters.dropped(reason))
        held_back = CounterMetricFamily(
            "sipcluster_lb_held_back",
            "messages that waited for room in a full worker queue instead of being dropped "
            "(TCP and control messages)",
            value=counters.held_back,
        )
        keepalives = CounterMetricFamily(
            "sipcluster_lb_keepalives_answered",
            "CRLFCRLF keepalive pings answered with CRLF (RFC 5626 4.4.1)",
            value=counters.keepalives_answered,
        )
        workers = GaugeMetricFamily(
            "sipcluster_lb_active_workers",
            "active workers in the ring",
            value=self._active_workers(),
        )
        connections = GaugeMetricFamily(
            "sipcluster_lb_tcp_connections", "open TCP connections", value=self._tcp_connections()
        )
        return [
            received,
            sent,
            dropped,
            held_back,
            keepalives,
            workers,
            connections,
            *ring_families("sipcluster_lb", self._view()),
        ]

    def describe(self) -> Iterable[Metric]:
        """The families, for the registry's duplicate check."""
        return self.collect()


class Metrics:
    """The registry and the instruments of one load balancer."""

    def __init__(
        self,
        counters: Counters,
        *,
        active_workers: Callable[[], int],
        tcp_connections: Callable[[], int],
        view: Callable[[], MemberView | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.counters = counters
        self.registry.register(_CounterCollector(counters, active_workers, tcp_connections, view))
        self.frame_envelopes = Histogram(
            "sipcluster_lb_frame_envelopes",
            "envelopes per ZeroMQ frame sent to a worker",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.forwarding_latency = Histogram(
            "sipcluster_lb_forwarding_latency_seconds",
            "time from a message's receipt to its frame leaving for the worker, "
            "observed once per frame for its oldest message",
            buckets=(
                0.00001,
                0.000025,
                0.00005,
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.1,
            ),
            registry=self.registry,
        )
