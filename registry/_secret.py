"""The cluster's nonce secret: created once in etcd, read by every worker."""

from __future__ import annotations

import secrets

import aetcd

from cluster.keys import KeyLayout

from ._errors import MalformedRecordError
from ._etcd import call

__all__ = ["load_or_create_nonce_secret"]

_SECRET_LENGTH = 32
_MINIMUM_LENGTH = 16


async def load_or_create_nonce_secret(
    client: aetcd.Client, keys: KeyLayout, *, timeout: float = 10.0
) -> bytes:
    """The cluster's nonce secret (``config/nonce-secret``).

    One Txn: when the key has never been created (create_revision 0) it stores 32
    fresh random bytes and returns them; otherwise it returns the stored secret,
    so that every worker of the cluster signs and checks nonces with the same key
    whichever started first.  Raises StoreUnavailableError when etcd does not answer
    and MalformedRecordError when the stored secret is shorter than 16 bytes.
    """
    candidate = secrets.token_bytes(_SECRET_LENGTH)
    transactions = client.transactions
    key = keys.nonce_secret
    created, responses = await call(
        client.transaction(
            compare=[transactions.create(key) == 0],
            success=[transactions.put(key, candidate)],
            failure=[transactions.get(key)],
        ),
        timeout,
    )
    if created:
        return candidate
    found = responses[0]
    value: bytes = found[0][0] if found else b""
    if len(value) < _MINIMUM_LENGTH:
        raise MalformedRecordError(f"the nonce secret at {key!r} is {len(value)} bytes long")
    return value
