"""Administrative commands: users, status, drain, locations, options.

Each talks to etcd (or, for ``options``, to a SIP server) and prints a result;
failures are one line on standard error and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import json
import os
import secrets
import socket
import sys
import time
from typing import Any

from sipcore import MessageError, Request, Response, SipURI, parse_message, parse_uri

from .config import Settings
from .keys import KeyLayout
from .membership import DRAINING, LBRecord, WorkerRecord, connect_etcd
from .ring import Ring

__all__ = ["run", "send_options"]

_DRAIN_ATTEMPTS = 5


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


def _error(text: str) -> int:
    sys.stderr.write(f"sipcluster: {text}\n")
    return 1


async def run(command: str, arguments: argparse.Namespace, settings: Settings) -> int:
    """Run ``user``, ``status`` or ``locations``; returns the exit code."""
    if not settings.etcd:
        return _error("--etcd URL is required (or SIPCLUSTER_ETCD)")
    try:
        client = await connect_etcd(settings.etcd)
    except (ConnectionError, ValueError) as error:
        return _error(str(error))
    keys = KeyLayout(settings.etcd_prefix)
    try:
        if command == "user":
            return await _user(client, keys, arguments)
        if command == "status":
            return await _status(client, keys, arguments.json)
        if command == "drain":
            return await _drain(client, keys, arguments.worker, arguments.wait, arguments.timeout)
        return await _locations(client, keys, arguments.aor, arguments.json)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


def _check_user(user: str) -> str | None:
    name, at, domain = user.partition("@")
    if not at or not name or not domain or "@" in domain:
        return None
    return f"{name}@{domain.lower()}"


async def _user(client: Any, keys: KeyLayout, arguments: argparse.Namespace) -> int:
    from registry import add_user, list_users, remove_user  # noqa: PLC0415

    action = arguments.user_command
    if action == "list":
        for user in await list_users(client, keys):
            _print(user)
        return 0
    checked = _check_user(arguments.user)
    if checked is None:
        return _error(f"{arguments.user!r}: a user is NAME@DOMAIN")
    user = checked
    if action == "remove":
        if not await remove_user(client, keys, user):
            return _error(f"no user {user}")
        _print(f"removed {user}")
        return 0
    password = arguments.password
    if password is None:
        if not sys.stdin.isatty():
            return _error("--password is required when not run in a terminal")
        password = getpass.getpass(f"password for {user}: ")
    if not password:
        return _error("the password must not be empty")
    await add_user(client, keys, user, password)
    _print(f"added {user}")
    return 0


async def _status(client: Any, keys: KeyLayout, as_json: bool) -> int:
    members = await client.get_prefix(keys.members)
    workers: list[WorkerRecord] = []
    lbs: list[LBRecord] = []
    for kv in members:
        with contextlib.suppress(ValueError, TypeError):
            if kv.key.startswith(keys.workers):
                workers.append(WorkerRecord.from_json(kv.value))
            elif kv.key.startswith(keys.lbs):
                lbs.append(LBRecord.from_json(kv.value))
    ring = Ring(w.id for w in workers if w.state == "active")
    rows: list[dict[str, Any]] = [
        {
            "id": w.id,
            "state": w.state,
            "pid": w.pid,
            "host": w.host,
            "address": w.endpoint,
            "http": w.http,
            "load": w.load,
            "share": ring.share(w.id) if w.state == "active" else 0.0,
        }
        for w in sorted(workers, key=lambda record: record.id)
    ]
    balancers: list[dict[str, Any]] = [
        {
            "id": lb.id,
            "pid": lb.pid,
            "host": lb.host,
            "address": lb.endpoint,
            "http": lb.http,
            "sockets": [
                f"{s.transport}:{s.host}:{s.port} (advertised {s.advertised})" for s in lb.sockets
            ],
        }
        for lb in sorted(lbs, key=lambda record: record.id)
    ]
    if as_json:
        _print(
            json.dumps(
                {"workers": rows, "load_balancers": balancers, "ring": f"{ring.fingerprint:016x}"},
                indent=2,
            )
        )
        return 0
    _print(f"ring {ring.fingerprint:016x}: {len(ring.workers)} active workers")
    _print(f"{'WORKER':20} {'STATE':9} {'PID':>7} {'HOST':16} {'SHARE':>6} {'LOAD':>5}  ADDRESS")
    for row in rows:
        _print(
            f"{row['id']:20} {row['state']:9} {row['pid']:>7} {row['host']:16} "
            f"{row['share']:>6.1%} {row['load']:>5.2f}  {row['address']}"
        )
    _print(f"{'LOAD BALANCER':20} {'PID':>7} {'HOST':16}  SOCKETS")
    for row in balancers:
        _print(f"{row['id']:20} {row['pid']:>7} {row['host']:16}  {', '.join(row['sockets'])}")
    return 0


async def _drain(
    client: Any, keys: KeyLayout, worker_id: str, wait: bool, timeout: float | None
) -> int:
    """Set the worker's record to ``draining`` (same lease); the worker sees it
    through its membership watch and drains as on SIGTERM (worker/server.py)."""
    key = keys.worker(worker_id)
    for _ in range(_DRAIN_ATTEMPTS):
        found = await client.get(key)
        if found is None:
            return _error(f"no worker {worker_id!r} in the cluster (see sipcluster status)")
        try:
            record = WorkerRecord.from_json(found.value)
        except (ValueError, TypeError) as error:
            return _error(f"the record of worker {worker_id!r} is unreadable: {error}")
        if record.state == DRAINING:
            _print(f"worker {worker_id} was already draining")
            break
        draining = dataclasses.replace(record, state=DRAINING)
        # Only over the record just read: the worker rewrites it (its load).
        written = await client.transaction(
            compare=[client.transactions.mod(key) == found.mod_revision],
            success=[client.transactions.put(key, draining.to_json(), lease=found.lease)],
            failure=[],
        )
        if written[0]:
            _print(f"worker {worker_id} is draining")
            break
    else:
        return _error(f"worker {worker_id!r} kept changing its record; try again")
    if not wait:
        return 0
    try:
        await asyncio.wait_for(_until_deleted(client, key), timeout)
    except TimeoutError:
        return _error(f"worker {worker_id!r} is still draining after {timeout:g} s")
    _print(f"worker {worker_id} has left the cluster")
    return 0


async def _until_deleted(client: Any, key: bytes) -> None:
    import aetcd  # noqa: PLC0415

    while True:
        found = await client.get(key)
        if found is None:
            return
        watch = await client.watch(key, start_revision=found.mod_revision + 1)
        try:
            async for event in watch:
                if event.kind == aetcd.rtypes.EventKind.DELETE:
                    return
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()


async def _locations(client: Any, keys: KeyLayout, aor: str | None, as_json: bool) -> int:
    from registry import Binding  # noqa: PLC0415

    prefix = keys.aor_bindings(aor) if aor else keys.bindings
    now = time.time()
    rows = []
    for kv in await client.get_prefix(prefix):
        try:
            binding = Binding.decode(kv.value)
        except (ValueError, TypeError):
            continue
        if binding.expires_at <= now:
            continue
        rows.append(binding)
    rows.sort(key=lambda binding: (binding.aor, binding.uri))
    if as_json:
        _print(
            json.dumps(
                [
                    {
                        "aor": b.aor,
                        "contact": b.uri,
                        "expires": int(b.expires_at - now),
                        "q": b.q,
                        "received": None if b.received is None else list(b.received),
                        "user_agent": b.user_agent,
                    }
                    for b in rows
                ],
                indent=2,
            )
        )
        return 0
    for binding in rows:
        received = binding.received
        via = ""
        if received is not None:
            via = f" via {received.transport}:{received.host}:{received.port}"
        _print(f"{binding.aor}  {binding.uri}  expires {int(binding.expires_at - now)}s{via}")
    if not rows:
        _print("no bindings")
    return 0


async def send_options(uri_text: str, timeout: float) -> int:
    """Send an OPTIONS to ``uri_text`` and return 0 when a 200 comes back.

    The request goes over UDP, or TCP when the URI says ``transport=tcp``, to the
    URI's host (an IP address or a name resolved by the system) and port; over
    UDP it is retransmitted at T1, 2*T1 ... (RFC 3261 17.1.2.2).
    """
    try:
        uri = parse_uri(uri_text)
    except Exception:  # any parse failure is a usage error
        return _error(f"{uri_text!r} is not a SIP URI")
    if not isinstance(uri, SipURI):
        return _error(f"{uri_text!r} is not a sip: or sips: URI")
    transport = "tcp" if uri.transport == "tcp" else "udp"
    host = uri.host.strip("[]")
    port = uri.port or 5060
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        )
    except OSError as error:
        return _error(f"cannot resolve {host}: {error.strerror}")
    family, _, _, _, socket_address = infos[0]
    address = (socket_address[0], socket_address[1])
    local = "[::1]" if family == socket.AF_INET6 else "127.0.0.1"
    branch = "z9hG4bK-options-" + secrets.token_hex(8)
    request = Request(
        "OPTIONS",
        uri_text,
        [
            ("Via", f"SIP/2.0/{transport.upper()} {local}:9;branch={branch};rport"),
            ("Max-Forwards", 70),
            ("To", f"<{uri_text}>"),
            ("From", f"<sip:probe@{local}>;tag={secrets.token_hex(4)}"),
            ("Call-ID", f"{secrets.token_hex(12)}@sipcluster-options"),
            ("CSeq", "1 OPTIONS"),
            ("Accept", "application/sdp"),
            ("User-Agent", f"sipcluster-options/{os.getpid()}"),
        ],
    )
    data = request.to_bytes()
    try:
        response = await asyncio.wait_for(
            _exchange(transport, family, address, data, branch), timeout
        )
    except TimeoutError:
        return _error(f"no answer from {uri_text} within {timeout:.0f} s")
    except OSError as error:
        return _error(f"{uri_text}: {error.strerror or error}")
    _print(f"{response.status} {response.reason}")
    return 0 if response.status == 200 else 1


async def _exchange(
    transport: str, family: int, address: Any, data: bytes, branch: str
) -> Response:
    loop = asyncio.get_running_loop()
    if transport == "tcp":
        from sipcore import MessageFramed, StreamFramer  # noqa: PLC0415

        reader, writer = await asyncio.open_connection(address[0], address[1])
        writer.write(data)
        framer = StreamFramer()
        try:
            while chunk := await reader.read(65536):
                framer.receive_data(chunk)
                while (event := framer.next_event()) is not None:
                    if isinstance(event, MessageFramed):
                        response = _final(event.data, branch)
                        if response is not None:
                            return response
        finally:
            writer.close()
        raise OSError("the connection closed without an answer")
    answer: asyncio.Future[Response] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, received: bytes, _: Any) -> None:
            response = _final(received, branch)
            if response is not None and not answer.done():
                answer.set_result(response)

    udp, _ = await loop.create_datagram_endpoint(Client, family=family, remote_addr=address)
    try:
        interval = 0.5
        while True:
            udp.sendto(data)
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(answer), interval)
            interval = min(interval * 2, 4.0)
    finally:
        udp.close()


def _final(data: bytes, branch: str) -> Response | None:
    try:
        message = parse_message(data)
    except MessageError:
        return None
    if not isinstance(message, Response) or message.status < 200:
        return None
    try:
        if message.via.branch != branch:
            return None
    except MessageError:
        return None
    return message
