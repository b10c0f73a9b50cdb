"""The layout of sipcluster's keys in etcd, in one place.

Everything lives under one prefix (default ``/sipcluster/``) so that several
clusters can share an etcd and a prefix watch sees exactly one cluster:

======================================  ==============================================
key                                     value
======================================  ==============================================
``<p>members/worker/<id>``              a worker's membership record (JSON), under the
                                        worker's own lease
``<p>members/lb/<id>``                  a load balancer's record: its ZeroMQ inbox and
                                        its SIP sockets (JSON), under its own lease
``<p>bindings/<aor>/<binding id>``      one registered contact (msgpack), under the
                                        shared lease of its expiry bucket; writers of
                                        one AoR serialize through compares on these
                                        keys (each expected key's mod_revision, and
                                        the AoR prefix's mod_revision < R + 1)
``<p>users/<user>@<domain>``            credentials: HA1 for MD5 and SHA-256 (JSON)
``<p>config/nonce-secret``              the cluster's nonce secret, created once
======================================  ==============================================
"""

from __future__ import annotations

__all__ = ["DEFAULT_PREFIX", "KeyLayout", "prefix_end"]

DEFAULT_PREFIX = "/sipcluster/"


def _escape(aor: str) -> bytes:
    # An AoR's user part may hold "/" (RFC 3261 25.1 user-unreserved): escape it so
    # that one AoR's key prefix never covers another's.
    return aor.replace("%", "%25").replace("/", "%2F").encode("utf-8", "surrogateescape")


def _unescape(text: bytes) -> str:
    return text.decode("utf-8", "surrogateescape").replace("%2F", "/").replace("%25", "%")


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix`` (etcd's rule:
    the prefix with its last byte incremented)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\x00"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class KeyLayout:
    """Builds and parses the keys of one cluster (see the module docstring)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.endswith("/"):
            prefix += "/"
        self.prefix = prefix.encode()
        self.workers = self.prefix + b"members/worker/"
        self.lbs = self.prefix + b"members/lb/"
        self.members = self.prefix + b"members/"
        self.bindings = self.prefix + b"bindings/"
        self.users = self.prefix + b"users/"
        self.nonce_secret = self.prefix + b"config/nonce-secret"

    def worker(self, worker_id: str) -> bytes:
        """The membership key of a worker."""
        return self.workers + worker_id.encode()

    def lb(self, lb_id: str) -> bytes:
        """The membership key of a load balancer."""
        return self.lbs + lb_id.encode()

    def binding(self, aor: str, binding_id: str) -> bytes:
        """The key of one binding of ``aor``."""
        return self.bindings + _escape(aor) + b"/" + binding_id.encode()

    def aor_bindings(self, aor: str) -> bytes:
        """The prefix of every binding of ``aor``."""
        return self.bindings + _escape(aor) + b"/"

    def user(self, user: str) -> bytes:
        """The credentials key of ``user`` (``name@domain``)."""
        return self.users + _escape(user)

    def split_binding(self, key: bytes) -> tuple[str, str]:
        """Return (aor, binding id) of a binding key; raises ValueError otherwise."""
        if not key.startswith(self.bindings):
            raise ValueError(f"not a binding key: {key!r}")
        aor, slash, binding_id = key[len(self.bindings) :].rpartition(b"/")
        if not slash:
            raise ValueError(f"not a binding key: {key!r}")
        return _unescape(aor), binding_id.decode()
