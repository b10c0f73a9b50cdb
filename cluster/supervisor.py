"""``sipcluster run``: the all-in-one supervisor for one machine.

After uvicorn's multiprocess supervisor and gunicorn's arbiter: the supervisor
starts a local etcd (unless ``--etcd`` names one), one load balancer and
``--workers`` workers as child processes, and serves ``/healthz``, ``/readyz``
and ``/metrics`` for the whole node.  Children report over an inherited pipe
(``cluster/notify.py``) when they are ready.

- A child that dies after it was ready is restarted, its lease revoked at once so
  that the load balancers drop it from the ring without waiting for the TTL.  A
  child that fails at start-up (exit code ``EXIT_STARTUP``) is not restarted in a
  loop: the supervisor stops everything and reports it.
- Signal handlers only queue the signal; the main loop dispatches to
  ``handle_sigterm`` and friends.  SIGTERM/SIGINT stop everything in order: the
  load balancer first (no new traffic), then the workers (they finish their
  transactions), then etcd.  A second signal kills what is left at once.
- ``/readyz`` is 200 once the load balancer and every worker started are ready,
  and afterwards while the load balancer and at least one worker are.
- SIGHUP is a rolling restart: one worker at a time, a new worker is started and,
  once it is ready, the old one gets SIGTERM and drains (``worker/server.py``);
  the node stays ready throughout.  A worker that exits after a drain asked
  through etcd (``sipcluster drain``) is replaced like any other.
- Stopping the node stops its load balancer first; its workers then get SIGINT
  (leave at once): with no load balancer nothing could reach them to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .config import Settings
from .etcd import EtcdError, LocalEtcd
from .http import HealthServer
from .membership import connect_etcd
from .notify import NOTIFY_FD

__all__ = ["EXIT_STARTUP", "Supervisor", "main"]

log = logging.getLogger(__name__)

EXIT_STARTUP = 3
"""A process could not start (etcd unreachable, a socket in use ...): do not retry."""

_RESTART_DELAYS = (0.2, 1.0, 2.0, 5.0, 10.0)
_STOP_TIMEOUT = 10.0


@dataclass(slots=True)
class Child:
    """One child process and what it told us."""

    role: str
    index: int
    arguments: list[str]
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    draining: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    started: float = 0.0
    retiring: bool = False
    """Replaced in a rolling restart: not restarted when it exits."""
    became_ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        """A label for logs and metrics (lb-0, worker-2 ...)."""
        return f"{self.role}-{self.index}"

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.returncode is None


def _flags(name: str, values: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(values, tuple):
        return [item for value in values for item in (flag, str(value))]
    return [flag, str(values)]


class Supervisor:
    """Runs the processes of one node (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.etcd_url = settings.etcd or ""
        self.local_etcd: LocalEtcd | None = None
        self.children: list[Child] = []
        self.initially_ready = False
        self.stopping = False
        self.exit_code = 0
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._done = asyncio.Event()
        self._http: HealthServer | None = None
        self._etcd_client: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._rolling: asyncio.Task[None] | None = None
        self._registry = CollectorRegistry()
        self._children_ready = Gauge(
            "sipcluster_node_processes_ready",
            "Child processes ready to serve, by role",
            ["role"],
            registry=self._registry,
        )
        self._restarts = Gauge(
            "sipcluster_node_restarts",
            "Child processes restarted since the node started, by role",
            ["role"],
            registry=self._registry,
        )

    # ------------------------------------------------------------------ set-up

    def _domains(self) -> tuple[str, ...]:
        if self.settings.domain:
            return self.settings.domain
        hosts: list[str] = []
        for listen in self.settings.listen:
            hosts.append(listen.host.lower())
        for advertised in self.settings.advertise:
            hosts.append(advertised.host.lower())
        return tuple(dict.fromkeys(hosts))

    def _common(self) -> list[str]:
        settings = self.settings
        return [
            *_flags("etcd", self.etcd_url),
            *_flags("etcd_prefix", settings.etcd_prefix),
            *_flags("data_dir", settings.data_dir),
            *_flags("lease_ttl", settings.lease_ttl),
            *_flags("batch_delay", settings.batch_delay),
            *_flags("log_level", settings.log_level),
            *_flags("log_json", settings.log_json),
            "--http",
            "127.0.0.1:0",
        ]

    def _lb_arguments(self) -> list[str]:
        settings = self.settings
        return [
            "lb",
            *self._common(),
            *_flags("listen", settings.listen),
            *_flags("tcp_idle_timeout", settings.tcp_idle_timeout),
            *(_flags("advertise", settings.advertise) if settings.advertise else []),
        ]

    def _worker_arguments(self) -> list[str]:
        settings = self.settings
        arguments = [
            "worker",
            *self._common(),
            *_flags("domain", self._domains()),
            *_flags("auth", settings.auth),
            *_flags("digest_algorithms", settings.digest_algorithms),
            *_flags("mode", settings.mode),
            *_flags("min_expires", settings.min_expires),
            *_flags("max_expires", settings.max_expires),
            *_flags("default_expires", settings.default_expires),
            *_flags("max_contacts", settings.max_contacts),
            *_flags("forking", settings.forking),
            *_flags("max_breadth", settings.max_breadth),
            *_flags("t1", settings.t1),
            *_flags("timer_c", settings.timer_c),
            *_flags("overload_target", settings.overload_target),
            *_flags("commit_window", settings.commit_window),
        ]
        if settings.drain_timeout is not None:
            arguments += _flags("drain_timeout", settings.drain_timeout)
        if settings.nonce_secret_file is not None:
            arguments += _flags("nonce_secret_file", settings.nonce_secret_file)
        return arguments

    async def _start_etcd(self) -> None:
        if self.settings.etcd:
            return
        data_dir = Path(self.settings.data_dir)
        self.local_etcd = LocalEtcd(
            data_dir / "etcd",
            client_port=self.settings.local_etcd_port,
            log_path=data_dir / "etcd.log",
        )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.local_etcd.start)
        self.etcd_url = self.local_etcd.url
        log.info("started etcd at %s (data in %s)", self.etcd_url, data_dir / "etcd")

    async def _spawn(self, child: Child) -> None:
        read_end, write_end = os.pipe()
        environment = dict(os.environ, **{NOTIFY_FD: str(write_end)})
        child.ready = False
        child.draining = False
        child.became_ready.clear()
        child.info = {}
        child.started = time.monotonic()
        child.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cluster.cli",
            *child.arguments,
            pass_fds=(write_end,),
            env=environment,
        )
        os.close(write_end)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb")
        )
        for task in (
            loop.create_task(self._read_notifications(child, reader, transport)),
            loop.create_task(self._watch_exit(child, child.process)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read_notifications(
        self, child: Child, reader: asyncio.StreamReader, transport: asyncio.BaseTransport
    ) -> None:
        try:
            while line := await reader.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                event = message.pop("event", None)
                if event == "ready":
                    child.ready = True
                    child.became_ready.set()
                    child.info.update(message)
                    log.info("%s ready (%s)", child.name, message.get("id", "?"))
                    self._check_initially_ready()
                elif event == "draining":
                    child.draining = True
                elif event == "lease" and "lease" in message:
                    # Its lease was lost and replaced (cluster/membership.py).
                    child.info["lease"] = message["lease"]
        finally:
            transport.close()

    def _check_initially_ready(self) -> None:
        if self.initially_ready or not self.children:
            return
        if all(child.ready for child in self.children):
            self.initially_ready = True
            self._announce()

    def _announce(self) -> None:
        settings = self.settings
        sockets = ", ".join(str(listen) for listen in settings.listen)
        domain = self._domains()[0]
        udp = next((listen for listen in settings.listen if listen.transport == "udp"), None)
        proxy = f"{udp.host}:{udp.port}" if udp else sockets
        log.info("sipcluster is ready: SIP on %s, HTTP on %s", sockets, settings.http)
        if settings.log_json:
            return  # JSON lines only: the instructions below are for a terminal
        if settings.auth == "digest":
            add_user = (
                f"  sipcluster user add --etcd {self.etcd_url} alice@{domain} --password secret\n"
            )
        else:
            add_user = "  (--auth none: no user needs adding)\n"
        sys.stderr.write(
            "\nsipcluster is ready.\n"
            "Add a user (from another terminal, in this directory):\n"
            f"  . .venv/bin/activate\n{add_user}"
            "Then register a softphone with:\n"
            f"  user name: alice   password: secret   domain: {domain}\n"
            f"  SIP server / proxy: {proxy} (UDP or TCP)\n"
            f"Check it: sipcluster locations --etcd {self.etcd_url}\n\n"
        )

    async def _watch_exit(self, child: Child, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if child.process is not process:
            return
        child.ready = False
        await self._revoke_lease(child)
        if self.stopping or child.retiring:
            return
        if code == EXIT_STARTUP or (not child.info and code != 0 and child.restarts == 0):
            log.error("%s failed at start-up (exit code %s); stopping", child.name, code)
            self.exit_code = 1
            self._signals.put_nowait(signal.SIGTERM)
            return
        if child.draining and code == 0:
            # Drained on request (sipcluster drain): a new worker takes its place.
            log.info("%s drained and left; starting a new one", child.name)
            await self._spawn(child)
            return
        delay = _RESTART_DELAYS[min(child.restarts, len(_RESTART_DELAYS) - 1)]
        log.warning("%s exited with code %s; restarting in %.1f s", child.name, code, delay)
        child.restarts += 1
        self._restarts.labels(child.role).inc()
        await asyncio.sleep(delay)
        if not self.stopping:
            await self._spawn(child)

    async def _revoke_lease(self, child: Child) -> None:
        lease = child.info.get("lease")
        if lease is None or self._etcd_client is None:
            return
        with contextlib.suppress(Exception):
            await self._etcd_client.revoke_lease(int(lease))
            log.info("revoked the lease of %s", child.name)

    # ------------------------------------------------------------- node health

    def ready(self) -> bool:
        """/readyz: the load balancer and at least one worker serve (after all
        started processes were ready once)."""
        if not self.initially_ready or self.stopping:
            return False
        lbs = [c for c in self.children if c.role == "lb"]
        workers = [c for c in self.children if c.role == "worker"]
        return all(c.alive and c.ready for c in lbs) and any(
            c.alive and c.ready and not c.draining for c in workers
        )

    async def metrics(self) -> bytes:
        """/metrics for the node: its own gauges and every child's metrics,
        labelled with the child's name."""
        for role in ("lb", "worker"):
            self._children_ready.labels(role).set(
                sum(1 for c in self.children if c.role == role and c.alive and c.ready)
            )
        scraped = await asyncio.gather(
            *(self._scrape(child) for child in self.children if child.info.get("http"))
        )
        registry = CollectorRegistry()
        registry.register(_MergedCollector([family for families in scraped for family in families]))
        return generate_latest(self._registry) + generate_latest(registry)

    async def _scrape(self, child: Child) -> list[Metric]:
        address = str(child.info["http"])
        host, _, port = address.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), 2.0
            )
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5.0)
            writer.close()
        except (OSError, TimeoutError, ValueError):
            return []
        body = data.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")
        families = []
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                sample.labels["process"] = child.name
            families.append(family)
        return families

    # ----------------------------------------------------------------- running

    async def run(self) -> int:
        """Start everything, supervise until stopped; returns the exit code."""
        loop = asyncio.get_running_loop()
        for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(handled, self._signals.put_nowait, handled)
        try:
            await self._start_etcd()
            self._etcd_client = await connect_etcd(self.etcd_url)
        except (EtcdError, ConnectionError) as error:
            log.error("%s", error)
            await self._stop_etcd()
            return 1
        http = self.settings.http
        self._http = HealthServer(http.host, http.port, ready=self.ready, metrics=self.metrics)
        try:
            await self._http.start()
        except OSError as error:
            log.error("cannot serve HTTP on %s: %s", http, error.strerror)
            await self._stop_etcd()
            return 1
        self.children.append(Child("lb", 0, self._lb_arguments()))
        for index in range(self.settings.workers):
            self.children.append(Child("worker", index, self._worker_arguments()))
        for child in self.children:
            await self._spawn(child)
        while not self.stopping:
            signum = await self._signals.get()
            handler = {
                signal.SIGTERM: self.handle_sigterm,
                signal.SIGINT: self.handle_sigterm,
                signal.SIGHUP: self.handle_sighup,
            }[signal.Signals(signum)]
            await handler()
        return self.exit_code

    async def handle_sigterm(self) -> None:
        """Stop in order: load balancer, workers, etcd.  A second signal kills."""
        self.stopping = True
        stopper = asyncio.get_running_loop().create_task(self._stop_all())
        second = asyncio.get_running_loop().create_task(self._signals.get())
        done, _ = await asyncio.wait({stopper, second}, return_when=asyncio.FIRST_COMPLETED)
        if second in done:
            log.warning("second signal: killing every process now")
            for child in self.children:
                if child.alive and child.process is not None:
                    child.process.kill()
            await stopper
        else:
            second.cancel()

    async def handle_sighup(self) -> None:
        """SIGHUP: replace the workers one at a time (see the module docstring)."""
        if self._rolling is not None and not self._rolling.done():
            log.info("SIGHUP: a rolling restart is already under way")
            return
        log.info("SIGHUP: rolling restart of the workers")
        self._rolling = asyncio.get_running_loop().create_task(self._rolling_restart())

    async def _rolling_restart(self) -> None:
        for old in [c for c in self.children if c.role == "worker" and not c.retiring]:
            if self.stopping:
                return
            new = Child("worker", old.index, self._worker_arguments())
            self.children.append(new)
            await self._spawn(new)
            process = new.process
            assert process is not None
            ready = asyncio.ensure_future(new.became_ready.wait())
            exited = asyncio.ensure_future(process.wait())
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            exited.cancel()
            if not new.ready:
                log.error("rolling restart stopped: the new %s did not start", new.name)
                return
            old.retiring = True
            if old.alive and old.process is not None:
                log.info("rolling restart: %s is ready; draining %s", new.name, old.name)
                with contextlib.suppress(ProcessLookupError):
                    old.process.send_signal(signal.SIGTERM)
                await self._wait_or_kill(old, self.settings.drain_seconds + _STOP_TIMEOUT)
            self.children.remove(old)
        log.info("rolling restart done")

    async def _stop_all(self) -> None:
        if self._rolling is not None:
            self._rolling.cancel()
        for role, signum in (("lb", signal.SIGTERM), ("worker", signal.SIGINT)):
            group = [c for c in self.children if c.role == role and c.alive]
            for child in group:
                assert child.process is not None
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signum)
            await asyncio.gather(*(self._wait_or_kill(child) for child in group))
        if self._http is not None:
            await self._http.stop()
        if self._etcd_client is not None:
            with contextlib.suppress(Exception):
                await self._etcd_client.close()
        await self._stop_etcd()

    async def _wait_or_kill(self, child: Child, timeout: float = _STOP_TIMEOUT) -> None:
        process = child.process
        assert process is not None
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            log.warning("%s did not stop in %.0f s; killing it", child.name, timeout)
            process.kill()
            await process.wait()

    async def _stop_etcd(self) -> None:
        if self.local_etcd is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.local_etcd.stop)


class _MergedCollector:
    """Hands prometheus_client the families scraped from the children."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        merged: dict[str, Metric] = {}
        for family in self.families:
            existing = merged.get(family.name)
            if existing is None:
                merged[family.name] = family
            else:
                existing.samples.extend(family.samples)
        return list(merged.values())


def main(settings: Settings) -> int:
    """Run the node until it is stopped; returns the process exit code."""
    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(Supervisor(settings).run())
