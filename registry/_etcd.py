"""Calling etcd through aetcd with a deadline and one error vocabulary."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import aetcd

from cluster.metrics import ETCD_LATENCY

from ._errors import StoreUnavailableError

__all__ = ["MAX_TXN_OPERATIONS", "LeaseNotFoundError", "call", "send_txn"]

T = TypeVar("T")

MAX_TXN_OPERATIONS = 128
"""etcd's default --max-txn-ops: a Txn whose compare, success or failure list
holds more (each list is counted on its own) is refused with "too many
operations in txn request"."""


class LeaseNotFoundError(StoreUnavailableError):
    """A Txn named a lease etcd no longer has."""


async def call(awaitable: Awaitable[T], timeout: float | None, operation: str = "other") -> T:
    """Await an aetcd call within ``timeout`` seconds.

    Its latency, failures and timeouts included, goes into the process's
    ``cluster.metrics.ETCD_LATENCY`` histogram of ``operation``.

    Raises StoreUnavailableError when etcd cannot be reached, does not answer in time
    or fails on its side; LeaseNotFoundError (a StoreUnavailableError) for an unknown lease;
    aetcd's InvalidArgumentError unchanged, since a request etcd refuses as
    malformed (too many operations, a key written twice) is our own bug.
    """
    started = time.perf_counter()
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
    finally:
        ETCD_LATENCY[operation].observe(time.perf_counter() - started)


async def send_txn(client: aetcd.Client, request: Any, timeout: float | None) -> Any:
    """Send a ready-made ``etcdserverpb.TxnRequest`` (``aetcd.rpc.TxnRequest``) and
    return etcd's ``TxnResponse`` as it is.

    ``client.transaction`` builds the same request from one Python object per
    compare and operation, converted one by one, and wraps every result in
    another: about three times the CPU of filling the request's repeated fields
    in place (measured: 6 us against 2 us for a compare pair, a put and a read).
    Errors are aetcd's, as ``client.transaction`` raises them (wrap the call
    in ``call``).  Relies on aetcd 1.0's ``kvstub``, ``metadata`` and
    ``exceptions._handle_exception``.
    """
    await client.connect()
    try:
        return await client.kvstub.Txn(request, timeout=timeout, metadata=client.metadata)
    except aetcd.rpc.AioRpcError as error:
        aetcd.exceptions._handle_exception(error)
        raise  # not reached: _handle_exception always raises
