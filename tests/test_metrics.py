"""Metrics on every process, merged by the node's /metrics, and JSON logs.

The end-to-end test runs `sipcluster run --workers 2 --auth digest --log-json`
with a real etcd: a REGISTER (challenged, then accepted), a REGISTER with a wrong
password, and a call (challenged by the proxy, then INVITE, 180, 200, ACK, BYE)
must show in the node's /metrics with the right labels; the unit tests check
the counting helpers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Iterator

import pytest
from harness import Node, UserAgent, add_user, http_get, start_node
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from cluster.etcd import LocalEtcd
from cluster.logs import configure_logging
from cluster.membership import MemberView, WorkerRecord
from cluster.metrics import (
    LatencyHistograms,
    label_values,
    message_label,
    new_label_counts,
    response_label,
    ring_families,
)
from cluster.ring import Ring
from cluster.supervisor import _MergedCollector
from sipcore import build_credentials, make_ack, parse_challenge

DOMAIN = "example.com"

# ------------------------------------------------------------------ unit tests


@pytest.mark.parametrize(
    ("data", "label", "values"),
    [
        (b"INVITE sip:bob@example.com SIP/2.0\r\n", "INVITE", ("request", "INVITE", "")),
        (b"REGISTER sip:example.com SIP/2.0\r\n", "REGISTER", ("request", "REGISTER", "")),
        (b"SIP/2.0 100 Trying\r\n", "1xx", ("response", "", "1xx")),
        (b"SIP/2.0 200 OK\r\n", "2xx", ("response", "", "2xx")),
        (b"SIP/2.0 401 Unauthorized\r\n", "4xx", ("response", "", "4xx")),
        (b"SIP/2.0 603 Decline\r\n", "6xx", ("response", "", "6xx")),
        (b"SIP/2.0 999 Odd\r\n", "other_response", ("response", "", "other")),
        (b"FOO sip:x SIP/2.0\r\n", "other", ("request", "other", "")),
        (b"NOTAVERYLONGMETHODNAME sip:x SIP/2.0\r\n", "other", ("request", "other", "")),
        (b" INVITE sip:x SIP/2.0\r\n", "other", ("request", "other", "")),
        (b"invite sip:x SIP/2.0\r\n", "other", ("request", "other", "")),
        (b"", "other", ("request", "other", "")),
    ],
)
def test_message_label(data: bytes, label: str, values: tuple[str, str, str]) -> None:
    assert message_label(data) == label
    assert label_values(label) == values
    assert label in new_label_counts()


def test_response_label_takes_any_case() -> None:
    assert response_label(b"sip/2.0 486 Busy Here\r\n") == "4xx"
    assert response_label(b"SIP/2.0 0") == "other_response"


def test_latency_histogram_buckets_are_cumulative_and_le() -> None:
    histograms = LatencyHistograms((0.001, 0.01, 0.1))
    for value in (0.0005, 0.001, 0.002, 0.05, 3.0):
        histograms["txn"].observe(value)
    histograms["range"].observe(0.02)
    txn = histograms["txn"]
    assert txn.count == 5
    assert txn.sum == pytest.approx(3.0535)
    # A value equal to a bound falls in that bucket (le: less or equal).
    assert txn.buckets() == [("0.001", 2.0), ("0.01", 3.0), ("0.1", 4.0), ("+Inf", 5.0)]
    family = histograms.family("x_seconds", "x", "operation")
    registry = CollectorRegistry()
    registry.register(_Fixed([family]))
    (parsed,) = text_string_to_metric_families(generate_latest(registry).decode())
    assert parsed.type == "histogram"
    samples = {
        (s.name, s.labels.get("operation"), s.labels.get("le")): s.value for s in parsed.samples
    }
    assert samples["x_seconds_bucket", "txn", "+Inf"] == 5
    assert samples["x_seconds_count", "txn", None] == 5
    assert samples["x_seconds_bucket", "range", "0.01"] == 0
    assert samples["x_seconds_bucket", "range", "0.1"] == 1


def test_ring_families() -> None:
    view = MemberView(
        workers={
            "w1": WorkerRecord("w1", "ipc://a"),
            "w2": WorkerRecord("w2", "ipc://b"),
            "w3": WorkerRecord("w3", "ipc://c", state="draining"),
        },
        ring=Ring(["w1", "w2"]),
    )
    workers, info = ring_families("p", view)
    assert {tuple(s.labels.values()): s.value for s in workers.samples} == {
        ("active",): 2,
        ("draining",): 1,
    }
    (sample,) = info.samples
    assert sample.labels == {
        "fingerprint": f"{Ring(['w1', 'w2']).fingerprint:016x}",
        "workers": "2",
    }
    assert sample.value == 1
    workers, info = ring_families("p", None)
    assert [s.value for s in workers.samples] == [0, 0]
    assert info.samples == []


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def test_the_supervisor_merges_histograms_of_several_processes() -> None:
    texts = []
    for latency in (0.002, 0.2):
        histograms = LatencyHistograms((0.01, 0.1))
        histograms["txn"].observe(latency)
        registry = CollectorRegistry()
        registry.register(_Fixed([histograms.family("h_seconds", "h", "operation")]))
        texts.append(generate_latest(registry).decode())
    families = []
    for name, text in zip(("worker-1", "worker-2"), texts, strict=True):
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                sample.labels["process"] = name
            families.append(family)
    registry = CollectorRegistry()
    registry.register(_MergedCollector(families))
    (merged,) = text_string_to_metric_families(generate_latest(registry).decode())
    assert merged.type == "histogram"
    buckets = {
        (s.labels["process"], s.labels["le"]): s.value
        for s in merged.samples
        if s.name == "h_seconds_bucket"
    }
    assert buckets == {
        ("worker-1", "0.01"): 1,
        ("worker-1", "0.1"): 1,
        ("worker-1", "+Inf"): 1,
        ("worker-2", "0.01"): 0,
        ("worker-2", "0.1"): 0,
        ("worker-2", "+Inf"): 1,
    }


def test_json_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("worker", "info", json_lines=True)
        logging.getLogger("worker.test").info("hello %s", "there")
        logging.getLogger("worker.test").debug("not written")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("worker.test").exception("failed")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "hello there"
    assert (first["level"], first["role"], first["logger"]) == ("info", "worker", "worker.test")
    assert first["time"].endswith("Z")
    assert second["level"] == "error"
    assert "ValueError: boom" in second["exception"]


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def node(etcd_server: LocalEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node with --auth digest, JSON logs and two users."""
    node = start_node(
        etcd_server.url,
        tmp_path_factory.mktemp("node"),
        auth="digest",
        domain=DOMAIN,
        extra=["--log-json"],
    )
    for user in ("alice", "bob"):
        add_user(node, f"{user}@{DOMAIN}", f"{user}-secret")
    yield node
    assert node.stop() == 0, "\n".join(node.log[-30:])


