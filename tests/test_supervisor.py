"""`sipcluster run` as a process: start-up, health, restarts, orderly stop, errors."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import cli, free_udp_and_tcp_port, http_get, start_node, status

from cluster.etcd import LocalEtcd, free_port
from cluster.keys import KeyLayout
from cluster.membership import MemberView, MemberWatch, connect_etcd


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_node_health_metrics_status_and_orderly_stop(
    etcd_server: LocalEtcd, tmp_path: Path
) -> None:
    node = start_node(etcd_server.url, tmp_path)
    try:
        assert http_get(node.http_port, "/healthz")[0] == 200
        assert http_get(node.http_port, "/readyz")[0] == 200
        code, metrics = http_get(node.http_port, "/metrics")
        assert code == 200
        assert 'sipcluster_node_processes_ready{role="worker"} 2.0' in metrics
        assert 'process="lb-0"' in metrics
        assert 'process="worker-1"' in metrics
        members = status(node)
        workers = members["workers"]
        assert len(workers) == 2
        assert {w["state"] for w in workers} == {"active"}
        assert sum(float(str(w["share"])) for w in workers) == pytest.approx(1.0)
        (balancer,) = members["load_balancers"]
        pids = [int(str(w["pid"])) for w in workers] + [int(str(balancer["pid"]))]
        assert all(alive(pid) for pid in pids)
    finally:
        code = node.stop()
    assert code == 0
    # SIGTERM stopped everything: no child is left, no member stays in etcd.
    assert not [pid for pid in pids if alive(pid)]
    assert status(node) == {"workers": [], "load_balancers": [], "ring": status(node)["ring"]}


def test_a_killed_worker_is_replaced_and_leaves_the_ring_at_once(
    etcd_server: LocalEtcd, tmp_path: Path
) -> None:
    node = start_node(etcd_server.url, tmp_path)
    try:
        victim = status(node)["workers"][0]
        victim_id, victim_pid = str(victim["id"]), int(str(victim["pid"]))

        async def watch() -> list[set[str]]:
            client = await connect_etcd(node.etcd_url)
            views: list[set[str]] = []
            replaced = asyncio.Event()

            def changed(view: MemberView) -> None:
                workers = set(view.workers)
                views.append(workers)
                if victim_id not in workers and len(workers) == 2:
                    replaced.set()

            follower = MemberWatch(client, KeyLayout(node.prefix), changed)
            follower.start()
            await follower.ready.wait()
            os.kill(victim_pid, signal.SIGKILL)
            await asyncio.wait_for(replaced.wait(), 30)
            await follower.stop()
            await client.close()
            return views

        views = asyncio.run(watch())
        # The dead worker left the membership (its lease revoked by the supervisor,
        # or expired) and a new worker took its place.
        assert victim_id in views[0]
        assert victim_id not in views[-1]
        assert len(views[-1]) == 2
        assert http_get(node.http_port, "/readyz")[0] == 200
    finally:
        assert node.stop() == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["run", "--workers", "zero"], "--workers"),
        (["run", "--listen", "sctp:127.0.0.1:5060"], "--listen"),
        (["run", "--listen", "udp:localhost:5060"], "IP address"),
        (["run", "--auth", "maybe"], "--auth"),
        (["worker", "--http", "127.0.0.1:99999"], "--http"),
        (["run", "--commit-window", "-0.01"], "--commit-window"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(arguments: list[str], message: str) -> None:
    result = cli(*arguments)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_environment_and_config_file(tmp_path: Path) -> None:
    config = tmp_path / "sipcluster.toml"
    config.write_text('workers = "many"\n')
    result = cli("run", "--config", str(config))
    assert result.returncode == 2
    assert "config file" in result.stderr
    config.write_text("no_such_setting = 1\n")
    result = cli("run", "--config", str(config))
    assert result.returncode == 2
    assert "no_such_setting" in result.stderr


@pytest.mark.parametrize("command", ["run", "worker", "lb"])
def test_unreachable_etcd_is_one_clear_error(command: str, tmp_path: Path) -> None:
    port = free_port()
    listen = [] if command == "worker" else ["--listen", f"udp:127.0.0.1:{free_udp_and_tcp_port()}"]
    result = cli(
        command,
        "--etcd",
        f"http://127.0.0.1:{port}",
        "--data-dir",
        str(tmp_path),
        "--http",
        "127.0.0.1:0",
        *listen,
    )
    assert result.returncode != 0
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_starts_its_own_etcd_when_none_is_given(tmp_path: Path) -> None:
    sip_port = free_udp_and_tcp_port()
    etcd_port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "run",
            "--workers",
            "1",
            "--data-dir",
            str(tmp_path),
            "--local-etcd-port",
            str(etcd_port),
            "--http",
            f"127.0.0.1:{free_port()}",
            "--listen",
            f"udp:127.0.0.1:{sip_port}",
            "--auth",
            "none",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "sipcluster is ready." in line:
                break
        else:
            raise AssertionError("the node never became ready")
        result = cli("options", f"sip:127.0.0.1:{sip_port}")
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "etcd").is_dir()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    # The local etcd stopped with the node.
    assert cli("status", "--etcd", f"http://127.0.0.1:{etcd_port}").returncode == 1
