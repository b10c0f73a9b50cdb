"""Tests of registry/: the location service, credentials and the nonce secret, on a
real etcd (the session's ``etcd_server``, one key prefix per test)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from cluster.etcd import LocalEtcd
from cluster.keys import KeyLayout
from cluster.membership import connect_etcd
from registry import (
    AorChange,
    AorState,
    Binding,
    CommitOutcome,
    LocationStore,
    MalformedRecordError,
    UserStore,
    add_user,
    address_of_record,
    binding_id_for,
    contact_text,
    list_users,
    load_or_create_nonce_secret,
    plan_change,
    remove_user,
)
from registry._watched import WatchedRange
from sipcore import DigestAlgorithm, SipURI, compute_ha1, parse_name_addr, parse_uri
from worker.transport import Peer

T = TypeVar("T")

PEER = Peer("lb1", 0, "udp", "192.0.2.10", 5060, None)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run one test coroutine on a fresh event loop."""
    return asyncio.run(coroutine)


class Clock:
    """A clock the test moves by hand (seconds since the epoch)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def make_binding(
    aor: str,
    uri: str,
    expires_at: float,
    *,
    call_id: str = "call-1",
    cseq: int = 1,
    q: float | None = None,
) -> Binding:
    address = parse_name_addr(f"<{uri}>", "Contact")
    return Binding(
        aor=aor,
        binding_id=binding_id_for(address),
        contact=contact_text(address),
        uri=uri,
        expires_at=expires_at,
        q=q,
        call_id=call_id,
        cseq=cseq,
        received=PEER,
        user_agent="test",
        path=("<sip:edge.example.net;lr>",),
        registered_at=expires_at - 3600,
    )


def test_the_first_load_reads_in_pages_at_one_revision(
    etcd_server: LocalEtcd, key_layout: KeyLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large range (one response for 100,000 bindings would pass gRPC's 4 MB
    limit) is read in pages; here pages of 3 keys for 10 bindings."""
    monkeypatch.setattr("registry._watched.LOAD_PAGE", 3)

    async def body(client: Any) -> None:
        writer = LocationStore(client, key_layout)
        await writer.start()
        written = {}
        revision = 0
        for index in range(10):
            aor = f"user{index}@example.com"
            binding = make_binding(aor, f"sip:user{index}@192.0.2.{index + 1}", time.time() + 600)
            revision = (await writer.commit(replace_all(writer, aor, [binding]))).revision
            written[aor] = binding
        late = LocationStore(client, key_layout)
        await late.start()
        assert late.revision == revision
        assert late.binding_count == 10
        assert {aor: late.lookup(aor) for aor in written} == {
            aor: [binding] for aor, binding in written.items()
        }
        for store in (writer, late):
            await store.stop()

    run(with_client(etcd_server, body))


async def wait_until(store: Any, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait, event by event of the store's watch, until ``predicate()`` holds."""
    while not predicate():
        await store.wait_for_revision(store.revision + 1, timeout)


async def with_client(
    etcd_server: LocalEtcd, body: Callable[..., Awaitable[T]], *, clients: int = 1
) -> T:
    connected = [await connect_etcd(etcd_server.url) for _ in range(clients)]
    try:
        return await body(*connected)
    finally:
        for client in connected:
            await client.close()


def replace_all(store: LocationStore, aor: str, bindings: list[Binding]) -> AorChange:
    return plan_change(store.aor_state(aor), bindings)


# ------------------------------------------------------------------ values


def test_binding_round_trips_through_msgpack() -> None:
    binding = make_binding("alice@example.com", "sip:alice@192.0.2.10:5060", 1e9, q=0.5)
    assert Binding.decode(binding.encode()) == binding
    without_peer = Binding(**{**_fields(binding), "received": None})
    assert Binding.decode(without_peer.encode()) == without_peer


def _fields(binding: Binding) -> dict[str, Any]:
    return {name: getattr(binding, name) for name in Binding.__dataclass_fields__}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x93\x01\x02\x03",
        b'{"json": 1}',
        b"\x91\x02",
        b"\xdc\x00\x0d" + b"\xc0" * 13,
    ],
)
def test_malformed_binding_values_raise_malformed_record(data: bytes) -> None:
    with pytest.raises(MalformedRecordError):
        Binding.decode(data)


