"""The errors of the location service and the credential store."""

from __future__ import annotations

__all__ = ["MalformedRecordError", "RegistryError", "StoreUnavailableError"]


class RegistryError(Exception):
    """Base class of every error the registry package raises."""


class StoreUnavailableError(RegistryError):
    """etcd did not answer (unreachable, timed out, no leader).

    A write that raised this was not acknowledged: a Txn is atomic, so either all
    of it or none of it was applied (after a timeout the caller cannot know which).
    """


class MalformedRecordError(RegistryError, ValueError):
    """A value read from etcd is not a record this version understands."""
