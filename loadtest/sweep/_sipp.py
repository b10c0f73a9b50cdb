"""Running SIPp and reading what it measured.

SIPp 3.6 writes, with ``-trace_stat -stf FILE``, a CSV of counters (one row per
``-fd`` period, cumulative columns end in ``(C)``), and, with ``-trace_rtt``, one
line per measured response time (``Date_ms;response_time_ms;rtd_no``) into
``<scenario file>_<pid>_rtt.csv`` in its working directory.  Every command gets
``-buff_size 4194304``: with the default socket buffers SIPp drops replies above
about 10,000 messages/s (../shared/PERFORMANCE-NOTES.md).

Injection files: ``write_injection`` writes one user per line,
``user;callee;password;[authentication username=user password=secret]``.  SIPp
3.6.1 does not expand a keyword nested inside ``[authentication ...]`` in a
scenario (``[authentication username=[field0] ...]`` comes out verbatim), while it
does expand keywords that an injected field holds: so the digest scenario takes
its whole ``[authentication ...]`` keyword from field 3.
"""

from __future__ import annotations

import csv
import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SCENARIOS",
    "SIPP_IO_OPTIONS",
    "ResponseTimes",
    "SippStatistics",
    "percentile",
    "read_response_times",
    "read_statistics",
    "sipp_binary",
    "write_injection",
]

SCENARIOS = Path(__file__).resolve().parent.parent / "sipp"
"""loadtest/sipp: the scenario files."""

SIPP_IO_OPTIONS = (
    "-buff_size",
    "4194304",
    "-max_recv_loops",
    "10000",
    "-max_sched_loops",
    "10000",
)
"""Options every SIPp of the sweep gets."""


def sipp_binary() -> str:
    """The sipp executable (Debian's sip-tester installs /usr/bin/sipp).

    Raises FileNotFoundError when there is none.
    """
    found = shutil.which("sipp")
    if found is None:
        raise FileNotFoundError("no sipp on PATH: apt-get install sip-tester")
    return found


def user_name(index: int) -> str:
    """user0000, user0001 ... (four digits at least)."""
    return f"user{index:04d}"


def write_injection(
    path: Path,
    users: Iterable[int],
    *,
    password: str,
    callees: int | None = None,
) -> int:
    """Write a SEQUENTIAL injection file, one line per user index in ``users``.

    Fields: 0 user, 1 callee (``user<index mod callees>`` when ``callees`` is
    given, else the user itself), 2 password, 3 the digest keyword for that user.
    Returns the number of lines written.
    """
    count = 0
    with path.open("w") as out:
        out.write("SEQUENTIAL\n")
        for index in users:
            user = user_name(index)
            callee = user_name(index % callees) if callees else user
            out.write(
                f"{user};{callee};{password};[authentication username={user} password={password}]\n"
            )
            count += 1
    return count


@dataclass(frozen=True, slots=True)
class SippStatistics:
    """The cumulative counters of one SIPp run (last row of its statistics file)."""

    created: int
    """Calls started."""
    successful: int
    """Calls that reached the end of the scenario."""
    failed: int
    """Calls that failed (timeouts, unexpected messages, send failures ...)."""
    elapsed: float
    """Seconds from the start of the traffic to the last statistics dump."""
    retransmissions: int
    """Messages SIPp sent again (UDP retransmissions)."""
    unexpected: int
    """Calls failed on an unexpected message."""
    timeouts: int
    """Calls failed on a timeout (no answer, or too many retransmissions)."""
    dead_call_messages: int
    """Messages for calls that had already ended."""
    failure_kinds: dict[str, int] = field(default_factory=dict)
    """Every non-zero ``Failed...(C)`` counter."""


def _duration(text: str) -> float:
    """``HH:MM:SS`` or ``HH:MM:SS:micro`` (SIPp's ElapsedTime) in seconds."""
    parts = text.strip().split(":")
    if len(parts) < 3:
        return 0.0
    seconds = int(parts[0]) * 3600 + int(parts[1]) * 60 + int(parts[2])
    if len(parts) > 3 and parts[3]:
        seconds += int(parts[3]) / 10 ** len(parts[3])
    return float(seconds)


def read_statistics(path: Path) -> SippStatistics | None:
    """The last row of a ``-trace_stat`` file, or None when it holds none."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle, delimiter=";"))
    except FileNotFoundError:
        return None
    if len(rows) < 2:
        return None
    header, last = rows[0], rows[-1]
    # The start/current time columns hold tabs but no ';': the columns line up.
    values = dict(zip(header, last, strict=False))

    def number(name: str) -> int:
        text = values.get(name, "0").strip()
        return int(text) if text.isdigit() else 0

    kinds = {
        name.removesuffix("(C)"): number(name)
        for name in header
        if name.startswith("Failed") and name.endswith("(C)") and name != "FailedCall(C)"
    }
    return SippStatistics(
        created=number("TotalCallCreated"),
        successful=number("SuccessfulCall(C)"),
        failed=number("FailedCall(C)"),
        elapsed=_duration(values.get("ElapsedTime(C)", "")),
        retransmissions=number("Retransmissions(C)"),
        unexpected=number("FailedUnexpectedMessage(C)"),
        timeouts=number("FailedMaxUDPRetrans(C)") + number("FailedTimeoutOnRecv(C)"),
        dead_call_messages=number("DeadCallMsgs(C)"),
        failure_kinds={name: value for name, value in kinds.items() if value},
    )


@dataclass(slots=True)
class ResponseTimes:
    """The response times of one SIPp run, from its ``*_rtt.csv`` files."""

    by_rtd: dict[int, list[float]] = field(default_factory=dict)
    """Milliseconds, by response-time number (``rtd="1"``, ``rtd="2"`` ...)."""
    first_ms: float | None = None
    """When the first response time 1 was taken (ms since SIPp started)."""
    last_ms: float | None = None
    """When the last response time 1 was taken."""


def read_response_times(directory: Path) -> ResponseTimes:
    """Every response time in the ``*_rtt.csv`` files of ``directory``."""
    found = ResponseTimes()
    for path in sorted(directory.glob("*_rtt.csv")):
        with path.open() as handle:
            for line in handle:
                parts = line.strip().split(";")
                if len(parts) != 3 or not parts[2].isdigit():
                    continue  # the header line
                try:
                    stamp, value = float(parts[0]), float(parts[1])
                except ValueError:
                    continue
                rtd = int(parts[2])
                found.by_rtd.setdefault(rtd, []).append(value)
                if rtd == 1:
                    if found.first_ms is None or stamp < found.first_ms:
                        found.first_ms = stamp
                    if found.last_ms is None or stamp > found.last_ms:
                        found.last_ms = stamp
    return found


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` quantile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]
