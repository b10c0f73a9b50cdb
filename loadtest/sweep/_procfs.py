"""What the kernel tells about processes and UDP: CPU times, children, drops.

Everything here reads ``/proc`` (Linux only) and never fails on a process that
ended meanwhile: a vanished process simply reports nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CpuSample",
    "children_of",
    "command_line",
    "cpu_seconds",
    "descendants_of",
    "machine_busy_seconds",
    "sample",
    "udp_counters",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself hold spaces or ')'.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid``: every thread of the process, in seconds.

    proc(5): the process's stat line sums the CPU time of all its threads.
    Returns None when the process is gone.
    """
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After the name: state(0) ppid(1) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``, in ascending pid order."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None and int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def descendants_of(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, their children ...)."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        children = [child for parent in frontier for child in children_of(parent)]
        found.extend(children)
        frontier = children
    return sorted(found)


def command_line(pid: int) -> list[str]:
    """The arguments of ``pid`` (empty when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds of a set of labelled processes at one moment."""

    seconds: dict[str, float]
    """Label -> utime + stime, for the processes alive at that moment."""

    def minus(self, earlier: CpuSample) -> dict[str, float]:
        """CPU seconds used per label since ``earlier`` (labels present in both)."""
        return {
            label: value - earlier.seconds[label]
            for label, value in self.seconds.items()
            if label in earlier.seconds
        }


def sample(processes: dict[str, int]) -> CpuSample:
    """Read the CPU times of ``processes`` (label -> pid) now."""
    seconds = {}
    for label, pid in processes.items():
        value = cpu_seconds(pid)
        if value is not None:
            seconds[label] = value
    return CpuSample(seconds)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (every CPU: user, nice,
    system, irq, softirq and steal time of /proc/stat; idle and iowait left out)."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return 0.0
    # cpu user nice system idle iowait irq softirq steal ...
    values = [int(value) for value in fields[1:9]]
    busy = values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
    return busy / _CLOCK_TICKS


def udp_counters() -> dict[str, int]:
    """UDP counters of /proc/net/snmp and /proc/net/snmp6 (InErrors, RcvbufErrors,
    SndbufErrors ...), IPv6 ones prefixed ``Udp6``."""
    counters: dict[str, int] = {}
    try:
        lines = Path("/proc/net/snmp").read_text().splitlines()
    except OSError:
        lines = []
    # The file pairs a header line with a value line per protocol.
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        names, numbers = header.split(), values.split()
        if names and names[0] == "Udp:":
            counters.update(zip(names[1:], map(int, numbers[1:]), strict=False))
    try:
        for line in Path("/proc/net/snmp6").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name.startswith("Udp6"):
                counters[name] = int(value.strip())
    except OSError:
        pass
    return counters
