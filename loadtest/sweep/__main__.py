"""``python -m loadtest.sweep``: see the package docstring."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ._docs import write_tables
from ._processes import Launcher, Started
from ._sipp import SCENARIOS, SIPP_IO_OPTIONS, read_statistics, sipp_binary, write_injection
from ._steps import (
    WORKLOADS,
    PassRules,
    StepResult,
    Workload,
    run_step,
    sipp_client_command,
    summary_rows,
)
from ._targets import KamailioTarget, SipclusterTarget, Target, TargetError, free_udp_tcp_port

DOMAIN = "example.com"
PASSWORD = "secret"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.sweep",
        description="Fixed-rate SIPp load sweeps against sipcluster and Kamailio.",
    )
    parser.add_argument(
        "--target",
        choices=("sipcluster", "kamailio", "both"),
        default="both",
        help="the system(s) under test [both]",
    )
    parser.add_argument(
        "--workloads",
        default="register,register-digest,calls",
        help=f"comma-separated, from {', '.join(WORKLOADS)} [register,register-digest,calls]",
    )
    parser.add_argument(
        "--step-seconds", type=float, default=30.0, help="duration of each step [30]"
    )
    parser.add_argument(
        "--rates",
        action="append",
        default=[],
        metavar="WORKLOAD[@TARGET]=R1,R2,...",
        help="replace a rate ladder, e.g. register=1000,2000 or calls@kamailio=500,1000",
    )
    parser.add_argument(
        "--refine",
        type=int,
        default=1,
        metavar="N",
        help="bisection steps between the last passing and the first failing rate [1]",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        metavar="N",
        help="times a failing step is run again before the ladder stops [1]",
    )
    parser.add_argument("--users", type=int, default=10000, help="registering users [10000]")
    parser.add_argument(
        "--callees", type=int, default=1000, help="registered callees for calls [1000]"
    )
    parser.add_argument("--workers", type=int, default=2, help="sipcluster workers [2]")
    parser.add_argument(
        "--kamailio-shm", type=int, default=2048, metavar="MB", help="kamailio -m [2048]"
    )
    parser.add_argument("--rest", type=float, default=3.0, help="seconds of rest between steps [3]")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=45.0,
        help="no new step starts after this many minutes [45]",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="run directory [/tmp/sipcluster-sweep-<time>]"
    )
    parser.add_argument(
        "--half-max",
        action="store_true",
        help="after each ladder, one step at half of the highest passing rate (its latency)",
    )
    parser.add_argument(
        "--cache-bindings",
        type=int,
        default=0,
        metavar="N",
        help="also measure a new worker's warm-up and memory with N bindings "
        "(loadtest.bench_cache) [0: not]",
    )
    parser.add_argument(
        "--write-docs",
        type=Path,
        default=None,
        metavar="MARKDOWN",
        help="write the tables between the '<!-- sweep tables -->' markers of this file",
    )
    return parser


def _ladders(arguments: argparse.Namespace) -> dict[tuple[str, str], tuple[int, ...]]:
    ladders: dict[tuple[str, str], tuple[int, ...]] = {}
    for workload in WORKLOADS.values():
        for target, rates in workload.rates.items():
            ladders[(workload.name, target)] = rates
    for text in arguments.rates:
        name, _, values = text.partition("=")
        workload_name, _, target = name.partition("@")
        if workload_name not in WORKLOADS or not values:
            raise SystemExit(f"--rates {text!r}: expected WORKLOAD[@TARGET]=R1,R2,...")
        rates = tuple(sorted(int(value) for value in values.split(",") if value.strip()))
        for target_name in (target,) if target else ("sipcluster", "kamailio"):
            ladders[(workload_name, target_name)] = rates
    return ladders


class _InterruptedError(Exception):
    """SIGTERM or SIGINT: stop everything and report what was measured."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _InterruptedError(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; returns the exit code (0 when it ran to its end)."""
    arguments = _parser().parse_args(argv)
    workloads = [name.strip() for name in arguments.workloads.split(",") if name.strip()]
    for name in workloads:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    targets = ["sipcluster", "kamailio"] if arguments.target == "both" else [arguments.target]
    ladders = _ladders(arguments)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = arguments.output or Path(f"/tmp/sipcluster-sweep-{stamp}")
    run_dir.mkdir(parents=True, exist_ok=True)
    sipp = sipp_binary()
    launcher = Launcher()
    results: list[StepResult] = []
    notes: list[str] = []
    deadline = time.monotonic() + arguments.max_minutes * 60
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    _header(arguments, run_dir, targets, workloads)
    exit_code = 0
    try:
        for target_name in targets:
            target: Target
            if target_name == "sipcluster":
                target = SipclusterTarget(launcher, run_dir, workers=arguments.workers)
            else:
                target = KamailioTarget(launcher, run_dir, shared_memory_mb=arguments.kamailio_shm)
            for name in workloads:
                workload = WORKLOADS[name]
                if time.monotonic() >= deadline:
                    print(f"time budget spent: {target_name} {name} not run", flush=True)
                    continue
                try:
                    _sweep(
                        arguments,
                        launcher,
                        sipp,
                        target,
                        workload,
                        ladders[(name, target_name)],
                        run_dir / target_name / name,
                        results,
                        deadline,
                    )
                except TargetError as error:
                    print(f"{target_name} {name}: {error}", flush=True)
                    exit_code = 1
                finally:
                    notes.extend(note for note in target.notes() if note not in notes)
                    target.stop()
    except _InterruptedError as stopped:
        print(f"\n{stopped}: stopping every process started", flush=True)
        exit_code = 130
    finally:
        launcher.stop_all()
    _report(results, notes, run_dir)
    cache = None
    if arguments.cache_bindings > 0 and exit_code != 130:
        from loadtest.bench_cache import measure  # noqa: PLC0415

        cache = measure(arguments.cache_bindings)
        print("\n".join(cache.lines()), flush=True)
    if arguments.write_docs is not None:
        if exit_code == 130:
            # A partial run must not replace the recorded tables.
            print(f"interrupted: {arguments.write_docs} left as it was", flush=True)
        else:
            write_tables(arguments.write_docs, results, notes, arguments, cache)
    return exit_code


