"""The registrar: RFC 3261 10.3, with Path (RFC 3327), on the cluster's location
service.

``Registrar.handle`` answers one REGISTER.  The decisions are plain functions
that need no etcd, in the order of RFC 3261 10.3:

* ``check_request``: steps 1 and 2 (Request-URI, Require) and the part of step 5
  the realm depends on (the To URI is a SIP or SIPS URI of one of our domains);
* ``authorize``: steps 3 and 4, from the ``worker.auth.Authenticator`` outcome;
* ``read_register``: steps 6 and 7 as far as the request alone decides (the
  ``*`` rules, each contact's expiry, 423);
* ``plan_bindings``: steps 6 and 7 against the AoR's current bindings (the
  Call-ID/CSeq rule, the contact limit), giving the change to commit and the
  bindings the AoR has after it;
* ``registered_response``: step 8, the 200.

Every failure is a ``RegistrarFailure``; ``FAILURE_RESPONSES`` maps each to its
status code and reason phrase, in one table (after Kamailio's registrar,
rerrno.h and reply.c).

Concurrent writers
------------------
Workers share no memory, and the load balancer spreads Call-IDs, so two devices
of one AoR may register on two workers at the same moment.  A change is computed
from ``LocationStore.aor_state`` (the worker's cache) and committed only if the
AoR's bindings are still those of that state (none added, changed or removed
since: ``registry._location`` explains the compares); when another worker got
there first the commit answers CONFLICT and the registrar re-reads the AoR from
etcd itself (the cache may lag) and computes again, at most
``RegistrarConfig.commit_attempts`` times.
A refusal that depends on the stored bindings (too many contacts, CSeq out of
order) is confirmed against etcd before it is sent, for the same reason.  The
contact limit, ``*`` and the list in the 200 are therefore exact at the revision
the change was written at, and the 200 leaves only after the commit returned:
the bindings are durable in etcd before the UA learns of them.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate

from registry import (
    AorChange,
    AorState,
    Binding,
    CommitResult,
    LocationStore,
    StoreUnavailableError,
    address_of_record,
    binding_id_for,
    contact_text,
    plan_change,
)
from sipcore import (
    MessageError,
    RemoteProtocolError,
    Request,
    Response,
    SipURI,
    make_response,
    parse_name_addr,
    reason_phrase,
)

from .auth import Authenticator, AuthOutcome
from .transport import Peer

__all__ = [
    "FAILURE_RESPONSES",
    "BindingPlan",
    "ContactRequest",
    "FailureResponse",
    "Refusal",
    "RegisterRequest",
    "Registrar",
    "RegistrarConfig",
    "RegistrarFailure",
    "RegistrarStatistics",
    "authorize",
    "check_request",
    "domain_of",
    "plan_bindings",
    "read_register",
    "refusal_response",
    "registered_response",
]

log = logging.getLogger(__name__)

SUPPORTED_OPTIONS = frozenset({"path"})
"""The option tags the registrar supports (RFC 3261 8.2.2.3, RFC 3327 5.3)."""

# RFC 3261 10.3 step 7: only an interval below one hour may be refused as too brief.
_ONE_HOUR = 3600


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistrarConfig:
    """The registrar's settings (each comes from ``cluster.config.Settings``)."""

    domains: frozenset[str]
    """The domains whose AoRs this registrar keeps, in lower case."""
    min_expires: int = 60
    """Shortest registration accepted; shorter non-zero ones get 423."""
    max_expires: int = 7200
    """Longest registration granted; longer ones are shortened to it."""
    default_expires: int = 3600
    """Expiry of a contact that asks for none."""
    max_contacts: int = 10
    """Most bindings one AoR may hold."""
    commit_attempts: int = 5
    """How many times a change is computed and committed before giving up on an
    AoR that other workers keep changing."""
    retry_after: tuple[int, int] = (2, 6)
    """Bounds of the Retry-After seconds of a 500 (drawn at random, so that UAs
    refused together do not retry together)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", frozenset(d.lower() for d in self.domains))
        if not 0 < self.min_expires <= self.max_expires:
            raise ValueError("need 0 < min_expires <= max_expires")
        if self.default_expires <= 0 or self.max_contacts < 1 or self.commit_attempts < 1:
            raise ValueError("default_expires, max_contacts and commit_attempts must be positive")
        low, high = self.retry_after
        if not 0 < low <= high:
            raise ValueError("retry_after must be (low, high) with 0 < low <= high")


class RegistrarFailure(enum.Enum):
    """Why a REGISTER was refused (the status of each is in FAILURE_RESPONSES)."""

    MALFORMED_REQUEST = "malformed request"
    UNSUPPORTED_URI_SCHEME = "Request-URI not a SIP or SIPS URI"
    DOMAIN_NOT_SERVED = "Request-URI domain not ours"
    BAD_EXTENSION = "Require names an option we do not support"
    TO_NOT_SIP_URI = "To is not a SIP or SIPS URI"
    AOR_NOT_SERVED = "To domain not ours"
    AOR_WITHOUT_USER = "To URI without a user part"
    MALFORMED_CREDENTIALS = "malformed credentials"
    UNAUTHENTICATED = "no valid credentials"
    NOT_AUTHORIZED = "authenticated user may not register this AoR"
    WILDCARD_NOT_ALONE = "Contact * with other contacts"
    WILDCARD_WITHOUT_EXPIRES_ZERO = "Contact * without Expires: 0"
    MALFORMED_PATH = "malformed Path"
    INTERVAL_TOO_BRIEF = "expiry below the minimum"
    OUT_OF_ORDER = "CSeq not above the stored one for the same Call-ID"
    TOO_MANY_CONTACTS = "more bindings than the AoR may hold"
    STORE_UNAVAILABLE = "location service unreachable"
    TOO_MUCH_CONTENTION = "the AoR kept changing under us"


@dataclass(frozen=True, slots=True)
class FailureResponse:
    """How a failure is answered."""

    status: int
    """The status code."""
    reason: str
    """The reason phrase."""
    retry_after: bool = False
    """Whether the answer carries Retry-After (a temporary server-side failure)."""


FAILURE_RESPONSES: dict[RegistrarFailure, FailureResponse] = {
    # The request cannot be read (RFC 3261 8.2, 21.4.1).  Kamailio: R_PARSE... 400.
    RegistrarFailure.MALFORMED_REQUEST: FailureResponse(400, "Bad Request"),
    # RFC 3261 8.2.2.1: a Request-URI scheme we do not serve.
    RegistrarFailure.UNSUPPORTED_URI_SCHEME: FailureResponse(416, "Unsupported URI Scheme"),
    # RFC 3261 10.3 step 1 / 8.2.2.1: not one of our domains (see Registrar.serves).
    RegistrarFailure.DOMAIN_NOT_SERVED: FailureResponse(404, "Not Found - Domain Not Served Here"),
    # RFC 3261 10.3 step 2 / 8.2.2.3, with Unsupported.
    RegistrarFailure.BAD_EXTENSION: FailureResponse(420, "Bad Extension"),
    # RFC 3261 10.3 step 5 needs a SIP AoR; RFC 4475 3.3.4 (To: isbn:...) wants 400.
    RegistrarFailure.TO_NOT_SIP_URI: FailureResponse(400, "Bad Request - To Is Not A SIP URI"),
    # RFC 3261 10.3 step 5: an AoR not valid for our domains gets 404.
    RegistrarFailure.AOR_NOT_SERVED: FailureResponse(
        404, "Not Found - Address-of-Record Not Served Here"
    ),
    # RFC 3261 10.3 step 5 (Kamailio R_TO_USER answers 400; an AoR without a user
    # is not a valid AoR of the domain, which step 5 answers 404).
    RegistrarFailure.AOR_WITHOUT_USER: FailureResponse(
        404, "Not Found - Address-of-Record Without User"
    ),
    # RFC 3261 22 / RFC 7616: credentials that cannot be parsed.
    RegistrarFailure.MALFORMED_CREDENTIALS: FailureResponse(400, "Bad Request"),
    # RFC 3261 10.3 step 3 / 22.2, with one WWW-Authenticate per algorithm.
    RegistrarFailure.UNAUTHENTICATED: FailureResponse(401, "Unauthorized"),
    # RFC 3261 10.3 step 4.
    RegistrarFailure.NOT_AUTHORIZED: FailureResponse(
        403, "Forbidden - Not Authorized For This Address-of-Record"
    ),
    # RFC 3261 10.3 step 6 (Kamailio R_STAR_CONT, 400).
    RegistrarFailure.WILDCARD_NOT_ALONE: FailureResponse(
        400, "Bad Request - Contact * Must Be The Only Contact"
    ),
    # RFC 3261 10.3 step 6 (Kamailio R_STAR_EXP, 400).
    RegistrarFailure.WILDCARD_WITHOUT_EXPIRES_ZERO: FailureResponse(
        400, "Bad Request - Contact * Requires Expires: 0"
    ),
    # RFC 3327 4: Path values are name-addrs (Kamailio R_PARSE_PATH, 400).
    RegistrarFailure.MALFORMED_PATH: FailureResponse(400, "Bad Request - Malformed Path"),
    # RFC 3261 10.3 step 7, with Min-Expires (20.23).
    RegistrarFailure.INTERVAL_TOO_BRIEF: FailureResponse(423, "Interval Too Brief"),
    # RFC 3261 10.3 step 7: "the update MUST be aborted and the request fails".
    # Kamailio (R_OOO) answers 200 without updating; the RFC says the request
    # fails, and a 500 would invite the UA to resend the same stale request, so
    # 400: the request contradicts the UA's own earlier one.
    RegistrarFailure.OUT_OF_ORDER: FailureResponse(400, "Bad Request - Out Of Order CSeq"),
    # RFC 3261 leaves this open.  Kamailio (R_TOO_MANY) and OpenSIPS answer 503,
    # which RFC 3261 21.5.4 defines as overload or maintenance: UAs then fail over
    # to another server of the cluster (RFC 3263) and get the same answer.  403
    # says what happened: understood, refused by policy, and authenticating
    # again will not help (21.4.4).
    RegistrarFailure.TOO_MANY_CONTACTS: FailureResponse(
        403, "Forbidden - Too Many Registered Contacts"
    ),
    # RFC 3261 10.3 step 7: a failed commit MUST fail the request with 500; nothing
    # was half-written (one Txn).  Retry-After (20.33): the outage is temporary.
    RegistrarFailure.STORE_UNAVAILABLE: FailureResponse(
        500, "Server Internal Error - Location Service Unavailable", retry_after=True
    ),
    RegistrarFailure.TOO_MUCH_CONTENTION: FailureResponse(
        500, "Server Internal Error - Concurrent Updates", retry_after=True
    ),
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """A REGISTER refused: the failure and what the answer needs besides."""

    failure: RegistrarFailure
    """What went wrong."""
    detail: str | None = None
    """A reason phrase to use instead of the table's (the parser's words)."""
    headers: tuple[tuple[str, str], ...] = ()
    """Header fields the answer carries (Unsupported, Min-Expires,
    WWW-Authenticate)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ContactRequest:
    """One contact of a REGISTER, read (RFC 3261 10.3 step 7)."""

    binding_id: str
    """Its binding id (``registry.binding_id_for``)."""
    contact: str
    """The Contact value to store (``registry.contact_text``)."""
    uri: str
    """The contact URI."""
    expires: int
    """The granted expiry in seconds; 0 removes the binding."""
    q: float | None
    """The q-value, or None."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterRequest:
    """What a REGISTER asks for, read and checked against the configuration."""

    aor: str
    """The canonical address-of-record (RFC 3261 10.3 step 5)."""
    call_id: str
    """The Call-ID."""
    cseq: int
    """The CSeq number."""
    wildcard: bool
    """``Contact: *`` with ``Expires: 0``: remove every binding."""
    contacts: tuple[ContactRequest, ...]
    """The contacts to add, refresh or remove (empty for a query or ``*``)."""
    path: tuple[str, ...] = ()
    """The Path values, topmost first (RFC 3327)."""
    path_supported: bool = False
    """Whether the UA listed ``path`` in Supported or Require."""
    user_agent: str = ""
    """The User-Agent header."""

    @property
    def is_query(self) -> bool:
        """A REGISTER without Contact only asks for the bindings (RFC 3261 10.2.3)."""
        return not self.wildcard and not self.contacts


@dataclass(frozen=True, slots=True)
class BindingPlan:
    """The outcome of steps 6 and 7 against the stored bindings."""

    change: AorChange | None
    """The change to commit; None when nothing changes."""
    bindings: tuple[Binding, ...]
    """The AoR's active bindings once the change is committed (for the 200)."""


