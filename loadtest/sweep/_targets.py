"""The systems under test: a sipcluster node and Kamailio, started by the sweep.

Each target is started fresh for every workload (``start(auth=...)``), provisions
its users before it takes traffic, names the processes whose CPU counts
(``processes()``) and stops everything it started (``stop()``).

- ``SipclusterTarget``: an etcd of its own (``cluster.etcd.LocalEtcd`` on free
  ports, a fresh data directory), the users written with ``registry.add_user``,
  then ``sipcluster run --etcd URL --etcd-prefix /loadtest/ --workers 2 --auth
  none|digest --domain example.com`` on a free UDP+TCP port.  CPU counts the
  supervisor, the load balancer, every worker and etcd.
- ``KamailioTarget``: ``kamailio -DD -E`` with loadtest/kamailio/kamailio.cfg
  (children=2, memory-only usrloc, record-route), the credentials in an htable
  filled at start-up from a generated users.cfg.  CPU counts every Kamailio
  process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Protocol

from ._processes import Launcher, Started
from ._procfs import children_of, command_line, descendants_of
from ._sipp import user_name

__all__ = ["KamailioTarget", "SipclusterTarget", "Target", "TargetError", "free_udp_tcp_port"]

_ROOT = Path(__file__).resolve().parent.parent.parent
KAMAILIO_CONFIG = _ROOT / "loadtest" / "kamailio" / "kamailio.cfg"


class TargetError(Exception):
    """A system under test could not be started or provisioned."""


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise TargetError("no free UDP+TCP port")


def sip_ping(host: str, port: int, timeout: float) -> bool:
    """Whether an OPTIONS to ``host:port`` over UDP gets any response within
    ``timeout`` seconds (the server is up)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        local = probe.getsockname()[1]
        while time.monotonic() < deadline:
            call_id = os.urandom(6).hex()
            message = (
                f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{call_id};rport\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:probe@127.0.0.1>;tag={call_id}\r\n"
                f"To: <sip:{host}:{port}>\r\n"
                f"Call-ID: {call_id}@probe\r\n"
                "CSeq: 1 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
            probe.sendto(message, (host, port))
            probe.settimeout(0.5)
            try:
                data = probe.recv(65535)
            except OSError:
                continue
            if data.startswith(b"SIP/2.0 "):
                return True
        return False


class Target(Protocol):
    """A system under test."""

    name: str
    host: str
    port: int
    reorders: bool
    """Whether the target may relay two messages of one dialog out of order
    (several processes reading one socket): calls then use the tolerant
    scenarios, uac_tolerant.xml and uas_tolerant.xml."""

    def start(self, *, auth: str, users: int, password: str, domain: str) -> None:
        """Start with ``auth`` ("none" or "digest") and ``users`` users provisioned.

        Raises TargetError."""
        ...

    def processes(self) -> dict[str, int]:
        """Label -> pid of every process whose CPU counts, now."""
        ...

    def stop(self) -> None:
        """Stop everything this target started."""
        ...

    def notes(self) -> list[str]:
        """What a reader of the results should know about this run."""
        ...


class _LogPump:
    """Copies a child's output to a file and spots a line in it."""

    def __init__(self, stream: IO[bytes], log_path: Path, marker: str) -> None:
        self.found = threading.Event()
        self.ended = threading.Event()
        self.tail: list[str] = []
        self._thread = threading.Thread(
            target=self._run, args=(stream, log_path, marker), daemon=True
        )
        self._thread.start()

    def _run(self, stream: IO[bytes], log_path: Path, marker: str) -> None:
        with log_path.open("a") as log:
            for raw in stream:
                line = raw.decode("utf-8", "replace")
                log.write(line)
                log.flush()
                if not self.found.is_set():
                    self.tail = [*self.tail[-30:], line.rstrip()]
                    if marker in line:
                        self.found.set()
        self.ended.set()


class SipclusterTarget:
    """``sipcluster run`` with an etcd of its own (see the module docstring)."""

    name = "sipcluster"
    reorders = False  # one worker handles every message of a Call-ID, in order

    def __init__(self, launcher: Launcher, run_dir: Path, *, workers: int = 2) -> None:
        self.launcher = launcher
        self.run_dir = run_dir
        self.workers = workers
        self.host = "127.0.0.1"
        self.port = 0
        self._etcd: Any = None
        self._node: Started | None = None
        self._md5_only = False
        self._children: dict[str, int] = {}
        self._serial = 0

    def start(self, *, auth: str, users: int, password: str, domain: str) -> None:
        """Start etcd, write the users (digest only), start the node."""
        from cluster.etcd import EtcdError, LocalEtcd, free_port  # noqa: PLC0415

        self._serial += 1
        directory = self.run_dir / f"sipcluster-{self._serial}-{auth}"
        directory.mkdir(parents=True)
        self._etcd = LocalEtcd(
            directory / "etcd", client_port=free_port(), log_path=directory / "etcd.log"
        )
        try:
            self._etcd.start()
        except EtcdError as error:
            raise TargetError(str(error)) from None
        etcd_url = self._etcd.url
        prefix = "/loadtest/"
        if auth == "digest":
            started = time.monotonic()
            asyncio.run(_add_users(etcd_url, prefix, users, password, domain))
            print(
                f"  provisioned {users} users in etcd in {time.monotonic() - started:.1f} s",
                flush=True,
            )
        self.port = free_udp_tcp_port(self.host)
        from cluster.etcd import free_port as free_tcp_port  # noqa: PLC0415

        command = [
            sys.executable,
            "-m",
            "cluster.cli",
            "run",
            "--etcd",
            etcd_url,
            "--etcd-prefix",
            prefix,
            "--data-dir",
            str(directory / "node"),
            "--listen",
            f"udp:{self.host}:{self.port}",
            "--listen",
            f"tcp:{self.host}:{self.port}",
            "--http",
            f"127.0.0.1:{free_tcp_port()}",
            "--workers",
            str(self.workers),
            "--auth",
            auth,
            "--domain",
            domain,
            "--log-level",
            "warning",
        ]
        self._md5_only = auth == "digest"
        if self._md5_only:
            # SIPp 3.6 answers only the first challenge and only with MD5.
            command += ["--digest-algorithms", "MD5"]
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        # The venv's sipcluster, importable from the project root.
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(_ROOT), environment.get("PYTHONPATH")])
        )
        (directory / "command.txt").write_text(" ".join(command) + "\n")
        self._node = self.launcher.start(
            "sipcluster",
            command,
            cwd=_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=environment,
        )
        assert self._node.process.stderr is not None
        pump = _LogPump(self._node.process.stderr, directory / "node.log", "sipcluster is ready.")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not pump.found.is_set():
            if pump.ended.is_set() or not self._node.running():
                break
            pump.found.wait(0.2)
        if not pump.found.is_set():
            tail = "\n".join(pump.tail[-15:])
            self.stop()
            raise TargetError(f"sipcluster did not become ready:\n{tail}")
        if not sip_ping(self.host, self.port, 10.0):
            self.stop()
            raise TargetError("sipcluster does not answer OPTIONS")
        self._children = self._find_children()
        self._node.extra_pids = list(self._children.values())

    def _find_children(self) -> dict[str, int]:
        assert self._node is not None
        found: dict[str, int] = {}
        workers = 0
        for pid in children_of(self._node.pid):
            arguments = command_line(pid)
            if "lb" in arguments:
                found["lb"] = pid
            elif "worker" in arguments:
                found[f"worker-{workers}"] = pid
                workers += 1
        return found

    def processes(self) -> dict[str, int]:
        """The supervisor, the load balancer, the workers and etcd."""
        if self._node is None:
            return {}
        found = {"supervisor": self._node.pid}
        # A child that was restarted has a new pid: look again.
        current = self._find_children()
        if current != self._children:
            self._children = current
            self._node.extra_pids = sorted(set(self._node.extra_pids) | set(current.values()))
        found.update(current)
        if self._etcd is not None and self._etcd.pid is not None:
            found["etcd"] = self._etcd.pid
        return found

    def stop(self) -> None:
        """SIGTERM the node (it stops the load balancer, then the workers), then etcd."""
        if self._node is not None:
            self._node.stop(grace=40.0)
            if self._node in self.launcher.started:
                self.launcher.started.remove(self._node)
            self._node = None
        if self._etcd is not None:
            self._etcd.stop()
            self._etcd = None

    def notes(self) -> list[str]:
        """Says when the digest challenge was limited to MD5."""
        if self._md5_only:
            return [
                "digest: sipcluster ran with --digest-algorithms MD5: SIPp 3.6 answers only "
                "the first challenge, and only with MD5"
            ]
        return []


