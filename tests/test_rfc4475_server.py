"""The 49 RFC 4475 messages replayed over UDP against a running node.

`sipcluster run --auth none --domain example.com`: each message is sent as it is
in tests/conformance/rfc4475/, except the top Via's sent-by, rewritten to the
test's loopback socket so that the answer comes back here (and nowhere else).
The expected outcome of each (a final status, or no answer at all) is in
``server-outcomes.json`` beside the data, with the reason.

A message that must get no answer is followed by an OPTIONS to the server with
the same Call-ID: both go to the same worker, which handles them in order, so
the OPTIONS' 200 arriving first proves nothing was sent for the message.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Node, start_node

from cluster.etcd import LocalEtcd
from sipcore import (
    MessageError,
    Request,
    Response,
    extract_call_id,
    make_response,
    parse_message,
)

DATA = Path(__file__).parent / "conformance" / "rfc4475"
OUTCOMES = {
    name: entry
    for name, entry in json.loads((DATA / "server-outcomes.json").read_text()).items()
    if not name.startswith("_")
}
# The first Via header line: its name, the sent-protocol and the sent-by.
_TOP_VIA = re.compile(
    rb"(\r\n(?:[Vv][Ii][Aa]|[Vv])[ \t]*:[ \t\r\n]*[A-Za-z0-9.!%*_+`'~-]+[ \t\r\n]*/[ \t\r\n]*"
    rb"[A-Za-z0-9.!%*_+`'~-]+[ \t\r\n]*/[ \t\r\n]*[A-Za-z0-9.!%*_+`'~-]+[ \t\r\n]+)"
    rb"(\[[0-9A-Fa-f:.]+\]|[^ \t\r\n;:,]+)(?::[0-9]+)?"
)


_LOOPBACK_ROUTE = re.compile(rb"(\r\nRoute: <sip:)127\.0\.0\.1:[0-9]+>")


def loopback_via(data: bytes, host: str, port: int) -> bytes:
    """``data`` with its top Via's sent-by replaced by ``host:port``, and a Route
    naming a loopback address (mpart01's) pointed there too."""
    if data.startswith(b"SIP/"):
        return data  # a response: nothing is sent back, nothing to rewrite
    address = f"{host}:{port}".encode()
    rewritten, count = _TOP_VIA.subn(rb"\g<1>" + address, data, count=1)
    assert count == 1
    return _LOOPBACK_ROUTE.sub(rb"\g<1>" + address + b">", rewritten)


def test_the_outcome_table_covers_every_message() -> None:
    assert set(OUTCOMES) == {path.stem for path in DATA.glob("*.dat")}


@pytest.fixture(scope="module")
def node(etcd_server: LocalEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    running = start_node(
        etcd_server.url,
        tmp_path_factory.mktemp("node"),
        auth="none",
        domain="example.com",
    )
    yield running
    assert running.stop() == 0


class Client(asyncio.DatagramProtocol):
    """The test's socket: collects responses; answers relayed requests 200."""

    def __init__(self) -> None:
        self.responses: asyncio.Queue[Response] = asyncio.Queue()
        self.relayed: list[Request] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's UDP transport does not derive from DatagramTransport (3.11).
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, address: tuple[str, int]) -> None:
        try:
            message = parse_message(data)
        except MessageError:
            return
        if isinstance(message, Response):
            self.responses.put_nowait(message)
        elif self.transport is not None and message.method != "ACK":
            self.relayed.append(message)
            self.transport.sendto(make_response(message, 200, to_tag="relayed").to_bytes(), address)


async def replay(node: Node, name: str) -> int | None:
    loop = asyncio.get_running_loop()
    # Several messages share a branch (z9hG4bKkdjuw ...): each is sent from an
    # address of its own, so that none matches another's transaction (RFC 3261
    # 17.2.3 matches on branch and sent-by) even when the OS reuses a port.
    host = f"127.0.0.{10 + sorted(OUTCOMES).index(name)}"
    transport, client = await loop.create_datagram_endpoint(Client, local_addr=(host, 0))
    port = transport.get_extra_info("sockname")[1]
    destination = (node.host, node.port)
    try:
        data = loopback_via((DATA / f"{name}.dat").read_bytes(), host, port)
        transport.sendto(data, destination)
        expected = OUTCOMES[name]["status"]
        if expected is None:
            call_id = (extract_call_id(data) or b"none").decode("utf-8", "replace")
            probe = (
                f"OPTIONS sip:{node.uri_host} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bKprobe{uuid.uuid4().hex}\r\n"
                "Max-Forwards: 70\r\nTo: <sip:probe@example.com>\r\n"
                "From: <sip:probe@example.com>;tag=p\r\n"
                f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            ).encode()
            transport.sendto(probe, destination)
        while True:
            response = await asyncio.wait_for(client.responses.get(), 5.0)
            if response.status < 200:
                continue
            if expected is None:
                assert response.cseq.method == "OPTIONS", f"{name} was answered {response.status}"
                return None
            if OUTCOMES[name].get("forward"):
                assert [r.call_id for r in client.relayed] == [response.call_id]
            if response.status == 200 and response.cseq.method == "REGISTER":
                # Remove what was registered, so that later messages to the same
                # users (user@example.com ...) find no binding whatever the order.
                await unregister(transport, client, host, port, destination, response)
            return response.status
    finally:
        transport.close()


async def unregister(
    transport: asyncio.DatagramTransport,
    client: Client,
    host: str,
    port: int,
    destination: tuple[str, int],
    registered: Response,
) -> None:
    """REGISTER Contact: * with Expires: 0 for the AoR of ``registered``."""
    aor = registered.to.uri
    request = (
        f"REGISTER sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bKclean{uuid.uuid4().hex}\r\n"
        f"Max-Forwards: 70\r\nTo: <{aor}>\r\nFrom: <{aor}>;tag=clean\r\n"
        f"Call-ID: clean-{uuid.uuid4().hex}\r\nCSeq: 1 REGISTER\r\nContact: *\r\n"
        "Expires: 0\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    transport.sendto(request, destination)
    while True:
        response = await asyncio.wait_for(client.responses.get(), 5.0)
        if response.cseq.method == "REGISTER" and response.get("Contact") is None:
            assert response.status == 200
            return


@pytest.mark.parametrize("name", sorted(OUTCOMES))
def test_replay(node: Node, name: str) -> None:
    expected = OUTCOMES[name]["status"]
    assert asyncio.run(replay(node, name)) == expected, OUTCOMES[name]["why"]
