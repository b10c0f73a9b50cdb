"""End to end with third-party user agents: pjsua2 (PJSIP) as caller and callee."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Node, add_user, start_node

from cluster.etcd import LocalEtcd

DOMAIN = "example.com"
AGENT = Path(__file__).with_name("pjsua_agent.py")


@pytest.fixture(scope="module")
def digest_node(etcd_server: LocalEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = start_node(
        etcd_server.url,
        tmp_path_factory.mktemp("node"),
        auth="digest",
        domain=DOMAIN,
    )
    for user in ("alice", "bob"):
        add_user(node, f"{user}@{DOMAIN}", f"{user}-pw")
    yield node
    assert node.stop() == 0


def agent(node: Node, user: str, *arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(AGENT),
            "--user",
            user,
            "--password",
            f"{user}-pw",
            "--domain",
            DOMAIN,
            "--proxy",
            node.uri_host,
            *arguments,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def events(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def wait_for_event(process: subprocess.Popen[str], name: str) -> list[dict[str, object]]:
    """Read the agent's output until it reports ``name`` (or exits)."""
    seen = []
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("{"):
            seen.append(json.loads(line))
            if seen[-1]["event"] == name:
                return seen
    return seen


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_pjsua2_registers_with_digest_and_calls_through_the_cluster(
    digest_node: Node, transport: str
) -> None:
    callee = agent(digest_node, "bob", "--answer", "--transport", transport)
    try:
        seen = wait_for_event(callee, "registered")
        assert seen[-1]["event"] == "registered", seen
        caller = agent(
            digest_node, "alice", "--call", f"sip:bob@{DOMAIN}", "--transport", transport
        )
        caller_output, _ = caller.communicate(timeout=60)
        caller_events = [event["event"] for event in events(caller_output)]
        assert caller.returncode == 0, caller_output
        assert caller_events[:2] == ["registered", "confirmed"], caller_output
        assert caller_events[-1] == "disconnected"
        callee_output, _ = callee.communicate(timeout=60)
        assert callee.returncode == 0, callee_output
        callee_events = [event["event"] for event in seen + events(callee_output)]
        assert "incoming" in callee_events
        assert "confirmed" in callee_events
        assert callee_events[-1] == "disconnected"
    finally:
        for process in (callee,):
            if process.poll() is None:
                process.kill()
                process.wait()
