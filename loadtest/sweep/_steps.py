"""Workloads, one fixed-rate step, and the pass rules.

A step (RFC 7502 section 5: a fixed offered rate for a fixed duration) runs one
SIPp client at ``rate`` calls/s for ``rate * seconds`` calls and passes when

- failed calls stay under 0.1 % of the calls started (the UAS's failures count
  too: a BYE before its ACK fails the call there);
- the achieved rate (successful calls over the span of their responses) is at
  least 95 % of the target;
- the 99th percentile of every response time SIPp measured (``rtd``) is under
  50 ms;
- the kernel's UDP receive-buffer errors (/proc/net/snmp RcvbufErrors) did not
  grow during the step.

CPU per operation is the utime+stime the target's processes used during the
step divided by the successful calls.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._processes import Launcher, Started
from ._procfs import cpu_seconds, machine_busy_seconds, sample, udp_counters
from ._sipp import (
    SCENARIOS,
    SIPP_IO_OPTIONS,
    ResponseTimes,
    SippStatistics,
    percentile,
    read_response_times,
    read_statistics,
)
from ._targets import Target

__all__ = [
    "WORKLOADS",
    "PassRules",
    "StepResult",
    "Workload",
    "run_step",
    "sipp_client_command",
]


@dataclass(frozen=True, slots=True)
class Workload:
    """One kind of traffic."""

    name: str
    """register, register-digest, calls, calls-tcp."""
    scenario: str
    """The client scenario in loadtest/sipp."""
    auth: str
    """The target's authentication: none or digest."""
    transport: str
    """SIPp's -t: u1 (one UDP socket) or t1 (one TCP connection)."""
    operation: str
    """What one SIPp "call" is, for the tables."""
    messages: int
    """SIP messages a load balancer carries per operation (each one way: from a
    user agent to a worker, or from a worker to a user agent)."""
    rates: dict[str, tuple[int, ...]]
    """The rate ladder per target (calls/s)."""

    @property
    def calls(self) -> bool:
        """Whether the workload needs registered callees and a UAS."""
        return self.scenario.startswith("uac")


_REGISTER_LADDER = (1000, 2000, 3000, 4000, 5000, 6000, 8000, 10000, 12000)
_DIGEST_LADDER = (500, 1000, 1500, 2000, 2500, 3000, 4000, 5000)
_CALLS_LADDER = (200, 400, 600, 800, 1000, 1200, 1500, 2000)

WORKLOADS: dict[str, Workload] = {
    workload.name: workload
    for workload in (
        Workload(
            "register",
            "register.xml",
            "none",
            "u1",
            "REGISTER",
            2,
            {
                "sipcluster": _REGISTER_LADDER,
                "kamailio": (2000, 5000, 10000, 15000, 20000, 25000),
            },
        ),
        Workload(
            "register-digest",
            "register_digest.xml",
            "digest",
            "u1",
            "registration (401 + 200)",
            4,
            {
                "sipcluster": _DIGEST_LADDER,
                "kamailio": (1000, 2500, 5000, 10000, 15000, 20000),
            },
        ),
        Workload(
            "calls",
            "uac.xml",
            "none",
            "u1",
            "call (INVITE..BYE)",
            13,
            {"sipcluster": _CALLS_LADDER, "kamailio": (500, 1000, 1500, 2000, 3000, 4000)},
        ),
        Workload(
            # Overload: offered beyond the maximum, sipcluster refuses part of the
            # new INVITEs with 503 (worker/overload.py); the achieved rate is the
            # goodput, calls completed per second.  Give the ladder with --rates,
            # e.g. calls-overload=1200,2400 (the maximum and twice it).
            "calls-overload",
            "uac_refusable.xml",
            "none",
            "u1",
            "call, 503 refusals allowed",
            13,
            {"sipcluster": (1200, 2400), "kamailio": (4000, 8000)},
        ),
        Workload(
            "calls-tcp",
            "uac.xml",
            "none",
            "t1",
            "call over TCP",
            13,
            {"sipcluster": _CALLS_LADDER, "kamailio": (500, 1000, 1500, 2000, 3000)},
        ),
    )
}


