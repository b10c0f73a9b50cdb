"""Keeping a transaction on the worker that holds it while ownership moves.

The load balancers route a request by its Call-ID on the ring of active workers.
When the ring changes (a worker joins, drains or dies), part of the Call-ID space
moves to another worker, and with it the CANCELs, the ACKs for non-2xx responses
and the retransmissions of transactions that are still running on the previous
owner.  Served by the new owner they would fork an INVITE twice, answer a CANCEL
481 or never stop a retransmitted response.  This module keeps them on the
worker that holds the transaction (sans-IO: messages and time go in, decisions
and messages to send come out).

How:

1. *Claims.*  When a worker's ring changes, it lists the Call-IDs of its live
   server transactions whose owner moved, and sends each new owner a CLAIMS
   message: "these calls stay with me" — sent even when empty, with ``complete``,
   so the new owner knows it has heard everything.
2. *Waiting.*  The new owner holds back requests for slots it just took over
   until the previous owner's complete claims for that ring arrived (or a short
   deadline passed: the previous owner may be dead), so it cannot start a
   transaction the previous owner already has.
3. *Forwarding.*  A request whose Call-ID is claimed by another worker is
   forwarded to it over ZeroMQ, with the list of workers it went through
   (``hops``) so that it is never forwarded back.
4. *Releases.*  When the claimant's last transaction of a claimed Call-ID ends,
   it sends RELEASES and the new owner serves the Call-ID itself from then on.

A load balancer whose ring differs from the worker's (one of them has not seen
the latest change yet) is handled the same way: the worker routes by its own
ring and forwards what it does not own.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from cluster.ring import Ring, slot_of

__all__ = ["Decision", "Handoff", "Route"]

# How long a new owner waits for the previous owner's claims before serving the
# moved slots itself (the previous owner may have died).
CLAIMS_DEADLINE = 0.5
# Claims kept for rings not adopted yet (a few ring changes' worth of workers).
EARLY_CLAIMS_KEPT = 256


class Decision(enum.Enum):
    """What to do with an inbound request."""

    LOCAL = "process it here"
    FORWARD = "forward it to another worker"
    WAIT = "hold it until the previous owner's claims arrive"


@dataclass(frozen=True, slots=True)
class Route:
    """A routing decision: ``worker`` is set for FORWARD."""

    decision: Decision
    worker: str | None = None


# The decisions without a worker, made once (building one costs 0.4 us).
_LOCAL = Route(Decision.LOCAL)
_WAIT = Route(Decision.WAIT)


@dataclass(slots=True)
class _Pending:
    """Slots taken over from ``previous`` that wait for its claims."""

    previous: str
    ring: int
    slots: set[int]
    deadline: float


@dataclass(slots=True)
class Handoff:
    """The claims of one worker and the claims it received.

    ``live`` counts this worker's live server transactions per Call-ID (the
    worker glue calls ``transaction_started``/``transaction_ended``).
    """

    worker_id: str
    ring: Ring = field(default_factory=lambda: Ring(()))
    live: dict[bytes, int] = field(default_factory=dict)
    claimed_by: dict[bytes, str] = field(default_factory=dict)
    """Call-IDs other workers hold, by the worker holding them."""
    exported: dict[bytes, str] = field(default_factory=dict)
    """Call-IDs this worker holds that moved to another owner, by that owner."""
    pending: list[_Pending] = field(default_factory=list)
    alive: set[str] = field(default_factory=set)
    early_claims: dict[tuple[str, int], None] = field(default_factory=dict)
    """(worker, ring) of complete claims that arrived before this worker adopted
    that ring (membership watches do not fire at the same instant): adopting it
    then waits for nothing.  The newest EARLY_CLAIMS_KEPT, oldest first."""

    # ------------------------------------------------------------------ inputs

    def transaction_started(self, call_id: bytes) -> None:
        """A server transaction started here for ``call_id``."""
        self.live[call_id] = self.live.get(call_id, 0) + 1

    def transaction_ended(self, call_id: bytes) -> tuple[str, bytes] | None:
        """A server transaction of ``call_id`` ended here.

        Returns (worker, call_id) when that was the last one of a Call-ID this
        worker had claimed from ``worker``: it must be told (RELEASES).
        """
        count = self.live.get(call_id, 0) - 1
        if count > 0:
            self.live[call_id] = count
            return None
        self.live.pop(call_id, None)
        owner = self.exported.pop(call_id, None)
        return None if owner is None else (owner, call_id)

    def ring_changed(self, ring: Ring, alive: Iterable[str], now: float) -> dict[str, list[bytes]]:
        """Adopt ``ring`` (``alive``: every member, active or draining).

        Returns the claims to send: for each worker that took over a slot from
        this one, the Call-IDs this worker keeps (possibly none; always sent, so
        that the new owner stops waiting).
        """
        previous, self.ring = self.ring, ring
        self.alive = set(alive)
        moved = previous.moved(ring)
        claims: dict[str, list[bytes]] = {}
        taken_over: dict[str, set[int]] = {}
        for slot, (old, new) in moved.items():
            if old == self.worker_id and new is not None:
                claims.setdefault(new, [])
            elif new == self.worker_id and old is not None and old in self.alive:
                taken_over.setdefault(old, set()).add(slot)
        for call_id in self.live:
            new_owner = ring.owner_of(call_id)
            if new_owner is not None and new_owner != self.worker_id:
                claims.setdefault(new_owner, []).append(call_id)
                self.exported[call_id] = new_owner
        # Claims about slots that came back to us are void.
        for call_id in [c for c, w in self.claimed_by.items() if w not in self.alive]:
            del self.claimed_by[call_id]
        for worker, slots in taken_over.items():
            if (worker, ring.fingerprint) in self.early_claims:
                del self.early_claims[(worker, ring.fingerprint)]
                continue  # its claims are already here
            self.pending.append(_Pending(worker, ring.fingerprint, slots, now + CLAIMS_DEADLINE))
        return claims

    def claims_received(self, ring: int, worker: str, call_ids: Iterable[bytes]) -> bool:
        """Record ``worker``'s claims for ``ring``.

        Returns True when this ended a wait (held requests may now be routed).
        """
        for call_id in call_ids:
            self.claimed_by[call_id] = worker
        if ring != self.ring.fingerprint:
            # A ring this worker has not adopted yet (or one it already left).
            early = self.early_claims
            early[(worker, ring)] = None
            while len(early) > EARLY_CLAIMS_KEPT:
                del early[next(iter(early))]
        before = len(self.pending)
        self.pending = [
            entry for entry in self.pending if not (entry.previous == worker and entry.ring == ring)
        ]
        return len(self.pending) != before

    def releases_received(self, worker: str, call_ids: Iterable[bytes]) -> None:
        """``worker`` no longer holds ``call_ids``."""
        for call_id in call_ids:
            if self.claimed_by.get(call_id) == worker:
                del self.claimed_by[call_id]

    def member_left(self, worker: str) -> bool:
        """``worker`` left the cluster: drop its claims and stop waiting for it.

        Returns True when this ended a wait.
        """
        self.alive.discard(worker)
        for call_id in [c for c, w in self.claimed_by.items() if w == worker]:
            del self.claimed_by[call_id]
        before = len(self.pending)
        self.pending = [entry for entry in self.pending if entry.previous != worker]
        return len(self.pending) != before

    # ---------------------------------------------------------------- decisions

    def route(self, call_id: bytes, lb_ring: int, hops: tuple[str, ...]) -> Route:
        """Where an inbound request with ``call_id`` is processed.

        ``lb_ring`` is the fingerprint of the ring the load balancer used;
        ``hops`` the workers the request was already forwarded through.
        """
        claimant = self.claimed_by.get(call_id)
        if claimant is not None and claimant not in hops and claimant in self.alive:
            return Route(Decision.FORWARD, claimant)
        if call_id in self.live or hops:
            return _LOCAL
        if lb_ring != self.ring.fingerprint:
            # The load balancer routed by another ring: send it where ours says.
            # (The owner is only looked up then: the ring hash is the cost here.)
            owner = self.ring.owner_of(call_id)
            if owner is not None and owner != self.worker_id:
                if owner in self.alive:
                    return Route(Decision.FORWARD, owner)
                return _LOCAL
        if self.pending:
            slot = slot_of(call_id)
            for entry in self.pending:
                if slot in entry.slots:
                    return _WAIT
        return _LOCAL

    # -------------------------------------------------------------------- time

    def get_timer(self) -> float | None:
        """The earliest deadline of a wait, or None."""
        return min((entry.deadline for entry in self.pending), default=None)

    def handle_timer(self, now: float) -> bool:
        """Give up waiting where the deadline passed; True when a wait ended."""
        before = len(self.pending)
        self.pending = [entry for entry in self.pending if entry.deadline > now]
        return len(self.pending) != before
