"""Calling etcd through aetcd with a deadline and one error vocabulary."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import aetcd

from ._errors import StoreUnavailableError

__all__ = ["MAX_TXN_OPERATIONS", "LeaseNotFoundError", "call", "response_revision"]

T = TypeVar("T")

MAX_TXN_OPERATIONS = 128
"""etcd's default --max-txn-ops: more operations (or compares) in one Txn are
refused with "too many operations in txn request"."""


class LeaseNotFoundError(StoreUnavailableError):
    """A Txn named a lease etcd no longer has."""


async def call(awaitable: Awaitable[T], timeout: float | None) -> T:
    """Await an aetcd call within ``timeout`` seconds.

    Raises StoreUnavailableError when etcd cannot be reached, does not answer in time
    or fails on its side; LeaseNotFoundError (a StoreUnavailableError) for an unknown lease;
    aetcd's InvalidArgumentError unchanged, since a request etcd refuses as
    malformed (too many operations, a key written twice) is our own bug.
    """
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise StoreUnavailableError(f"etcd did not answer within {timeout} s") from None
    except aetcd.exceptions.InvalidArgumentError:
        raise
    except aetcd.exceptions.ClientError as error:
        text = str(error) or type(error).__name__
        if "lease not found" in text:
            raise LeaseNotFoundError(text) from error
        raise StoreUnavailableError(f"etcd: {text}") from error
    except OSError as error:
        raise StoreUnavailableError(f"etcd: {error}") from error


def response_revision(response: Any) -> int:
    """The store revision of one operation's response inside a Txn response."""
    kind = response.WhichOneof("response")
    return int(getattr(response, kind).header.revision)
