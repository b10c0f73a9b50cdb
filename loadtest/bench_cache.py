"""How long a new worker takes to warm its caches, and what a binding costs in memory.

``python -m loadtest.bench_cache [--bindings 100000]`` starts a local etcd in a
temporary directory, writes the bindings through the location service's commit
path (one AoR each, as ``loadtest.bench_registry`` does), then starts
``sipcluster worker`` processes and times each from its start to its ready
notification (``cluster/notify.py``: sent once the bindings and credentials are
loaded and the worker has joined).  A worker on an empty key prefix is the
baseline: the difference is the warm-up of the cache, and the difference of
resident memory (``VmRSS``) divided by the bindings is the memory per binding in
a worker.  etcd's resident memory and database size before and after the writes
give its share.  Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cluster.etcd import LocalEtcd, free_port
from cluster.keys import KeyLayout
from cluster.membership import connect_etcd
from cluster.notify import NOTIFY_FD

from .bench_registry import run_commit_benchmark

__all__ = ["CacheFigures", "main", "measure"]


def _rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (``VmRSS`` of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _start_worker(etcd_url: str, prefix: str, data_dir: Path) -> tuple[float, int, int]:
    """Start ``sipcluster worker`` on ``prefix``; (seconds to ready, its RSS once
    ready, its pid).  The worker is stopped before returning."""
    read_end, write_end = os.pipe()
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "worker",
            "--etcd",
            etcd_url,
            "--etcd-prefix",
            prefix,
            "--data-dir",
            str(data_dir),
            "--http",
            "127.0.0.1:0",
            "--auth",
            "none",
            "--domain",
            "bench.example.com",
            "--log-level",
            "warning",
        ],
        pass_fds=(write_end,),
        env=dict(os.environ, **{NOTIFY_FD: str(write_end)}),
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end) as notifications:
            for line in notifications:
                if json.loads(line).get("event") == "ready":
                    seconds = time.perf_counter() - started
                    return seconds, _rss_bytes(process.pid), process.pid
        raise RuntimeError("the worker exited before it was ready")
    finally:
        process.send_signal(signal.SIGINT)  # leave at once (SIGTERM would drain)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _db_size(etcd: LocalEtcd) -> int:
    return sum(path.stat().st_size for path in etcd.data_dir.rglob("*") if path.is_file())


async def _fill(etcd_url: str, prefix: str, bindings: int) -> tuple[float, int]:
    """Write ``bindings`` bindings (one AoR each); (seconds, commits)."""
    client = await connect_etcd(etcd_url)
    try:
        result = await run_commit_benchmark(
            client,
            KeyLayout(prefix),
            registrations=bindings,
            aors=bindings,
            concurrency=1_000,
        )
    finally:
        await client.close()
    return result.seconds, result.commits


@dataclass(frozen=True, slots=True)
class CacheFigures:
    """What one run measured."""

    bindings: int
    write_seconds: float
    commits: int
    baseline: tuple[tuple[float, int], ...]
    """(seconds to ready, RSS bytes) of each worker start on an empty prefix."""
    warm: tuple[tuple[float, int], ...]
    """The same with the bindings."""
    etcd_rss_per_binding: float
    etcd_disk_per_binding: float

    @property
    def warm_seconds(self) -> float:
        """The cache's warm-up: best start with the bindings minus best baseline."""
        return min(run[0] for run in self.warm) - min(run[0] for run in self.baseline)

    @property
    def worker_bytes_per_binding(self) -> float:
        """Resident memory of a worker per binding in its cache."""
        return (min(run[1] for run in self.warm) - min(run[1] for run in self.baseline)) / (
            self.bindings
        )

    def lines(self) -> list[str]:
        """The figures as text lines."""
        lines = [
            f"{self.bindings:,} bindings written in {self.write_seconds:.1f} s "
            f"({self.commits / self.write_seconds:,.0f}/s)",
            f"{'worker start':<34} {'to ready':>9} {'RSS':>9}",
        ]
        for label, runs in (
            ("empty location range (baseline)", self.baseline),
            ("with the bindings", self.warm),
        ):
            lines += [f"{label:<34} {run[0]:>8.2f}s {run[1] / 2**20:>7.1f}MB" for run in runs]
        lines += [
            f"cache warm-up for {self.bindings:,} bindings: {self.warm_seconds:.2f} s "
            "(best start minus best baseline)",
            f"worker memory per binding: {self.worker_bytes_per_binding:,.0f} bytes",
            f"etcd per binding: {self.etcd_rss_per_binding:,.0f} bytes resident, "
            f"{self.etcd_disk_per_binding:,.0f} bytes of data directory",
        ]
        return lines


def measure(bindings: int = 100_000, runs: int = 3) -> CacheFigures:
    """Run the benchmark (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="sipcluster-bench-cache-") as directory:
        root = Path(directory)
        etcd = LocalEtcd(root / "etcd", client_port=free_port(), log_path=root / "etcd.log")
        etcd.start()
        try:
            filled = f"/bench-{uuid.uuid4().hex[:8]}/"
            empty = f"/bench-{uuid.uuid4().hex[:8]}/"
            assert etcd.process is not None
            etcd_rss_before, db_before = _rss_bytes(etcd.process.pid), _db_size(etcd)
            seconds, commits = asyncio.run(_fill(etcd.url, filled, bindings))
            etcd_rss_after, db_after = _rss_bytes(etcd.process.pid), _db_size(etcd)
            baseline = [_start_worker(etcd.url, empty, root / "w")[:2] for _ in range(runs)]
            warm = [_start_worker(etcd.url, filled, root / "w")[:2] for _ in range(runs)]
        finally:
            etcd.stop()
    return CacheFigures(
        bindings,
        seconds,
        commits,
        tuple(baseline),
        tuple(warm),
        (etcd_rss_after - etcd_rss_before) / bindings,
        (db_after - db_before) / bindings,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_cache", description=__doc__)
    parser.add_argument("--bindings", type=int, default=100_000, help="bindings [100000]")
    parser.add_argument("--runs", type=int, default=3, help="worker starts of each kind [3]")
    arguments = parser.parse_args(argv)
    if arguments.bindings < 1 or arguments.runs < 1:
        parser.error("--bindings and --runs must be at least 1")
    print("\n".join(measure(arguments.bindings, arguments.runs).lines()))


if __name__ == "__main__":
    main()