async def _traffic(node: Node) -> None:
    alice, bob = [
        await UserAgent(name, DOMAIN).start((node.host, node.port)) for name in ("alice", "bob")
    ]
    # A failed authentication, then two registrations (each challenged first).
    assert (await alice.register("wrong-password")).status == 401
    assert (await alice.register("alice-secret")).status == 200
    assert (await bob.register("bob-secret")).status == 200
    # A call: challenged by the proxy (407, ACKed), then with credentials.
    invite = alice.request("INVITE", f"sip:{bob.aor}")
    alice.send(invite)
    challenge = await alice.receive_response(200, method="INVITE")
    assert challenge.status == 407
    alice.send(make_ack(invite, challenge))
    credentials = build_credentials(
        parse_challenge(challenge.get_all("Proxy-Authenticate")[0]),
        username="alice",
        password="alice-secret",
        method="INVITE",
        uri=f"sip:{bob.aor}",
        cnonce=secrets.token_hex(8),
    )
    invite = alice.request(
        "INVITE", f"sip:{bob.aor}", headers=[("Proxy-Authorization", str(credentials))]
    )
    alice.send(invite)
    received = await bob.receive_request("INVITE")
    bob.answer(received, 180)
    bob.answer(received, 200)
    ok = await alice.receive_response(200, method="INVITE")
    assert ok.status == 200
    routes: list[tuple[str, object]] = [
        ("Route", value) for value in reversed(ok.get_all("Record-Route"))
    ]
    contact = str(ok.contacts[0].uri)
    alice.send(
        alice.request(
            "ACK",
            contact,
            to=f"sip:{bob.aor}",
            to_tag=ok.to.tag,
            cseq=invite.cseq.number,
            headers=routes,
        )
    )
    await bob.receive_request("ACK")
    alice.send(alice.request("BYE", contact, to=f"sip:{bob.aor}", to_tag=ok.to.tag, headers=routes))
    bye = await bob.receive_request("BYE")
    bob.answer(bye, 200)
    assert (await alice.receive_response(200, method="BYE")).status == 200
    await alice.close()
    await bob.close()


