"""End to end: `sipcluster run --workers 2` with a real etcd, over UDP and TCP.

Every test talks SIP to a real node (load balancer and worker processes) through
real sockets; the user agents are tests/harness.py's (pjsua2 and SIPp drive the
tests in test_peers.py).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from harness import Node, UserAgent, add_user, metric_sum, start_node

from cluster.etcd import LocalEtcd
from cluster.ring import Ring
from sipcore import Request, Response, build_credentials, make_cancel, parse_challenge

T = TypeVar("T")
DOMAIN = "example.com"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def open_node(etcd_server: LocalEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node with --auth none."""
    node = start_node(
        etcd_server.url,
        tmp_path_factory.mktemp("node"),
        auth="none",
        domain=DOMAIN,
        extra=["--min-expires", "1"],
    )
    yield node
    assert node.stop() == 0, "\n".join(node.log[-30:])


@pytest.fixture(scope="module")
def digest_node(etcd_server: LocalEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node with --auth digest and two users."""
    node = start_node(
        etcd_server.url, tmp_path_factory.mktemp("node"), auth="digest", domain=DOMAIN
    )
    for user in ("alice", "bob"):
        add_user(node, f"{user}@{DOMAIN}", f"{user}-secret")
    yield node
    assert node.stop() == 0, "\n".join(node.log[-30:])


def locations(node: Node, aor: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "locations",
            "--etcd",
            node.etcd_url,
            "--etcd-prefix",
            node.prefix,
            aor,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def agents(node: Node, transport: str, *names: str) -> list[UserAgent]:
    return [
        await UserAgent(name, DOMAIN, transport=transport).start((node.host, node.port))
        for name in names
    ]


def route_set(response: Response) -> list[tuple[str, str]]:
    """The caller's route set from a 2xx: Record-Route reversed (RFC 3261 12.1.2)."""
    return [("Route", value) for value in reversed(response.get_all("Record-Route"))]


async def call_setup(caller: UserAgent, callee: UserAgent) -> tuple[Request, Request]:
    """INVITE from caller to callee through the node; returns (sent, received)."""
    invite = caller.request(
        "INVITE",
        f"sip:{callee.aor}",
        body=b"v=0\r\n",
        headers=[("Content-Type", "application/sdp")],
    )
    caller.send(invite)
    received = await callee.receive_request("INVITE")
    return invite, received


# ---------------------------------------------------------------------- registrar


def test_registration_with_digest_md5_and_sha256(digest_node: Node) -> None:
    async def scenario() -> None:
        alice, bob = await agents(digest_node, "udp", "alice", "bob")
        challenged = await alice.register()
        assert challenged.status == 401
        algorithms = [
            value.rsplit("algorithm=", 1)[1] for value in challenged.get_all("WWW-Authenticate")
        ]
        assert algorithms == ["SHA-256", "MD5"]
        assert (await alice.register("alice-secret", algorithm="SHA-256")).status == 200
        assert (await bob.register("bob-secret", algorithm="MD5")).status == 200
        await alice.close()
        await bob.close()

    run(scenario())
    assert "sip:alice@127.0.0.1" in locations(digest_node, f"alice@{DOMAIN}")


def node_gauge(node: Node, name: str) -> float:
    """The sum over the node's processes of gauge ``name`` (the node's /metrics)."""
    return metric_sum(node.http_port, name)


def test_challenges_keep_no_transaction(etcd_server: LocalEtcd, tmp_path: Path) -> None:
    # RFC 3261 8.2.7, 26.1.5: REGISTERs without credentials are challenged by a
    # stateless UAS; a retransmission gets the same To tag.
    node = start_node(etcd_server.url, tmp_path, auth="digest", domain=DOMAIN)
    try:

        async def scenario() -> None:
            agents_ = await agents(node, "udp", *(f"user{i}" for i in range(5)))
            for agent in agents_:
                register = agent.request(
                    "REGISTER", f"sip:{DOMAIN}", to=f"sip:{agent.aor}", headers=[("Expires", 60)]
                )
                agent.send(register)
                first = await agent.receive_response(200, method="REGISTER")
                agent.send(register)
                again = await agent.receive_response(200, method="REGISTER")
                assert (first.status, again.status) == (401, 401)
                assert first.to.tag is not None
                assert first.to.tag == again.to.tag
                await agent.close()

        run(scenario())
        assert node_gauge(node, "sipcluster_worker_transactions") == 0
    finally:
        assert node.stop() == 0, "\n".join(node.log[-30:])


def test_wrong_password_is_refused(digest_node: Node) -> None:
    async def scenario() -> None:
        (alice,) = await agents(digest_node, "udp", "alice")
        response = await alice.register("not-the-password")
        assert response.status == 401
        await alice.close()

    run(scenario())


def test_calls_need_proxy_authentication(digest_node: Node) -> None:
    async def scenario() -> None:
        alice, bob = await agents(digest_node, "udp", "alice", "bob")
        assert (await bob.register("bob-secret")).status == 200
        invite = alice.request("INVITE", f"sip:{bob.aor}")
        alice.send(invite)
        challenge = await alice.receive_response(200)
        assert challenge.status == 407
        assert challenge.get("Proxy-Authenticate") is not None
        await alice.close()
        await bob.close()

    run(scenario())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_register_refresh_and_star_removal(open_node: Node, transport: str) -> None:
    async def scenario() -> None:
        (carol,) = await agents(open_node, transport, f"carol-{transport}")
        first = await carol.register(expires=120)
        assert first.status == 200
        (contact,) = first.contacts
        assert contact.expires is not None
        assert 110 <= contact.expires <= 120
        second = carol.request(
            "REGISTER", f"sip:{DOMAIN}", to=f"sip:{carol.aor}", headers=[("Expires", 0)]
        )
        second.set("Contact", "*")
        carol.send(second)
        removed = await carol.receive_response(200, method="REGISTER")
        assert removed.status == 200
        assert removed.contacts == []
        await carol.close()

    run(scenario())
    assert "no bindings" in locations(open_node, f"carol-{transport}@{DOMAIN}")


def test_the_commit_window_delays_the_200_of_a_register(
    etcd_server: LocalEtcd, tmp_path: Path
) -> None:
    """``--commit-window`` reaches each worker's location store: a REGISTER's 200
    waits for the commit, which waits up to the window for other changes to join
    it (group commit); with 0.4 s the 200 cannot come sooner than that."""
    node = start_node(
        etcd_server.url,
        tmp_path,
        workers=1,
        auth="none",
        domain=DOMAIN,
        extra=["--commit-window", "0.4"],
    )

    async def scenario() -> float:
        (dave,) = await agents(node, "udp", "dave")
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await dave.register(expires=120)
        elapsed = loop.time() - started
        assert response.status == 200
        await dave.close()
        return elapsed

    try:
        assert run(scenario()) >= 0.4
        assert "sip:dave@" in locations(node, f"dave@{DOMAIN}")
    finally:
        assert node.stop() == 0, "\n".join(node.log[-30:])


def test_a_short_expiry_removes_the_binding(open_node: Node) -> None:
    async def scenario() -> None:
        dave, eve = await agents(open_node, "udp", "dave", "eve")
        assert (await dave.register(expires=1)).status == 200
        # The binding lives one second; the thing under test is time passing.
        await asyncio.sleep(1.5)
        invite = eve.request("INVITE", f"sip:{dave.aor}")
        eve.send(invite)
        response = await eve.receive_response(200)
        assert response.status in (404, 480)
        await dave.close()
        await eve.close()

    run(scenario())


# -------------------------------------------------------------------------- calls


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_call_through_the_proxy_with_record_route(open_node: Node, transport: str) -> None:
    async def scenario() -> None:
        caller, callee = await agents(
            open_node, transport, f"frank-{transport}", f"grace-{transport}"
        )
        assert (await callee.register()).status == 200
        invite, received = await call_setup(caller, callee)
        assert received.uri_text.startswith(f"sip:grace-{transport}@127.0.0.1:")
        assert received.record_routes, "the proxy record-routes INVITEs"
        assert received.max_forwards == 69
        callee.answer(received, 180)
        assert (await caller.receive_response(180)).status == 180
        callee.answer(received, 200)
        ok = await caller.receive_response(200)
        assert ok.status == 200
        assert ok.get_all("Record-Route") == received.get_all("Record-Route")
        contact = str(ok.contacts[0].uri)
        routes = route_set(ok)
        ack = caller.request(
            "ACK",
            contact,
            to=f"sip:{callee.aor}",
            to_tag=ok.to.tag,
            cseq=invite.cseq.number,
            headers=routes,
        )
        caller.send(ack)
        assert (await callee.receive_request("ACK")).uri_text == contact
        # The callee hangs up: its BYE follows the route set the other way.
        callee_routes = [("Route", value) for value in received.get_all("Record-Route")]
        bye = callee.request(
            "BYE",
            str(invite.contacts[0].uri),
            to=f"sip:{caller.aor}",
            to_tag=invite.from_.tag,
            call_id=invite.call_id,
            from_tag=ok.to.tag,
            headers=callee_routes,
        )
        callee.send(bye)
        received_bye = await caller.receive_request("BYE")
        caller.answer(received_bye, 200)
        assert (await callee.receive_response(200, method="BYE")).status == 200
        await caller.close()
        await callee.close()

    run(scenario())


def test_cancel_before_the_answer(open_node: Node) -> None:
    async def scenario() -> None:
        caller, callee = await agents(open_node, "udp", "heidi", "ivan")
        assert (await callee.register()).status == 200
        invite, received = await call_setup(caller, callee)
        callee.answer(received, 180)
        assert (await caller.receive_response(180)).status == 180
        caller.send(make_cancel(invite))
        assert (await caller.receive_response(200, method="CANCEL")).status == 200
        cancel = await callee.receive_request("CANCEL")
        callee.answer(cancel, 200)
        callee.answer(received, 487)
        terminated = await caller.receive_response(300, method="INVITE")
        assert terminated.status == 487
        await caller.close()
        await callee.close()

    run(scenario())


def test_a_busy_callee_reaches_the_caller(open_node: Node) -> None:
    async def scenario() -> None:
        caller, callee = await agents(open_node, "udp", "judy", "karl")
        assert (await callee.register()).status == 200
        _, received = await call_setup(caller, callee)
        callee.answer(received, 486)
        assert (await caller.receive_response(300)).status == 486
        # The proxy acknowledges the 486 itself (RFC 3261 17.1.1.3).
        assert (await callee.receive_request("ACK")).method == "ACK"
        await caller.close()
        await callee.close()

    run(scenario())


def test_a_callee_that_cannot_be_reached_over_tcp_fails_at_once(open_node: Node) -> None:
    # The callee registered over TCP and went away: the load balancer cannot
    # connect to it, hands the INVITE back, and the client transaction reports
    # the transport error (RFC 3261 17.1.4, 18.4): the caller gets a final
    # response now rather than a 408 after Timer B (32 s).
    async def scenario() -> None:
        (caller,) = await agents(open_node, "udp", "lena")
        (callee,) = await agents(open_node, "tcp", "mark")
        assert (await callee.register()).status == 200
        await callee.close()
        caller.send(caller.request("INVITE", f"sip:{callee.aor}"))
        final = await caller.receive_response(300, timeout=10.0)
        assert final.status in (480, 500, 503), final.status
        await caller.close()

    run(scenario())


def test_parallel_forking_first_200_wins(open_node: Node) -> None:
    async def scenario() -> None:
        caller, phone, laptop = await agents(open_node, "udp", "leo", "mia", "mia")
        assert (await phone.register()).status == 200
        registered = await laptop.register()
        assert len(registered.contacts) == 2
        invite = caller.request("INVITE", "sip:mia@example.com")
        caller.send(invite)
        on_phone = await phone.receive_request("INVITE")
        on_laptop = await laptop.receive_request("INVITE")
        # Both ring; a branch is CANCELled only once it answered provisionally
        # (RFC 3261 9.1), which a phone does at once.
        phone.answer(on_phone, 180)
        laptop.answer(on_laptop, 180)
        phone.answer(on_phone, 200)
        assert (await caller.receive_response(200)).status == 200
        cancel = await laptop.receive_request("CANCEL")
        laptop.answer(cancel, 200)
        laptop.answer(on_laptop, 487)
        assert (await laptop.receive_request("ACK")).method == "ACK"
        await caller.close()
        await phone.close()
        await laptop.close()

    run(scenario())


def test_unknown_user_too_many_hops_and_loops(open_node: Node) -> None:
    async def scenario() -> None:
        (caller,) = await agents(open_node, "udp", "nina")
        caller.send(caller.request("INVITE", "sip:nobody@example.com"))
        assert (await caller.receive_response(200)).status == 404
        no_hops = caller.request("OPTIONS", "sip:nobody@example.com")
        no_hops.set("Max-Forwards", 0)
        caller.send(no_hops)
        assert (await caller.receive_response(200)).status == 483
        # A request that comes back to the proxy unchanged loops (RFC 3261 16.3
        # step 4, RFC 5393): the callee sends the forwarded MESSAGE straight back,
        # with the Request-URI it had when the proxy first saw it.
        (callee,) = await agents(open_node, "udp", "olaf")
        assert (await callee.register()).status == 200
        message = caller.request(
            "MESSAGE", f"sip:{callee.aor}", body=b"hello", headers=[("Content-Type", "text/plain")]
        )
        caller.send(message)
        forwarded = await callee.receive_request("MESSAGE")
        assert forwarded.vias[1].branch == message.via.branch  # ours on top
        bounced = forwarded.copy()
        bounced.uri = message.uri
        callee.send(bounced)
        assert (await callee.receive_response(200, method="MESSAGE")).status == 482
        await callee.close()
        await caller.close()

    run(scenario())


def test_redirect_mode(etcd_server: LocalEtcd, tmp_path: Path) -> None:
    node = start_node(
        etcd_server.url,
        tmp_path,
        auth="none",
        domain=DOMAIN,
        extra=["--mode", "redirect"],
        workers=1,
    )
    try:

        async def scenario() -> None:
            caller, callee = await agents(node, "udp", "olga", "pete")
            assert (await callee.register()).status == 200
            caller.send(caller.request("INVITE", f"sip:{callee.aor}"))
            moved = await caller.receive_response(200)
            assert moved.status == 302
            assert [str(c.uri) for c in moved.contacts] == [callee.contact]
            await caller.close()
            await callee.close()

        run(scenario())
    finally:
        assert node.stop() == 0


def test_a_nonce_from_one_worker_verifies_on_another(digest_node: Node) -> None:
    """Nonces are stateless (HMAC with the cluster's secret): credentials sent with
    another Call-ID, which the ring gives to another worker, still verify."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "status",
            "--etcd",
            digest_node.etcd_url,
            "--etcd-prefix",
            digest_node.prefix,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    workers = [worker["id"] for worker in json.loads(result.stdout)["workers"]]
    ring = Ring(workers)
    first = next(
        f"first-{i}@test"
        for i in range(1000)
        if ring.owner_of(f"first-{i}@test".encode()) == workers[0]
    )
    second = next(
        f"second-{i}@test"
        for i in range(1000)
        if ring.owner_of(f"second-{i}@test".encode()) == workers[1]
    )

    async def scenario() -> None:
        (alice,) = await agents(digest_node, "udp", "alice")
        register = alice.request("REGISTER", f"sip:{DOMAIN}", to=f"sip:{alice.aor}", call_id=first)
        alice.send(register)
        challenge = await alice.receive_response(200, method="REGISTER")
        assert challenge.status == 401
        credentials = build_credentials(
            parse_challenge(challenge.get_all("WWW-Authenticate")[0]),
            username="alice",
            password="alice-secret",
            method="REGISTER",
            uri=f"sip:{DOMAIN}",
            cnonce="c1",
        )
        again = alice.request(
            "REGISTER",
            f"sip:{DOMAIN}",
            to=f"sip:{alice.aor}",
            call_id=second,
            headers=[("Authorization", str(credentials))],
        )
        alice.send(again)
        assert (await alice.receive_response(200, method="REGISTER")).status == 200
        await alice.close()

    run(scenario())