async def _add_users(etcd_url: str, prefix: str, count: int, password: str, domain: str) -> None:
    from loadtest.provision import provision_users  # noqa: PLC0415

    await provision_users(etcd_url, prefix, domain, range(count), password)


class KamailioTarget:
    """Kamailio 5.6 with loadtest/kamailio/kamailio.cfg (see the module docstring)."""

    name = "kamailio"
    reorders = True  # its UDP worker processes each read the socket on their own

    def __init__(self, launcher: Launcher, run_dir: Path, *, shared_memory_mb: int = 2048) -> None:
        self.launcher = launcher
        self.run_dir = run_dir
        self.shared_memory_mb = shared_memory_mb
        self.host = "127.0.0.1"
        self.port = 0
        self._process: Started | None = None
        self._serial = 0

    def start(self, *, auth: str, users: int, password: str, domain: str) -> None:
        """Write the configuration and users.cfg into a fresh directory; start."""
        binary = shutil.which("kamailio") or "/usr/sbin/kamailio"
        if not Path(binary).exists():
            raise TargetError("no kamailio: apt-get install kamailio")
        self._serial += 1
        directory = self.run_dir / f"kamailio-{self._serial}-{auth}"
        directory.mkdir(parents=True)
        shutil.copy(KAMAILIO_CONFIG, directory / "kamailio.cfg")
        with (directory / "users.cfg").open("w") as out:
            for index in range(users if auth == "digest" else 0):
                user = user_name(index)
                ha1 = hashlib.md5(f"{user}:{domain}:{password}".encode()).hexdigest()
                out.write(f'$sht(auth=>{user}) = "{ha1}";\n')
        self.port = free_udp_tcp_port(self.host)
        command = [
            binary,
            "-f",
            str(directory / "kamailio.cfg"),
            "-DD",
            "-E",
            "-m",
            str(self.shared_memory_mb),
            # Private memory per process: parsing users.cfg (one statement per
            # user) takes ~3.5 KB a line, 35 MB for 10,000 users.
            "-M",
            "64",
            "-P",
            str(directory / "kamailio.pid"),
            "-Y",
            str(directory),
            "-w",
            str(directory),
            "-l",
            f"udp:{self.host}:{self.port}",
            "-l",
            f"tcp:{self.host}:{self.port}",
            "-A",
            f'DOMAIN="{domain}"',
            "-A",
            f'CTL_SOCKET="unix:{directory / "ctl.sock"}"',
        ]
        if auth == "digest":
            command += ["-A", "WITH_AUTH"]
        (directory / "command.txt").write_text(" ".join(command) + "\n")
        self._process = self.launcher.start(
            "kamailio", command, cwd=directory, log_path=directory / "kamailio.log"
        )
        if not sip_ping(self.host, self.port, 30.0):
            log = (directory / "kamailio.log").read_text(errors="replace")
            self.stop()
            raise TargetError("kamailio did not start:\n" + "\n".join(log.splitlines()[-15:]))
        self._process.extra_pids = descendants_of(self._process.pid)

    def processes(self) -> dict[str, int]:
        """The main process and every process it forked."""
        if self._process is None:
            return {}
        found = {"main": self._process.pid}
        for pid in descendants_of(self._process.pid):
            found[f"child-{pid}"] = pid
        return found

    def stop(self) -> None:
        """SIGTERM the main process (it ends its children)."""
        if self._process is not None:
            self._process.stop(grace=15.0)
            if self._process in self.launcher.started:
                self.launcher.started.remove(self._process)
            self._process = None

    def notes(self) -> list[str]:
        """Says that calls used the tolerant scenarios."""
        return [
            "calls through kamailio use uac_tolerant.xml / uas_tolerant.xml: its UDP "
            "processes may relay a 180 after the 200 or an ACK after the BYE"
        ]