def _header(
    arguments: argparse.Namespace, run_dir: Path, targets: list[str], workloads: list[str]
) -> None:
    print(f"sweep {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC", flush=True)
    print(
        f"  machine: {os.cpu_count()} CPUs, {platform.machine()}, kernel {platform.release()}, "
        f"Python {platform.python_version()}"
    )
    print(f"  targets: {', '.join(targets)}; workloads: {', '.join(workloads)}")
    print(
        f"  steps of {arguments.step_seconds:g} s; {arguments.users} users, "
        f"{arguments.callees} callees; output in {run_dir}",
        flush=True,
    )


def _sweep(
    arguments: argparse.Namespace,
    launcher: Launcher,
    sipp: str,
    target: Target,
    workload: Workload,
    ladder: tuple[int, ...],
    directory: Path,
    results: list[StepResult],
    deadline: float,
) -> None:
    """Start the target for ``workload`` and climb its rate ladder."""
    directory.mkdir(parents=True, exist_ok=True)
    print(f"\n== {target.name}: {workload.name} ({workload.operation}) ==", flush=True)
    target.start(auth=workload.auth, users=arguments.users, password=PASSWORD, domain=DOMAIN)
    rules = PassRules()
    uas: Started | None = None
    uas_statistics: Path | None = None
    if workload.calls:
        injection = directory / "calls.csv"
        write_injection(
            injection,
            range(arguments.callees, arguments.users),
            password=PASSWORD,
            callees=arguments.callees,
        )
        remaining = max(60.0, deadline - time.monotonic() + 120)
        uas, uas_statistics = _start_callees(
            arguments, launcher, sipp, target, workload, directory, remaining
        )
    else:
        injection = directory / "users.csv"
        write_injection(injection, range(arguments.users), password=PASSWORD)
    print(_TABLE_HEAD, flush=True)

    def step(rate: int, attempt: int, *, half: bool = False) -> StepResult:
        result = run_step(
            launcher,
            sipp,
            target,
            workload,
            rate=rate,
            seconds=arguments.step_seconds,
            step_dir=directory / (f"step-{rate}-half" if half else f"step-{rate}-{attempt}"),
            injection=injection,
            domain=DOMAIN,
            rules=rules,
            uas=uas,
            uas_statistics=uas_statistics,
        )
        result.half = half
        results.append(result)
        print(_row(result), flush=True)
        time.sleep(arguments.rest)
        return result

    def judged(rate: int) -> bool | None:
        """Whether ``rate`` passes (retrying a failure); None when out of time."""
        for attempt in range(1 + max(0, arguments.retries)):
            if time.monotonic() + arguments.step_seconds * 1.5 > deadline:
                print("  (time budget spent)", flush=True)
                return None
            if step(rate, attempt).passed:
                return True
        return False

    try:
        last_pass = _climb(ladder, judged, arguments.refine)
        if (
            arguments.half_max
            and last_pass is not None
            and time.monotonic() + arguments.step_seconds * 1.5 <= deadline
        ):
            step(_round_rate(last_pass / 2), 0, half=True)
    finally:
        if uas is not None:
            uas.stop(grace=5.0)
            if uas in launcher.started:
                launcher.started.remove(uas)