@dataclass(frozen=True, slots=True)
class PassRules:
    """The thresholds a step must meet."""

    max_failed_fraction: float = 0.001
    min_achieved_fraction: float = 0.95
    max_p99_ms: float = 50.0


@dataclass(slots=True)
class StepResult:
    """What one step measured."""

    target: str
    workload: str
    rate: int
    seconds: float
    started: int = 0
    successful: int = 0
    failed: int = 0
    uas_failed: int = 0
    achieved: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    p99_by_rtd: dict[int, float] = field(default_factory=dict)
    server_cpu_seconds: float = 0.0
    server_cpu_by_process: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    sipp_cpu_seconds: float = 0.0
    machine_cpu_seconds: float = 0.0
    """Busy CPU seconds of the whole machine during the step: what is neither the
    server nor SIPp was other work on the (shared) machine."""
    retransmissions: int = 0
    udp_errors: dict[str, int] = field(default_factory=dict)
    failure_kinds: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    """Calls refused with 503 (calls-overload: counted, not failed)."""
    half: bool = False
    """A step at half of the highest passing rate (its latency is reported; it
    never counts as the highest rate)."""
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    @property
    def cpu_per_operation_us(self) -> float | None:
        """Server CPU microseconds per successful call."""
        if not self.successful:
            return None
        return self.server_cpu_seconds / self.successful * 1e6

    @property
    def server_cores(self) -> float:
        """Server CPU seconds per wall second during the step."""
        return self.server_cpu_seconds / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def sipp_cores(self) -> float:
        """SIPp's CPU seconds (client and UAS) per wall second."""
        return self.sipp_cpu_seconds / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def other_cores(self) -> float:
        """Cores busy with neither the server nor SIPp during the step."""
        if not self.wall_seconds:
            return 0.0
        other = self.machine_cpu_seconds - self.server_cpu_seconds - self.sipp_cpu_seconds
        return max(0.0, other / self.wall_seconds)

    def busiest(self) -> tuple[str, float]:
        """The server process that used the most CPU, and its cores."""
        if not self.server_cpu_by_process or not self.wall_seconds:
            return ("-", 0.0)
        label, value = max(self.server_cpu_by_process.items(), key=lambda item: item[1])
        return label, value / self.wall_seconds

    def to_json(self) -> dict[str, Any]:
        """A plain dict for results.json."""
        data = asdict(self)
        data["cpu_per_operation_us"] = self.cpu_per_operation_us
        data["server_cores"] = self.server_cores
        data["sipp_cores"] = self.sipp_cores
        data["other_cores"] = self.other_cores
        return data


