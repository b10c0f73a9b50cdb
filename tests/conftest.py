"""Shared fixtures: a real etcd server for the integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.etcd import LocalEtcd, free_port
from cluster.keys import KeyLayout


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """One etcd server (Debian's etcd-server) on a free loopback port for the session."""
    data_dir: Path = tmp_path_factory.mktemp("etcd")
    server = LocalEtcd(data_dir, client_port=free_port(), log_path=data_dir / "etcd.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def key_layout() -> KeyLayout:
    """A key prefix of its own for each test, so tests sharing the etcd never meet."""
    return KeyLayout(f"/test-{uuid.uuid4().hex[:12]}/")