# ------------------------------------------------------------------ the decisions


def check_request(
    request: Request,
    config: RegistrarConfig,
    is_own_address: Callable[[str, int | None], bool] | None = None,
) -> str | Refusal:
    """RFC 3261 10.3 steps 1 and 2, and the To check of step 5.

    ``is_own_address(host, port)`` says whether a Request-URI names this server
    itself (one of the cluster's sockets): a UA configured with the server's
    address as its registrar sends that, and the AoR's domain in To decides.
    Returns the canonical address-of-record of the To URI, or the refusal.
    Raises MessageError when a header it reads is malformed.
    """
    # RFC 3261 10.3 step 1: the Request-URI names the domain whose bindings are
    # asked for.  The worker proxies a REGISTER for a foreign domain (step 1's
    # SHOULD forward, see Registrar.serves); one that reaches the registrar anyway
    # is answered as a UAS answers a Request-URI it does not accept: 416 for
    # another scheme, 404 for another domain (RFC 3261 8.2.2.1).  A user part in
    # the Request-URI (10.2 forbids it) is tolerated: many UAs send one.
    uri = request.uri
    if not isinstance(uri, SipURI):
        return Refusal(RegistrarFailure.UNSUPPORTED_URI_SCHEME)
    if uri.host_key not in config.domains and not (
        is_own_address is not None and is_own_address(uri.host, uri.port)
    ):
        return Refusal(RegistrarFailure.DOMAIN_NOT_SERVED)
    # RFC 3261 10.3 step 2 / 8.2.2.3: every Require option must be supported.
    unsupported = [tag for tag in request.require if tag not in SUPPORTED_OPTIONS]
    if unsupported:
        return Refusal(
            RegistrarFailure.BAD_EXTENSION, headers=(("Unsupported", ", ".join(unsupported)),)
        )
    # RFC 3261 10.3 step 5: the AoR comes from To.  It is checked before
    # authentication because the realm is the AoR's domain; it reveals nothing
    # about users.  A To that is not a SIP or SIPS URI is no AoR at all: 400
    # (RFC 4475 3.3.4); a SIP AoR of another domain is not valid here: 404.
    to_uri = request.to.uri
    if not isinstance(to_uri, SipURI):
        return Refusal(RegistrarFailure.TO_NOT_SIP_URI)
    if to_uri.host_key not in config.domains:
        return Refusal(RegistrarFailure.AOR_NOT_SERVED)
    if not to_uri.user:
        return Refusal(RegistrarFailure.AOR_WITHOUT_USER)
    # RFC 3261 10.3 step 5: URI parameters removed, escapes resolved.
    return address_of_record(to_uri)