def _climb(
    ladder: tuple[int, ...], judged: Callable[[int], bool | None], refine: int
) -> int | None:
    """Climb the ladder to its first failing rate, then bisect ``refine`` times
    between the last passing and the first failing rate; the highest passing
    rate (None when none passed or time ran out before one did)."""
    last_pass: int | None = None
    first_fail: int | None = None
    for rate in ladder:
        verdict = judged(rate)
        if verdict is None:
            return last_pass
        if not verdict:
            first_fail = rate
            break
        last_pass = rate
    if first_fail is None or last_pass is None:
        return last_pass
    for _ in range(max(0, refine)):
        middle = _round_rate((last_pass + first_fail) / 2)
        if middle in (last_pass, first_fail):
            break
        verdict = judged(middle)
        if verdict is None:
            break
        if verdict:
            last_pass = middle
        else:
            first_fail = middle
    return last_pass


def _round_rate(rate: float) -> int:
    step = 100 if rate >= 1000 else 50
    return int(round(rate / step) * step)


def _start_callees(
    arguments: argparse.Namespace,
    launcher: Launcher,
    sipp: str,
    target: Target,
    workload: Workload,
    directory: Path,
    lifetime: float,
) -> tuple[Started, Path]:
    """Register the callees from the UAS's own port, then start the UAS there.

    sipcluster sends a request to a binding through the flow its REGISTER came
    in on (the source address and port), Kamailio to the Contact: registering
    from the port the UAS will listen on satisfies both.
    """
    port = free_udp_tcp_port()
    callees = directory / "callees.csv"
    write_injection(callees, range(arguments.callees), password=PASSWORD)
    register_dir = directory / "register-callees"
    register_dir.mkdir()
    command = sipp_client_command(
        sipp,
        f"{target.host}:{target.port}",
        "register.xml",
        injection=callees,
        domain=DOMAIN,
        transport=workload.transport,
        rate=500,
        calls=arguments.callees,
        time_limit=60,
        local_port=port,
        statistics=register_dir / "stat.csv",
    )
    registering = launcher.start(
        "sipp-register", command, cwd=register_dir, log_path=register_dir / "sipp.log"
    )
    if registering.wait(90) is None:
        registering.stop(grace=5.0)
    launcher.started.remove(registering)
    stats = read_statistics(register_dir / "stat.csv")
    if stats is None or stats.successful != arguments.callees:
        done = 0 if stats is None else stats.successful
        raise TargetError(f"only {done} of {arguments.callees} callees registered")
    uas_dir = directory / "uas"
    uas_dir.mkdir()
    uas_statistics = uas_dir / "stat.csv"
    uas_command = [
        sipp,
        "-sf",
        str(SCENARIOS / ("uas_tolerant.xml" if target.reorders else "uas.xml")),
        "-i",
        "127.0.0.1",
        "-p",
        str(port),
        "-t",
        workload.transport,
        *SIPP_IO_OPTIONS,
        "-trace_stat",
        "-stf",
        str(uas_statistics),
        "-fd",
        "1",
        "-timeout",
        f"{int(lifetime)}s",
        "-trace_err",
        "-error_file",
        str(uas_dir / "errors.log"),
        "-max_log_size",
        "10000000",
        "-nostdin",
    ]
    (uas_dir / "command.txt").write_text(" ".join(uas_command) + "\n")
    uas = launcher.start("sipp-uas", uas_command, cwd=uas_dir, log_path=uas_dir / "sipp.log")
    time.sleep(1.5)
    if not uas.running():
        raise TargetError(f"the UAS SIPp exited: see {uas_dir / 'sipp.log'}")
    print(f"  {arguments.callees} callees registered at 127.0.0.1:{port}; UAS up", flush=True)
    return uas, uas_statistics


