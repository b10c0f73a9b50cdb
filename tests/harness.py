"""Helpers for the end-to-end tests: a real node, and a small SIP user agent.

``Node`` runs ``sipcluster run`` as a subprocess (its own load balancer and
workers, against the test etcd, on free loopback ports) and waits for the line
the supervisor prints once every process is ready.

``UserAgent`` is a minimal SIP endpoint over UDP or TCP built on sipcore: it
sends requests and answers, and hands the test every message it receives, so a
test can play caller or callee by hand.  Third-party user agents (pjsua2, SIPp)
are used where the tests can; this one exists for flows those cannot script
(malformed messages, precise timing of CANCEL, forking).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.etcd import free_port
from sipcore import (
    MessageFramed,
    Request,
    Response,
    StreamFramer,
    build_credentials,
    make_response,
    parse_challenge,
    parse_message,
)

READY_LINE = "sipcluster is ready"
"""In the plain banner and in the supervisor's log record (also with --log-json)."""


def free_udp_and_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        port = free_port(host)
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@dataclass
class Node:
    """A ``sipcluster run`` subprocess."""

    etcd_url: str
    prefix: str
    data_dir: Path
    workers: int = 2
    auth: str = "none"
    domain: str = "example.com"
    extra: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    http_port: int = 0
    process: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> Node:
        """Start the node and return once it says it is ready."""
        self.port = self.port or free_udp_and_tcp_port(self.host)
        self.http_port = self.http_port or free_port()
        host = f"[{self.host}]" if ":" in self.host else self.host
        command = [
            sys.executable,
            "-m",
            "cluster.cli",
            "run",
            "--etcd",
            self.etcd_url,
            "--etcd-prefix",
            self.prefix,
            "--data-dir",
            str(self.data_dir),
            "--listen",
            f"udp:{host}:{self.port}",
            "--listen",
            f"tcp:{host}:{self.port}",
            "--http",
            f"127.0.0.1:{self.http_port}",
            "--workers",
            str(self.workers),
            "--auth",
            self.auth,
            "--domain",
            self.domain,
            *self.extra,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.log.append(line.rstrip())
            if READY_LINE in line:
                # Keep draining stderr so that the node never blocks on a full pipe.
                self._drain = _Drain(self.process.stderr, self.log)
                return self
        self.stop()
        raise AssertionError("the node did not become ready:\n" + "\n".join(self.log[-30:]))

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the node and wait for it; returns its exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        """The first line of the node's log holding ``text``, once it is there."""
        return self._drain.wait_for(text, timeout)

    @property
    def uri_host(self) -> str:
        """host:port for URIs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Drain:
    """Reads the node's standard error into ``log`` on a thread of its own."""

    def __init__(self, stream: Any, log: list[str]) -> None:
        self.log = log
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            with self.changed:
                self.log.append(line.rstrip())
                self.changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line holding ``text``, once it is logged; AssertionError after
        ``timeout`` seconds."""
        with self.changed:
            found = self.changed.wait_for(
                lambda: next((line for line in self.log if text in line), None), timeout
            )
        if found is None:
            raise AssertionError(f"no log line with {text!r} in {timeout} s: {self.log[-20:]}")
        return found


class UserAgent:
    """A minimal SIP endpoint for tests (see the module docstring)."""

    def __init__(
        self, user: str, domain: str, *, transport: str = "udp", host: str = "127.0.0.1"
    ) -> None:
        self.user = user
        self.domain = domain
        self.transport = transport
        self.host = host
        self.port = 0
        self.inbox: asyncio.Queue[Request | Response] = asyncio.Queue()
        self._udp: asyncio.DatagramTransport | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self.cseq = 0
        self.call_id = secrets.token_hex(8) + "@test"
        self.tag = secrets.token_hex(4)
        self.proxy: tuple[str, int] | None = None

    @property
    def aor(self) -> str:
        """user@domain."""
        return f"{self.user}@{self.domain}"

    @property
    def contact(self) -> str:
        """Our Contact URI."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = ";transport=tcp" if self.transport == "tcp" else ""
        return f"sip:{self.user}@{host}:{self.port}{suffix}"

    async def start(self, proxy: tuple[str, int]) -> UserAgent:
        """Bind (UDP) or connect (TCP) towards ``proxy``."""
        self.proxy = proxy
        loop = asyncio.get_running_loop()
        if self.transport == "udp":
            agent = self

            class Protocol(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, address: Any) -> None:
                    agent._received(data)

            transport, _ = await loop.create_datagram_endpoint(Protocol, local_addr=(self.host, 0))
            self._udp = transport
            self.port = transport.get_extra_info("sockname")[1]
        else:
            # Listen too, so that requests can reach us on a new connection.
            self._server = await asyncio.start_server(self._accepted, self.host, 0)
            self.port = self._server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(proxy[0], proxy[1])
            self._writer = writer
            self._reader_task = loop.create_task(self._read_stream(reader))
        return self

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        await self._read_stream(reader)

    async def _read_stream(self, reader: asyncio.StreamReader) -> None:
        framer = StreamFramer()
        while chunk := await reader.read(65536):
            framer.receive_data(chunk)
            while (event := framer.next_event()) is not None:
                if isinstance(event, MessageFramed):
                    self._received(event.data)

    def _received(self, data: bytes) -> None:
        if data.strip(b"\r\n") == b"":
            return
        with contextlib.suppress(Exception):
            self.inbox.put_nowait(parse_message(data, datagram=self.transport == "udp"))

    def send(
        self, message: Request | Response | bytes, destination: tuple[str, int] | None = None
    ) -> None:
        """Send to ``destination`` (default: the proxy)."""
        data = message if isinstance(message, bytes) else message.to_bytes()
        if self._udp is not None:
            self._udp.sendto(data, destination or self.proxy)
        else:
            assert self._writer is not None
            self._writer.write(data)

    async def receive(self, timeout: float = 5.0) -> Request | Response:
        """The next message received."""
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def receive_response(
        self, status_min: int = 100, timeout: float = 5.0, method: str | None = None
    ) -> Response:
        """The next response with a status >= ``status_min`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.receive(max(deadline - time.monotonic(), 0.01))
            if (
                isinstance(message, Response)
                and message.status >= status_min
                and (method is None or message.cseq.method == method)
            ):
                return message

    async def receive_request(self, method: str, timeout: float = 5.0) -> Request:
        """The next request of ``method`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.receive(max(deadline - time.monotonic(), 0.01))
            if isinstance(message, Request) and message.method == method:
                return message

    def via(self, branch: str | None = None) -> str:
        """A Via for a request we send."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        branch = branch or "z9hG4bK" + secrets.token_hex(8)
        return f"SIP/2.0/{self.transport.upper()} {host}:{self.port};branch={branch};rport"

    def request(
        self,
        method: str,
        uri: str,
        *,
        to: str | None = None,
        headers: list[tuple[str, object]] | None = None,
        body: bytes = b"",
        call_id: str | None = None,
        cseq: int | None = None,
        from_tag: str | None = None,
        to_tag: str | None = None,
    ) -> Request:
        """A request from us."""
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        to_value = f"<{to or uri}>" + (f";tag={to_tag}" if to_tag else "")
        fields: list[tuple[str, object]] = [
            ("Via", self.via()),
            ("Max-Forwards", 70),
            ("From", f"<sip:{self.aor}>;tag={from_tag or self.tag}"),
            ("To", to_value),
            ("Call-ID", call_id or self.call_id),
            ("CSeq", f"{cseq} {method}"),
            ("Contact", f"<{self.contact}>"),
            *(headers or []),
        ]
        return Request(method, uri, fields, body)

    async def register(
        self,
        password: str | None = None,
        expires: int = 300,
        contact: str | None = None,
        algorithm: str | None = None,
    ) -> Response:
        """REGISTER our contact (answering a 401 with credentials); the final response."""
        headers: list[tuple[str, object]] = [("Expires", expires)]
        register = self.request(
            "REGISTER", f"sip:{self.domain}", to=f"sip:{self.aor}", headers=headers
        )
        if contact is not None:
            register.set("Contact", contact)
        self.send(register)
        response = await self.receive_response(200, method="REGISTER")
        if response.status != 401 or password is None:
            return response
        challenges = [parse_challenge(value) for value in response.get_all("WWW-Authenticate")]
        challenge = challenges[0]
        if algorithm is not None:
            challenge = next(c for c in challenges if c.get("algorithm") == algorithm)
        credentials = build_credentials(
            challenge,
            username=self.user,
            password=password,
            method="REGISTER",
            uri=f"sip:{self.domain}",
            cnonce=secrets.token_hex(8),
        )
        again = self.request(
            "REGISTER",
            f"sip:{self.domain}",
            to=f"sip:{self.aor}",
            headers=[*headers, ("Authorization", str(credentials))],
        )
        if contact is not None:
            again.set("Contact", contact)
        self.send(again)
        return await self.receive_response(200, method="REGISTER")

    def answer(
        self,
        request: Request,
        status: int,
        *,
        to_tag: str | None = None,
        body: bytes = b"",
        headers: list[tuple[str, object]] | None = None,
    ) -> Response:
        """Answer ``request`` (the response goes back the way it came)."""
        extra = list(headers or [])
        if status < 300 and request.method == "INVITE":
            extra.append(("Contact", f"<{self.contact}>"))
        response = make_response(
            request, status, to_tag=to_tag or self.tag, headers=extra, body=body
        )
        for record_route in request.get_all("Record-Route"):
            response.add("Record-Route", record_route)
        self.send(response, self._response_destination(request))
        return response

    def _response_destination(self, request: Request) -> tuple[str, int] | None:
        if self._udp is None:
            return None
        via = request.via
        host = via.received or via.host
        port = via.rport or via.port or 5060
        return host.strip("[]"), port

    async def close(self) -> None:
        """Close sockets."""
        if self._udp is not None:
            self._udp.close()
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._server is not None:
            self._server.close()


def start_node(etcd_url: str, data_dir: Path, **options: Any) -> Node:
    """Start a node on etcd at ``etcd_url`` under a key prefix of its own (so that
    tests sharing one etcd never see each other's members or bindings)."""
    return Node(etcd_url, f"/test-{uuid.uuid4().hex[:10]}/", data_dir, **options).start()


def cli(*arguments: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``sipcluster ARGUMENTS`` and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def status(node: Node) -> dict[str, list[dict[str, object]]]:
    """``sipcluster status --json`` for the node's cluster."""
    result = cli("status", "--etcd", node.etcd_url, "--etcd-prefix", node.prefix, "--json")
    assert result.returncode == 0, result.stderr
    parsed: dict[str, list[dict[str, object]]] = json.loads(result.stdout)
    return parsed


def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """GET ``path``: the status code and the body."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def members_until(
    etcd_url: str, prefix: str, done: Callable[[Any], bool], timeout: float = 30.0
) -> Any:
    """Follow the cluster's membership until ``done(view)``; returns that view.

    Raises TimeoutError after ``timeout`` seconds.
    """
    from cluster.keys import KeyLayout  # noqa: PLC0415
    from cluster.membership import MemberView, MemberWatch, connect_etcd  # noqa: PLC0415

    client = await connect_etcd(etcd_url)
    reached = asyncio.Event()
    seen: list[MemberView] = []

    def changed(view: MemberView) -> None:
        if done(view):
            seen.append(view)
            reached.set()

    follower = MemberWatch(client, KeyLayout(prefix), changed)
    follower.start()
    try:
        await asyncio.wait_for(reached.wait(), timeout)
    finally:
        await follower.stop()
        await client.close()
    return seen[0]


def add_user(node: Node, user: str, password: str) -> None:
    """``sipcluster user add USER --password PASSWORD`` on the node's cluster."""
    result = cli(
        "user",
        "add",
        "--etcd",
        node.etcd_url,
        "--etcd-prefix",
        node.prefix,
        user,
        "--password",
        password,
    )
    assert result.returncode == 0, result.stderr


def metric_sum(
    port: int, name: str, labels: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> float:
    """The sum of the samples ``name`` (with exactly ``labels``, when given) of the
    /metrics served at host:port."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    text = http_get(port, "/metrics", host)[1]
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and (labels is None or sample.labels == labels)
    )
