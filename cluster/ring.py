"""The ring: which worker owns a call, the same answer on every load balancer.

Rendezvous (highest random weight) hashing: each active worker gets a weight
``H(worker id, key)`` and the key goes to the worker with the highest weight.  A
worker that joins takes over only the keys it now wins; one that leaves gives up
only its own keys; everybody else keeps theirs.

The key is the Call-ID, hashed once into one of ``SLOTS`` slots; rendezvous
hashing runs per slot when the membership changes and fills a table, so that
routing a message costs one hash and one list index, whatever the number of
workers.  The hash is keyed BLAKE2b with a fixed key: stable across processes,
machines and Python versions (never Python's salted ``hash()``), so every load
balancer and every worker computes the same table from the same member set.

A ring has a fingerprint, a hash of its worker ids: two processes that see the
same active workers compute the same ring and the same fingerprint, whenever
and in whatever order they learnt of them.  The load balancers stamp every
request with the fingerprint of the ring they routed it by, which lets a worker
see that a load balancer's view differs from its own, and the workers hand over
transactions when ownership moves (``worker/handoff.py``).

Branches: a worker puts its id in the branch of every Via it adds
(``z9hG4bK-<worker id>-<unique>``), so a response finds its way back to the worker
whose client transaction sent the request.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

__all__ = [
    "SLOTS",
    "Ring",
    "branch_worker",
    "check_worker_id",
    "make_branch_prefix",
    "ring_hash",
    "slot_of",
]

SLOTS = 4096
_HASH_KEY = b"sipcluster ring v1"
_WORKER_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")


_KEYED = hashlib.blake2b(digest_size=8, key=_HASH_KEY)


def ring_hash(data: bytes) -> int:
    """A stable 64-bit keyed hash of ``data`` (BLAKE2b, fixed key)."""
    # Copying a keyed hash object is cheaper than keying a new one.
    hasher = _KEYED.copy()
    hasher.update(data)
    return int.from_bytes(hasher.digest(), "big")


def slot_of(call_id: bytes) -> int:
    """The slot of a Call-ID value (already trimmed of whitespace)."""
    return ring_hash(call_id) % SLOTS


class Ring:
    """The slot table for one set of active workers, at one version.

    ``owner(slot)`` is the worker id that wins the slot; with no worker it is None.
    """

    __slots__ = ("_table", "fingerprint", "version", "workers")

    def __init__(self, workers: Iterable[str], version: int = 0) -> None:
        self.workers = tuple(sorted(set(workers)))
        self.version = version
        """The etcd revision at which this process computed the ring (informative:
        processes that started at different times see different revisions)."""
        self.fingerprint = ring_hash(b"\x00".join(worker.encode() for worker in self.workers))
        if not self.workers:
            self._table: list[str | None] = [None] * SLOTS
            return
        seeds = [(worker, worker.encode() + b"\x00") for worker in self.workers]
        table: list[str | None] = []
        for slot in range(SLOTS):
            suffix = slot.to_bytes(2, "big")
            best = max(seeds, key=lambda seed: ring_hash(seed[1] + suffix))
            table.append(best[0])
        self._table = table

    def owner(self, slot: int) -> str | None:
        """The worker that owns ``slot``, or None when the ring is empty."""
        return self._table[slot]

    def owner_of(self, call_id: bytes) -> str | None:
        """The worker that owns the Call-ID ``call_id``."""
        return self._table[slot_of(call_id)]

    def share(self, worker: str) -> float:
        """The fraction of the hash space ``worker`` owns."""
        return self._table.count(worker) / SLOTS

    def moved(self, newer: Ring) -> dict[int, tuple[str | None, str | None]]:
        """The slots whose owner differs in ``newer``: slot -> (old, new owner)."""
        return {
            slot: (old, new)
            for slot, (old, new) in enumerate(zip(self._table, newer._table, strict=True))
            if old != new
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self.workers == other.workers

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Ring({list(self.workers)}, fingerprint={self.fingerprint:016x})"


def check_worker_id(worker_id: str) -> str:
    """Return ``worker_id`` if it can travel in a branch (1-32 letters or digits);
    raises ValueError otherwise."""
    if _WORKER_ID_RE.fullmatch(worker_id) is None:
        raise ValueError(f"a worker id is 1 to 32 letters or digits, not {worker_id!r}")
    return worker_id


def make_branch_prefix(worker_id: str) -> str:
    """The start of every branch worker ``worker_id`` creates (RFC 3261 8.1.1.7:
    the magic cookie first); a unique part follows."""
    return f"z9hG4bK-{check_worker_id(worker_id)}-"


def branch_worker(branch: bytes) -> str | None:
    """The worker id in a branch made by ``make_branch_prefix``, or None."""
    if not branch.startswith(b"z9hG4bK-"):
        return None
    end = branch.find(b"-", 8)
    if end <= 8 or end > 8 + 32:
        return None
    try:
        return branch[8:end].decode("ascii")
    except UnicodeDecodeError:
        return None