_TABLE_HEAD = (
    f"{'target/s':>8} {'achieved':>9} {'failed':>7} {'p50 ms':>6} {'p99 ms':>6} "
    f"{'CPU us/op':>9} {'cores':>5} {'SIPp':>5} {'other':>5} {'rcvbuf':>6}  {'busiest':<16} "
    "verdict"
)


def _row(result: StepResult) -> str:
    per_op = result.cpu_per_operation_us
    label, cores = result.busiest()
    verdict = "pass" if result.passed else "FAIL: " + "; ".join(result.reasons)
    if result.refused:
        verdict += f" ({result.refused} refused with 503)"
    return (
        f"{result.rate:>8} {result.achieved:>9.0f} {result.failed:>7} "
        f"{_ms(result.p50_ms):>6} {_ms(result.p99_ms):>6} "
        f"{'-' if per_op is None else f'{per_op:.0f}':>9} {result.server_cores:>5.2f} "
        f"{result.sipp_cores:>5.2f} {result.other_cores:>5.2f} "
        f"{result.udp_errors.get('RcvbufErrors', 0):>6}  "
        f"{f'{label} {cores:.2f}':<16} {verdict}"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _report(results: list[StepResult], notes: list[str], run_dir: Path) -> None:
    summary = summary_rows(results)
    lines = ["", "== highest passing rate =="]
    lines.append(
        f"{'workload':<16} {'target':<10} {'rate/s':>7} {'p50 ms':>6} {'p99 ms':>6} "
        f"{'CPU us/op':>9} {'cores':>5}  CPU/op vs kamailio: at its best, at a near rate"
    )
    by_key = {(row.workload, row.target): row for row in summary}
    workloads = list(dict.fromkeys(result.workload for result in results))
    for workload in workloads:
        for target in ("sipcluster", "kamailio"):
            tried = [r for r in results if r.workload == workload and r.target == target]
            if not tried:
                continue
            row = by_key.get((workload, target))
            if row is None:
                lowest = min(r.rate for r in tried)
                lines.append(
                    f"{workload:<16} {target:<10} {'< ' + str(lowest):>7}  (no step passed)"
                )
                continue
            ratio = ""
            other = by_key.get((workload, "kamailio"))
            mine = row.cpu_per_operation_us
            if target == "sipcluster" and other is not None and mine:
                theirs = other.cpu_per_operation_us
                if theirs:
                    ratio = f"x{mine / theirs:.1f}"
                # CPU per operation falls as the rate rises: compare at a near rate too.
                near = [
                    r
                    for r in results
                    if r.workload == workload and r.target == "kamailio" and r.passed
                ]
                if near:
                    closest = min(near, key=lambda r: abs(r.rate - row.rate))
                    if closest.cpu_per_operation_us:
                        ratio += (
                            f", x{mine / closest.cpu_per_operation_us:.1f} "
                            f"(kamailio at {closest.rate}/s)"
                        )
            top = max(r.rate for r in tried)
            mark = "+" if row.rate == top else " "
            lines.append(
                f"{workload:<16} {target:<10} {row.rate:>6}{mark} {_ms(row.p50_ms):>6} "
                f"{_ms(row.p99_ms):>6} {row.cpu_per_operation_us or 0:>9.0f} "
                f"{row.server_cores:>5.2f}  {ratio}"
            )
    lines.append("(+: the top of the ladder passed; the limit is higher)")
    for note in notes:
        lines.append(f"note: {note}")
    text = "\n".join(lines)
    print(text, flush=True)
    (run_dir / "summary.txt").write_text(text + "\n")
    data: dict[str, Any] = {
        "notes": notes,
        "steps": [result.to_json() for result in results],
    }
    (run_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"results: {run_dir / 'results.json'}", flush=True)


if __name__ == "__main__":
    if shutil.which("sipp") is None:
        sys.exit("no sipp on PATH: apt-get install sip-tester")
    sys.exit(main())
