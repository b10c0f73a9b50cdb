"""Create load-test users in etcd and write the SIPp injection file for them.

``python -m loadtest.provision --etcd URL [--etcd-prefix P] --domain D --count N
--password PW [--first 0] [--callees K] --output users.csv`` creates the users
``user<first>`` .. ``user<first+count-1>`` (four digits at least, as the sweep
names them) at ``D`` with password ``PW``, stored as ``sipcluster user add``
stores them (``registry.credentials_for``: HA1 values only, the domain as realm,
RFC 3261 22.4), and writes ``users.csv`` in the format of
``loadtest.sweep._sipp.write_injection``, one line per user::

    user;callee;password;[authentication username=user password=PW]

The callee of line i is ``user<i mod K>`` with ``--callees K``, else the user
itself.  An existing user is replaced.  The writes go in etcd Txns of up to 128
puts (etcd's default --max-txn-ops), a few in flight at once: 10,000 users take
about a second.  Failures are one line on standard error and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from aetcd import rpc

from cluster.keys import DEFAULT_PREFIX, KeyLayout
from cluster.membership import connect_etcd
from loadtest.sweep._sipp import user_name, write_injection
from registry import StoreUnavailableError, credentials_for
from registry._etcd import MAX_TXN_OPERATIONS, call, send_txn

__all__ = ["main", "provision_users", "write_users"]

_IN_FLIGHT = 4
"""Txns outstanding at once."""

_TXN_TIMEOUT = 30.0


async def provision_users(
    etcd_url: str, prefix: str, domain: str, indices: Sequence[int], password: str
) -> None:
    """Create (or replace) ``user<index>@domain`` for every index, with ``password``.

    Raises ConnectionError (etcd unreachable), ValueError (a bad URL or user) and
    StoreUnavailableError (etcd stopped answering)."""
    users = [f"{user_name(index)}@{domain}" for index in indices]
    await write_users(etcd_url, prefix, users, password)


async def write_users(etcd_url: str, prefix: str, users: Sequence[str], password: str) -> None:
    """Create (or replace) every ``user@domain`` of ``users`` with ``password``, in
    batched Txns (see the module docstring); raises as ``provision_users``."""
    records = [credentials_for(user, password) for user in users]
    keys = KeyLayout(prefix)
    client = await connect_etcd(etcd_url)
    try:
        requests: list[Any] = []
        for first in range(0, len(records), MAX_TXN_OPERATIONS):
            request = rpc.TxnRequest()
            for record in records[first : first + MAX_TXN_OPERATIONS]:
                put = request.success.add().request_put
                put.key = keys.user(record.user)
                put.value = record.encode()
            requests.append(request)
        limit = asyncio.Semaphore(_IN_FLIGHT)

        async def send(request: Any) -> None:
            async with limit:
                await call(send_txn(client, request, _TXN_TIMEOUT), _TXN_TIMEOUT + 1)

        await asyncio.gather(*(send(request) for request in requests))
    finally:
        await client.close()


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"provision: {message} (see --help)\n")


def add_user_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a command that creates load-test users in etcd (this one
    and ``loadtest.locust.users``): where, which domain, how many, the password."""
    parser.add_argument("--etcd", required=True, help="etcd URL, http://HOST:PORT")
    parser.add_argument("--etcd-prefix", default=DEFAULT_PREFIX, help="the cluster's key prefix")
    parser.add_argument("--domain", required=True, help="the users' domain (also the realm)")
    parser.add_argument("--count", required=True, type=int, help="how many users")
    parser.add_argument("--password", required=True, help="every user's password")
    parser.add_argument("--first", type=int, default=0, help="the first user's number")


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m loadtest.provision",
        description="Create load-test users in etcd and write their SIPp injection file.",
    )
    add_user_arguments(parser)
    parser.add_argument(
        "--callees",
        type=int,
        default=None,
        help="field 1 of line i is user<i mod CALLEES> (default: the user itself)",
    )
    parser.add_argument("--output", required=True, type=Path, help="the injection file")
    return parser.parse_args(argv)


def _check(arguments: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, or None."""
    if arguments.count < 1:
        return f"--count must be at least 1, not {arguments.count}"
    if arguments.first < 0:
        return f"--first must not be negative, not {arguments.first}"
    if arguments.callees is not None and arguments.callees < 1:
        return f"--callees must be at least 1, not {arguments.callees}"
    if not arguments.password:
        return "--password must not be empty"
    if any(character in arguments.password for character in ";\n]"):
        # ';' separates injection fields and ']' ends SIPp's keyword.
        return "--password must not hold ';', ']' or a line break (SIPp's injection format)"
    domain = arguments.domain
    if not domain or any(character in domain for character in "@;/ "):
        return f"--domain {domain!r} is not a host name or address"
    if not arguments.output.parent.is_dir():
        return f"--output: no directory {str(arguments.output.parent)!r}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code."""
    arguments = _arguments(argv)
    problem = _check(arguments)
    if problem is not None:
        sys.stderr.write(f"provision: {problem}\n")
        return 1
    indices = range(arguments.first, arguments.first + arguments.count)
    started = time.monotonic()
    try:
        asyncio.run(
            provision_users(
                arguments.etcd,
                arguments.etcd_prefix,
                arguments.domain.lower(),
                indices,
                arguments.password,
            )
        )
    except (ConnectionError, ValueError, StoreUnavailableError) as error:
        sys.stderr.write(f"provision: {error}\n")
        return 1
    try:
        write_injection(
            arguments.output, indices, password=arguments.password, callees=arguments.callees
        )
    except OSError as error:
        sys.stderr.write(f"provision: cannot write {arguments.output}: {error.strerror}\n")
        return 1
    sys.stdout.write(
        f"created {arguments.count} users {user_name(indices[0])}..{user_name(indices[-1])}"
        f"@{arguments.domain.lower()} in {time.monotonic() - started:.1f} s;"
        f" injection file {arguments.output}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
