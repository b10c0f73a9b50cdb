"""``python -m lb``: the load balancer with the flags of ``sipcluster lb``."""

from __future__ import annotations

import argparse
import sys

from cluster.config import ConfigError, add_arguments, resolve

from ._balancer import ExitCode
from ._main import main


def run(argv: list[str] | None = None) -> int:
    """Parse the ``lb`` flags (and SIPCLUSTER_* variables) and run ``main``."""
    parser = argparse.ArgumentParser(prog="python -m lb", description="sipcluster load balancer")
    add_arguments(parser, "lb")
    arguments = parser.parse_args(argv)
    try:
        settings = resolve("lb", arguments)
    except ConfigError as error:
        sys.stderr.write(f"python -m lb: {error}\n")
        return int(ExitCode.CONFIG)
    return main(settings)


if __name__ == "__main__":
    sys.exit(run())