def sipp_client_command(
    sipp: str,
    remote: str,
    scenario: str,
    *,
    injection: Path,
    domain: str,
    transport: str,
    rate: int,
    calls: int,
    time_limit: float,
    local_port: int | None = None,
    statistics: Path | None = None,
    response_times: bool = False,
    hold_ms: int = 0,
) -> list[str]:
    """A bounded SIPp client run against ``remote`` (host:port): at most ``calls``
    calls and ``time_limit`` s; ``hold_ms`` is the length of a call's <pause/>."""
    command = [
        sipp,
        remote,
        "-sf",
        str(SCENARIOS / scenario),
        "-inf",
        str(injection),
        "-key",
        "domain",
        domain,
        "-key",
        "expires",
        "3600",
        "-i",
        "127.0.0.1",
        "-t",
        transport,
        "-r",
        str(rate),
        "-rp",
        "1000",
        "-m",
        str(calls),
        "-d",
        str(hold_ms),
        # At most two seconds' worth of calls open: an overloaded server makes the
        # client slow down (and the step fail on its rate) instead of piling up.
        "-l",
        str(max(2 * rate, 200)),
        "-recv_timeout",
        "5000",
        "-timeout",
        f"{int(time_limit)}s",
        *SIPP_IO_OPTIONS,
        "-nostdin",
    ]
    if not scenario.startswith("uac"):
        # A failed registration is not a dialog: never send a BYE for it.
        command += ["-default_behaviors", "all,-bye"]
    if scenario == "register_digest.xml":
        # The digest-uri must be the Request-URI (RFC 3261 22.4, RFC 7616 3.4.6);
        # SIPp's default is the remote address, which sipcluster refuses (400).
        command += ["-auth_uri", domain]
    if local_port is not None:
        command += ["-p", str(local_port)]
    if statistics is not None:
        command += ["-trace_stat", "-stf", str(statistics), "-fd", "1"]
    if response_times:
        command += ["-trace_rtt", "-rtt_freq", "200"]
    if statistics is not None:
        # Why each failed call failed, at most 10 MB of it.
        command += [
            "-trace_err",
            "-error_file",
            str(statistics.with_name("errors.log")),
            "-max_log_size",
            "10000000",
        ]
    return command


def run_step(
    launcher: Launcher,
    sipp: str,
    target: Target,
    workload: Workload,
    *,
    rate: int,
    seconds: float,
    step_dir: Path,
    injection: Path,
    domain: str,
    rules: PassRules,
    uas: Started | None = None,
    uas_statistics: Path | None = None,
) -> StepResult:
    """Run one fixed-rate step and judge it."""
    step_dir.mkdir(parents=True)
    result = StepResult(target.name, workload.name, rate, seconds)
    calls = int(rate * seconds)
    time_limit = seconds * 2 + 30
    statistics = step_dir / "client-stat.csv"
    scenario = workload.scenario
    if workload.calls and target.reorders and scenario == "uac.xml":
        scenario = "uac_tolerant.xml"
    command = sipp_client_command(
        sipp,
        f"{target.host}:{target.port}",
        scenario,
        injection=injection,
        domain=domain,
        transport=workload.transport,
        rate=rate,
        calls=calls,
        time_limit=time_limit,
        statistics=statistics,
        response_times=True,
    )
    if scenario == "uac_refusable.xml":
        command += ["-trace_counts"]
    (step_dir / "command.txt").write_text(" ".join(command) + "\n")
    uas_before = _uas_failed(uas_statistics)
    uas_cpu_before = cpu_seconds(uas.pid) if uas is not None else None
    udp_before = udp_counters()
    processes = target.processes()
    cpu_before = sample(processes)
    machine_before = machine_busy_seconds()
    started_at = time.monotonic()
    client = launcher.start("sipp", command, cwd=step_dir, log_path=step_dir / "sipp.log")
    code = client.wait(time_limit + 15)
    if code is None:
        client.stop(grace=5.0)
        result.reasons.append("SIPp did not finish in time")
    result.wall_seconds = time.monotonic() - started_at
    cpu_after = sample(processes)
    result.machine_cpu_seconds = machine_busy_seconds() - machine_before
    udp_after = udp_counters()
    launcher.started.remove(client)
    result.server_cpu_by_process = cpu_after.minus(cpu_before)
    result.server_cpu_seconds = sum(result.server_cpu_by_process.values())
    result.sipp_cpu_seconds = client.cpu_seconds or 0.0
    if uas is not None and uas_cpu_before is not None:
        uas_cpu_after = cpu_seconds(uas.pid)
        if uas_cpu_after is not None:
            result.sipp_cpu_seconds += uas_cpu_after - uas_cpu_before
    result.udp_errors = {
        name: udp_after.get(name, 0) - udp_before.get(name, 0)
        for name in ("RcvbufErrors", "SndbufErrors", "InErrors", "Udp6RcvbufErrors")
        if udp_after.get(name, 0) - udp_before.get(name, 0)
    }
    if uas is not None:
        time.sleep(1.5)  # the UAS writes its statistics every second
        after = _uas_failed(uas_statistics)
        result.uas_failed = max(0, after - uas_before)
    stats = read_statistics(statistics)
    result.refused = _refusals(step_dir)
    _judge(result, stats, read_response_times(step_dir), rules)
    return result