def _samples(node: Node) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The node's /metrics: samples by name."""
    code, text = http_get(node.http_port, "/metrics")
    assert code == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _total(samples: list[tuple[dict[str, str], float]], **labels: str) -> float:
    return sum(
        value
        for sample_labels, value in samples
        if all(sample_labels.get(name) == wanted for name, wanted in labels.items())
    )


def test_the_node_metrics_cover_messages_auth_etcd_and_the_ring(node: Node) -> None:
    asyncio.run(_traffic(node))
    samples = _samples(node)

    received = samples["sipcluster_worker_messages_received_total"]
    assert _total(received, kind="request", method="REGISTER", status_class="") >= 5
    assert _total(received, kind="request", method="INVITE", status_class="") == 2
    assert _total(received, kind="request", method="ACK", status_class="") == 2
    assert _total(received, kind="request", method="BYE") == 1
    # Responses received from bob, by their CSeq method and status class.
    assert _total(received, kind="response", method="INVITE", status_class="1xx") == 1
    assert _total(received, kind="response", method="INVITE", status_class="2xx") == 1
    assert _total(received, kind="response", method="BYE", status_class="2xx") == 1

    sent = samples["sipcluster_worker_messages_sent_total"]
    assert _total(sent, transport="udp", kind="request", method="INVITE") == 1
    assert _total(sent, transport="udp", kind="request", method="ACK") == 1
    assert _total(sent, transport="udp", kind="request", method="BYE") == 1
    # 401 (three REGISTER challenges, the wrong password's included) and 407.
    assert _total(sent, transport="udp", kind="response", status_class="4xx") >= 4
    assert _total(sent, kind="response", status_class="2xx") >= 4
    assert _total(sent, kind="response", status_class="1xx") >= 1

    challenges = samples["sipcluster_worker_auth_challenges_total"]
    assert _total(challenges, status="401", reason="no_credentials") >= 3
    assert _total(challenges, status="407", reason="no_credentials") == 1
    failures = samples["sipcluster_worker_auth_failures_total"]
    assert _total(failures, status="401", reason="wrong_response") == 1

    lb_received = samples["sipcluster_lb_messages_received_total"]
    assert _total(lb_received, transport="udp", direction="request", method="INVITE") == 2
    assert _total(lb_received, transport="udp", direction="response", status_class="2xx") == 2
    lb_sent = samples["sipcluster_lb_messages_sent_total"]
    assert _total(lb_sent, transport="udp", direction="response", status_class="4xx") >= 4
    assert _total(lb_sent, transport="udp", direction="request", method="BYE") == 1
    assert _total(samples["sipcluster_lb_forwarding_latency_seconds_count"]) >= 10

    # The location service's commits went through etcd Txns: observed and merged.
    latency_count = samples["sipcluster_worker_etcd_request_duration_seconds_count"]
    txns = _total(latency_count, operation="txn")
    assert txns >= 2
    buckets = samples["sipcluster_worker_etcd_request_duration_seconds_bucket"]
    assert _total(buckets, operation="txn", le="+Inf") == txns
    workers = {labels["process"] for labels, _ in samples["sipcluster_worker_transactions"]}
    assert len(workers) == 2
    assert {labels["process"] for labels, _ in buckets} <= workers

    # Every process sees the same ring of two active workers.
    for prefix, names in (("sipcluster_lb", {"lb-0"}), ("sipcluster_worker", workers)):
        for process in names:
            ring = samples[f"{prefix}_ring_workers"]
            assert _total(ring, state="active", process=process) == 2
            assert _total(ring, state="draining", process=process) == 0
    fingerprints = {labels["fingerprint"] for labels, _ in samples["sipcluster_lb_ring_info"]}
    fingerprints |= {labels["fingerprint"] for labels, _ in samples["sipcluster_worker_ring_info"]}
    assert len(fingerprints) == 1
    assert all(labels["workers"] == "2" for labels, _ in samples["sipcluster_worker_ring_info"])
    assert _total(samples["sipcluster_worker_draining"]) == 0


def test_the_overload_rejections_family_is_exported(node: Node) -> None:
    code, text = http_get(node.http_port, "/metrics")
    assert code == 200
    assert "# TYPE sipcluster_worker_overload_rejections_total counter" in text


def test_log_json_writes_json_lines(node: Node) -> None:
    # Every line the node and its children wrote so far is a JSON object (the
    # supervisor writes no banner for people under --log-json).
    log_lines = list(node.log)
    assert log_lines
    roles = set()
    for line in log_lines:
        entry = json.loads(line)
        assert {"time", "level", "role", "logger", "message"} <= set(entry)
        roles.add(entry["role"])
    assert {"run", "lb", "worker"} <= roles
