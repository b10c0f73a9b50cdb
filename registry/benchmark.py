"""A benchmark of the location service's commit path, for ``loadtest/`` to call.

``run_commit_benchmark`` drives one ``LocationStore`` the way a busy worker
does: ``concurrency`` registrations outstanding at any time, each reading its
AoR's state from the cache, planning a change and committing it, and measures
commits per second and CPU per commit of this process and, given its pid, of
etcd.  Nothing here prints.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import aetcd

from cluster.keys import KeyLayout
from worker.transport import Peer

from ._binding import Binding
from ._location import LocationStore, plan_change

__all__ = ["CommitBenchmark", "run_commit_benchmark"]

_PEER = Peer("lb-bench", 0, "udp", "198.51.100.1", 5060, None)


@dataclass(frozen=True, slots=True)
class CommitBenchmark:
    """What one run measured."""

    commits: int
    """Changes committed (one binding each)."""
    seconds: float
    """Wall-clock duration of the run."""
    client_cpu_seconds: float
    """CPU (user + system) of this process during the run."""
    etcd_cpu_seconds: float | None
    """CPU of the etcd process during the run, when its pid was given."""
    transactions: int
    """Txns sent."""
    conflicts: int
    """Changes answered CONFLICT (none expected: every AoR has one writer)."""

    @property
    def commits_per_second(self) -> float:
        """Throughput."""
        return self.commits / self.seconds if self.seconds > 0 else 0.0

    @property
    def client_cpu_per_commit_us(self) -> float:
        """This process's CPU per commit, in microseconds."""
        return 1e6 * self.client_cpu_seconds / max(self.commits, 1)

    @property
    def etcd_cpu_per_commit_us(self) -> float | None:
        """etcd's CPU per commit, in microseconds."""
        if self.etcd_cpu_seconds is None:
            return None
        return 1e6 * self.etcd_cpu_seconds / max(self.commits, 1)

    @property
    def changes_per_transaction(self) -> float:
        """The mean batch size."""
        return self.commits / max(self.transactions, 1)


def _process_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def run_commit_benchmark(
    client: aetcd.Client,
    keys: KeyLayout,
    *,
    registrations: int = 20_000,
    concurrency: int = 1_000,
    aors: int = 10_000,
    etcd_pid: int | None = None,
    max_in_flight: int = 4,
    batch_window: float = 0.010,
    rate: float | None = None,
) -> CommitBenchmark:
    """Commit ``registrations`` single-binding changes over ``aors`` AoRs through
    one LocationStore, and measure.

    Closed loop (``rate`` None): ``concurrency`` registrations outstanding at any
    time, as fast as they complete.  Open loop: registrations arrive at ``rate``
    per second (in groups every millisecond, as a worker's message loop hands
    them over), however long they take.  Each reads its AoR's state from the
    cache and writes one binding (new or refreshed, 3600 s), as the registrar
    does.  Raises StoreUnavailableError when etcd does not answer.
    """
    store = LocationStore(client, keys, max_in_flight=max_in_flight, batch_window=batch_window)
    await store.start()
    try:
        counter = iter(range(registrations))

        async def register(index: int) -> None:
            aor = f"bench{index % aors}@bench.example.com"
            now = time.time()
            state = store.aor_state(aor)
            binding = Binding(
                aor=aor,
                binding_id=f"{index % aors:016x}",
                contact=f"<sip:{index % aors}@198.51.100.1:5060>",
                uri=f"sip:{index % aors}@198.51.100.1:5060",
                expires_at=now + 3600,
                q=None,
                call_id=f"bench-{index % aors}",
                cseq=index // aors + 1,
                received=_PEER,
                user_agent="bench",
                registered_at=now,
            )
            await store.commit(plan_change(state, [binding]))

        async def registrar_loop() -> None:
            for index in counter:
                await register(index)

        async def arrivals(per_second: float) -> None:
            loop = asyncio.get_running_loop()
            tasks: list[asyncio.Task[None]] = []
            start = loop.time()
            sent = 0
            while sent < registrations:
                due = min(registrations, int((loop.time() - start) * per_second) + 1)
                tasks.extend(loop.create_task(register(index)) for index in range(sent, due))
                sent = due
                await asyncio.sleep(0.001)
            await asyncio.gather(*tasks)

        etcd_before = _process_cpu_seconds(etcd_pid) if etcd_pid is not None else None
        cpu_before = time.process_time()
        started = time.perf_counter()
        if rate is None:
            await asyncio.gather(*(registrar_loop() for _ in range(concurrency)))
        else:
            await arrivals(rate)
        seconds = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_before
        etcd_cpu = (
            _process_cpu_seconds(etcd_pid) - etcd_before
            if etcd_pid is not None and etcd_before is not None
            else None
        )
        statistics = store.statistics
        return CommitBenchmark(
            commits=statistics.changes,
            seconds=seconds,
            client_cpu_seconds=client_cpu,
            etcd_cpu_seconds=etcd_cpu,
            transactions=statistics.transactions,
            conflicts=statistics.conflicts,
        )
    finally:
        await store.stop()
