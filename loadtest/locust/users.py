"""Create the users the Locust load test registers as.

``python -m loadtest.locust.users --etcd URL [--etcd-prefix P] --domain D --count N
--password PW [--prefix user] [--first 0]`` creates (or replaces) the users
``<prefix><first>`` .. ``<prefix><first+count-1>`` at ``D`` (numbers of four digits
at least: ``user0000``), as ``sipcluster user add`` does (``registry.add_user``:
HA1 values only, the domain as realm, RFC 3261 22.4).  The names match the
locustfile's ``--sip-user-prefix`` and those of ``python -m loadtest.provision``.

Bounded: at most 100,000 users, written as ``python -m loadtest.provision`` writes
them (batched Txns); failures are one line on standard error and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from loadtest.provision import add_user_arguments, write_users
from registry import StoreUnavailableError

__all__ = ["MAX_USERS", "create_users", "main", "user_name"]

MAX_USERS = 100_000


def user_name(prefix: str, index: int) -> str:
    """``user0000``, ``user0001`` ... (four digits at least)."""
    return f"{prefix}{index:04d}"


async def create_users(
    etcd_url: str, etcd_prefix: str, names: Sequence[str], domain: str, password: str
) -> None:
    """Create or replace ``name@domain`` with ``password`` for every name, in
    batched etcd Txns (``loadtest.provision.write_users``).

    Raises ConnectionError (etcd unreachable), ValueError (a malformed user) and
    StoreUnavailableError (etcd stopped answering)."""
    await write_users(etcd_url, etcd_prefix, [f"{name}@{domain}" for name in names], password)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.locust.users",
        description="Create the users of the Locust load test in etcd.",
    )
    add_user_arguments(parser)
    parser.add_argument("--prefix", default="user", help="user names: PREFIX0000 ... (user)")
    arguments = parser.parse_args(argv)
    if not 1 <= arguments.count <= MAX_USERS:
        parser.error(f"--count must be 1 .. {MAX_USERS}, not {arguments.count}")
    if arguments.first < 0:
        parser.error(f"--first must not be negative, not {arguments.first}")
    if not arguments.password:
        parser.error("--password must not be empty")
    domain = arguments.domain.lower()
    names = [
        user_name(arguments.prefix, index)
        for index in range(arguments.first, arguments.first + arguments.count)
    ]
    started = time.monotonic()
    try:
        asyncio.run(
            create_users(arguments.etcd, arguments.etcd_prefix, names, domain, arguments.password)
        )
    except (ConnectionError, ValueError, StoreUnavailableError, OSError) as error:
        sys.stderr.write(f"users: {error}\n")
        return 1
    print(
        f"created {len(names)} users {names[0]}..{names[-1]}@{domain}"
        f" in {time.monotonic() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
