"""Overload control: the controller on virtual time (worker/overload.py), what
may be refused and how, and a node offered more calls than it can serve."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from harness import metric_sum, start_node
from sipp_load import CallLoad

from cluster.etcd import LocalEtcd
from sipcore import Request, parse_message
from worker.overload import OverloadConfig, OverloadControl, refusable, refusal

CONFIG = OverloadConfig()  # target 20 ms, interval 50 ms


def feed(control: OverloadControl, start: float, seconds: float, delay: float) -> float:
    """Frames every millisecond from ``start`` for ``seconds``, each ``delay``
    seconds old; returns the time after the last."""
    now = start
    for _ in range(round(seconds * 1000)):
        control.delay_observed(delay, now)
        now += 0.001
    return now


def refused_of(control: OverloadControl, requests: int) -> int:
    return sum(control.refuse() for _ in range(requests))


def test_a_worker_without_queue_refuses_nothing() -> None:
    control = OverloadControl(CONFIG)
    feed(control, 0.0, 2.0, 0.001)
    assert control.refused_fraction == 0.0
    assert refused_of(control, 1000) == 0


def test_a_standing_queue_raises_the_refused_share_up_to_the_maximum() -> None:
    control = OverloadControl(CONFIG)
    now = feed(control, 0.0, 0.5, 0.001)  # the base: 1 ms
    fractions = []
    for _ in range(20):
        now = feed(control, now, CONFIG.interval, 0.001 + 0.050)  # 50 ms of queue
        fractions.append(control.refused_fraction)
    # Two intervals over the target (the first may straddle the change) before
    # the share rises.
    assert fractions[0] == 0
    assert fractions[2] > 0
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(CONFIG.maximum)
    # Refusals are spread evenly: exactly the share, never a run of luck.
    assert refused_of(control, 1000) == pytest.approx(950, abs=1)


def test_a_burst_that_drains_within_an_interval_is_not_overload() -> None:
    control = OverloadControl(CONFIG)
    now = feed(control, 0.0, 0.5, 0.001)
    for _ in range(10):
        now = feed(control, now, 0.05, 0.200)  # half of each interval late ...
        now = feed(control, now, 0.05, 0.001)  # ... then the queue is empty again
    assert control.refused_fraction == 0.0


def test_one_interval_of_queue_is_a_stall_not_overload() -> None:
    control = OverloadControl(CONFIG)
    now = feed(control, 0.0, 0.5, 0.001)
    for _ in range(10):
        # One interval late (a collection, a slow etcd answer), then calm again.
        now = feed(control, now, CONFIG.interval, 0.001 + 0.050)
        now = feed(control, now, 3 * CONFIG.interval, 0.001)
    assert control.refused_fraction == 0.0


def test_the_share_falls_when_the_queue_is_gone_and_while_idle() -> None:
    control = OverloadControl(CONFIG)
    now = feed(control, 0.0, 0.5, 0.001)
    now = feed(control, now, 1.0, 0.101)
    overloaded = control.refused_fraction
    assert overloaded > 0.5
    now = feed(control, now, 0.5, 0.001)
    assert 0 < control.refused_fraction < overloaded
    # Two idle seconds (no frame at all) count as calm intervals.
    feed(control, now + 2.0, 0.2, 0.001)
    assert control.refused_fraction == 0.0


@pytest.mark.parametrize("offset", [-3.0, 0.25, 5.0])
def test_a_clock_offset_between_machines_is_not_queueing(offset: float) -> None:
    control = OverloadControl(CONFIG)
    feed(control, 0.0, 2.0, offset + 0.001)
    assert control.refused_fraction == 0.0
    now = feed(control, 2.0, 0.5, offset + 0.080)
    assert control.refused_fraction > 0
    assert now > 2.0


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        OverloadConfig(target=0)
    with pytest.raises(ValueError, match="maximum"):
        OverloadConfig(maximum=1.0)


def sip_request(method: str, *, to_tag: str | None = None, vias: int = 1) -> Request:
    lines = [f"{method} sip:bob@example.com SIP/2.0"]
    lines += [
        f"Via: SIP/2.0/UDP 127.0.0.{index + 1}:5060;branch=z9hG4bK{index}x" for index in range(vias)
    ]
    lines += [
        "Max-Forwards: 70",
        "From: <sip:alice@example.com>;tag=a1",
        "To: <sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else ""),
        "Call-ID: c1@test",
        f"CSeq: 1 {method}",
        "Content-Length: 0",
    ]
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def test_only_requests_that_start_new_work_are_refusable() -> None:
    for method in ("INVITE", "REGISTER", "OPTIONS", "MESSAGE", "SUBSCRIBE"):
        assert refusable(sip_request(method))
    for method in ("ACK", "CANCEL"):
        assert not refusable(sip_request(method))
    for method in ("BYE", "INVITE", "NOTIFY", "UPDATE"):
        assert not refusable(sip_request(method, to_tag="b1"))  # inside a dialog


def test_a_user_agent_is_told_when_to_retry_a_server_is_not() -> None:
    to_agent = refusal(sip_request("INVITE"), 7)
    assert to_agent.status == 503
    assert to_agent.get("Retry-After") == "7"
    # Through a proxy (two Vias): no Retry-After, or the proxy would stop sending
    # anything to the cluster for that long (RFC 3261 21.5.4).
    to_server = refusal(sip_request("INVITE", vias=2), 7)
    assert to_server.status == 503
    assert not to_server.has("Retry-After")


def refusals_received(directory: Path) -> int:
    """The 503s SIPp received (its -trace_counts file, last row)."""
    (path,) = directory.glob("uac_refusable_*_counts.csv")
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter=";"))
    values = dict(zip(rows[0], rows[-1], strict=False))
    return sum(int(v) for k, v in values.items() if k.endswith("_503_Recv") and v.isdigit())


def test_an_overloaded_node_refuses_new_calls_and_finishes_the_others(
    etcd_server: LocalEtcd, tmp_path: Path
) -> None:
    """Offered far more calls than its one worker serves in time (and with a 5 ms
    queueing target), the node refuses part of the new INVITEs with 503
    and completes every call it took: no call times out, no in-dialog request is
    refused, and every refusal reaches its caller."""
    node = start_node(
        etcd_server.url,
        tmp_path / "node",
        workers=1,
        auth="none",
        extra=["--overload-target", "0.005"],
    )
    load = CallLoad(node.uri_host, tmp_path / "sipp")
    try:
        load.start_callees()
        rate, seconds = 3000, 3
        load.start_calls(
            rate=rate,
            calls=rate * seconds,
            hold_ms=0,
            scenario="uac_refusable.xml",
            extra=("-trace_counts",),
        )
        code, statistics = load.wait_calls()
        assert statistics.failed == 0, load.errors()
        assert statistics.successful == rate * seconds
        assert code == 0
        refused = metric_sum(node.http_port, "sipcluster_worker_overload_rejections_total")
        assert refused > 0
        assert refusals_received(load.directory) == refused
        # A refused INVITE is the only thing refused: every other call completed
        # its BYE (SIPp fails a call whose BYE gets a 503).
        assert refused < rate * seconds
        print(f"\n{rate * seconds} calls offered at {rate}/s: {int(refused)} refused")  # noqa: T201
    finally:
        load.stop()
        assert node.stop() == 0
