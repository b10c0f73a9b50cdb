"""The SIPp scenarios of loadtest/sipp against a real node (SIPp from Debian's
sip-tester, 3.6.1), each for a small bounded number of calls:

* digest registrations of users made by ``python -m loadtest.provision``, with
  the injection file it writes (``register_digest.xml``);
* a caller that cancels while the callee rings (``uac_cancel.xml`` and
  ``uas_ringing.xml``), and a call with hold (``uac_hold.xml`` and
  ``uas_hold.xml``), on a node without authentication and on one with digest
  and the domain its own address, as ``make run`` (the INVITE challenged
  with 407);
* ``uas_ringing.xml`` answering when no CANCEL comes (with ``uac.xml``).

The commands are the README's ("Load testing"), on free ports.  sipcluster sends
a registered user's calls to the address its REGISTER came from, so the callee
registers from the port the UAS then listens on (``-p``).  Every SIPp run is
bounded by ``-m`` and ``-timeout``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Node, free_udp_and_tcp_port, start_node

from cluster.etcd import LocalEtcd
from loadtest.sweep._sipp import (
    SCENARIOS,
    SippStatistics,
    read_statistics,
    sipp_binary,
    write_injection,
)

PASSWORD = "secret"
CALLS = 20
RATE = 50
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Cluster:
    """A node, and the port where its callee user0000 registered from (where the
    UAS of each call test listens, one test after the other)."""

    node: Node
    uas_port: int

    @property
    def digest(self) -> bool:
        return self.node.auth == "digest"


def cluster_for(etcd: LocalEtcd, directory: Path, auth: str, domain: str) -> Iterator[Cluster]:
    # SIPp 3.6.1 answers only the first challenge, and only with MD5.
    extra = ["--digest-algorithms", "MD5", "--digest-algorithms", "SHA-256"]
    node = start_node(etcd.url, directory, workers=2, auth=auth, domain=domain, extra=extra)
    try:
        cluster = Cluster(node, free_udp_and_tcp_port())
        callee = directory / "callee.csv"
        if cluster.digest:
            provision(node, callee, "--count", "1")
        else:
            write_injection(callee, [0], password=PASSWORD)
        run_client(
            sipp_client(
                node,
                "register_digest.xml" if cluster.digest else "register.xml",
                callee,
                directory / "register-callee.csv",
                calls=1,
                local_port=cluster.uas_port,
                extra=("-auth_uri", node.domain, "-default_behaviors", "all,-bye"),
            ),
            directory,
        )
        yield cluster
    finally:
        assert node.stop() == 0


@pytest.fixture(scope="module")
def open_cluster(
    etcd_server: LocalEtcd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    yield from cluster_for(etcd_server, tmp_path_factory.mktemp("open"), "none", "example.com")


@pytest.fixture(scope="module")
def digest_cluster(
    etcd_server: LocalEtcd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    # As `make run`: digest, and the node's own address for domain (so a contact
    # without a user part would look like the node itself to it).
    yield from cluster_for(etcd_server, tmp_path_factory.mktemp("digest"), "digest", "127.0.0.1")


def sipp_client(
    node: Node,
    scenario: str,
    injection: Path,
    statistics: Path,
    *,
    calls: int,
    local_port: int,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """A bounded SIPp client against the node (the README's options)."""
    return [
        sipp_binary(),
        node.uri_host,
        "-sf",
        str(SCENARIOS / scenario),
        "-inf",
        str(injection),
        "-key",
        "domain",
        node.domain,
        "-key",
        "expires",
        "3600",
        "-i",
        "127.0.0.1",
        "-p",
        str(local_port),
        "-r",
        str(RATE),
        "-m",
        str(calls),
        "-timeout",
        "20s",
        "-nostdin",
        "-trace_stat",
        "-stf",
        str(statistics),
        "-trace_err",
        "-error_file",
        str(statistics.with_suffix(".errors.log")),
        *extra,
    ]


def run_client(command: list[str], directory: Path) -> SippStatistics:
    """Run a SIPp client to its end; its statistics (every call must succeed)."""
    result = subprocess.run(
        command,
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=40,
        check=False,
    )
    statistics = read_statistics(Path(command[command.index("-stf") + 1]))
    assert statistics is not None, f"no statistics: {command}"
    assert statistics.failed == 0, (statistics, errors(directory))
    assert result.returncode == 0, (statistics, errors(directory))
    return statistics


def errors(directory: Path) -> str:
    """What SIPp logged about failed calls, for assertion messages."""
    return "\n".join(
        f"{path.name}:\n{path.read_text(errors='replace')[-2000:]}"
        for path in sorted(directory.glob("*errors.log"))
    )


def udp_bound(port: int) -> bool:
    """Whether some socket is bound to UDP 127.0.0.1:``port`` (from /proc/net/udp)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as table:
        return any(line.split()[1] == wanted for line in list(table)[1:])


def provision(node: Node, output: Path, *options: str) -> None:
    """``python -m loadtest.provision`` against the node's etcd and key prefix."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.provision",
            "--etcd",
            node.etcd_url,
            "--etcd-prefix",
            node.prefix,
            "--domain",
            node.domain,
            "--password",
            PASSWORD,
            "--output",
            str(output),
            *options,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_register_digest_with_provisioned_users(digest_cluster: Cluster, tmp_path: Path) -> None:
    users = tmp_path / "users.csv"
    node = digest_cluster.node
    provision(node, users, "--count", str(CALLS), "--first", "1000")
    statistics = run_client(
        sipp_client(
            node,
            "register_digest.xml",
            users,
            tmp_path / "register.csv",
            calls=CALLS,
            local_port=free_udp_and_tcp_port(),
            # The digest-uri is the Request-URI (RFC 3261 22.4); a failed
            # registration is no dialog: no BYE.
            extra=("-auth_uri", node.domain, "-default_behaviors", "all,-bye"),
        ),
        tmp_path,
    )
    assert statistics.successful == CALLS


def run_calls(
    cluster: Cluster,
    directory: Path,
    *,
    uas: str,
    uac: str,
    calls: int = CALLS,
    extra: tuple[str, ...] = (),
) -> tuple[SippStatistics, SippStatistics]:
    """Run ``uas`` on the cluster's callee port and ``uac`` with ``calls`` callers
    (user0001 ...) calling user0000; both statistics."""
    node = cluster.node
    callers = directory / "callers.csv"
    if cluster.digest:
        provision(node, callers, "--count", str(calls), "--first", "1", "--callees", "1")
    else:
        write_injection(callers, range(1, calls + 1), password=PASSWORD, callees=1)
    port = cluster.uas_port
    uas_statistics = directory / "uas.csv"
    server = subprocess.Popen(
        [
            sipp_binary(),
            "-sf",
            str(SCENARIOS / uas),
            "-i",
            "127.0.0.1",
            "-p",
            str(port),
            "-m",
            str(calls),
            "-timeout",
            "30s",
            "-nostdin",
            "-trace_stat",
            "-stf",
            str(uas_statistics),
            "-trace_err",
            "-error_file",
            str(directory / "uas.errors.log"),
        ],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # SIPp says nothing once it listens: watch the kernel's socket table,
        # so that the first INVITE does not wait for a retransmission.
        deadline = time.monotonic() + 10
        while not udp_bound(port):
            assert server.poll() is None, errors(directory)
            assert time.monotonic() < deadline, "the UAS did not bind its port"
            time.sleep(0.01)
        # With digest, SIPp 3.6.1's digest-uri is -auth_uri: the callee's URI,
        # the INVITE's Request-URI (RFC 3261 22.4).
        auth_uri = ("-auth_uri", f"user0000@{node.domain}") if cluster.digest else ()
        client = run_client(
            sipp_client(
                node,
                uac,
                callers,
                directory / "uac.csv",
                calls=calls,
                local_port=free_udp_and_tcp_port(),
                extra=(*auth_uri, *extra),
            ),
            directory,
        )
        # The UAS ends after its last call's timewait (4 s).
        assert server.wait(30) == 0, errors(directory)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    served = read_statistics(uas_statistics)
    assert served is not None
    return client, served


@pytest.fixture(params=["none", "digest"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """The node without authentication, then the one with digest."""
    name = "digest_cluster" if request.param == "digest" else "open_cluster"
    found: Cluster = request.getfixturevalue(name)
    return found


def test_cancel_while_ringing(cluster: Cluster, tmp_path: Path) -> None:
    client, served = run_calls(cluster, tmp_path, uas="uas_ringing.xml", uac="uac_cancel.xml")
    assert client.successful == CALLS, client
    assert (served.successful, served.failed) == (CALLS, 0), served


def test_call_with_hold(cluster: Cluster, tmp_path: Path) -> None:
    client, served = run_calls(
        cluster, tmp_path, uas="uas_hold.xml", uac="uac_hold.xml", extra=("-d", "100")
    )
    assert client.successful == CALLS, client
    assert (served.successful, served.failed) == (CALLS, 0), served


def test_ringing_callee_answers_without_cancel(open_cluster: Cluster, tmp_path: Path) -> None:
    client, served = run_calls(
        open_cluster, tmp_path, uas="uas_ringing.xml", uac="uac.xml", calls=3
    )
    assert client.successful == 3, client
    assert (served.successful, served.failed) == (3, 0), served
