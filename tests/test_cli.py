"""The administrative commands against a real etcd and a real node, and IPv6."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Node, UserAgent, start_node

from cluster.etcd import LocalEtcd, free_port


def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def node(etcd_server: LocalEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    running = start_node(
        etcd_server.url,
        tmp_path_factory.mktemp("node"),
        workers=1,
        auth="none",
    )
    yield running
    assert running.stop() == 0


def test_user_add_list_remove(node: Node) -> None:
    etcd = ["--etcd", node.etcd_url, "--etcd-prefix", node.prefix]
    assert cli("user", "add", *etcd, "zoe@Example.COM", "--password", "pw").returncode == 0
    listed = cli("user", "list", *etcd)
    assert listed.stdout.split() == ["zoe@example.com"]
    bad = cli("user", "add", *etcd, "zoe", "--password", "pw")
    assert bad.returncode == 1
    assert "NAME@DOMAIN" in bad.stderr
    assert cli("user", "remove", *etcd, "zoe@example.com").returncode == 0
    missing = cli("user", "remove", *etcd, "zoe@example.com")
    assert missing.returncode == 1
    assert "no user" in missing.stderr
    assert cli("user", "list", *etcd).stdout.strip() == ""
    no_etcd = cli("user", "list")
    assert no_etcd.returncode == 1
    assert "--etcd" in no_etcd.stderr


def test_locations_lists_bindings(node: Node) -> None:
    async def register() -> str:
        agent = await UserAgent("yann", "example.com").start((node.host, node.port))
        assert (await agent.register(expires=600)).status == 200
        await agent.close()
        return agent.contact

    contact = asyncio.run(register())
    etcd = ["--etcd", node.etcd_url, "--etcd-prefix", node.prefix]
    text = cli("locations", *etcd, "yann@example.com")
    assert contact in text.stdout
    listed = json.loads(cli("locations", *etcd, "--json").stdout)
    (binding,) = [entry for entry in listed if entry["aor"] == "yann@example.com"]
    assert binding["contact"] == contact
    assert 590 <= binding["expires"] <= 600
    assert binding["received"][2] == "udp"


def test_options_exit_codes(node: Node) -> None:
    assert cli("options", f"sip:{node.uri_host}").returncode == 0
    assert cli("options", f"sip:{node.uri_host};transport=tcp").returncode == 0
    # A user without a binding: 404, not a 200.
    assert cli("options", f"sip:nobody@{node.uri_host}").returncode == 1
    silent = cli("options", f"sip:127.0.0.1:{free_port()}", "--timeout", "1")
    assert silent.returncode == 1
    assert "no answer" in silent.stderr
    assert cli("options", "http://example.com").returncode == 1


def test_ipv6_register_and_call(etcd_server: LocalEtcd, tmp_path: Path) -> None:
    ipv6 = start_node(
        etcd_server.url,
        tmp_path,
        workers=1,
        auth="none",
        host="::1",
    )
    try:

        async def scenario() -> None:
            proxy = ("::1", ipv6.port)
            caller = await UserAgent("v6caller", "example.com", host="::1").start(proxy)
            callee = await UserAgent("v6callee", "example.com", host="::1").start(proxy)
            assert (await callee.register()).status == 200
            caller.send(caller.request("INVITE", f"sip:{callee.aor}"))
            received = await callee.receive_request("INVITE")
            assert received.uri_text.startswith("sip:v6callee@[::1]:")
            assert received.via.host == "[::1]"
            callee.answer(received, 486)
            assert (await caller.receive_response(300)).status == 486
            await caller.close()
            await callee.close()

        asyncio.run(scenario())
        assert cli("options", f"sip:[::1]:{ipv6.port}").returncode == 0
    finally:
        assert ipv6.stop() == 0
