"""Every process the sweep starts, so that all of them stop, whatever happens.

``Launcher.start`` runs a command in its own session (a Ctrl-C in the terminal
reaches the sweep only, which then stops things in order) and remembers it;
``Launcher.stop_all`` ends what is left, newest first: SIGTERM, then SIGKILL
after a grace period.  Only processes started here are ever signalled, by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["Launcher", "Started"]


class Started:
    """One started process and what it used."""

    def __init__(self, name: str, process: subprocess.Popen[Any], log_path: Path | None) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.cpu_seconds: float | None = None
        """utime + stime of the process and its reaped children, once it ended
        (from wait4)."""
        self.extra_pids: list[int] = []
        """Descendants to kill as well if the process itself dies without ending them."""

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def running(self) -> bool:
        """Whether the process has not been reaped yet."""
        return self.process.returncode is None and self._reap(block=False) is None

    def _reap(self, *, block: bool) -> int | None:
        if self.process.returncode is not None:
            return self.process.returncode
        try:
            pid, status, usage = os.wait4(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            # Reaped elsewhere (Popen's own bookkeeping): fall back to poll().
            return self.process.poll()
        if pid == 0:
            return None
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
        self.process.returncode = os.waitstatus_to_exitcode(status)
        return self.process.returncode

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds; returns the exit code or None."""
        deadline = time.monotonic() + timeout
        while True:
            code = self._reap(block=False)
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        """Send ``signum`` if the process still runs."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL; then the same for the
        descendants in ``extra_pids`` that are still alive."""
        if self.running():
            self.signal(signal.SIGTERM)
            if self.wait(grace) is None:
                self.signal(signal.SIGKILL)
                self.wait(5.0)
        for pid in self.extra_pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return self.process.returncode


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Launcher:
    """Starts processes and stops every one of them at the end."""

    def __init__(self) -> None:
        self.started: list[Started] = []

    def start(
        self,
        name: str,
        command: Sequence[str],
        *,
        log_path: Path | None = None,
        cwd: Path | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> Started:
        """Start ``command``; its output goes to ``log_path`` unless ``stdout`` /
        ``stderr`` say otherwise (e.g. subprocess.PIPE)."""
        log_file = log_path.open("ab") if log_path is not None else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                list(command),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else log_file,
                stderr=stderr if stderr is not None else log_file,
                env=env,
                start_new_session=True,
            )
        finally:
            if log_path is not None and not isinstance(log_file, int):
                log_file.close()
        started = Started(name, process, log_path)
        self.started.append(started)
        return started

    def stop_all(self, grace: float = 15.0) -> None:
        """Stop every process still running, the newest first."""
        for started in reversed(self.started):
            started.stop(grace)
        self.started.clear()
