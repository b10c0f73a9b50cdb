"""The ``sipcluster`` command line.

::

    sipcluster run        the all-in-one node: local etcd, a load balancer, workers
    sipcluster lb         one load balancer (the Helm chart runs these)
    sipcluster worker     one worker
    sipcluster user add|remove|list   credentials in etcd
    sipcluster status     the workers and load balancers of the cluster, and the ring
    sipcluster drain      drain a worker: no new calls, finish its own, leave
    sipcluster locations  registered bindings
    sipcluster options    send an OPTIONS and exit 0 on a 200 (probes, Helm test)

Every setting is a flag, an environment variable ``SIPCLUSTER_<NAME>`` or a key in
the TOML file given by ``--config`` (``cluster/config.py``).  Errors are one line
on standard error and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from .config import ConfigError, Settings, add_arguments, resolve

__all__ = ["main"]

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sipcluster", description="A horizontally scalable SIP registrar and proxy."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run a whole node on this machine")
    add_arguments(run, "run")
    lb = commands.add_parser("lb", help="run one load balancer")
    add_arguments(lb, "lb")
    worker = commands.add_parser("worker", help="run one worker")
    add_arguments(worker, "worker")

    user = commands.add_parser("user", help="manage credentials in etcd")
    user_commands = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = user_commands.add_parser("add", help="add or change a user")
    add_arguments(add, "admin")
    add.add_argument("user", metavar="USER@DOMAIN")
    add.add_argument("--password", help="the password (asked for when omitted)")
    remove = user_commands.add_parser("remove", help="remove a user")
    add_arguments(remove, "admin")
    remove.add_argument("user", metavar="USER@DOMAIN")
    listing = user_commands.add_parser("list", help="list the users")
    add_arguments(listing, "admin")

    status = commands.add_parser("status", help="show the cluster's members and ring")
    add_arguments(status, "admin")
    status.add_argument("--json", action="store_true", help="print JSON")

    drain = commands.add_parser("drain", help="drain a worker, which then leaves")
    add_arguments(drain, "admin")
    drain.add_argument("worker", metavar="WORKER_ID", help="the worker's id (sipcluster status)")
    drain.add_argument(
        "--wait", action="store_true", help="return once the worker has left the cluster"
    )
    drain.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="with --wait: give up after this many seconds (exit 1) [default: no limit]",
    )

    locations = commands.add_parser("locations", help="list registered bindings")
    add_arguments(locations, "admin")
    locations.add_argument("aor", nargs="?", metavar="AOR", help="only this address of record")
    locations.add_argument("--json", action="store_true", help="print JSON")

    options = commands.add_parser("options", help="send an OPTIONS; exit 0 on a 200")
    options.add_argument("uri", metavar="SIP-URI")
    options.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    return parser


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"sipcluster: {message}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    # The supervisor talks to etcd over gRPC and starts children with fork+exec:
    # gRPC's fork handlers are not needed and only warn.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    parser = _parser()
    arguments = parser.parse_args(argv)
    command = arguments.command
    try:
        if command in ("run", "lb", "worker"):
            settings = resolve(command, arguments)
            return _serve(command, settings)
        if command == "options":
            from .admin import send_options  # noqa: PLC0415

            return asyncio.run(send_options(arguments.uri, arguments.timeout))
        settings = resolve("admin", arguments)
        from . import admin  # noqa: PLC0415

        return asyncio.run(admin.run(command, arguments, settings))
    except ConfigError as error:
        return _fail(str(error), EXIT_USAGE)
    except KeyboardInterrupt:
        return 130


def _serve(command: str, settings: Settings) -> int:
    from .logs import configure_logging  # noqa: PLC0415

    configure_logging(command, settings.log_level, settings.log_json)
    if command == "run":
        from .supervisor import main as run_node  # noqa: PLC0415

        return run_node(settings)
    if command == "lb":
        from lb import main as run_lb  # noqa: PLC0415

        return run_lb(settings)
    from worker.server import main as run_worker  # noqa: PLC0415

    return run_worker(settings)


if __name__ == "__main__":
    sys.exit(main())