def test_binding_ids_follow_uri_equality_and_instance_ids() -> None:
    def identity(text: str) -> str:
        return binding_id_for(parse_name_addr(text, "Contact"))

    # RFC 3261 19.1.4: host case, escaping and a parameter present on one side only
    # do not matter; user case, port, transport and URI headers do.
    assert identity("<sip:alice@EXAMPLE.com>") == identity("<sip:%61lice@example.com;foo>")
    assert identity("<sip:alice@example.com>") != identity("<sip:Alice@example.com>")
    assert identity("<sip:alice@example.com>") != identity("<sip:alice@example.com:5070>")
    assert identity("<sip:alice@example.com>") != identity("<sip:alice@example.com;transport=tcp>")
    assert identity("<sip:a@example.com>") != identity("<sip:a@example.com?Route=%3Csip:x%3E>")
    # RFC 5626: instance id and reg-id name the binding whatever the URI.
    instance = ';+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"'
    assert identity(f"<sip:a@192.0.2.1>{instance};reg-id=1") == identity(
        f"<sip:a@192.0.2.2:6000>{instance};reg-id=1"
    )
    assert identity(f"<sip:a@192.0.2.1>{instance};reg-id=1") != identity(
        f"<sip:a@192.0.2.1>{instance};reg-id=2"
    )


def test_address_of_record_is_canonical() -> None:
    uri = parse_uri("sips:Al%69ce@Example.COM:5061;transport=tcp")
    assert isinstance(uri, SipURI)
    assert address_of_record(uri) == "Alice@example.com"


# ------------------------------------------------------------------ the store


