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
    """Plain integers the hot path increments; read at scrape time."""

    __slots__ = (
        "bad_envelope",
        "keepalives_answered",
        "no_worker",
        "not_sip",
        "send_failed",
        "tcp_overflow",
        "tcp_requests_received",
        "tcp_requests_sent",
        "tcp_responses_received",
        "tcp_responses_sent",
        "udp_requests_received",
        "udp_requests_sent",
        "udp_responses_received",
        "udp_responses_sent",
        "zmq_full",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    udp_requests_received: int
    udp_responses_received: int
    tcp_requests_received: int
    tcp_responses_received: int
    udp_requests_sent: int
    udp_responses_sent: int
    tcp_requests_sent: int
    tcp_responses_sent: int
    keepalives_answered: int
    not_sip: int
    no_worker: int
    zmq_full: int
    bad_envelope: int
    send_failed: int
    tcp_overflow: int

    def dropped(self, reason: str) -> int:
        """The count of drops for ``reason`` (one of DROP_REASONS)."""
        value: int = getattr(self, reason)
        return value


class _CounterCollector:
    """Turns ``Counters`` and the gauges' sources into metric families."""

    def __init__(
        self,
        counters: Counters,
        active_workers: Callable[[], int],
        tcp_connections: Callable[[], int],
    ) -> None:
        self._counters = counters
        self._active_workers = active_workers
        self._tcp_connections = tcp_connections

    def collect(self) -> Iterable[Metric]:
        """The current values (called by the registry at scrape time)."""
        counters = self._counters
        labels = ["transport", "direction"]
        received = CounterMetricFamily(
            "sipcluster_lb_messages_received",
            "SIP messages received from clients and forwarded to workers",
            labels=labels,
        )
        sent = CounterMetricFamily(
            "sipcluster_lb_messages_sent",
            "SIP messages sent to clients on the workers' behalf",
            labels=labels,
        )
        for transport in ("udp", "tcp"):
            for direction in ("request", "response"):
                received.add_metric(
                    [transport, direction],
                    getattr(counters, f"{transport}_{direction}s_received"),
                )
                sent.add_metric(
                    [transport, direction], getattr(counters, f"{transport}_{direction}s_sent")
                )
        dropped = CounterMetricFamily(
            "sipcluster_lb_dropped",
            "messages dropped, by reason (not_sip, no_worker, zmq_full, bad_envelope, "
            "send_failed, tcp_overflow)",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], counters.dropped(reason))
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
        return [received, sent, dropped, keepalives, workers, connections]

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
    ) -> None:
        self.registry = CollectorRegistry()
        self.counters = counters
        self.registry.register(_CounterCollector(counters, active_workers, tcp_connections))
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
