"""Tests of worker/registrar.py: RFC 3261 10.3 and RFC 3327 on a real etcd (through a
LocationStore), plus the pure decision functions on their own."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cluster.etcd import LocalEtcd, free_port
from cluster.keys import KeyLayout
from cluster.membership import connect_etcd
from registry import AorState, Binding, LocationStore, UserStore, add_user
from sipcore import (
    DigestServer,
    NonceKeyring,
    Request,
    Response,
    build_credentials,
    parse_message,
)
from worker.auth import Authenticator
from worker.registrar import (
    FAILURE_RESPONSES,
    Refusal,
    Registrar,
    RegistrarConfig,
    RegistrarFailure,
    plan_bindings,
    read_register,
)
from worker.transport import Peer

T = TypeVar("T")

RFC4475 = Path(__file__).parent / "conformance" / "rfc4475"
DOMAIN = "example.com"
AOR = "alice@example.com"
PEER = Peer("lb1", 0, "udp", "192.0.2.10", 5060, None)
CONFIG = RegistrarConfig(domains=frozenset({DOMAIN}))


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run one test coroutine on a fresh event loop."""
    return asyncio.run(coroutine)


def register(
    *contacts: str,
    user: str = "alice",
    call_id: str = "call-1@192.0.2.10",
    cseq: int = 1,
    expires: int | None = None,
    request_uri: str = f"sip:{DOMAIN}",
    to: str | None = None,
    headers: tuple[str, ...] = (),
) -> Request:
    """A REGISTER for ``user`` with ``contacts`` (Contact values)."""
    token = call_id.replace("@", ".")
    lines = [
        f"REGISTER {request_uri} SIP/2.0",
        f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-{token}-{cseq};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{DOMAIN}>;tag=from-{token}",
        f"To: {to if to is not None else f'<sip:{user}@{DOMAIN}>'}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        *(f"Contact: {contact}" for contact in contacts),
        *([f"Expires: {expires}"] if expires is not None else []),
        "User-Agent: test-phone/1.0",
        *headers,
        "Content-Length: 0",
        "",
        "",
    ]
    message = parse_message("\r\n".join(lines).encode())
    assert isinstance(message, Request)
    return message


def contacts_of(response: Response) -> list[str]:
    return response.get_all("contact")


@dataclass
class Node:
    """One worker's registrar and location store."""

    registrar: Registrar
    store: LocationStore
    client: Any

    async def send(self, request: Request, now: float | None = None) -> Response:
        return await self.registrar.handle(request, PEER, time.time() if now is None else now)


@contextlib.asynccontextmanager
async def node(
    url: str,
    keys: KeyLayout,
    config: RegistrarConfig = CONFIG,
    *,
    authenticator: Authenticator | None = None,
    timeout: float = 5.0,
) -> AsyncIterator[Node]:
    """A worker's view: its own etcd client, LocationStore and Registrar."""
    client = await connect_etcd(url, timeout=timeout)
    store = LocationStore(client, keys, request_timeout=timeout)
    await store.start()
    try:
        yield Node(
            Registrar(config, store, authenticator, random_source=random.Random(7)), store, client
        )
    finally:
        await store.stop()
        await client.close()


# ------------------------------------------------------------------ 10.3 step by step


