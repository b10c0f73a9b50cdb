"""Credentials in etcd: HA1 values per user, never passwords.

A user is ``name@domain``; its record at ``users/<name@domain>`` is JSON::

    {"user": "alice@example.com", "ha1": {"MD5": "<hex>", "SHA-256": "<hex>"}}

HA1 = H(name ":" realm ":" password) with the realm being the domain
(RFC 3261 22.4, RFC 7616 3.4.2); the name is the bare user part, which is what
UAs send as the digest ``username``.  ``UserStore`` caches every record and follows
a watch on ``users/`` so that ``get`` answers without I/O (it satisfies
``worker.auth.UserDirectory``); the admin functions write through etcd directly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import aetcd

from cluster.keys import KeyLayout, prefix_end
from sipcore import DigestAlgorithm, compute_ha1

from ._errors import MalformedRecordError
from ._etcd import call
from ._watched import WatchedRange

__all__ = [
    "UserCredentials",
    "UserStore",
    "add_user",
    "credentials_for",
    "list_users",
    "normalize_user",
    "remove_user",
]

log = logging.getLogger(__name__)

_ADMIN_TIMEOUT = 10.0


def normalize_user(user: str) -> str:
    """``name@domain`` with the domain in lower case (the name keeps its case).

    Raises ValueError when ``user`` is not ``name@domain``.
    """
    name, at, domain = user.rpartition("@")
    if not at or not name or not domain:
        raise ValueError(f"a user is NAME@DOMAIN, not {user!r}")
    return f"{name}@{domain.lower()}"


@dataclass(frozen=True, slots=True)
class UserCredentials:
    """A user's stored credentials (satisfies ``worker.auth.UserRecord``)."""

    user: str
    """``name@domain``, the domain in lower case."""
    ha1: Mapping[DigestAlgorithm, str]
    """HA1 in lower-case hex per algorithm (RFC 7616 3.4.2)."""

    @property
    def domain(self) -> str:
        """The domain part of the user."""
        return self.user.rpartition("@")[2]

    def encode(self) -> bytes:
        """The record as stored in etcd (JSON)."""
        return json.dumps(
            {
                "user": self.user,
                "ha1": {algorithm.value: ha1 for algorithm, ha1 in self.ha1.items()},
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> UserCredentials:
        """Read a stored record; raises MalformedRecordError (a ValueError) when it is
        not one."""
        try:
            values: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise MalformedRecordError(f"not a user record: {error}") from None
        if not isinstance(values, dict):
            raise MalformedRecordError("not a user record")
        user = values.get("user")
        hashes = values.get("ha1")
        if not isinstance(user, str) or not isinstance(hashes, dict):
            raise MalformedRecordError("a user record needs 'user' and 'ha1'")
        ha1: dict[DigestAlgorithm, str] = {}
        for name, value in hashes.items():
            algorithm = DigestAlgorithm.from_token(name) if isinstance(name, str) else None
            if algorithm is not None and isinstance(value, str):
                ha1[algorithm] = value.lower()
        try:
            user = normalize_user(user)
        except ValueError as error:
            raise MalformedRecordError(str(error)) from None
        return cls(user, MappingProxyType(ha1))


class UserStore(WatchedRange):
    """Every user's credentials, cached and kept current by a watch on ``users/``.

    Satisfies ``worker.auth.UserDirectory``; ``known`` and ``users_exist`` let the
    proxy tell "no such user" (404) from "known user, not registered" (480).
    """

    def __init__(self, client: aetcd.Client, keys: KeyLayout) -> None:
        super().__init__(client, keys.users, prefix_end(keys.users), name="user")
        self.keys = keys
        self._by_key: dict[bytes, UserCredentials] = {}
        self._by_user: dict[str, UserCredentials] = {}
        self._domains: dict[str, int] = {}

    def get(self, user: str) -> UserCredentials | None:
        """The credentials of ``name@domain``, or None.  No I/O."""
        record = self._by_user.get(user)
        if record is None and "@" in user:
            name, _, domain = user.rpartition("@")
            record = self._by_user.get(f"{name}@{domain.lower()}")
        return record

    def known(self, user: str) -> bool:
        """Whether ``name@domain`` is a user."""
        return self.get(user) is not None

    def users_exist(self, domain: str) -> bool:
        """Whether ``domain`` has any user (when none, the domain is not managed
        by credentials and "unknown user" means nothing)."""
        return self._domains.get(domain.lower(), 0) > 0

    def __len__(self) -> int:
        return len(self._by_user)

    def _add(self, key: bytes, record: UserCredentials) -> None:
        self._remove(key)
        self._by_key[key] = record
        self._by_user[record.user] = record
        self._domains[record.domain] = self._domains.get(record.domain, 0) + 1

    def _remove(self, key: bytes) -> None:
        old = self._by_key.pop(key, None)
        if old is None:
            return
        if self._by_user.get(old.user) is old:
            del self._by_user[old.user]
        remaining = self._domains.get(old.domain, 0) - 1
        if remaining > 0:
            self._domains[old.domain] = remaining
        else:
            self._domains.pop(old.domain, None)

    def _reset(self, kvs: list[Any], revision: int) -> None:
        self._by_key.clear()
        self._by_user.clear()
        self._domains.clear()
        for kv in kvs:
            self._apply_put(kv.key, kv.value, revision)

    def _apply_put(self, key: bytes, value: bytes, revision: int) -> None:
        try:
            record = UserCredentials.decode(value)
        except MalformedRecordError as error:
            log.warning("ignoring a malformed user record at %r: %s", key, error)
            self._remove(key)
            return
        self._add(key, record)

    def _apply_delete(self, key: bytes, revision: int) -> None:
        self._remove(key)


def credentials_for(user: str, password: str) -> UserCredentials:
    """The credentials of ``user`` (``name@domain``) for ``password``: HA1 for
    MD5 and SHA-256 with the domain as realm.  Raises ValueError for a user that
    is not ``name@domain``."""
    user = normalize_user(user)
    name, _, domain = user.rpartition("@")
    ha1 = {
        algorithm: compute_ha1(name, domain, password, algorithm) for algorithm in DigestAlgorithm
    }
    return UserCredentials(user, MappingProxyType(ha1))


async def add_user(client: aetcd.Client, keys: KeyLayout, user: str, password: str) -> None:
    """Create or replace ``user`` (``name@domain``) with ``password``.

    Only the HA1 values are stored.  Raises ValueError for a malformed user and
    StoreUnavailableError when etcd does not answer.
    """
    record = credentials_for(user, password)
    await call(client.put(keys.user(record.user), record.encode()), _ADMIN_TIMEOUT)


async def remove_user(client: aetcd.Client, keys: KeyLayout, user: str) -> bool:
    """Remove ``user``; returns whether it existed.  Raises ValueError for a
    malformed user and StoreUnavailableError when etcd does not answer."""
    deleted = await call(client.delete(keys.user(normalize_user(user))), _ADMIN_TIMEOUT)
    return bool(deleted)


async def list_users(client: aetcd.Client, keys: KeyLayout) -> list[str]:
    """Every user, sorted.  Raises StoreUnavailableError when etcd does not answer."""
    response = await call(client.get_prefix(keys.users), _ADMIN_TIMEOUT)
    users = []
    for kv in response:
        try:
            users.append(UserCredentials.decode(kv.value).user)
        except MalformedRecordError as error:
            log.warning("ignoring a malformed user record at %r: %s", kv.key, error)
    return sorted(users)
