"""The Locust load test (loadtest/locust/) against a live node.

Locust runs as a subprocess only: its gevent monkey-patches sockets, so it is
never imported here.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Node, start_node

from cluster.etcd import LocalEtcd

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtest" / "locust" / "locustfile.py"
LOCUST = Path(sys.executable).with_name("locust")

pytestmark = pytest.mark.skipif(not LOCUST.exists(), reason="locust is not installed")

SIP_USERS = 10
"""6 Locust users take at most 10 SIP users: a Registrar one, a Caller or a
Messenger two (loadtest/locust/locustfile.py)."""


def _create_users(node: Node) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.locust.users",
            "--etcd",
            node.etcd_url,
            "--etcd-prefix",
            node.prefix,
            "--domain",
            "example.com",
            "--count",
            str(SIP_USERS),
            "--password",
            "pw",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "created 10 users user0000..user0009@example.com" in result.stdout


def _locust(node: Node, transport: str, prefix: Path) -> str:
    """Run Locust headless for 4 s with its statistics in PREFIX_*.csv; its output."""
    result = subprocess.run(
        [
            str(LOCUST),
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--users",
            "6",
            "--spawn-rate",
            "6",
            "--run-time",
            "4s",
            "--host",
            f"sip:{node.uri_host}",
            "--sip-transport",
            transport,
            "--sip-domain",
            "example.com",
            "--sip-password",
            "pw",
            "--sip-users",
            str(SIP_USERS),
            "--sip-hold",
            "0.2",
            "--sip-pause",
            "0.2",
            "--sip-register-interval",
            "0.5",
            "--csv",
            str(prefix),
            "--only-summary",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=prefix.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def _stats(prefix: Path) -> dict[str, dict[str, str]]:
    """Locust's PREFIX_stats.csv, one row per request name."""
    with open(f"{prefix}_stats.csv", newline="") as stream:
        return {row["Name"]: row for row in csv.DictReader(stream)}


def test_locust_headless_against_a_node(etcd_server: LocalEtcd, tmp_path: Path) -> None:
    node = start_node(
        etcd_server.url, tmp_path / "node", workers=2, auth="digest", domain="example.com"
    )
    try:
        _create_users(node)
        for transport in ("udp", "tcp"):
            prefix = tmp_path / transport
            output = _locust(node, transport, prefix)
            stats = _stats(prefix)
            for method in ("REGISTER", "INVITE", "BYE", "MESSAGE"):
                assert method in stats, output
                assert int(stats[method]["Request Count"]) > 0, output
            for name, row in stats.items():
                assert row["Type"] in ("SIP", ""), output
                assert int(row["Failure Count"]) == 0, (name, output)
            with open(f"{prefix}_failures.csv", newline="") as stream:
                assert list(csv.DictReader(stream)) == [], output
    finally:
        node.stop()