def domain_of(aor: str) -> str:
    """The domain part of a canonical AoR (the digest realm)."""
    return aor.rpartition("@")[2]


def authorize(outcome: AuthOutcome, aor: str) -> Refusal | None:
    """RFC 3261 10.3 steps 3 and 4 from an authentication outcome.

    None when the authenticated user may change ``aor``'s bindings.
    """
    # RFC 3261 10.3 step 3 / 22.2: no valid credentials -> 401 with a challenge
    # per algorithm (the Authenticator makes them).
    if not outcome.ok:
        if outcome.status == 401:
            return Refusal(RegistrarFailure.UNAUTHENTICATED, headers=outcome.challenges)
        if outcome.status == 403:
            return Refusal(RegistrarFailure.NOT_AUTHORIZED)
        return Refusal(RegistrarFailure.MALFORMED_CREDENTIALS, detail=outcome.reason)
    # RFC 3261 10.3 step 4: a user may change its own bindings only (no
    # third-party registration here).
    user = outcome.user or ""
    name, _, domain = user.rpartition("@")
    if f"{name}@{domain.lower()}" != aor:
        return Refusal(RegistrarFailure.NOT_AUTHORIZED)
    return None


def read_register(request: Request, config: RegistrarConfig, aor: str) -> RegisterRequest | Refusal:
    """RFC 3261 10.3 steps 6 and 7 as far as the request alone decides.

    Returns what the REGISTER asks for, or the refusal.  Raises MessageError when
    a header it reads is malformed.
    """
    contact_values = request.values("contact")
    # RFC 3261 10.3 step 6: "*" only alone and only with Expires: 0.
    wildcard = any(value.strip(" \t") == "*" for value in contact_values)
    if wildcard:
        if len(contact_values) > 1:
            return Refusal(RegistrarFailure.WILDCARD_NOT_ALONE)
        if request.expires != 0:
            return Refusal(RegistrarFailure.WILDCARD_WITHOUT_EXPIRES_ZERO)
    contacts: list[ContactRequest] = []
    if not wildcard:
        header_expires = request.expires
        for contact in request.contacts:
            address = contact.address
            assert address is not None  # "*" was handled above
            # RFC 3261 10.3 step 7: the expires parameter, else the Expires
            # header, else the local default.
            requested = contact.expires
            if requested is None:
                requested = header_expires if header_expires is not None else config.default_expires
            if requested == 0:
                granted = 0
            elif requested < _ONE_HOUR and requested < config.min_expires:
                # RFC 3261 10.3 step 7: above zero, below one hour and below our
                # minimum: 423 with Min-Expires (20.23).
                return Refusal(
                    RegistrarFailure.INTERVAL_TOO_BRIEF,
                    headers=(("Min-Expires", str(config.min_expires)),),
                )
            else:
                # RFC 3261 10.3 step 7: the registrar may shorten, never lengthen.
                granted = min(requested, config.max_expires)
            stored = contact_text(address)
            # contact_text is "<uri>" then parameters, and no SIP URI holds a ">"
            # (RFC 3261 25.1): slicing saves writing the URI out again.
            uri = address.uri
            contacts.append(
                ContactRequest(
                    binding_id=binding_id_for(address),
                    contact=stored,
                    uri=stored[1 : stored.index(">")] if isinstance(uri, SipURI) else str(uri),
                    expires=granted,
                    q=contact.q,
                )
            )
    # RFC 3327 5.3: the registrar stores the Path values with the binding.
    path = tuple(request.values("path"))
    for value in path:
        try:
            parse_name_addr(value, "Path")
        except RemoteProtocolError:
            return Refusal(RegistrarFailure.MALFORMED_PATH)
    return RegisterRequest(
        aor=aor,
        call_id=request.call_id,
        cseq=request.cseq.number,
        wildcard=wildcard,
        contacts=tuple(contacts),
        path=path,
        path_supported="path" in request.supported or "path" in request.require,
        user_agent=request.get("user-agent") or "",
    )


