"""``python -m loadtest.provision``: users in a real etcd and their SIPp injection file."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.etcd import LocalEtcd, free_port
from cluster.keys import KeyLayout
from cluster.membership import connect_etcd
from registry import UserStore, credentials_for, list_users


def provision(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest.provision", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )


async def stored_users(url: str, keys: KeyLayout) -> tuple[list[str], UserStore]:
    client = await connect_etcd(url)
    try:
        users = await list_users(client, keys)
        store = UserStore(client, keys)
        await store.start()
        await store.stop()
        return users, store
    finally:
        await client.close()


def test_ten_thousand_users_in_seconds(
    etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path
) -> None:
    output = tmp_path / "users.csv"
    started = time.monotonic()
    result = provision(
        "--etcd",
        etcd_server.url,
        "--etcd-prefix",
        key_layout.prefix.decode(),
        "--domain",
        "Example.COM",
        "--count",
        "10000",
        "--password",
        "secret",
        "--output",
        str(output),
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "created 10000 users user0000..user9999@example.com" in result.stdout
    assert elapsed < 20, elapsed

    users, store = asyncio.run(stored_users(etcd_server.url, key_layout))
    assert len(users) == 10000
    assert users[0] == "user0000@example.com"
    assert users[-1] == "user9999@example.com"
    # Stored exactly as `sipcluster user add` stores them (HA1 only).
    for user in ("user0000@example.com", "user4321@example.com"):
        assert store.get(user) == credentials_for(user, "secret")

    lines = output.read_text().splitlines()
    assert lines[0] == "SEQUENTIAL"
    assert len(lines) == 10001
    assert lines[1] == "user0000;user0000;secret;[authentication username=user0000 password=secret]"
    assert lines[-1].startswith("user9999;user9999;secret;")


def test_first_and_callees(etcd_server: LocalEtcd, key_layout: KeyLayout, tmp_path: Path) -> None:
    output = tmp_path / "callers.csv"
    result = provision(
        "--etcd",
        etcd_server.url,
        "--etcd-prefix",
        key_layout.prefix.decode(),
        "--domain",
        "example.com",
        "--count",
        "5",
        "--first",
        "10",
        "--callees",
        "2",
        "--password",
        "pw",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    users, _ = asyncio.run(stored_users(etcd_server.url, key_layout))
    assert users == [f"user{index:04d}@example.com" for index in range(10, 15)]
    assert [line.split(";")[:3] for line in output.read_text().splitlines()[1:]] == [
        ["user0010", "user0000", "pw"],
        ["user0011", "user0001", "pw"],
        ["user0012", "user0000", "pw"],
        ["user0013", "user0001", "pw"],
        ["user0014", "user0000", "pw"],
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--count": "0"}, "provision: --count must be at least 1, not 0"),
        ({"--count": "ten"}, "provision: argument --count: invalid int value: 'ten'"),
        ({"--first": "-1"}, "provision: --first must not be negative"),
        ({"--password": "a;b"}, "provision: --password must not hold ';'"),
        ({"--etcd": "etcd-host"}, "provision: an etcd URL is http://HOST:PORT"),
        ({"--etcd": "http://127.0.0.1:{closed}"}, "is unreachable"),
        ({"--output": "/nonexistent/users.csv"}, "provision: --output: no directory"),
    ],
)
def test_bad_input_is_one_line(change: dict[str, str], message: str, tmp_path: Path) -> None:
    options = {
        "--etcd": "http://127.0.0.1:{closed}",
        "--domain": "example.com",
        "--count": "3",
        "--password": "secret",
        "--output": str(tmp_path / "users.csv"),
    }
    options.update(change)
    options["--etcd"] = options["--etcd"].format(closed=free_port())
    result = provision(*(item for pair in options.items() for item in pair))
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "users.csv").exists()
