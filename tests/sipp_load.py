"""SIPp call load for the operations tests (SIPp from Debian's sip-tester).

``CallLoad`` registers ``callees`` users from the port a SIPp UAS then listens on
(so that calls to them reach it), and runs a SIPp caller (``loadtest/sipp/uac.xml``:
INVITE .. 200 .. ACK .. hold .. BYE .. 200, following Record-Route) at a fixed
rate for a bounded number of calls.  The scenarios and helpers are the sweep's
(``loadtest/sweep``).  Every SIPp run is bounded in calls and time.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from harness import free_udp_and_tcp_port

from loadtest.sweep._sipp import (
    SCENARIOS,
    SIPP_IO_OPTIONS,
    SippStatistics,
    read_statistics,
    sipp_binary,
    write_injection,
)
from loadtest.sweep._steps import sipp_client_command

PASSWORD = "secret"


@dataclass
class CallLoad:
    """A UAS for ``callees`` registered users and a caller SIPp against ``target``."""

    target: str
    """host:port of the load balancer."""
    directory: Path
    domain: str = "example.com"
    callees: int = 10
    uas: subprocess.Popen[bytes] | None = None
    uac: subprocess.Popen[bytes] | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_callees(self) -> None:
        """Register the callees from the UAS port, then start the UAS there."""
        self.directory.mkdir(parents=True, exist_ok=True)
        port = free_udp_and_tcp_port()
        injection = self.directory / "callees.csv"
        write_injection(injection, range(self.callees), password=PASSWORD)
        statistics = self.directory / "register.csv"
        subprocess.run(
            sipp_client_command(
                sipp_binary(),
                self.target,
                "register.xml",
                injection=injection,
                domain=self.domain,
                transport="u1",
                rate=100,
                calls=self.callees,
                time_limit=30,
                local_port=port,
                statistics=statistics,
            ),
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        registered = read_statistics(statistics)
        assert registered is not None
        assert registered.successful == self.callees, registered
        self.uas = self._start(
            [
                sipp_binary(),
                "-sf",
                str(SCENARIOS / "uas.xml"),
                "-i",
                "127.0.0.1",
                "-p",
                str(port),
                "-t",
                "u1",
                "-trace_stat",
                "-stf",
                str(self.directory / "uas.csv"),
                "-fd",
                "1",
                "-trace_err",
                "-error_file",
                str(self.directory / "uas-errors.log"),
                "-timeout",
                "300s",
                *SIPP_IO_OPTIONS,
                "-nostdin",
            ]
        )

    def start_calls(
        self,
        *,
        rate: int,
        calls: int,
        hold_ms: int,
        name: str = "uac",
        scenario: str = "uac.xml",
        extra: tuple[str, ...] = (),
    ) -> None:
        """Start ``calls`` calls at ``rate`` per second, each held ``hold_ms``
        (``scenario`` from loadtest/sipp; ``extra``: more SIPp options)."""
        injection = self.directory / f"{name}.inf"
        write_injection(
            injection,
            range(self.callees, self.callees + 50),
            password=PASSWORD,
            callees=self.callees,
        )
        self.uac = self._start(
            [
                *sipp_client_command(
                    sipp_binary(),
                    self.target,
                    scenario,
                    injection=injection,
                    domain=self.domain,
                    transport="u1",
                    rate=rate,
                    calls=calls,
                    time_limit=120,
                    statistics=self.directory / f"{name}.csv",
                    hold_ms=hold_ms,
                ),
                *extra,
            ]
        )
        self._name = name

    def wait_calls(self, timeout: float = 120.0) -> tuple[int, SippStatistics]:
        """Wait for the caller to finish; its exit code and statistics."""
        assert self.uac is not None
        code = self.uac.wait(timeout)
        statistics = read_statistics(self.directory / f"{self._name}.csv")
        assert statistics is not None
        return code, statistics

    def errors(self) -> str:
        """What SIPp logged about failed calls (for assertion messages)."""
        texts = []
        for path in sorted(self.directory.glob("*errors.log")):
            texts.append(f"{path.name}:\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(texts)

    def uas_failed(self) -> int:
        """Calls the UAS counted as failed."""
        statistics = read_statistics(self.directory / "uas.csv")
        return 0 if statistics is None else statistics.failed

    def _start(self, command: list[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            command,
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Stop every SIPp still running (by PID)."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
