"""The sweep's tables in Markdown, written into docs/performance.md by ``make sweep``.

``write_tables`` replaces what stands between the two marker lines of the file
(``BEGIN`` and ``END``), or appends a section holding them when the file has none:
the highest passing rate of each workload and target with the CPU per operation
and the ratio to Kamailio; latency at half of each maximum; what the load
balancer costs per message and so how many messages one load balancer process
moves per second of its CPU; and every step run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from loadtest.bench_cache import CacheFigures

from ._steps import WORKLOADS, StepResult, summary_rows

__all__ = ["BEGIN", "END", "render_tables", "write_tables"]

BEGIN = "<!-- sweep tables: begin (written by make sweep) -->"
END = "<!-- sweep tables: end -->"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _us(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def render_tables(
    results: Sequence[StepResult],
    notes: Sequence[str],
    arguments: argparse.Namespace,
    cache: CacheFigures | None = None,
) -> str:
    """The Markdown of one sweep."""
    stamp = datetime.datetime.now(datetime.UTC)
    lines = [
        f"Sweep of {stamp:%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs "
        f"({platform.machine()}, kernel {platform.release()}, Python "
        f"{platform.python_version()}), steps of {arguments.step_seconds:g} s, "
        f"{arguments.workers} sipcluster workers.  A step passes with fewer than 0.1 % "
        "failed, at least 95 % of the rate achieved, p99 under 50 ms and no UDP receive "
        "buffer errors.",
        "",
        "| workload | target | highest passing rate/s | p50 / p99 ms | CPU µs per operation "
        "| cores | CPU per operation vs Kamailio |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    best = {(row.workload, row.target): row for row in summary_rows(results)}
    workloads = list(dict.fromkeys(result.workload for result in results))
    for workload in workloads:
        for target in ("sipcluster", "kamailio"):
            tried = [r for r in results if (r.workload, r.target) == (workload, target)]
            if not tried:
                continue
            row = best.get((workload, target))
            if row is None:
                lowest = min(r.rate for r in tried)
                lines.append(f"| {workload} | {target} | < {lowest:,} | – | – | – | |")
                continue
            top = max(r.rate for r in tried if not r.half)
            rate = f"{row.rate:,}" + (" (ladder top)" if row.rate == top else "")
            ratio = ""
            theirs = best.get((workload, "kamailio"))
            if target == "sipcluster" and theirs is not None:
                mine_us, their_us = row.cpu_per_operation_us, theirs.cpu_per_operation_us
                if mine_us and their_us:
                    ratio = f"×{mine_us / their_us:.1f}"
            lines.append(
                f"| {workload} | {target} | {rate} | {_ms(row.p50_ms)} / {_ms(row.p99_ms)} "
                f"| {_us(row.cpu_per_operation_us)} | {row.server_cores:.2f} | {ratio} |"
            )
    halves = [r for r in results if r.half]
    if halves:
        lines += [
            "",
            "Latency at half of the highest passing rate:",
            "",
            "| workload | target | rate/s | p50 ms | p99 ms | failed |",
            "|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.workload} | {r.target} | {r.rate:,} | {_ms(r.p50_ms)} | {_ms(r.p99_ms)} "
            f"| {r.failed} |"
            for r in halves
        ]
    lb_rows = []
    for (workload, target), row in best.items():
        lb_seconds = row.server_cpu_by_process.get("lb")
        if target != "sipcluster" or not lb_seconds or not row.successful:
            continue
        messages = row.successful * WORKLOADS[workload].messages
        per_message = lb_seconds / messages * 1e6
        lb_rows.append(
            f"| {workload} | {WORKLOADS[workload].messages} | {per_message:.1f} "
            f"| {1e6 / per_message:,.0f} | {messages / row.wall_seconds:,.0f} |"
        )
    if lb_rows:
        lines += [
            "",
            "The load balancer at each highest passing rate: its CPU per message it moves "
            "(user agent to worker, or worker to user agent), and what one load balancer "
            "process would move with a core of its own:",
            "",
            "| workload | messages per operation | LB CPU µs per message | messages/s per LB "
            "core | messages/s moved in the step |",
            "|---|---:|---:|---:|---:|",
            *lb_rows,
        ]
    lines += [
        "",
        "Every step:",
        "",
        "| workload | target | rate/s | achieved/s | failed | refused | p50 ms | p99 ms "
        "| CPU µs/op | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        verdict = "pass" if r.passed else "; ".join(r.reasons)
        if r.half:
            verdict = "half of the maximum: " + verdict
        lines.append(
            f"| {r.workload} | {r.target} | {r.rate:,} | {r.achieved:,.0f} | {r.failed} "
            f"| {r.refused} | {_ms(r.p50_ms)} | {_ms(r.p99_ms)} "
            f"| {_us(r.cpu_per_operation_us)} | {verdict} |"
        )
    lines += [f"- {note}" for note in notes]
    if cache is not None:
        lines += [
            "",
            f"A new worker's caches (`python -m loadtest.bench_cache --bindings "
            f"{cache.bindings}`): warm-up of {cache.bindings:,} bindings "
            f"{cache.warm_seconds:.2f} s; {cache.worker_bytes_per_binding:,.0f} bytes of worker "
            f"memory per binding; etcd {cache.etcd_rss_per_binding:,.0f} bytes resident and "
            f"{cache.etcd_disk_per_binding:,.0f} bytes of data directory per binding.",
        ]
    return "\n".join(lines)


def write_tables(
    path: Path,
    results: Sequence[StepResult],
    notes: Sequence[str],
    arguments: argparse.Namespace,
    cache: CacheFigures | None = None,
) -> None:
    """Put the tables between the markers of ``path`` (appended when absent)."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{render_tables(results, notes, arguments, cache)}\n{END}"
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## Sweep tables (`make sweep`)\n\n" + block + "\n"
    path.write_text(text)
    print(f"tables written to {path}", flush=True)
