"""The ``sipcluster`` command line."""

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the sipcluster command line."""
    del argv
    sys.stderr.write("sipcluster: no command implemented yet\n")
    return 2
