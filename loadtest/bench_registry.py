"""A benchmark of the location service's commit path.

``run_commit_benchmark`` drives one ``LocationStore`` the way a busy worker
does: ``concurrency`` registrations outstanding at any time (or arriving at a
fixed rate), each reading its AoR's state from the cache, planning a change and
committing it, and measures commits per second and CPU per commit of this
process and, given its pid, of etcd.  ``followers`` other processes each follow
the location range with a ``LocationStore`` of their own, as the other workers of
a node do (they only watch: nobody looks their bindings up), and their CPU per
commit is measured too.

``python -m loadtest.bench_registry`` starts a local etcd (``cluster.etcd``) in a
temporary directory and prints one line per run: a fixed rate, then a closed
loop at peak.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import aetcd

from cluster.keys import KeyLayout
from cluster.protocol import Peer
from registry import Binding, LocationStore, plan_change

__all__ = ["CommitBenchmark", "main", "run_commit_benchmark"]

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
    follower_cpu_seconds: tuple[float, ...] = ()
    """CPU of each follower process during the run (until its cache reached the
    last commit)."""

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
    def follower_cpu_per_commit_us(self) -> float | None:
        """The mean CPU per commit of one follower, in microseconds."""
        if not self.follower_cpu_seconds:
            return None
        mean = sum(self.follower_cpu_seconds) / len(self.follower_cpu_seconds)
        return 1e6 * mean / max(self.commits, 1)

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
    followers: int = 0,
    etcd_url: str | None = None,
) -> CommitBenchmark:
    """Commit ``registrations`` single-binding changes over ``aors`` AoRs through
    one LocationStore, and measure.

    Closed loop (``rate`` None): ``concurrency`` registrations outstanding at any
    time, as fast as they complete.  Open loop: registrations arrive at ``rate``
    per second (in groups every millisecond, as a worker's message loop hands
    them over), however long they take.  Each reads its AoR's state from the
    cache and writes one binding (new or refreshed, 3600 s), as the registrar
    does.  ``followers`` processes (``etcd_url`` needed) follow the writes.
    Raises StoreUnavailableError when etcd does not answer.
    """
    if followers and etcd_url is None:
        raise ValueError("followers need etcd_url")
    store = LocationStore(client, keys, max_in_flight=max_in_flight, batch_window=batch_window)
    await store.start()
    context = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    processes = []
    try:
        for _ in range(followers):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_follower_main, args=(etcd_url, keys.prefix.decode(), theirs), daemon=True
            )
            process.start()
            pipes.append(ours)
            processes.append(process)
        loop = asyncio.get_running_loop()
        for pipe in pipes:
            # Each follower answers once its cache is loaded.
            await loop.run_in_executor(None, pipe.recv)
        counter = iter(range(registrations))
        last_revision = 0

        async def register(index: int) -> None:
            nonlocal last_revision
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
            result = await store.commit(plan_change(state, [binding]))
            last_revision = max(last_revision, result.revision)

        async def registrar_loop() -> None:
            for index in counter:
                await register(index)

        async def arrivals(per_second: float) -> None:
            tasks: list[asyncio.Task[None]] = []
            start = loop.time()
            sent = 0
            while sent < registrations:
                due = min(registrations, int((loop.time() - start) * per_second) + 1)
                tasks.extend(loop.create_task(register(index)) for index in range(sent, due))
                sent = due
                await asyncio.sleep(0.001)
            await asyncio.gather(*tasks)

        for pipe in pipes:
            pipe.send(0)  # start measuring
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
        follower_cpu = []
        for pipe in pipes:
            pipe.send(last_revision)
        for pipe in pipes:
            follower_cpu.append(float(await loop.run_in_executor(None, pipe.recv)))
        statistics = store.statistics
        return CommitBenchmark(
            commits=statistics.changes,
            seconds=seconds,
            client_cpu_seconds=client_cpu,
            etcd_cpu_seconds=etcd_cpu,
            transactions=statistics.transactions,
            conflicts=statistics.conflicts,
            follower_cpu_seconds=tuple(follower_cpu),
        )
    finally:
        for pipe in pipes:
            pipe.close()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
        await store.stop()


def _follower_main(etcd_url: str, prefix: str, pipe: Connection) -> None:
    """A follower process: a LocationStore that only watches.  Answers on
    ``pipe`` when loaded, then, given the last revision, its CPU seconds from the
    start signal until its cache reached that revision."""
    asyncio.run(_follow(etcd_url, prefix, pipe))


async def _follow(etcd_url: str, prefix: str, pipe: Connection) -> None:
    from cluster.membership import connect_etcd  # noqa: PLC0415 - in the child only

    client = await connect_etcd(etcd_url)
    store = LocationStore(client, KeyLayout(prefix))
    await store.start()
    loop = asyncio.get_running_loop()
    pipe.send(True)
    await loop.run_in_executor(None, pipe.recv)
    cpu_before = time.process_time()
    # The pipe is read in a thread while the watch goes on in this loop.
    last_revision = int(await loop.run_in_executor(None, pipe.recv))
    await store.wait_for_revision(last_revision, timeout=60)
    pipe.send(time.process_time() - cpu_before)
    await store.stop()
    await client.close()


async def _main(arguments: argparse.Namespace) -> None:
    from cluster.etcd import LocalEtcd, free_port  # noqa: PLC0415
    from cluster.membership import connect_etcd  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="registry-bench-") as directory:
        server = LocalEtcd(Path(directory) / "etcd", client_port=free_port())
        with server:
            client = await connect_etcd(server.url)
            try:
                runs: list[tuple[str, float | None]] = [
                    (f"{arguments.rate:,.0f}/s", arguments.rate),
                    ("peak", None),
                ]
                for label, rate in runs:
                    for _ in range(arguments.repeat):
                        result = await run_commit_benchmark(
                            client,
                            KeyLayout(f"/bench-{uuid.uuid4().hex[:8]}/"),
                            registrations=arguments.registrations,
                            aors=arguments.aors,
                            concurrency=arguments.concurrency,
                            etcd_pid=server.pid,
                            rate=rate,
                            followers=arguments.followers,
                            etcd_url=server.url,
                            batch_window=arguments.batch_window,
                        )
                        follower = result.follower_cpu_per_commit_us
                        print(
                            f"{label:>8}: {result.commits_per_second:8,.0f} commits/s, "
                            f"{result.changes_per_transaction:5.1f} per Txn, CPU per commit: "
                            f"worker {result.client_cpu_per_commit_us:5.1f} us, "
                            f"etcd {result.etcd_cpu_per_commit_us or 0:5.1f} us"
                            + (f", follower {follower:5.1f} us" if follower is not None else "")
                            + f", conflicts {result.conflicts}",
                            flush=True,
                        )
            finally:
                await client.close()


def main() -> None:
    """``python -m loadtest.bench_registry``: run the benchmark on a local etcd."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_registry", description=__doc__)
    parser.add_argument("--rate", type=float, default=5_000.0, help="the fixed rate, changes/s")
    parser.add_argument("--registrations", type=int, default=50_000)
    parser.add_argument("--aors", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=1_000, help="at peak")
    parser.add_argument("--followers", type=int, default=1, help="watching processes")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each kind")
    parser.add_argument(
        "--batch-window", type=float, default=0.010, help="LocationStore batch_window, seconds"
    )
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