def test_commit_put_lookup_and_delete(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body(client: Any) -> None:
        store = LocationStore(client, key_layout)
        await store.start()
        aor = "alice@example.com"
        now = time.time()
        first = make_binding(aor, "sip:alice@192.0.2.10:5060", now + 3600, q=1.0)
        second = make_binding(aor, "sip:alice@192.0.2.11:5060", now + 600, q=0.5)
        result = await store.commit(replace_all(store, aor, [first, second]))
        assert result.outcome is CommitOutcome.COMMITTED
        # Written through to the cache at once, and durable in etcd.
        assert store.lookup(aor) == [first, second]
        state = store.aor_state(aor)
        assert state.revision == result.revision
        assert state.mod_revisions == (result.revision, result.revision)
        stored = await client.get_prefix(key_layout.prefix)
        assert sorted(kv.key for kv in stored) == sorted(
            key_layout.binding(aor, binding.binding_id) for binding in (first, second)
        )
        assert sorted(Binding.decode(kv.value).uri for kv in stored) == [first.uri, second.uri]
        fetched = await store.fetch_aor_state(aor)
        assert fetched.revision == result.revision
        assert sorted(fetched.bindings, key=lambda binding: binding.uri) == [first, second]
        assert fetched.mod_revisions == (result.revision, result.revision)

        result = await store.commit(replace_all(store, aor, [second]))
        assert result.committed
        assert store.lookup(aor) == [second]
        assert len(await client.get_prefix(key_layout.aor_bindings(aor))) == 1

        result = await store.commit(replace_all(store, aor, []))
        assert result.committed
        assert store.lookup(aor) == []
        assert store.aor_state(aor).bindings == ()
        assert (await store.fetch_aor_state(aor)) == AorState(aor, result.revision, ())
        # A registration writes its bindings and nothing else: no per-AoR key.
        assert [kv.key for kv in await client.get_prefix(key_layout.prefix)] == []
        await store.stop()

    run(with_client(etcd_server, body))


def test_cache_follows_writes_of_another_store(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body(first_client: Any, second_client: Any) -> None:
        reader = LocationStore(first_client, key_layout)
        writer = LocationStore(second_client, key_layout)
        await reader.start()
        await writer.start()
        aor = "bob@example.com"
        binding = make_binding(aor, "sip:bob@192.0.2.20", time.time() + 3600)
        result = await writer.commit(replace_all(writer, aor, [binding]))
        await reader.wait_for_revision(result.revision, timeout=5)
        assert reader.lookup(aor) == [binding]
        assert reader.aor_state(aor).revision == result.revision

        refreshed = make_binding(aor, binding.uri, time.time() + 7200, cseq=2)
        result = await writer.commit(replace_all(writer, aor, [refreshed]))
        await reader.wait_for_revision(result.revision, timeout=5)
        assert reader.lookup(aor) == [refreshed]

        result = await writer.commit(replace_all(writer, aor, []))
        await reader.wait_for_revision(result.revision, timeout=5)
        assert reader.lookup(aor) == []
        assert reader.aor_state(aor) == AorState(aor, result.revision, ())
        # A third store reads what the others wrote in its first load.
        late = LocationStore(first_client, key_layout)
        await late.start()
        assert late.lookup(aor) == []
        for store in (reader, writer, late):
            await store.stop()

    run(with_client(etcd_server, body, clients=2))


def test_a_cache_is_ready_once_its_watch_caught_up(
    etcd_server: LocalEtcd, key_layout: KeyLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write anywhere in etcd between the full read and the watch's creation
    leaves the watch behind etcd, which then delivers nothing for up to 100 ms:
    ``start`` returns only once a progress notification showed the watch caught
    up, so the cache already reflects that write's revision."""

    async def body(client: Any, other: Any) -> None:
        load = WatchedRange._load
        written: list[int] = []

        async def load_then_write(self: WatchedRange) -> None:
            await load(self)
            put = await other.put(key_layout.prefix + b"elsewhere", b"x")
            written.append(put.header.revision)

        monkeypatch.setattr(WatchedRange, "_load", load_then_write)
        store = LocationStore(client, key_layout)
        await store.start()
        assert store.revision >= written[0]
        await store.stop()

    run(with_client(etcd_server, body, clients=2))


def test_sync_shows_what_another_worker_has_just_written(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    """Read-your-writes across workers: a binding committed by another worker and
    acknowledged (its REGISTER's 200 went out) is in this store's cache once
    ``sync`` returns, though its watch event had not been applied when ``sync``
    was called: the caller's INVITE that follows must find it
    (worker/server.py).  The other worker is a store on its own event loop in a
    thread; this loop waits for each of its commits without running, so the
    watch event is at most in a buffer when ``sync`` starts."""
    other_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=other_loop.run_forever, daemon=True)
    thread.start()

    def on_other(coroutine: Coroutine[Any, Any, T]) -> T:
        # Blocks this loop on purpose: nothing here runs until the commit is done.
        return asyncio.run_coroutine_threadsafe(coroutine, other_loop).result(10)

    async def start_writer() -> tuple[Any, LocationStore]:
        client = await connect_etcd(etcd_server.url)
        store = LocationStore(client, key_layout, clock=clock)
        await store.start()
        return client, store

    async def stop_writer(client: Any, store: LocationStore) -> None:
        await store.stop()
        await client.close()

    async def body(client: Any) -> None:
        reader = LocationStore(client, key_layout, clock=clock)
        assert await reader.sync(0.1) is False  # no watch yet: nothing to wait for
        await reader.start()
        writer_client, writer = on_other(start_writer())
        try:
            for number in range(10):
                aor = f"user{number}@example.com"
                binding = make_binding(aor, f"sip:u{number}@192.0.2.40", clock.now + 600)
                on_other(writer.commit(replace_all(writer, aor, [binding])))
                assert reader.lookup(aor) == []  # the event is not applied yet
                assert await reader.sync(2.0) is True
                assert reader.lookup(aor) == [binding]
            # Callers arriving while a sync is in flight all get through.
            aor = "many@example.com"
            binding = make_binding(aor, "sip:many@192.0.2.41", clock.now + 600)
            on_other(writer.commit(replace_all(writer, aor, [binding])))
            assert await asyncio.gather(*(reader.sync(2.0) for _ in range(5))) == [True] * 5
            assert reader.lookup(aor) == [binding]
        finally:
            on_other(stop_writer(writer_client, writer))
            await reader.stop()

    clock = Clock()
    try:
        run(with_client(etcd_server, body))
    finally:
        other_loop.call_soon_threadsafe(other_loop.stop)
        thread.join(5)
        other_loop.close()


def test_a_sync_whose_request_went_unanswered_is_asked_again(
    etcd_server: LocalEtcd, key_layout: KeyLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd ignores a progress request while a watch has not caught up: that sync
    gives up at its timeout, and the next one sends a request of its own instead
    of waiting behind the lost one for ever."""

    async def body(client: Any) -> None:
        store = LocationStore(client, key_layout)
        await store.start()
        ask = WatchedRange._ask_progress_once
        asked: list[bool] = []

        async def lose_the_first(self: WatchedRange, stream: Any) -> None:
            asked.append(True)
            if len(asked) > 1:
                await ask(self, stream)

        monkeypatch.setattr(WatchedRange, "_ask_progress_once", lose_the_first)
        assert await store.sync(0.2) is False
        assert await store.sync(2.0) is True
        assert len(asked) == 2
        await store.stop()

    run(with_client(etcd_server, body))


def test_expired_bindings_are_hidden(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body(client: Any) -> None:
        clock = Clock()
        store = LocationStore(client, key_layout, clock=clock)
        await store.start()
        aor = "carol@example.com"
        short = make_binding(aor, "sip:carol@192.0.2.30", clock.now + 60)
        long = make_binding(aor, "sip:carol@192.0.2.31", clock.now + 600)
        await store.commit(replace_all(store, aor, [short, long]))
        assert store.lookup(aor) == [short, long] or store.lookup(aor) == [long, short]
        clock.now += 61
        # The key is still in etcd (its lease runs past the bucket's end) ...
        assert len(await client.get_prefix(key_layout.aor_bindings(aor))) == 2
        # ... but no reader returns it.
        assert store.lookup(aor) == [long]
        assert store.aor_state(aor).active(clock.now) == [long]
        fresh = LocationStore(client, key_layout, clock=clock)
        await fresh.start()
        assert fresh.lookup(aor) == [long]
        clock.now += 600
        assert store.lookup(aor) == []
        # A change computed from the state deletes the expired keys.
        change = plan_change(store.aor_state(aor), [])
        assert sorted(change.delete) == sorted([short.binding_id, long.binding_id])
        await store.stop()
        await fresh.stop()

    run(with_client(etcd_server, body))


def test_bindings_of_one_bucket_share_one_lease(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body(client: Any) -> None:
        store = LocationStore(client, key_layout, bucket_seconds=10.0)
        await store.start()
        # Five expiries inside one 10 s bucket, of three AoRs, committed at once.
        bucket_end = (math.ceil(time.time() / 10) + 100) * 10
        aors = ["a@example.com", "b@example.com", "c@example.com"]
        changes = []
        for index, aor in enumerate(aors):
            bindings = [
                make_binding(aor, f"sip:{aor.split('@')[0]}@192.0.2.{index}:{5060 + n}", when)
                for n, when in enumerate((bucket_end - 9.5 + index, bucket_end - 0.5 - index))
            ]
            changes.append(replace_all(store, aor, bindings[: 2 if index < 2 else 1]))
        results = await asyncio.gather(*(store.commit(change) for change in changes))
        assert all(result.committed for result in results)
        stored = await client.get_prefix(key_layout.bindings)
        leases = {kv.lease for kv in stored}
        assert len(stored) == 5
        assert len(leases) == 1
        assert 0 not in leases
        # One lease for the bindings' bucket, never one per binding.
        assert store.leases.granted == 1
        lease_info = await client.get_lease_info(leases.pop())
        assert len(lease_info.keys) == 5
        assert bucket_end - time.time() < lease_info.TTL <= bucket_end - time.time() + 6

        # A refresh moves the binding to its new bucket's lease.
        old = store.lookup("a@example.com")[0]
        moved = make_binding(old.aor, old.uri, bucket_end + 1000.0, cseq=2)
        others = [binding for binding in store.lookup(old.aor) if binding.uri != old.uri]
        await store.commit(replace_all(store, old.aor, [moved, *others]))
        record = await client.get(key_layout.binding(old.aor, moved.binding_id))
        assert record.lease not in (0, lease_info.ID)
        assert Binding.decode(record.value).expires_at == moved.expires_at
        await store.stop()

    run(with_client(etcd_server, body))


def test_a_lease_revoked_by_hand_is_granted_again(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body(client: Any) -> None:
        store = LocationStore(client, key_layout)
        await store.start()
        aor = "leo@example.com"
        expires_at = time.time() + 3600
        first = make_binding(aor, "sip:leo@192.0.2.120", expires_at)
        await store.commit(replace_all(store, aor, [first]))
        lease = (await client.get(key_layout.binding(aor, first.binding_id))).lease
        await client.revoke_lease(lease)
        await wait_until(store, lambda: store.lookup(aor) == [])
        # The cached lease is gone: etcd refuses the Txn, the store forgets its
        # leases, grants a new one and sends the Txn again.
        second = make_binding(aor, "sip:leo@192.0.2.121", expires_at)
        result = await store.commit(replace_all(store, aor, [second]))
        assert result.committed
        assert store.leases.granted == 2
        record = await client.get(key_layout.binding(aor, second.binding_id))
        assert record.lease not in (0, lease)
        await store.stop()

    run(with_client(etcd_server, body))


def test_compare_and_swap_between_two_stores(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body(first_client: Any, second_client: Any) -> None:
        first = LocationStore(first_client, key_layout)
        second = LocationStore(second_client, key_layout)
        await first.start()
        await second.start()
        aor = "dave@example.com"
        now = time.time()
        one = make_binding(aor, "sip:dave@192.0.2.40", now + 3600, call_id="a")
        two = make_binding(aor, "sip:dave@192.0.2.41", now + 3600, call_id="b")
        # Both computed from the same (empty) state.
        results = await asyncio.gather(
            first.commit(replace_all(first, aor, [one])),
            second.commit(replace_all(second, aor, [two])),
        )
        outcomes = sorted(result.outcome.value for result in results)
        assert outcomes == ["committed", "conflict"]
        winner, loser = results if results[0].committed else results[::-1]
        # The loser learns where it found the AoR changed; etcd holds the
        # winner's binding.
        assert loser.revision >= winner.revision
        assert len(await first_client.get_prefix(key_layout.aor_bindings(aor))) == 1
        # Re-read from etcd, recomputed, committed.
        loser_store = second if results[1] is loser else first
        state = await loser_store.fetch_aor_state(aor)
        assert state.revision >= winner.revision
        assert state.mod_revisions == (winner.revision,)
        retried = await loser_store.commit(plan_change(state, [*state.bindings, two, one]))
        assert retried.committed
        assert len(await first_client.get_prefix(key_layout.aor_bindings(aor))) == 2
        await first.stop()
        await second.stop()

    run(with_client(etcd_server, body, clients=2))


async def cseqs_in_etcd(client: Any, key_layout: KeyLayout, aor: str) -> dict[str, int]:
    """The stored bindings of ``aor``: URI -> CSeq."""
    stored = await client.get_prefix(key_layout.aor_bindings(aor))
    return {
        binding.uri: binding.cseq for binding in map(Binding.decode, (kv.value for kv in stored))
    }


def test_a_binding_added_by_another_store_is_a_conflict(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body(first_client: Any, second_client: Any) -> None:
        store = LocationStore(first_client, key_layout)
        other = LocationStore(second_client, key_layout)
        await store.start()
        await other.start()
        aor = "ivan@example.com"
        now = time.time()
        mine = make_binding(aor, "sip:ivan@192.0.2.90", now + 3600, call_id="a")
        first = await store.commit(replace_all(store, aor, [mine]))
        state = store.aor_state(aor)
        # Another worker adds a binding and leaves ours alone: only the range
        # compare (nothing written after the state's revision) can tell.
        await other.wait_for_revision(first.revision, timeout=5)
        theirs = make_binding(aor, "sip:ivan@192.0.2.91", now + 3600, call_id="b")
        added = await other.commit(replace_all(other, aor, [mine, theirs]))
        assert added.committed
        refreshed = make_binding(aor, mine.uri, now + 7200, call_id="a", cseq=2)
        change = plan_change(state, [refreshed])
        assert change.delete == ()  # the state does not know of theirs
        result = await store.commit(change)
        assert result.outcome is CommitOutcome.CONFLICT
        assert result.revision >= added.revision
        assert await cseqs_in_etcd(first_client, key_layout, aor) == {mine.uri: 1, theirs.uri: 1}
        # Read again from etcd, the same intent keeps their binding.
        fetched = await store.fetch_aor_state(aor)
        assert sorted(binding.uri for binding in fetched.bindings) == [mine.uri, theirs.uri]
        retried = await store.commit(plan_change(fetched, [refreshed, theirs]))
        assert retried.committed
        assert await cseqs_in_etcd(first_client, key_layout, aor) == {mine.uri: 2, theirs.uri: 1}
        await store.stop()
        await other.stop()

    run(with_client(etcd_server, body, clients=2))


def test_a_binding_deleted_by_another_store_is_a_conflict(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body(first_client: Any, second_client: Any) -> None:
        store = LocationStore(first_client, key_layout)
        other = LocationStore(second_client, key_layout)
        await store.start()
        await other.start()
        aor = "judy@example.com"
        now = time.time()
        kept = make_binding(aor, "sip:judy@192.0.2.100", now + 3600)
        removed = make_binding(aor, "sip:judy@192.0.2.101", now + 3600)
        first = await store.commit(replace_all(store, aor, [kept, removed]))
        state = store.aor_state(aor)
        # Another worker removes one binding: a deleted key leaves nothing for
        # the range compare to see; its own compare (mod_revision 0 now) fails.
        await other.wait_for_revision(first.revision, timeout=5)
        deleted = await other.commit(replace_all(other, aor, [kept]))
        assert deleted.committed
        refreshed = make_binding(aor, kept.uri, now + 7200, cseq=2)
        change = plan_change(state, [refreshed, removed])
        assert change.put == (refreshed,)
        assert change.delete == ()
        result = await store.commit(change)
        assert result.outcome is CommitOutcome.CONFLICT
        assert result.revision >= deleted.revision
        # Nothing written: no refresh, and the removed binding stays removed.
        assert await cseqs_in_etcd(first_client, key_layout, aor) == {kept.uri: 1}
        await store.stop()
        await other.stop()

    run(with_client(etcd_server, body, clients=2))


def test_a_conflict_in_a_batch_fails_only_its_aor(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body(first_client: Any, second_client: Any) -> None:
        store = LocationStore(first_client, key_layout)
        other = LocationStore(second_client, key_layout)
        await store.start()
        await other.start()
        now = time.time()
        aors = [f"user{index}@example.com" for index in range(4)]
        # user2 and user3 have bindings already; user0 and user1 have none.
        await store.commit(
            replace_all(store, aors[2], [make_binding(aors[2], "sip:a@192.0.2.1", now + 60)])
        )
        written = await store.commit(
            replace_all(
                store,
                aors[3],
                [make_binding(aors[3], f"sip:a@192.0.2.{host}", now + 60) for host in (1, 2)],
            )
        )
        stale = {aor: store.aor_state(aor) for aor in aors}
        # Another worker adds a binding to user1 and removes one of user3's.
        await other.wait_for_revision(written.revision, timeout=5)
        await other.commit(
            replace_all(other, aors[1], [make_binding(aors[1], "sip:x@192.0.2.9", now + 60)])
        )
        await other.commit(
            replace_all(other, aors[3], [make_binding(aors[3], "sip:a@192.0.2.1", now + 60)])
        )
        # One change per AoR, each computed from the state read before; all in
        # one batch.
        changes = [
            plan_change(
                stale[aor],
                [*stale[aor].bindings[:1], make_binding(aor, "sip:y@192.0.2.2", now + 120)],
            )
            for aor in aors
        ]
        statistics = store.statistics
        transactions = statistics.transactions
        results = await asyncio.gather(*(store.commit(change) for change in changes))
        assert [result.outcome for result in results] == [
            CommitOutcome.COMMITTED,
            CommitOutcome.CONFLICT,
            CommitOutcome.COMMITTED,
            CommitOutcome.CONFLICT,
        ]
        # One Txn failed its compares and was sent again without the stale AoRs.
        assert statistics.failed_compares == 1
        assert statistics.conflicts == 2
        assert statistics.transactions - transactions == 2
        assert results[0].revision == results[2].revision
        assert await cseqs_in_etcd(first_client, key_layout, aors[0]) == {"sip:y@192.0.2.2": 1}
        assert await cseqs_in_etcd(first_client, key_layout, aors[1]) == {"sip:x@192.0.2.9": 1}
        assert await cseqs_in_etcd(first_client, key_layout, aors[2]) == {
            "sip:a@192.0.2.1": 1,
            "sip:y@192.0.2.2": 1,
        }
        assert await cseqs_in_etcd(first_client, key_layout, aors[3]) == {"sip:a@192.0.2.1": 1}
        await store.stop()
        await other.stop()

    run(with_client(etcd_server, body, clients=2))


def test_batches_over_128_operations_are_split(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body(client: Any) -> None:
        store = LocationStore(client, key_layout)
        await store.start()
        now = time.time()
        changes = [
            replace_all(
                store,
                f"user{index}@example.com",
                [make_binding(f"user{index}@example.com", "sip:u@192.0.2.1", now + 3600)],
            )
            for index in range(300)
        ]
        # Some big changes too: 61 operations each.
        changes += [
            replace_all(
                store,
                f"big{index}@example.com",
                [
                    make_binding(f"big{index}@example.com", f"sip:u@192.0.2.1:{port}", now + 60)
                    for port in range(5000, 5060)
                ],
            )
            for index in range(3)
        ]
        results = await asyncio.gather(*(store.commit(change) for change in changes))
        assert all(result.committed for result in results)
        stored = await client.get_prefix(key_layout.bindings)
        assert len(stored) == 300 + 3 * 60
        statistics = store.statistics
        assert statistics.changes == len(changes)
        assert statistics.largest_transaction == 128
        assert statistics.transactions >= math.ceil((300 + 3 * 60) / 128)
        assert statistics.failed_compares == 0

        # Refreshing one binding of each big AoR takes 61 compares (one per
        # binding and the range): two such changes at most per Txn.
        refreshes = []
        for index in range(3):
            aor = f"big{index}@example.com"
            state = store.aor_state(aor)
            refreshed = make_binding(aor, "sip:u@192.0.2.1:5000", now + 120, cseq=2)
            others = [b for b in state.bindings if b.binding_id != refreshed.binding_id]
            refreshes.append(plan_change(state, [refreshed, *others]))
            assert refreshes[-1].compares == 61
            assert refreshes[-1].operations == 1
        transactions = statistics.transactions
        results = await asyncio.gather(*(store.commit(change) for change in refreshes))
        assert all(result.committed for result in results)
        assert statistics.transactions - transactions == 2
        assert statistics.most_compares <= 128

        with pytest.raises(ValueError, match="does not fit"):
            await store.commit(
                AorChange(
                    aor="huge@example.com",
                    expected_revision=0,
                    delete=tuple(str(index) for index in range(129)),
                )
            )
        with pytest.raises(ValueError, match="does not fit"):
            await store.commit(
                AorChange(
                    aor="huge@example.com",
                    expected_revision=1,
                    expected_bindings=tuple((str(index), 1) for index in range(128)),
                )
            )
        await store.stop()

    run(with_client(etcd_server, body))


def test_two_changes_of_one_aor_in_one_pass_do_not_share_a_txn(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body(client: Any) -> None:
        store = LocationStore(client, key_layout)
        await store.start()
        aor = "erin@example.com"
        now = time.time()
        state = store.aor_state(aor)
        first = plan_change(state, [make_binding(aor, "sip:erin@192.0.2.50", now + 60)])
        second = plan_change(state, [make_binding(aor, "sip:erin@192.0.2.51", now + 60)])
        # A third AoR's change rides along with the first.
        third_aor = "frank@example.com"
        third = replace_all(
            store, third_aor, [make_binding(third_aor, "sip:f@192.0.2.52", now + 60)]
        )
        results = await asyncio.gather(
            store.commit(first), store.commit(second), store.commit(third)
        )
        # No "duplicate key given in txn request": the second waited for the first,
        # whose commit moved the AoR past the revision the second expected.
        assert [result.outcome for result in results] == [
            CommitOutcome.COMMITTED,
            CommitOutcome.CONFLICT,
            CommitOutcome.COMMITTED,
        ]
        assert store.statistics.transactions == 2
        assert results[0].revision == results[2].revision
        assert [binding.uri for binding in store.lookup(aor)] == ["sip:erin@192.0.2.50"]
        await store.stop()

    run(with_client(etcd_server, body))


def test_watch_reloads_after_compaction(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body(first_client: Any, second_client: Any) -> None:
        reader = LocationStore(first_client, key_layout)
        writer = LocationStore(second_client, key_layout)
        await reader.start()
        await writer.start()
        now = time.time()
        kept, dropped, added = "kept@example.com", "dropped@example.com", "added@example.com"
        for aor in (kept, dropped):
            result = await writer.commit(
                replace_all(writer, aor, [make_binding(aor, "sip:k@192.0.2.60", now + 3600)])
            )
        await reader.wait_for_revision(result.revision, timeout=5)
        assert reader.reloads == 1
        # The reader's watch stops; meanwhile a binding is deleted and one added,
        # and etcd compacts its history past the reader's revision.
        await reader.stop()
        await writer.commit(replace_all(writer, dropped, []))
        last = await writer.commit(
            replace_all(writer, added, [make_binding(added, "sip:a@192.0.2.61", now + 3600)])
        )
        await first_client.compact(last.revision, physical=True)
        # Resuming from its old revision finds it compacted: a full reload.
        await reader.start()
        await reader.wait_for_revision(last.revision, timeout=5)
        assert reader.reloads == 2
        assert len(reader.lookup(kept)) == 1
        assert reader.lookup(dropped) == []
        assert reader.aor_state(dropped) == AorState(dropped, reader.revision, ())
        assert [binding.uri for binding in reader.lookup(added)] == ["sip:a@192.0.2.61"]
        # And it follows the watch again afterwards.
        result = await writer.commit(replace_all(writer, kept, []))
        await reader.wait_for_revision(result.revision, timeout=5)
        assert reader.lookup(kept) == []
        await reader.stop()
        await writer.stop()

    run(with_client(etcd_server, body, clients=2))


def test_malformed_values_are_skipped(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body(client: Any) -> None:
        aor = "gina@example.com"
        await client.put(key_layout.binding(aor, "garbage"), b"\x00not msgpack")
        store = LocationStore(client, key_layout)
        await store.start()
        assert store.lookup(aor) == []
        binding = make_binding(aor, "sip:gina@192.0.2.70", time.time() + 60)
        result = await client.put(key_layout.binding(aor, "other"), binding.encode())
        # A binding under a key that is not its own is ignored as well.
        await store.wait_for_revision(result.header.revision, timeout=5)
        assert store.lookup(aor) == []
        await store.stop()

    run(with_client(etcd_server, body))


def test_bindings_of_other_stores_are_decoded_once_when_read(
    etcd_server: LocalEtcd,
    key_layout: KeyLayout,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    decoded: list[bytes] = []
    decode = Binding.decode

    def counting_decode(data: bytes) -> Binding:
        decoded.append(data)
        return decode(data)

    monkeypatch.setattr(Binding, "decode", staticmethod(counting_decode))

    async def body(first_client: Any, second_client: Any) -> None:
        reader = LocationStore(first_client, key_layout)
        writer = LocationStore(second_client, key_layout)
        await reader.start()
        await writer.start()
        aor = "kate@example.com"
        binding = make_binding(aor, "sip:kate@192.0.2.110", time.time() + 3600)
        result = await writer.commit(replace_all(writer, aor, [binding]))
        await reader.wait_for_revision(result.revision, timeout=5)
        # The writer keeps what it wrote; the reader keeps the value as it came.
        assert writer._bindings[aor] == {binding.binding_id: (binding, result.revision)}
        assert reader._bindings[aor] == {binding.binding_id: (binding.encode(), result.revision)}
        assert reader.binding_count == 1
        assert decoded == []
        # Decoded on the first read, once.
        assert reader.lookup(aor) == [binding]
        assert reader.lookup(aor) == [binding]
        assert reader.aor_state(aor) == AorState(
            aor, result.revision, (binding,), (result.revision,)
        )
        assert decoded == [binding.encode()]
        assert reader._bindings[aor] == {binding.binding_id: (binding, result.revision)}

        # A value written by hand that is no binding: kept raw, dropped (and
        # logged) when read.
        garbage = key_layout.binding(aor, "garbage")
        put = await first_client.put(garbage, b"\x00not msgpack")
        await reader.wait_for_revision(put.header.revision, timeout=5)
        assert reader._bindings[aor]["garbage"] == (b"\x00not msgpack", put.header.revision)
        with caplog.at_level(logging.WARNING, logger="registry._location"):
            assert reader.lookup(aor) == [binding]
        assert "malformed binding garbage" in caplog.text
        assert "garbage" not in reader._bindings[aor]
        assert len(decoded) == 2
        caplog.clear()
        assert reader.lookup(aor) == [binding]
        assert len(decoded) == 2
        assert caplog.text == ""
        # The key it holds in etcd does not stop the AoR's writers.
        other = make_binding(aor, "sip:kate@192.0.2.111", time.time() + 3600)
        assert (await reader.commit(replace_all(reader, aor, [binding, other]))).committed
        await reader.stop()
        await writer.stop()

    run(with_client(etcd_server, body, clients=2))


# ------------------------------------------------------------------ users and the secret


def test_user_store_add_get_remove_and_watch(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body(client: Any) -> None:
        await add_user(client, key_layout, "alice@Example.COM", "secret one")
        users = UserStore(client, key_layout)
        await users.start()
        record = users.get("alice@example.com")
        assert record is not None
        assert record.ha1 == {
            DigestAlgorithm.MD5: compute_ha1(
                "alice", "example.com", "secret one", DigestAlgorithm.MD5
            ),
            DigestAlgorithm.SHA_256: compute_ha1(
                "alice", "example.com", "secret one", DigestAlgorithm.SHA_256
            ),
        }
        stored = await client.get(key_layout.user("alice@example.com"))
        assert b"secret one" not in stored.value
        assert users.known("alice@example.com")
        assert not users.known("Alice@example.com")
        assert users.users_exist("example.com")
        assert not users.users_exist("example.org")

        # Changes made elsewhere reach the cache through the watch.
        await add_user(client, key_layout, "bob@example.org", "secret two")
        await wait_until(users, lambda: users.known("bob@example.org"))
        assert users.users_exist("example.org")
        assert await list_users(client, key_layout) == ["alice@example.com", "bob@example.org"]
        await add_user(client, key_layout, "alice@example.com", "new secret")
        await wait_until(
            users,
            lambda: (
                users.get("alice@example.com").ha1[DigestAlgorithm.MD5]  # type: ignore[union-attr]
                == compute_ha1("alice", "example.com", "new secret", DigestAlgorithm.MD5)
            ),
        )
        assert await remove_user(client, key_layout, "bob@example.org")
        assert not await remove_user(client, key_layout, "bob@example.org")
        await wait_until(users, lambda: not users.known("bob@example.org"))
        assert not users.users_exist("example.org")
        with pytest.raises(ValueError, match="NAME@DOMAIN"):
            await add_user(client, key_layout, "nodomain", "x")
        await users.stop()

    run(with_client(etcd_server, body))


def test_nonce_secret_is_created_once(etcd_server: LocalEtcd, key_layout: KeyLayout) -> None:
    async def body(first_client: Any, second_client: Any) -> None:
        first, second = await asyncio.gather(
            load_or_create_nonce_secret(first_client, key_layout),
            load_or_create_nonce_secret(second_client, key_layout),
        )
        assert first == second
        assert len(first) == 32
        assert await load_or_create_nonce_secret(first_client, key_layout) == first
        assert (await first_client.get(key_layout.nonce_secret)).value == first

    run(with_client(etcd_server, body, clients=2))


def test_late_watch_events_do_not_undo_newer_writes(
    etcd_server: LocalEtcd, key_layout: KeyLayout
) -> None:
    async def body(client: Any) -> None:
        store = LocationStore(client, key_layout)
        await store.start()
        # The watch lags behind the commits' replies (paused here to make it so).
        await store.stop()
        aor = "hank@example.com"
        binding = make_binding(aor, "sip:hank@192.0.2.80", time.time() + 3600)
        put = await store.commit(replace_all(store, aor, [binding]))
        # The state is as of the commit, though the cache's revision is older.
        assert store.revision < put.revision
        assert store.aor_state(aor).revision == put.revision
        removed = await store.commit(replace_all(store, aor, []))
        assert store.lookup(aor) == []
        # When the watch then delivers the older revision, the cache keeps what
        # the newer commit wrote.
        store._apply_put(
            key_layout.binding(aor, binding.binding_id), binding.encode(), put.revision
        )
        assert store.lookup(aor) == []
        assert store.aor_state(aor).bindings == ()
        # And the real watch, resumed, ends in the same state.
        await store.start()
        await store.wait_for_revision(removed.revision, timeout=5)
        assert store.lookup(aor) == []
        assert store.aor_state(aor) == AorState(aor, removed.revision, ())
        await store.stop()

    run(with_client(etcd_server, body))