def test_new_binding_then_refresh(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body() -> None:
        async with node(etcd_server.url, key_layout) as worker:
            response = await worker.send(register("<sip:alice@192.0.2.10:5060>"))
            assert response.status == 200
            # RFC 3261 10.3 step 8: every binding with its expiry, a Date, and
            # RFC 3327: Supported: path.
            assert contacts_of(response) == ["<sip:alice@192.0.2.10:5060>;expires=3600"]
            assert response.get("date") is not None
            assert response.get("date").endswith("GMT")  # type: ignore[union-attr]
            assert response.supported == ("path",)
            assert response.to.tag is not None
            (binding,) = worker.store.lookup(AOR)
            assert binding.received == PEER
            assert binding.user_agent == "test-phone/1.0"
            assert binding.call_id == "call-1@192.0.2.10"
            assert binding.cseq == 1
            # Durable in etcd before the 200.
            stored = await worker.client.get_prefix(key_layout.aor_bindings(AOR))
            assert [Binding.decode(kv.value) for kv in stored] == [binding]

            refreshed = await worker.send(
                register("<sip:alice@192.0.2.10:5060>", cseq=2, expires=1800)
            )
            assert refreshed.status == 200
            assert contacts_of(refreshed) == ["<sip:alice@192.0.2.10:5060>;expires=1800"]
            assert len(worker.store.lookup(AOR)) == 1
            # A query (no Contact) lists the bindings and changes nothing.
            query = await worker.send(register(cseq=3))
            assert query.status == 200
            assert contacts_of(query) == ["<sip:alice@192.0.2.10:5060>;expires=1800"]

    run(body())


def test_expires_header_and_contact_parameter(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body() -> None:
        async with node(etcd_server.url, key_layout) as worker:
            response = await worker.send(
                register(
                    "<sip:alice@192.0.2.10:5060>",
                    "<sip:alice@192.0.2.11:5060>;expires=600",
                    "<sip:alice@192.0.2.12:5060>;expires=0",
                    expires=300,
                )
            )
            assert response.status == 200
            assert sorted(contacts_of(response)) == [
                "<sip:alice@192.0.2.10:5060>;expires=300",
                "<sip:alice@192.0.2.11:5060>;expires=600",
            ]
            # Expiry zero removes a binding.
            response = await worker.send(register("<sip:alice@192.0.2.11:5060>;expires=0", cseq=2))
            assert contacts_of(response) == ["<sip:alice@192.0.2.10:5060>;expires=300"]

    run(body())


def test_interval_too_brief_and_maximum(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body() -> None:
        async with node(etcd_server.url, key_layout) as worker:
            brief = await worker.send(register("<sip:alice@192.0.2.10>", expires=30))
            assert brief.status == 423
            assert brief.min_expires == 60
            brief = await worker.send(register("<sip:alice@192.0.2.10>;expires=59", cseq=2))
            assert brief.status == 423
            assert worker.store.lookup(AOR) == []
            capped = await worker.send(register("<sip:alice@192.0.2.10>", expires=10**6, cseq=3))
            assert capped.status == 200
            assert contacts_of(capped) == ["<sip:alice@192.0.2.10>;expires=7200"]

    run(body())


def test_wildcard_removes_every_binding(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body() -> None:
        async with node(etcd_server.url, key_layout) as worker:
            await worker.send(register("<sip:alice@192.0.2.10>", "<sip:alice@192.0.2.11>"))
            assert len(worker.store.lookup(AOR)) == 2
            not_alone = await worker.send(
                register("*", "<sip:alice@192.0.2.12>", expires=0, call_id="other", cseq=9)
            )
            assert not_alone.status == 400
            assert not_alone.reason == "Bad Request - Contact * Must Be The Only Contact"
            for expires in (None, 10):
                no_zero = await worker.send(register("*", expires=expires, call_id="other"))
                assert no_zero.status == 400
                assert no_zero.reason == "Bad Request - Contact * Requires Expires: 0"
            assert len(worker.store.lookup(AOR)) == 2
            # Same Call-ID, CSeq not higher than the stored one: the request fails.
            stale = await worker.send(register("*", expires=0, cseq=1))
            assert stale.status == 400
            removed = await worker.send(register("*", expires=0, call_id="other", cseq=1))
            assert removed.status == 200
            assert contacts_of(removed) == []
            assert worker.store.lookup(AOR) == []
            assert await worker.client.get_prefix(key_layout.bindings) is not None
            assert len(await worker.client.get_prefix(key_layout.bindings)) == 0

    run(body())


def test_call_id_and_cseq_ordering(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body() -> None:
        async with node(etcd_server.url, key_layout) as worker:
            contact = "<sip:alice@192.0.2.10>"
            assert (await worker.send(register(contact, cseq=5))).status == 200
            for cseq in (5, 4):
                refused = await worker.send(register(contact, cseq=cseq, expires=120))
                assert refused.status == 400
                assert refused.reason == "Bad Request - Out Of Order CSeq"
            assert worker.store.lookup(AOR)[0].cseq == 5
            assert (await worker.send(register(contact, cseq=6, expires=120))).status == 200
            # Another Call-ID (the UA restarted) updates whatever its CSeq.
            restarted = await worker.send(register(contact, call_id="new", cseq=1))
            assert restarted.status == 200
            (binding,) = worker.store.lookup(AOR)
            assert (binding.call_id, binding.cseq) == ("new", 1)

    run(body())


def test_several_contacts_keep_their_q_values(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body() -> None:
        async with node(etcd_server.url, key_layout) as worker:
            response = await worker.send(
                register(
                    '"Desk" <sip:alice@192.0.2.10>;q=0.5',
                    "<sip:alice@192.0.2.11;transport=tcp>;q=1.0;+sip.foo=bar",
                )
            )
            assert response.status == 200
            assert contacts_of(response) == [
                "<sip:alice@192.0.2.11;transport=tcp>;q=1.0;+sip.foo=bar;expires=3600",
                "<sip:alice@192.0.2.10>;q=0.5;expires=3600",
            ]
            assert [binding.q for binding in worker.store.lookup(AOR)] == [1.0, 0.5]

    run(body())


def test_max_contacts(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body() -> None:
        config = RegistrarConfig(domains=frozenset({DOMAIN}), max_contacts=2)
        async with node(etcd_server.url, key_layout, config) as worker:
            response = await worker.send(
                register("<sip:alice@192.0.2.10>", "<sip:alice@192.0.2.11>")
            )
            assert response.status == 200
            third = await worker.send(register("<sip:alice@192.0.2.12>", call_id="c3"))
            assert third.status == 403
            assert third.reason == "Forbidden - Too Many Registered Contacts"
            assert len(worker.store.lookup(AOR)) == 2
            # Refreshing or replacing within the limit still works.
            refresh = await worker.send(register("<sip:alice@192.0.2.11>", cseq=2))
            assert refresh.status == 200
            swap = await worker.send(
                register("<sip:alice@192.0.2.11>;expires=0", "<sip:alice@192.0.2.12>", cseq=3)
            )
            assert swap.status == 200
            assert len(contacts_of(swap)) == 2
            too_many = await worker.send(
                register(*(f"<sip:alice@192.0.2.{n}>" for n in range(20, 23)), cseq=4)
            )
            assert too_many.status == 403

    run(body())


def test_path_is_stored_and_echoed(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body() -> None:
        async with node(etcd_server.url, key_layout) as worker:
            path = ("<sip:edge1.example.net;lr>", "<sip:edge2.example.net;lr;ob>")
            response = await worker.send(
                register(
                    "<sip:alice@10.0.0.5:5060>",
                    headers=(f"Path: {path[0]}", f"Path: {path[1]}", "Supported: path"),
                )
            )
            assert response.status == 200
            # RFC 3327 5.3: the Path values come back in order.
            assert response.values("path") == list(path)
            assert worker.store.lookup(AOR)[0].path == path
            # Require: path is supported; a UA that did not announce path support
            # gets the binding stored but no Path in the 200.
            quiet = await worker.send(
                register(
                    "<sip:alice@10.0.0.5:5060>",
                    cseq=2,
                    headers=(f"Path: {path[0]}", "Require: path"),
                )
            )
            assert quiet.status == 200
            assert quiet.values("path") == [path[0]]
            silent = await worker.send(
                register("<sip:alice@10.0.0.5:5060>", cseq=3, headers=(f"Path: {path[1]}",))
            )
            assert silent.status == 200
            assert silent.get("path") is None
            assert worker.store.lookup(AOR)[0].path == (path[1],)

    run(body())


def test_request_uri_require_and_to_checks(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body() -> None:
        async with node(etcd_server.url, key_layout) as worker:
            contact = "<sip:alice@192.0.2.10>"
            foreign = await worker.send(register(contact, request_uri="sip:example.org"))
            assert foreign.status == 404
            tel = await worker.send(register(contact, request_uri="tel:+15551234567"))
            assert tel.status == 416
            unsupported = await worker.send(register(contact, headers=("Require: path, foo",)))
            assert unsupported.status == 420
            assert unsupported.unsupported == ("foo",)
            other_domain = await worker.send(register(contact, to="<sip:alice@example.org>"))
            assert other_domain.status == 404
            no_user = await worker.send(register(contact, to=f"<sip:{DOMAIN}>"))
            assert no_user.status == 404
            malformed = await worker.send(register("<sip:alice@192.0.2.10>;expires=soon"))
            assert malformed.status == 400
            assert worker.store.lookup(AOR) == []
            # The AoR is canonical: parameters dropped, escapes resolved.
            escaped = await worker.send(register(contact, to="<sip:%61lice@EXAMPLE.com;x=y>"))
            assert escaped.status == 200
            assert len(worker.store.lookup(AOR)) == 1

    run(body())


# ------------------------------------------------------------------ digest


def test_digest_authentication(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body() -> None:
        client = await connect_etcd(etcd_server.url)
        await add_user(client, key_layout, "alice@example.com", "alice secret")
        await add_user(client, key_layout, "bob@example.com", "bob secret")
        users = UserStore(client, key_layout)
        await users.start()
        keyring = NonceKeyring({"k1": b"0123456789abcdef0123456789abcdef"}, "k1")
        authenticator = Authenticator(DigestServer(keyring), users)
        try:
            async with node(etcd_server.url, key_layout, authenticator=authenticator) as worker:
                contact = "<sip:alice@192.0.2.10>"
                challenge = await worker.send(register(contact))
                assert challenge.status == 401
                challenges = challenge.www_authenticate
                assert [c.get("algorithm") for c in challenges] == ["SHA-256", "MD5"]
                assert all(c.get("realm") == DOMAIN for c in challenges)
                assert worker.store.lookup(AOR) == []

                cseq = 2
                # Both challenges carry one nonce: the second use counts nc=2.
                for nonce_count, offered in enumerate(challenges, start=1):
                    credentials = build_credentials(
                        offered,
                        username="alice",
                        password="alice secret",
                        method="REGISTER",
                        uri=f"sip:{DOMAIN}",
                        cnonce=f"cnonce{cseq}",
                        nc=nonce_count,
                    )
                    answer = await worker.send(
                        register(contact, cseq=cseq, headers=(f"Authorization: {credentials}",))
                    )
                    assert answer.status == 200, offered.get("algorithm")
                    cseq += 1
                assert len(worker.store.lookup(AOR)) == 1

                wrong = build_credentials(
                    challenges[0],
                    username="alice",
                    password="wrong",
                    method="REGISTER",
                    uri=f"sip:{DOMAIN}",
                    cnonce="x",
                    nc=3,
                )
                refused = await worker.send(
                    register(contact, cseq=cseq, headers=(f"Authorization: {wrong}",))
                )
                assert refused.status == 401
                assert len(refused.www_authenticate) == 2

                # Bob authenticates fine but may not change Alice's bindings.
                bobs = build_credentials(
                    challenges[1],
                    username="bob",
                    password="bob secret",
                    method="REGISTER",
                    uri=f"sip:{DOMAIN}",
                    cnonce="y",
                    nc=4,
                )
                forbidden = await worker.send(
                    register(
                        "<sip:bob@192.0.2.99>",
                        cseq=cseq + 1,
                        headers=(f"Authorization: {bobs}",),
                    )
                )
                assert forbidden.status == 403
                assert [binding.uri for binding in worker.store.lookup(AOR)] == [
                    "sip:alice@192.0.2.10"
                ]
        finally:
            await users.stop()
            await client.close()

    run(body())


# ------------------------------------------------------------------ the race


def test_concurrent_registrations_respect_max_contacts(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body() -> None:
        config = RegistrarConfig(domains=frozenset({DOMAIN}), max_contacts=1)
        async with (
            node(etcd_server.url, key_layout, config) as first,
            node(etcd_server.url, key_layout, config) as second,
        ):
            # Two devices of one AoR, two Call-IDs, two workers, at the same time.
            responses = await asyncio.gather(
                first.send(register("<sip:alice@192.0.2.10>", call_id="device-1")),
                second.send(register("<sip:alice@192.0.2.20>", call_id="device-2")),
            )
            assert sorted(response.status for response in responses) == [200, 403]
            # Both computed from the same empty state: the loser's commit
            # conflicted, it re-read the AoR from etcd and refused.
            assert first.registrar.statistics.conflicts + second.registrar.statistics.conflicts == 1
            stored = await first.client.get_prefix(key_layout.aor_bindings(AOR))
            assert len(stored) == 1
            winner = next(response for response in responses if response.status == 200)
            assert contacts_of(winner) == [
                Binding.decode(stored[0].value).contact + ";expires=3600"
            ]

    run(body())


def test_concurrent_registrations_list_every_binding(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body() -> None:
        async with (
            node(etcd_server.url, key_layout) as first,
            node(etcd_server.url, key_layout) as second,
        ):
            responses = await asyncio.gather(
                first.send(register("<sip:alice@192.0.2.10>", call_id="device-1")),
                second.send(register("<sip:alice@192.0.2.20>", call_id="device-2")),
            )
            assert [response.status for response in responses] == [200, 200]
            assert first.registrar.statistics.conflicts + second.registrar.statistics.conflicts == 1
            # Whichever committed second saw the other's binding and lists both.
            assert sorted(len(contacts_of(response)) for response in responses) == [1, 2]
            assert len(await first.client.get_prefix(key_layout.aor_bindings(AOR))) == 2
            # `*` on one worker removes the binding the other worker wrote, even
            # before its cache has heard of it.
            removed = await first.send(register("*", expires=0, call_id="device-3"))
            assert removed.status == 200
            assert len(await first.client.get_prefix(key_layout.aor_bindings(AOR))) == 0

    run(body())


def test_a_removal_on_another_worker_not_yet_seen_is_not_undone(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body() -> None:
        async with (
            node(etcd_server.url, key_layout) as first,
            node(etcd_server.url, key_layout) as second,
        ):
            both = await first.send(
                register("<sip:alice@192.0.2.10>", "<sip:alice@192.0.2.11>", call_id="device-1")
            )
            assert both.status == 200
            await second.store.wait_for_revision(first.store.aor_state(AOR).revision, timeout=5)
            # The first worker's cache falls behind (its watch paused), while the
            # second worker removes one of the bindings.
            await first.store.stop()
            removed = await second.send(
                register("<sip:alice@192.0.2.11>;expires=0", call_id="device-1", cseq=2)
            )
            assert contacts_of(removed) == ["<sip:alice@192.0.2.10>;expires=3600"]
            # A third device registers on the first worker, whose cache still
            # lists the removed binding: its commit conflicts on that binding's
            # key, and the change computed again from etcd leaves it removed.
            third = await first.send(register("<sip:alice@192.0.2.12>", call_id="device-2"))
            assert third.status == 200
            assert first.registrar.statistics.conflicts == 1
            assert sorted(contacts_of(third)) == [
                "<sip:alice@192.0.2.10>;expires=3600",
                "<sip:alice@192.0.2.12>;expires=3600",
            ]
            stored = await first.client.get_prefix(key_layout.aor_bindings(AOR))
            assert sorted(Binding.decode(kv.value).uri for kv in stored) == [
                "sip:alice@192.0.2.10",
                "sip:alice@192.0.2.12",
            ]

    run(body())


def test_max_contacts_hold_while_the_cache_lags_after_a_conflict(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body() -> None:
        config = RegistrarConfig(domains=frozenset({DOMAIN}), max_contacts=2)
        async with (
            node(etcd_server.url, key_layout, config) as first,
            node(etcd_server.url, key_layout, config) as second,
        ):
            # The first worker's watch pauses; a device registers on the second.
            await first.store.stop()
            other = await second.send(register("<sip:alice@192.0.2.20>", call_id="device-1"))
            assert other.status == 200
            # The first worker computes from its (empty) cache, conflicts, reads
            # etcd and registers: the 200 lists both.
            mine = await first.send(register("<sip:alice@192.0.2.10>", call_id="device-2"))
            assert len(contacts_of(mine)) == 2
            assert first.registrar.statistics.conflicts == 1
            # Its cache now has its own binding but still not the other one: a
            # third device must not get in on the strength of that.
            third = await first.send(register("<sip:alice@192.0.2.30>", call_id="device-3"))
            assert third.status == 403
            assert len(await first.client.get_prefix(key_layout.aor_bindings(AOR))) == 2

    run(body())


# ------------------------------------------------------------------ RFC 4475


def torture(name: str) -> Request:
    message = parse_message((RFC4475 / f"{name}.dat").read_bytes())
    assert isinstance(message, Request)
    return message


@pytest.mark.parametrize(
    ("name", "aor", "contact", "uri"),
    [
        # 3.3.12: no brackets, so ;unknownparam is a contact parameter.
        (
            "cparam01",
            "watson@example.com",
            "<sip:+19725552222@gw1.example.net>;unknownparam",
            "sip:+19725552222@gw1.example.net",
        ),
        # 3.3.13: inside the brackets it is a URI parameter.
        (
            "cparam02",
            "watson@example.com",
            "<sip:+19725552222@gw1.example.net;unknownparam>",
            "sip:+19725552222@gw1.example.net;unknownparam",
        ),
        # 3.3.14: the escaped Route header stays in the contact URI.
        (
            "regescrt",
            "user@example.com",
            "<sip:user@example.com?Route=%3Csip:sip.example.com%3E>",
            "sip:user@example.com?Route=%3Csip:sip.example.com%3E",
        ),
    ],
)
def test_rfc4475_contacts_are_stored_and_returned_exactly(
    etcd_server: LocalEtcd, key_layout: KeyLayout, name: str, aor: str, contact: str, uri: str
) -> None:
    async def body() -> None:
        async with node(etcd_server.url, key_layout) as worker:
            response = await worker.send(torture(name))
            assert response.status == 200
            assert contacts_of(response) == [f"{contact};expires=3600"]
            (binding,) = worker.store.lookup(aor)
            assert binding.contact == contact
            assert binding.uri == uri
            # And so does a later fetch, through etcd.
            (stored,) = (await worker.store.fetch_aor_state(aor)).bindings
            assert stored.contact == contact

    run(body())


def test_rfc4475_unknown_to_scheme_gets_400(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body() -> None:
        async with node(etcd_server.url, key_layout) as worker:
            response = await worker.send(torture("unksm2"))
            assert response.status == 400
            assert response.reason == "Bad Request - To Is Not A SIP URI"

    run(body())


# ------------------------------------------------------------------ etcd unreachable


def test_etcd_unreachable_gives_500_with_retry_after(tmp_path: Path) -> None:
    server = LocalEtcd(tmp_path / "etcd", client_port=free_port())
    server.start()
    keys = KeyLayout("/unreachable/")

    async def body() -> None:
        async with node(server.url, keys, timeout=1.0) as worker:
            assert (await worker.send(register("<sip:alice@192.0.2.10>"))).status == 200
            server.stop()
            # Lookups keep answering from the cache.
            assert len(worker.store.lookup(AOR)) == 1
            response = await worker.send(register("<sip:alice@192.0.2.11>", cseq=2))
            assert response.status == 500
            assert response.reason == "Server Internal Error - Location Service Unavailable"
            retry_after = int(response.get("retry-after") or "0")
            assert 2 <= retry_after <= 6
            assert len(worker.store.lookup(AOR)) == 1

    try:
        run(body())
    finally:
        server.stop()


# ------------------------------------------------------------------ pure decisions


def test_decisions_without_etcd() -> None:
    now = 1_700_000_000.0
    request = register("<sip:alice@192.0.2.10>", cseq=7)
    intent = read_register(request, CONFIG, AOR)
    assert not isinstance(intent, Refusal)
    plan = plan_bindings(intent, AorState(AOR, 0), now=now, config=CONFIG, received=PEER)
    assert not isinstance(plan, Refusal)
    assert plan.change is not None
    assert plan.change.expected_revision == 0
    (binding,) = plan.bindings
    assert binding.expires_at == now + 3600
    # The same request against the state it produced is out of order.
    state = AorState(AOR, 42, plan.bindings, (42,))
    again = plan_bindings(intent, state, now=now, config=CONFIG, received=PEER)
    assert again == Refusal(RegistrarFailure.OUT_OF_ORDER)
    # Once that binding has expired it no longer counts.
    later = plan_bindings(intent, state, now=now + 3601, config=CONFIG, received=PEER)
    assert not isinstance(later, Refusal)
    assert later.change is not None
    assert later.change.expected_revision == 42
    assert later.change.expected_bindings == ((binding.binding_id, 42),)


def test_every_failure_has_one_answer() -> None:
    assert set(FAILURE_RESPONSES) == set(RegistrarFailure)
    assert all(400 <= answer.status < 600 for answer in FAILURE_RESPONSES.values())
    retried = {failure for failure, answer in FAILURE_RESPONSES.items() if answer.retry_after}
    assert retried == {RegistrarFailure.STORE_UNAVAILABLE, RegistrarFailure.TOO_MUCH_CONTENTION}
