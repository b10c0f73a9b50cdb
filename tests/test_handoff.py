"""Handoff of transactions when the ring changes (sans-IO, virtual time)."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.ring import Ring, slot_of
from worker.handoff import Decision, Handoff


def call_ids_owned_by(ring: Ring, worker: str, count: int, start: int = 0) -> list[bytes]:
    found = []
    index = start
    while len(found) < count:
        call_id = f"call-{index}@example.com".encode()
        if ring.owner_of(call_id) == worker:
            found.append(call_id)
        index += 1
    return found


def moved_call_id(old: Ring, new: Ring, old_owner: str, new_owner: str, start: int = 0) -> bytes:
    index = start
    while True:
        call_id = f"moved-{index}@example.com".encode()
        if old.owner_of(call_id) == old_owner and new.owner_of(call_id) == new_owner:
            return call_id
        index += 1


@dataclass
class Joining:
    """w2 joins w1's ring while w1 holds a transaction of ``ringing``, a Call-ID
    that moves to w2 (as does ``fresh``, a new call)."""

    before: Ring
    after: Ring
    w1: Handoff
    w2: Handoff
    ringing: bytes
    fresh: bytes


def joining() -> Joining:
    before = Ring(["w1"])
    after = Ring(["w1", "w2"])
    w1 = Handoff("w1", before, alive={"w1"})
    w2 = Handoff("w2", before, alive={"w1"})
    ringing = moved_call_id(before, after, "w1", "w2")
    fresh = moved_call_id(before, after, "w1", "w2", start=10_000)
    w1.transaction_started(ringing)
    return Joining(before, after, w1, w2, ringing, fresh)


def test_a_joining_worker_waits_for_claims_then_forwards_claimed_calls() -> None:
    j = joining()
    after, w1, w2, ringing, fresh = j.after, j.w1, j.w2, j.ringing, j.fresh
    assert slot_of(ringing) != slot_of(fresh) or ringing != fresh

    claims = w1.ring_changed(after, {"w1", "w2"}, now=0.0)
    assert claims == {"w2": [ringing]}
    assert w2.ring_changed(after, {"w1", "w2"}, now=0.0) == {}
    # Until w1's claims arrive, w2 holds requests for the slots it took over ...
    assert w2.route(fresh, after.fingerprint, ()).decision is Decision.WAIT
    assert w2.claims_received(after.fingerprint, "w1", claims["w2"])
    # ... then serves new calls itself and forwards the claimed one to w1.
    assert w2.route(fresh, after.fingerprint, ()).decision is Decision.LOCAL
    forward = w2.route(ringing, after.fingerprint, ())
    assert (forward.decision, forward.worker) == (Decision.FORWARD, "w1")
    # w1 serves what w2 forwarded (it has the transaction).
    assert w1.route(ringing, after.fingerprint, ("w2",)).decision is Decision.LOCAL
    # When the transaction ends, w1 releases the call and w2 serves it.
    assert w1.transaction_ended(ringing) == ("w2", ringing)
    w2.releases_received("w1", [ringing])
    assert w2.route(ringing, after.fingerprint, ()).decision is Decision.LOCAL


def test_unmoved_calls_are_never_held() -> None:
    before = Ring(["w1"])
    after = Ring(["w1", "w2"])
    w2 = Handoff("w2", before, alive={"w1"})
    w2.ring_changed(after, {"w1", "w2"}, now=0.0)
    index = 0
    while True:
        call_id = f"stay-{index}".encode()
        if after.owner_of(call_id) == "w2" and before.owner_of(call_id) != "w1":
            break
        index += 1
        if index > 100_000:
            # Every slot of w2 came from w1 (the only previous owner): nothing to test.
            return
    assert w2.route(call_id, after.fingerprint, ()).decision is Decision.LOCAL


def test_the_wait_ends_at_the_deadline_when_the_previous_owner_is_silent() -> None:
    before = Ring(["w1"])
    after = Ring(["w1", "w2"])
    w2 = Handoff("w2", before, alive={"w1"})
    w2.ring_changed(after, {"w1", "w2"}, now=10.0)
    call_id = moved_call_id(before, after, "w1", "w2")
    assert w2.route(call_id, after.fingerprint, ()).decision is Decision.WAIT
    deadline = w2.get_timer()
    assert deadline is not None
    assert deadline > 10.0
    assert not w2.handle_timer(deadline - 0.01)
    assert w2.handle_timer(deadline)
    assert w2.get_timer() is None
    assert w2.route(call_id, after.fingerprint, ()).decision is Decision.LOCAL


def test_no_wait_for_a_previous_owner_that_died() -> None:
    before = Ring(["w1", "w2"])
    after = Ring(["w2"])
    w2 = Handoff("w2", before, alive={"w1", "w2"})
    assert w2.ring_changed(after, {"w2"}, now=0.0) == {}
    call_id = moved_call_id(before, after, "w1", "w2")
    assert w2.route(call_id, after.fingerprint, ()).decision is Decision.LOCAL
    assert w2.get_timer() is None


def test_a_draining_worker_keeps_its_calls() -> None:
    # w1 drains: it leaves the ring but stays alive until its calls end.
    before = Ring(["w1", "w2"])
    after = Ring(["w2"])
    w1 = Handoff("w1", before, alive={"w1", "w2"})
    w2 = Handoff("w2", before, alive={"w1", "w2"})
    (ringing,) = call_ids_owned_by(before, "w1", 1)
    w1.transaction_started(ringing)
    claims = w1.ring_changed(after, {"w1", "w2"}, now=0.0)
    assert claims == {"w2": [ringing]}
    w2.ring_changed(after, {"w1", "w2"}, now=0.0)
    assert w2.route(ringing, after.fingerprint, ()).decision is Decision.WAIT
    w2.claims_received(after.fingerprint, "w1", [ringing])
    assert w2.route(ringing, after.fingerprint, ()).worker == "w1"
    # w1 leaves: its claims are void.
    assert not w2.member_left("w1")
    assert w2.route(ringing, after.fingerprint, ()).decision is Decision.LOCAL


def test_a_load_balancer_with_another_ring_is_corrected() -> None:
    old = Ring(["w1"])
    new = Ring(["w1", "w2"])
    w1 = Handoff("w1", old, alive={"w1"})
    w1.ring_changed(new, {"w1", "w2"}, now=0.0)
    call_id = moved_call_id(old, new, "w1", "w2")
    # The load balancer still routes by the old ring: w1 sends it to w2.
    route = w1.route(call_id, old.fingerprint, ())
    assert (route.decision, route.worker) == (Decision.FORWARD, "w2")
    # Forwarded once, never bounced back: w2 serves it even if its ring differs.
    w2 = Handoff("w2", old, alive={"w1"})
    assert w2.route(call_id, old.fingerprint, ("w1",)).decision is Decision.LOCAL


def test_several_transactions_of_one_call_release_on_the_last() -> None:
    before = Ring(["w1"])
    after = Ring(["w1", "w2"])
    w1 = Handoff("w1", before, alive={"w1"})
    call_id = moved_call_id(before, after, "w1", "w2")
    w1.transaction_started(call_id)  # the INVITE
    w1.transaction_started(call_id)  # its CANCEL
    w1.ring_changed(after, {"w1", "w2"}, now=0.0)
    assert w1.transaction_ended(call_id) is None
    assert w1.transaction_ended(call_id) == ("w2", call_id)
    assert w1.transaction_ended(b"never-seen") is None


def test_claims_that_arrive_before_the_ring_change_end_the_wait_in_advance() -> None:
    # The previous owner's watch can show it the new ring, and its claims can
    # reach the new owner, before the new owner's own watch shows that ring.
    j = joining()
    after, w1, w2, ringing, fresh = j.after, j.w1, j.w2, j.ringing, j.fresh
    claims = w1.ring_changed(after, {"w1", "w2"}, now=0.0)

    assert not w2.claims_received(after.fingerprint, "w1", claims["w2"])
    w2.ring_changed(after, {"w1", "w2"}, now=0.0)
    assert w2.get_timer() is None
    assert w2.route(fresh, after.fingerprint, ()).decision is Decision.LOCAL
    forward = w2.route(ringing, after.fingerprint, ())
    assert (forward.decision, forward.worker) == (Decision.FORWARD, "w1")


def test_early_claims_for_another_ring_do_not_end_a_wait() -> None:
    before = Ring(["w1"])
    after = Ring(["w1", "w2"])
    other = Ring(["w1", "w2", "w3"])
    w2 = Handoff("w2", before, alive={"w1"})
    assert not w2.claims_received(other.fingerprint, "w1", [])
    w2.ring_changed(after, {"w1", "w2"}, now=0.0)
    call_id = moved_call_id(before, after, "w1", "w2")
    assert w2.route(call_id, after.fingerprint, ()).decision is Decision.WAIT