def _binding_order(binding: Binding) -> tuple[float, float, str]:
    return (-(binding.q if binding.q is not None else 1.0), -binding.registered_at, binding.uri)


def plan_bindings(
    register: RegisterRequest,
    state: AorState,
    *,
    now: float,
    config: RegistrarConfig,
    received: Peer | None,
) -> BindingPlan | Refusal:
    """RFC 3261 10.3 steps 6 and 7 against the AoR's stored bindings.

    Returns the change that makes the AoR hold what the REGISTER asks for and the
    bindings it then holds, or the refusal (CSeq out of order, too many contacts).
    """
    current = {binding.binding_id: binding for binding in state.active(now)}
    after = dict(current)
    if register.wildcard:
        # RFC 3261 10.3 step 6: every binding goes, unless one was written by
        # this Call-ID with a CSeq not below the request's: then the whole request
        # fails.
        for binding in current.values():
            if binding.call_id == register.call_id and register.cseq <= binding.cseq:
                return Refusal(RegistrarFailure.OUT_OF_ORDER)
        after.clear()
    for contact in register.contacts:
        existing = current.get(contact.binding_id)
        # RFC 3261 10.3 step 7: an existing binding from the same Call-ID is only
        # changed by a higher CSeq; otherwise the update is aborted and the
        # request fails (a different Call-ID always updates: the UA restarted).
        if (
            existing is not None
            and existing.call_id == register.call_id
            and register.cseq <= existing.cseq
        ):
            return Refusal(RegistrarFailure.OUT_OF_ORDER)
        if contact.expires == 0:
            # RFC 3261 10.3 step 7: expiry zero removes the binding.
            after.pop(contact.binding_id, None)
            continue
        after[contact.binding_id] = Binding(
            aor=register.aor,
            binding_id=contact.binding_id,
            contact=contact.contact,
            uri=contact.uri,
            expires_at=now + contact.expires,
            q=contact.q,
            call_id=register.call_id,
            cseq=register.cseq,
            received=received,
            user_agent=register.user_agent,
            # RFC 3327 5.3: the Path vector is stored with the binding.
            path=register.path,
            registered_at=now,
        )
    # The contact limit: refuse a request that would leave the AoR with more
    # bindings than allowed, when it adds one (a refresh or a removal never fails
    # on it, even after the limit was lowered).
    added = any(binding_id not in current for binding_id in after)
    if added and len(after) > config.max_contacts:
        return Refusal(RegistrarFailure.TOO_MANY_CONTACTS)
    bindings = tuple(sorted(after.values(), key=_binding_order))
    change = plan_change(state, bindings)
    if not change.put and not change.delete:
        return BindingPlan(None, bindings)
    return BindingPlan(change, bindings)