def _refusals(step_dir: Path) -> int:
    """The 503s SIPp counted (``-trace_counts``: a ``<index>_503_Recv`` column)."""
    total = 0
    for path in step_dir.glob("*_counts.csv"):
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle, delimiter=";"))
        if len(rows) >= 2:
            values = dict(zip(rows[0], rows[-1], strict=False))
            total += sum(
                int(value)
                for name, value in values.items()
                if name.endswith("_503_Recv") and value.isdigit()
            )
    return total


def _uas_failed(path: Path | None) -> int:
    if path is None:
        return 0
    stats = read_statistics(path)
    return 0 if stats is None else stats.failed


def _judge(
    result: StepResult,
    stats: SippStatistics | None,
    times: ResponseTimes,
    rules: PassRules,
) -> None:
    if stats is None:
        result.reasons.append("no SIPp statistics")
        return
    result.started = stats.created
    result.successful = stats.successful
    result.failed = stats.failed + result.uas_failed
    result.retransmissions = stats.retransmissions
    result.failure_kinds = dict(stats.failure_kinds)
    if result.uas_failed:
        result.failure_kinds["UAS"] = result.uas_failed
    result.p50_ms = percentile(times.by_rtd.get(1, []), 0.50)
    for rtd, values in sorted(times.by_rtd.items()):
        value = percentile(values, 0.99)
        if value is not None:
            result.p99_by_rtd[rtd] = value
    result.p99_ms = max(result.p99_by_rtd.values()) if result.p99_by_rtd else None
    # The achieved rate: completed calls per second between the first and the
    # last response time recorded (SIPp's start-up and a straggler waiting for
    # its receive timeout are not slowness; a client or server that cannot keep
    # up stretches this span).  SIPp writes response times in batches of
    # -rtt_freq and drops the last partial batch, so the count is the file's.
    completed = len(times.by_rtd.get(1, []))
    if times.first_ms is not None and times.last_ms is not None and completed > 1:
        span = (times.last_ms - times.first_ms) / 1000
        result.achieved = (completed - 1) / span if span > 0 else 0.0
    else:
        result.achieved = result.successful / result.wall_seconds
    planned = result.rate * result.seconds
    if result.started < planned * 0.999:
        result.reasons.append(f"SIPp started only {result.started} of {int(planned)} calls")
    failed_fraction = result.failed / max(result.started, 1)
    if failed_fraction >= rules.max_failed_fraction:
        result.reasons.append(f"failed {failed_fraction:.2%}")
    if result.achieved < rules.min_achieved_fraction * result.rate:
        result.reasons.append(f"achieved {result.achieved:.0f}/s")
    if result.p99_ms is None:
        result.reasons.append("no response times")
    elif result.p99_ms >= rules.max_p99_ms:
        result.reasons.append(f"p99 {result.p99_ms:.0f} ms")
    if result.udp_errors.get("RcvbufErrors") or result.udp_errors.get("Udp6RcvbufErrors"):
        result.reasons.append(f"UDP RcvbufErrors +{result.udp_errors.get('RcvbufErrors', 0)}")
    result.passed = not result.reasons


def summary_rows(results: Sequence[StepResult]) -> list[StepResult]:
    """The passing steps with the highest rate, per (target, workload)."""
    best: dict[tuple[str, str], StepResult] = {}
    for result in results:
        key = (result.target, result.workload)
        if result.passed and not result.half and (key not in best or result.rate > best[key].rate):
            best[key] = result
    return list(best.values())
