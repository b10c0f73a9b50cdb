"""One registered contact (a binding) and how it is identified and stored.

A binding maps an address-of-record to a contact address (RFC 3261 10, "binding").
It is stored at ``bindings/<aor>/<binding id>`` (``cluster/keys.py``) as a msgpack
array, version first, so that a later version can add fields and an older worker
can tell it does not understand a record instead of misreading it.

Binding ids
-----------
The binding id names "the same contact" across registrations, so that a refresh
replaces the binding instead of adding a second one:

* a contact with ``+sip.instance`` and ``reg-id`` (RFC 5626 6, outbound) is
  identified by the pair: the same device on the same flow, whatever its URI now;
* a contact with ``+sip.instance`` alone (RFC 5627, GRUU) by the instance id: one
  binding per device instance;
* any other contact by its URI, compared as RFC 3261 19.1.4 says (scheme, user and
  password case-sensitive after unescaping, host case-insensitive, the port, the
  user/ttl/method/maddr/transport parameters, and the headers component, which is
  never ignored); other URI parameters take no part, as 19.1.4 ignores parameters
  present in only one of two URIs.

The id is the first 16 hex digits of a BLAKE2b hash of that identity: short, free
of "/" and identical on every worker.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import msgpack

from cluster.protocol import Peer
from sipcore import URI, NameAddr, SipURI, TelURI, unescape

from ._errors import MalformedRecordError

__all__ = ["Binding", "address_of_record", "binding_id_for", "contact_text"]

_FORMAT_VERSION = 1
_FIELD_COUNT = 13


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """One registered contact of an address-of-record."""

    aor: str
    """The address-of-record, ``user@domain``: the user unescaped and case-sensitive,
    the domain in lower case (RFC 3261 10.3 step 5)."""
    binding_id: str
    """The stable id of the contact within the AoR (see the module docstring)."""
    contact: str
    """The Contact value the registrar lists in a 200: ``<uri>`` and the contact
    parameters the UA sent, without ``expires`` (the registrar writes that)."""
    uri: str
    """The contact URI as text."""
    expires_at: float
    """When the binding expires, seconds since the epoch."""
    q: float | None
    """The q-value the UA gave (RFC 3261 20.10), or None."""
    call_id: str
    """The Call-ID of the REGISTER that wrote the binding (RFC 3261 10.3 step 7)."""
    cseq: int
    """The CSeq number of that REGISTER."""
    received: Peer | None
    """Where that REGISTER came from: the load balancer socket, the remote address
    and the TCP connection; the way back to the device through its NAT.  None when
    unknown (a binding written by a tool)."""
    user_agent: str = ""
    """The User-Agent of that REGISTER ("" when absent)."""
    path: tuple[str, ...] = ()
    """The Path header values of that REGISTER, topmost first (RFC 3327 5.3)."""
    registered_at: float = 0.0
    """When the REGISTER that wrote the binding was processed (seconds since the
    epoch): the binding's last-modified time."""

    def is_active(self, now: float) -> bool:
        """Whether the binding has not expired at ``now``."""
        return self.expires_at > now

    def expires_in(self, now: float) -> int:
        """Whole seconds left at ``now`` (rounded up, at least 0): the ``expires``
        parameter of the Contact in a 200 (RFC 3261 10.3 step 8)."""
        remaining = self.expires_at - now
        if remaining <= 0:
            return 0
        # A binding just written for N seconds must read N, not N - 1, despite
        # the rounding of now + N - now.
        return max(1, math.ceil(remaining - 1e-3))

    def encode(self) -> bytes:
        """The binding as stored in etcd (msgpack)."""
        received = self.received
        return msgpack.packb(  # type: ignore[no-any-return]
            [
                _FORMAT_VERSION,
                self.aor,
                self.binding_id,
                self.contact,
                self.uri,
                self.expires_at,
                self.q,
                self.call_id,
                self.cseq,
                None if received is None else list(received),
                self.user_agent,
                list(self.path),
                self.registered_at,
            ],
            use_bin_type=True,
            unicode_errors="surrogateescape",
        )

    @classmethod
    def decode(cls, data: bytes) -> Binding:
        """Read a stored binding.

        Raises MalformedRecordError (a ValueError) when ``data`` is not a binding of a
        version this code understands.
        """
        try:
            fields = msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape")
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
            raise MalformedRecordError(f"not a binding: {error}") from None
        if (
            not isinstance(fields, list)
            or len(fields) < _FIELD_COUNT
            or fields[0] != _FORMAT_VERSION
        ):
            raise MalformedRecordError("not a binding of format version 1")
        (
            _,
            aor,
            binding_id,
            contact,
            uri,
            expires_at,
            q,
            call_id,
            cseq,
            received,
            user_agent,
            path,
            registered_at,
        ) = fields[:_FIELD_COUNT]
        _check(
            isinstance(aor, str)
            and isinstance(binding_id, str)
            and isinstance(contact, str)
            and isinstance(uri, str)
            and _is_number(expires_at)
            and (q is None or _is_number(q))
            and isinstance(call_id, str)
            and isinstance(cseq, int)
            and isinstance(user_agent, str)
            and isinstance(path, list)
            and all(isinstance(item, str) for item in path)
            and _is_number(registered_at)
        )
        return cls(
            aor=aor,
            binding_id=binding_id,
            contact=contact,
            uri=uri,
            expires_at=float(expires_at),
            q=None if q is None else float(q),
            call_id=call_id,
            cseq=cseq,
            received=_decode_peer(received),
            user_agent=user_agent,
            path=tuple(path),
            registered_at=float(registered_at),
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(condition: bool) -> None:
    if not condition:
        raise MalformedRecordError("a binding field has the wrong type")


def _decode_peer(value: Any) -> Peer | None:
    if value is None:
        return None
    _check(isinstance(value, list) and len(value) == 6)
    lb_id, socket_id, transport, host, port, connection_id = value
    _check(
        isinstance(lb_id, str)
        and isinstance(socket_id, int)
        and isinstance(transport, str)
        and isinstance(host, str)
        and isinstance(port, int)
        and (connection_id is None or isinstance(connection_id, int))
    )
    return Peer(lb_id, socket_id, transport, host, port, connection_id)


def address_of_record(uri: SipURI) -> str:
    """The canonical address-of-record of a SIP or SIPS URI: ``user@domain``.

    RFC 3261 10.3 step 5: URI parameters are removed and escaped characters
    unescaped; the user stays case-sensitive and the host is lowered (19.1.4).
    The scheme and the port take no part, so that sip: and sips: name one AoR.
    A URI without a user part gives the bare domain.
    """
    host = uri.host.lower()
    if uri.user is None:
        return host
    return f"{unescape(uri.user)}@{host}"


def _uri_identity(uri: URI) -> tuple[object, ...]:
    if isinstance(uri, SipURI):
        # RFC 3261 19.1.4: URI header components are never ignored; names are
        # case-insensitive, values compared unescaped.
        headers = tuple(
            sorted((unescape(name).lower(), unescape(value)) for name, value in uri.headers)
        )
        return ("sip", *uri.compare_key(), headers)
    if isinstance(uri, TelURI):
        return ("tel", uri.number, tuple((name.lower(), value) for name, value in uri.params))
    return ("uri", uri.scheme, uri.rest)


# The same contacts come back with every refresh: both functions below are pure
# functions of the (immutable, hashable) address, memoized in least-recently-used
# caches of sipcore's size (see sipcore/_memo.py).
_MEMO_SIZE = 32768


def binding_id_for(address: NameAddr) -> str:
    """The binding id of a contact address (see the module docstring)."""
    return _binding_id(address)


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _binding_id(address: NameAddr) -> str:
    instance = address.param("+sip.instance")
    identity: tuple[object, ...]
    if instance:
        # RFC 5626 6 / RFC 5627: the instance id (and reg-id) name the binding.
        identity = ("instance", instance, address.param("reg-id") or "")
    else:
        identity = _uri_identity(address.uri)
    material = msgpack.packb(identity, use_bin_type=True, unicode_errors="surrogateescape")
    return hashlib.blake2b(material, digest_size=8).hexdigest()


def contact_text(address: NameAddr) -> str:
    """The Contact value a binding stores: ``<uri>`` plus the contact parameters
    as the UA sent them, without the display name and without ``expires``.

    The URI keeps its own parameters and escaped headers inside the brackets, and
    header parameters stay outside them (RFC 4475 3.3.12 to 3.3.14).
    """
    return _contact_text(address)


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _contact_text(address: NameAddr) -> str:
    return str(address._replace(display_name=None).without_param("expires"))