def _to_tag(request: Request) -> str:
    # RFC 3261 8.2.6.2: a UAS adds a To tag.  It is derived from the raw Call-ID,
    # CSeq and top Via (no parsing), so that the same request gets the same tag
    # without any state kept.
    material = "\x00".join(
        (request.get("call-id") or "", request.get("cseq") or "", request.get("via") or "")
    )
    return hashlib.blake2b(material.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


_date_cache: tuple[int, str] = (0, "")


def _http_date(now: float) -> str:
    """RFC 3261 20.17 Date (RFC 1123 form, GMT), computed once per second."""
    global _date_cache  # noqa: PLW0603 - a one-entry cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, formatdate(second, usegmt=True))
    return _date_cache[1]


def registered_response(
    request: Request, register: RegisterRequest, bindings: tuple[Binding, ...], now: float
) -> Response:
    """RFC 3261 10.3 step 8: the 200 listing every current binding of the AoR."""
    # RFC 3261 10.3 step 8: one Contact per binding, with its remaining expiry
    # (and its q, among the parameters kept from the REGISTER).
    headers: list[tuple[str, object]] = [
        ("Contact", f"{binding.contact};expires={binding.expires_in(now)}")
        for binding in bindings
        if binding.expires_at > now
    ]
    if register.path and register.path_supported:
        # RFC 3327 5.3: the Path values go back in the 200, in order, to a UA that
        # indicated support for path (to others they would mean nothing).
        headers.extend(("Path", value) for value in register.path)
    headers.append(("Supported", ", ".join(sorted(SUPPORTED_OPTIONS))))
    # RFC 3261 10.3 step 8: the response SHOULD carry a Date (20.17).
    headers.append(("Date", _http_date(now)))
    return make_response(request, 200, to_tag=_to_tag(request), headers=headers)


def refusal_response(
    request: Request, refusal: Refusal, *, retry_after: int | None = None
) -> Response:
    """The answer to a refused REGISTER, from FAILURE_RESPONSES.

    ``retry_after`` seconds go into Retry-After when the failure calls for one.
    """
    answer = FAILURE_RESPONSES[refusal.failure]
    reason = answer.reason
    if refusal.detail:
        phrase = reason_phrase(answer.status)
        detail = refusal.detail
        reason = detail if detail.startswith(phrase) else f"{phrase} - {detail}"
    headers: list[tuple[str, object]] = list(refusal.headers)
    if answer.retry_after and retry_after is not None:
        headers.append(("Retry-After", retry_after))
    if answer.status == 420:
        headers.append(("Supported", ", ".join(sorted(SUPPORTED_OPTIONS))))
    try:
        tag: str | None = _to_tag(request)
    except MessageError:
        tag = None
    return make_response(
        request,
        answer.status,
        reason[:200].replace("\r", " ").replace("\n", " "),
        to_tag=tag,
        headers=headers,
    )


# ------------------------------------------------------------------ the registrar


@dataclass(slots=True)
class RegistrarStatistics:
    """Counters of the registrar's outcomes."""

    registered: int = 0
    """REGISTERs answered 200."""
    refused: dict[RegistrarFailure, int] = field(default_factory=dict)
    """Refusals by failure."""
    conflicts: int = 0
    """Commits that found the AoR changed and were computed again."""


def internal_error(request: Request) -> Response:
    """The answer when answering failed unexpectedly: 500, retry in 5 s."""
    return make_response(request, 500, headers=[("Retry-After", 5)])


@dataclass(slots=True)
class _Continue:
    """A REGISTER whose outcome needs the AoR's state read from etcd."""

    register: RegisterRequest
    aor: str
    peer: Peer | None
    now: float
    attempts: int
    """Commit attempts already spent."""


@dataclass(slots=True, eq=False)
class _Commit:
    """A REGISTER waiting for its first commit (the common path)."""

    registrar: Registrar
    request: Request
    register: RegisterRequest
    aor: str
    peer: Peer | None
    now: float
    plan: BindingPlan
    change: AorChange
    answer: Callable[[Response], None] | None = None

    def committed(self, future: asyncio.Future[CommitResult]) -> None:
        registrar, request = self.registrar, self.request
        answer = self.answer
        assert answer is not None
        outcome: Response | Refusal
        if future.cancelled():
            outcome = Refusal(RegistrarFailure.STORE_UNAVAILABLE)
        elif (error := future.exception()) is not None:
            if not isinstance(error, StoreUnavailableError):
                log.error("REGISTER of %s failed", self.aor, exc_info=error)
                answer(internal_error(request))
                return
            log.warning("REGISTER of %s not stored: %s", self.aor, error)
            outcome = Refusal(RegistrarFailure.STORE_UNAVAILABLE)
        elif future.result().committed:
            # RFC 3261 10.3 step 8: answered only now that the change is durable
            # (and it was all or nothing: one Txn, step 7).
            outcome = registered_response(request, self.register, self.plan.bindings, self.now)
        else:
            # Another worker changed the AoR since the cached state: read it from
            # etcd and compute again.
            registrar.statistics.conflicts += 1
            step = _Continue(self.register, self.aor, self.peer, self.now, attempts=1)
            registrar._continue(request, step, answer)
            return
        answer(registrar._finish(request, outcome))


class Registrar:
    """Answers REGISTERs for our domains (RFC 3261 10.3, RFC 3327).

    ``authenticator`` is None when authentication is off.  ``random`` draws the
    Retry-After jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        config: RegistrarConfig,
        store: LocationStore,
        authenticator: Authenticator | None = None,
        *,
        random_source: random.Random | None = None,
        is_own_address: Callable[[str, int | None], bool] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.is_own_address = is_own_address
        self.authenticator = authenticator
        self.statistics = RegistrarStatistics()
        self._random = random_source if random_source is not None else random.Random()
        self._tasks: set[asyncio.Task[None]] = set()

    def serves(self, request: Request) -> bool:
        """Whether ``request``'s Request-URI names one of our domains or this
        server itself (RFC 3261 10.3 step 1: a REGISTER for another domain is
        proxied, not handled)."""
        try:
            uri = request.uri
        except MessageError:
            return False
        if not isinstance(uri, SipURI):
            return False
        if uri.host_key in self.config.domains:
            return True
        return self.is_own_address is not None and self.is_own_address(uri.host, uri.port)

    async def handle(self, request: Request, peer: Peer | None, now: float) -> Response:
        """Answer one REGISTER received from ``peer`` at ``now`` (seconds since the
        epoch).

        The 200 is returned only once the bindings are durable in etcd.  Never
        raises for a peer's mistake (malformed headers get 400) nor for an
        unreachable etcd (500 with Retry-After); raises ValueError when
        ``request`` is not a REGISTER.
        """
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[Response] = loop.create_future()
        self.handle_nowait(request, peer, now, answered.set_result)
        return await answered

    def handle_nowait(
        self,
        request: Request,
        peer: Peer | None,
        now: float,
        answer: Callable[[Response], None],
    ) -> None:
        """``handle`` without a task per REGISTER: ``answer`` is called with the
        response, at once when no etcd write is needed, else from a callback once
        the commit is decided.  Must be called from the event loop.

        The common path (one commit that succeeds) runs no coroutine at all; a
        conflict or a refusal to confirm against etcd continues in a task.
        """
        if request.method != "REGISTER":
            raise ValueError(f"the registrar handles REGISTER, not {request.method}")
        try:
            step = self._start(request, peer, now)
        except MessageError as error:
            step = Refusal(RegistrarFailure.MALFORMED_REQUEST, detail=error.reason)
        if isinstance(step, _Commit):
            step.answer = answer
            future = self.store.submit(step.change)
            future.add_done_callback(step.committed)
            return
        if isinstance(step, _Continue):
            self._continue(request, step, answer)
            return
        answer(self._finish(request, step))

    def answer_statelessly(
        self, request: Request, peer: Peer | None, now: float
    ) -> Response | None:
        """The answer to a REGISTER for us without credentials when authentication
        is on (its challenge, or a refusal found before it), to be sent outside any
        transaction; None when the request carries an Authorization header field,
        authentication is off (``handle`` answers those) or it is not for us.

        RFC 3261 8.2.7: the stateless UAS role is there for challenges to
        unauthenticated requests, so that a flood of them creates no transaction
        state (26.1.5).  A retransmission is challenged again; the To tag is
        derived from the request, so identical requests get the same one.
        """
        if self.authenticator is None or request.get("authorization") is not None:
            return None
        if request.method != "REGISTER":
            raise ValueError(f"the registrar handles REGISTER, not {request.method}")
        if not self.serves(request):
            return None  # for another domain: proxied
        try:
            step = self._start(request, peer, now)
        except MessageError as error:
            step = Refusal(RegistrarFailure.MALFORMED_REQUEST, detail=error.reason)
        if not isinstance(step, Refusal):
            return None  # nothing to refuse: the transaction path takes it
        return self._finish(request, step)

    def _finish(self, request: Request, outcome: Response | Refusal) -> Response:
        if isinstance(outcome, Response):
            self.statistics.registered += 1
            return outcome
        refused = self.statistics.refused
        refused[outcome.failure] = refused.get(outcome.failure, 0) + 1
        low, high = self.config.retry_after
        return refusal_response(request, outcome, retry_after=self._random.randint(low, high))

    def _start(
        self, request: Request, peer: Peer | None, now: float
    ) -> Response | Refusal | _Commit | _Continue:
        config = self.config
        checked = check_request(request, config, self.is_own_address)
        if isinstance(checked, Refusal):
            return checked
        aor = checked
        if self.authenticator is not None:
            # RFC 3261 10.3 steps 3 and 4; the realm is the AoR's domain.
            outcome = self.authenticator.check(request, realm=domain_of(aor), proxy=False, now=now)
            refusal = authorize(outcome, aor)
            if refusal is not None:
                if outcome.ok:  # authenticated, but not as this AoR's user
                    self.authenticator.counters.failures[403, "forbidden_aor"] += 1
                return refusal
        register = read_register(request, config, aor)
        if isinstance(register, Refusal):
            return register
        store = self.store
        if register.is_query:
            # RFC 3261 10.3 step 8 (10.2.3): no Contact, nothing changes; the 200
            # lists the bindings.
            bindings = tuple(sorted(store.aor_state(aor).active(now), key=_binding_order))
            return registered_response(request, register, bindings, now)
        plan = plan_bindings(register, store.aor_state(aor), now=now, config=config, received=peer)
        if isinstance(plan, Refusal):
            # The refusal depends on the stored bindings, and the cache may lag
            # behind another worker's change: confirm it against etcd.
            return _Continue(register, aor, peer, now, attempts=0)
        if plan.change is None:
            return registered_response(request, register, plan.bindings, now)
        return _Commit(self, request, register, aor, peer, now, plan, plan.change)

    def _continue(
        self, request: Request, step: _Continue, answer: Callable[[Response], None]
    ) -> None:
        async def run() -> None:
            try:
                outcome = await self._commit_from_etcd(request, step)
            except MessageError as error:
                outcome = Refusal(RegistrarFailure.MALFORMED_REQUEST, detail=error.reason)
            except Exception:
                log.exception("REGISTER of %s failed", step.aor)
                answer(internal_error(request))
                return
            answer(self._finish(request, outcome))

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit_from_etcd(self, request: Request, step: _Continue) -> Response | Refusal:
        """Steps 6 to 8 again from the AoR's state read from etcd (not the cache,
        which may lag), after a conflict or to confirm a refusal."""
        config = self.config
        register, aor, now = step.register, step.aor, step.now
        for _ in range(step.attempts, config.commit_attempts):
            state = await self._fetch(aor)
            if state is None:
                return Refusal(RegistrarFailure.STORE_UNAVAILABLE)
            plan = plan_bindings(register, state, now=now, config=config, received=step.peer)
            if isinstance(plan, Refusal):
                return plan
            if plan.change is None:
                return registered_response(request, register, plan.bindings, now)
            try:
                result = await self.store.commit(plan.change)
            except StoreUnavailableError as error:
                log.warning("REGISTER of %s not stored: %s", aor, error)
                return Refusal(RegistrarFailure.STORE_UNAVAILABLE)
            if result.committed:
                # RFC 3261 10.3 step 8: answered only once the change is durable.
                return registered_response(request, register, plan.bindings, now)
            # Changed again since the read: read it once more.
            self.statistics.conflicts += 1
        log.warning("REGISTER of %s gave up after %d conflicts", aor, config.commit_attempts)
        return Refusal(RegistrarFailure.TOO_MUCH_CONTENTION)

    async def _fetch(self, aor: str) -> AorState | None:
        try:
            return await self.store.fetch_aor_state(aor)
        except StoreUnavailableError as error:
            log.warning("cannot read %s from etcd: %s", aor, error)
            return None
