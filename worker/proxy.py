"""The worker's record-routing, transaction-stateful proxy core (RFC 3261 16), sans-IO.

``ProxyCore`` sits on the worker's ``TransactionLayer`` (whose addresses are
``Peer`` objects): the worker feeds it every event of the layer except REGISTER requests
(``handle_event``), and it acts only through the layer (``send_request``,
``send_response``, ``send_stateless``, ``abandon_transaction``).  It reads no clock
(``now`` is passed in), does no I/O and no DNS: a next hop is a binding's
registration flow (``Binding.received``) or a Route / Request-URI whose host is an
IP address; any other host name is refused.

Per request (RFC 3261 16.3 to 16.6): validation (scheme, Max-Forwards, loop
detection after RFC 5393, Proxy-Require, proxy authentication), route
preprocessing (16.4, RFC 5658), target determination (16.5: location service,
the server itself, the Route set, a foreign Request-URI), then one client
transaction per target, forked in waves (see ``_response_context``).  Per response
(16.7): our Via is removed, provisional responses and every 2xx go upstream at
once, the best final response when every branch has finished.  CANCEL (16.10),
Timer C (16.8), the ACK to a 2xx and stray 2xx retransmissions (RFC 6026) are
handled here too.  The proxy has one timer of its own, the 64*T1 wait for the
final response of a CANCELled branch (RFC 3261 9.1): ``get_timer``/``handle_timer``.

Choices where the RFCs leave room
---------------------------------
* Record-Route is added to INVITE, SUBSCRIBE and REFER outside a dialog, and to
  every NOTIFY: a NOTIFY may create the dialog at the subscriber (RFC 6665: forked SUBSCRIBE),
  and a UA ignores Record-Route in other mid-dialog requests (RFC 3261 12.2).
* Serial forking tries targets by decreasing q-value (a binding without q counts
  as 1.0); targets of equal q are tried in parallel, as one wave (RFC 3261 16.6).
  A 3xx from a branch is not recursed on: it competes in the 16.7 step 6 choice.
* A request with Route values left after 16.4 goes along its Route set, even when
  its Request-URI is in one of our domains: the sender chose the path.
* Relaying (forwarding somewhere else than to a registered contact of ours): an
  in-dialog request reached through a Route naming us is forwarded; otherwise the
  sender must be authenticated (with auth off: its From domain must be ours),
  else 403.  A next hop that would need DNS is refused with 403.
* Requests addressed to the server itself (no user part) are answered without a
  challenge: nothing is forwarded and nothing is disclosed.
* A CANCEL matching no INVITE server transaction is answered 481 (16.10 would
  forward it statelessly; this proxy is always transaction-stateful).
* A stray response is forwarded only when it is a 2xx to an INVITE and its top Via
  is ours (RFC 6026 8.4); anything else is dropped.
* Max-Breadth (RFC 5393): the parallel branches of one wave are capped at the
  smaller of the received Max-Breadth (our ``max_breadth`` when absent) and our
  ``max_breadth``, and share it; a single branch is not forking and carries the
  whole value.
* Flows (after RFC 5626, outbound): a device behind a NAT, or connected over TCP, is
  reached only through the flow it uses (its registration's ``received``, or the
  connection and address a caller's request came from).  The Record-Route value
  facing such a device carries a ``flow`` parameter naming that flow (load balancer,
  socket, address, connection), signed with the proxy's flow key.  A request within
  the dialog that reaches us through that value (the last Route value of ours it
  carries), and does not come from that flow itself, is sent through the flow
  instead of to its Request-URI (the device's contact, often a private address).
  A caller that needs a flow (TCP, or a source other than its Via sent-by) makes us
  record-route twice, one value per side (RFC 5658), so that the direction of each
  later request is exact.
* The loop hash (16.6 step 8, checked per 16.3 step 4) covers the To tag, From tag,
  Call-ID, the Request-URI as received, the CSeq number, Proxy-Require, the
  Proxy-Authorization values for other realms (ours are removed before forwarding,
  RFC 3261 22.3) and the transaction identity (sent-by, branch) of the top Via as
  received.  On a request that comes back, each Via of ours is checked against the
  hash computed with the Via just below it, which was the top Via when we forwarded
  it: the same values mean a loop, different ones a spiral.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from cluster.membership import LBSocket
from cluster.ring import make_branch_prefix
from registry import address_of_record
from sipcore import (
    URI,
    AckReceived,
    CancelReceived,
    Event,
    LocalProtocolError,
    MessageError,
    NameAddr,
    RemoteProtocolError,
    Request,
    RequestReceived,
    Response,
    ResponseReceived,
    SipURI,
    StrayResponseReceived,
    TimerCFired,
    TransactionId,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimedOut,
    TransportFailed,
    Via,
    make_cancel,
    make_response,
    parse_name_addr,
    parse_uri,
    parse_via,
    reason_phrase,
)

from ._response_context import (
    Branch,
    BranchState,
    CancelState,
    ForwardingPlan,
    ResponseContext,
    Target,
    best_response,
)
from .auth import Authenticator
from .transport import Peer, SocketDirectory, response_peer

if TYPE_CHECKING:
    from cluster.config import Settings

__all__ = [
    "Binding",
    "ForkingMode",
    "Locator",
    "ProxyConfig",
    "ProxyCore",
    "ProxyMode",
    "Refusal",
]


# ------------------------------------------------------------------ configuration


class ProxyMode(Enum):
    """What the server does with an INVITE for a user that has bindings."""

    PROXY = "proxy"
    """Forward it to the bindings (RFC 3261 16)."""
    REDIRECT = "redirect"
    """Answer 302 listing the bindings (RFC 3261 8.3); other methods are proxied."""


class ForkingMode(Enum):
    """How the bindings of an address-of-record are tried (RFC 3261 16.6)."""

    PARALLEL = "parallel"
    """All at once."""
    SERIAL = "serial"
    """By decreasing q-value, equal q-values in parallel; the next only after failures."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """The proxy's settings (``cluster.config.Settings`` holds the user-facing ones)."""

    domains: frozenset[str] = frozenset()
    """The domains we are responsible for (RFC 3261 16.5), stored in lower case."""
    mode: ProxyMode = ProxyMode.PROXY
    """Proxy or redirect INVITEs to our users."""
    forking: ForkingMode = ForkingMode.PARALLEL
    """Parallel or serial forking to the bindings of an address-of-record."""
    max_breadth: int = 60
    """The most parallel branches of one request, and the Max-Breadth assumed when a
    request carries none (RFC 5393)."""
    timer_c: bool = True
    """Whether forwarded INVITEs run Timer C (RFC 3261 16.6 step 11); its duration is
    the transaction layer's ``TransactionConfig.timer_c``."""
    supported: tuple[str, ...] = ("path",)
    """The option tags listed in Supported when the server answers OPTIONS itself
    (the registrar stores Path, RFC 3327).  Proxy-Require tags are never supported."""

    def __post_init__(self) -> None:
        """Lower-case the domains; raises ValueError when ``max_breadth`` is below 1."""
        if self.max_breadth < 1:
            raise ValueError("ProxyConfig.max_breadth must be at least 1")
        object.__setattr__(self, "domains", frozenset(domain.lower() for domain in self.domains))

    @classmethod
    def from_settings(cls, settings: Settings) -> ProxyConfig:
        """The proxy configuration from the worker's settings (``--domain``, ``--mode``,
        ``--forking``, ``--max-breadth``); raises ValueError on an unknown choice."""
        return cls(
            domains=frozenset(settings.domain),
            mode=ProxyMode(settings.mode),
            forking=ForkingMode(settings.forking),
            max_breadth=settings.max_breadth,
        )


class Binding(Protocol):
    """What the proxy needs of one registered contact."""

    @property
    def uri(self) -> str:
        """The registered contact URI."""
        ...

    @property
    def q(self) -> float | None:
        """The contact's q-value (RFC 3261 20.10), None when it gave none."""
        ...

    @property
    def received(self) -> Peer | None:
        """The load balancer socket, remote address and connection the REGISTER came
        through: requests for the device go back the same way (NAT, TCP)."""
        ...

    @property
    def path(self) -> tuple[str, ...]:
        """The Path values of the registration, topmost first (RFC 3327)."""
        ...


class Locator(Protocol):
    """The location service as the proxy sees it: a cache, no I/O."""

    def lookup(self, aor: str) -> Sequence[Binding]:
        """The active bindings of ``aor`` (``user@domain``: user unescaped and
        case-sensitive, domain in lower case, as the registrar stores it)."""
        ...


class Refusal(Enum):
    """Why the proxy answers a request itself instead of forwarding it: the status
    code and reason phrase of the answer, in one table."""

    FORBIDDEN_SENDER = (403, "Forbidden - Authenticated User Is Not The From User")
    RELAY_DENIED = (403, "Forbidden - Relaying Denied")
    UNRESOLVABLE = (403, "Forbidden - Destination Needs DNS")
    FORBIDDEN_DESTINATION = (403, "Forbidden - Broadcast Or Multicast Destination")
    NOT_FOUND = (404, "Not Found")
    METHOD_NOT_ALLOWED = (405, "Method Not Allowed")
    UNSUPPORTED_SCHEME = (416, "Unsupported URI Scheme")
    BAD_EXTENSION = (420, "Bad Extension")
    MAX_BREADTH_EXCEEDED = (440, "Max-Breadth Exceeded")
    TEMPORARILY_UNAVAILABLE = (480, "Temporarily Unavailable")
    CALL_DOES_NOT_EXIST = (481, "Call/Transaction Does Not Exist")
    LOOP_DETECTED = (482, "Loop Detected")
    TOO_MANY_HOPS = (483, "Too Many Hops")
    UNSUPPORTED_TRANSPORT = (503, "Service Unavailable - Transport Not Supported")
    NO_SOCKET = (503, "Service Unavailable - No Socket Towards The Destination")

    @property
    def status(self) -> int:
        """The status code of the answer."""
        status: int = self.value[0]
        return status

    @property
    def reason(self) -> str:
        """The reason phrase of the answer."""
        reason: str = self.value[1]
        return reason


# ------------------------------------------------------------------------ helpers

# RFC 3261 16.6 step 4: requests that can create a dialog get a Record-Route.
_DIALOG_CREATING = frozenset({"INVITE", "SUBSCRIBE", "REFER"})
# Methods the server itself accepts as a UAS (the registrar takes REGISTER).
_SERVER_METHODS = "OPTIONS, REGISTER"
_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_COOKIE_DASH = "z9hG4bK-"  # every branch of make_branch_prefix starts so
_DEFAULT_MAX_FORWARDS = 70  # RFC 3261 16.6 step 3
_FLOW_PARAM = "flow"  # the Record-Route URI parameter carrying a flow token
_FLOW_MEMO = 4096  # flow tokens remembered each way (made, and decoded)
_TRANSPORT_LETTERS = {"udp": "u", "tcp": "t"}
_LETTER_TRANSPORTS = {letter: name for name, letter in _TRANSPORT_LETTERS.items()}


@dataclass(frozen=True, slots=True)
class _Hop:
    """A resolved next hop: the peer and the socket the message leaves from."""

    peer: Peer
    socket: LBSocket


def _random_tokens() -> Callable[[], str]:
    """Unique tokens for branches and tags: a random part per process (new at each
    start) and a counter, cheaper per message than fresh randomness."""
    prefix = secrets.token_hex(4)
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter):x}"


def _peer_of(address: object) -> Peer:
    if not isinstance(address, Peer):
        raise LocalProtocolError("the proxy needs a transaction layer whose addresses are Peers")
    return address


# Destinations repeat (a few load balancers, the devices' addresses): parsing an
# address with ipaddress costs 1.8 us, a cached answer 0.1.
@functools.lru_cache(maxsize=4096)
def _ip_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _forbidden_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Broadcast, multicast and unspecified addresses are never a destination
    (the RFC 4475 "bcast" case: nothing is ever sent to a broadcast address)."""
    return address.is_multicast or address.is_unspecified or address == _LIMITED_BROADCAST


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def _loop_hash(loop_key: str, upstream: Via) -> str:
    """RFC 3261 16.6 step 8: the request's loop key with the identity of the Via that
    was on top when the request reached us (sent-by and branch; not received or
    rport, which we add ourselves)."""
    host, port = upstream.sent_by
    return _digest(f"{loop_key}\x00{upstream.transport}\x00{host}\x00{port}\x00{upstream.branch}")


def _format_q(q: float) -> str:
    # qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )  (RFC 3261 25.1)
    text = f"{min(max(q, 0.0), 1.0):.3f}".rstrip("0").rstrip(".")
    return text or "0"


def _share(total: int, count: int) -> list[int]:
    """Split ``total`` into ``count`` parts differing by at most one (RFC 5393:
    the Max-Breadth values of concurrent branches sum to at most the received one)."""
    base, extra = divmod(total, count)
    return [base + 1 if index < extra else base for index in range(count)]


def _same_user(authenticated: str, aor: str) -> bool:
    """Whether an authenticated ``user@domain`` is the address-of-record ``aor``: the
    user part compared exactly, the domain case-insensitively (RFC 3261 19.1.4)."""
    user, _, domain = authenticated.rpartition("@")
    aor_user, _, aor_domain = aor.rpartition("@")
    return user == aor_user and domain.lower() == aor_domain


def _max_breadth(request: Request) -> int | None:
    """The Max-Breadth value (RFC 5393), None when absent.  Raises MessageError."""
    text = request.get("max-breadth")
    if text is None:
        return None
    if not text.isdigit() or not text.isascii():
        raise MessageError("Malformed Max-Breadth header", 400, message=request)
    return int(text)


def _rewrite_routes(request: Request, routes: Sequence[NameAddr]) -> None:
    if routes:
        request.set("Route", ", ".join(str(route) for route in routes))
    else:
        request.remove("Route")


def _strict_route_fixup(request: Request) -> URI:
    """RFC 3261 16.6 step 6: when the next hop is a strict router (no ``lr``), the
    Request-URI goes to the end of the Route set and the first Route value becomes
    the Request-URI (RFC 3261 16.12).  Returns the next hop's URI (16.6 step 7)."""
    routes = request.routes
    first = routes[0].uri
    if isinstance(first, SipURI) and first.loose_route:
        return first
    remaining = [*routes[1:], NameAddr(request.uri)]
    request.uri = first
    _rewrite_routes(request, remaining)
    return first


# -------------------------------------------------------------------------- proxy


class ProxyCore:
    """The record-routing, transaction-stateful proxy of one worker (RFC 3261 16).

    Call ``handle_event(event, now)`` with every event of the transaction layer
    except REGISTER requests, then ``handle_timer(now)`` whenever ``get_timer()``
    expires; drain the layer's ``messages_to_send()`` and ``next_event()`` after
    each call.
    """

    def __init__(
        self,
        layer: TransactionLayer,
        *,
        worker_id: str,
        sockets: SocketDirectory,
        locator: Locator,
        known_user: Callable[[str], bool],
        config: ProxyConfig | None = None,
        authenticator: Authenticator | None = None,
        tokens: Callable[[], str] | None = None,
        flow_key: bytes | None = None,
    ) -> None:
        """Build the proxy.

        ``layer`` is the worker's transaction layer, its addresses ``Peer`` objects;
        ``worker_id`` goes into every branch (``cluster.ring.make_branch_prefix``) so
        that the load balancers route responses back here; ``sockets`` knows the
        cluster's load balancer sockets; ``locator`` is the location service and
        ``known_user(aor)`` tells a known user (480 when unreachable) from an unknown
        one (404); ``authenticator`` is None when authentication is off; ``tokens``
        returns a new unique token per call (branches, tags), random by default;
        ``flow_key`` signs the flow tokens in our Record-Route values (random per
        process by default: give every worker the same key so that a dialog survives
        its move to another worker).  Raises ValueError for a worker id that cannot
        go into a branch.
        """
        self._layer = layer
        self._branch_prefix = make_branch_prefix(worker_id)
        self._sockets = sockets
        self._locator = locator
        self._known_user = known_user
        self._config = config if config is not None else ProxyConfig()
        self._domains = self._config.domains
        self._authenticator = authenticator
        self._tokens = tokens if tokens is not None else _random_tokens()
        self._flow_key = flow_key if flow_key is not None else secrets.token_bytes(16)
        self._flow_tokens: dict[Peer, str] = {}
        # The reverse: tokens this worker made or verified, and the flow each names
        # (the ACK and the BYE of a call carry the token its INVITE's Record-Route got).
        self._flow_peers: OrderedDict[str, Peer] = OrderedDict()
        self._contexts: dict[TransactionId, ResponseContext] = {}
        self._branches: dict[TransactionId, Branch] = {}
        self._cancels: set[TransactionId] = set()
        # RFC 3261 9.1: a CANCELled INVITE without a final response 64*T1 after the
        # CANCEL is given up.  Entries: (deadline, sequence, branch); lazy deletion.
        self._cancel_wait = 64 * layer.config.t1
        self._timers: list[tuple[float, int, Branch]] = []
        self._sequence = itertools.count()
        self._handlers: dict[type[Event], Callable[[Any, float], None]] = {
            RequestReceived: self.handle_request,
            CancelReceived: self._handle_cancel,
            AckReceived: self._handle_ack,
            ResponseReceived: self._handle_response,
            StrayResponseReceived: self._handle_stray_response,
            TimerCFired: self._handle_timer_c,
            TransactionTimedOut: self._handle_timeout,
            TransportFailed: self._handle_transport_failure,
            TransactionTerminated: self._handle_terminated,
        }

    # -------------------------------------------------------------- public entry

    def handle_event(self, event: Event, now: float) -> None:
        """Act on one event of the transaction layer (anything but a REGISTER).

        Events about transactions the proxy did not start are ignored.  Raises
        LocalProtocolError when the layer's addresses are not ``Peer`` objects.
        """
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event, now)

    def get_timer(self) -> float | None:
        """The earliest deadline of the proxy's own timers (the 64*T1 wait for the
        final response of a CANCELled branch, RFC 3261 9.1), or None."""
        timers = self._timers
        while timers:
            branch = timers[0][2]
            if branch.pending and branch.live:
                return timers[0][0]
            heapq.heappop(timers)
        return None

    def handle_timer(self, now: float) -> None:
        """Give up, as RFC 3261 9.1 says, every CANCELled branch whose final response
        is more than 64*T1 late; its response context goes on as if a 487 came."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, branch = heapq.heappop(timers)
            if branch.pending and branch.live:
                self._abandon(branch, 487, now)

    @property
    def context_count(self) -> int:
        """The number of response contexts alive (for metrics and tests)."""
        return len(self._contexts)

    # ------------------------------------------------------------------ requests

    def unbound_user(self, request: Request) -> str | None:
        """The address of record an initial request is for, when it is one of our
        users and the location cache holds no binding for it; None otherwise.

        The cache follows etcd a few milliseconds behind: a device that has just
        registered through another worker may be missing here.  A worker asks
        this before ``handle_event``, and when it gets an answer it makes sure its
        cache has caught up with etcd first (``LocationStore.sync``), so that a
        registered device is not answered 404 or 480 (RFC 3261 16.5: the
        location service's bindings at the time of the request).
        """
        try:
            if request.method in ("ACK", "CANCEL", "REGISTER") or request.to.tag is not None:
                return None
            uri = request.uri
        except MessageError:
            return None
        if not isinstance(uri, SipURI) or uri.user is None or not self._names_us(uri):
            return None
        aor = address_of_record(uri)
        return None if self._locator.lookup(aor) else aor

    def handle_request(self, event: RequestReceived, now: float) -> None:
        """Process a new request (not ACK, not CANCEL, not REGISTER): answer it or
        forward it (RFC 3261 16.3 to 16.6).  A header it needs that is malformed is
        answered 400 (16.3 step 1).  The request is changed in place (received and
        rport in its top Via, our Route values and credentials removed): it is the
        template of the copies forwarded and of the responses made here."""
        request = event.request
        peer = _peer_of(event.source)
        top_via = request.via
        destination = response_peer(peer, top_via)
        try:
            self._route_request(request, peer, top_via, event.transaction_id, destination, now)
        except MessageError as error:
            status = error.status_hint or 400
            self._answer(
                event.transaction_id,
                request,
                destination,
                status,
                f"{reason_phrase(status)} - {error.reason}"[:200],
                (),
                now,
            )

    def _route_request(
        self,
        request: Request,
        peer: Peer,
        top_via: Via,
        transaction_id: TransactionId,
        destination: Peer,
        now: float,
    ) -> None:
        """RFC 3261 16.3 to 16.5; every header is read here, before anything is sent,
        so that a malformed one can still be answered 400."""
        method = request.method
        received_uri = request.uri_text  # 16.6 step 8: the Request-URI before 16.4

        def refuse(refusal: Refusal, headers: Iterable[tuple[str, object]] = ()) -> None:
            self._answer(
                transaction_id, request, destination, refusal.status, refusal.reason, headers, now
            )

        # RFC 3261 18.2.1, RFC 3581 4: note where the request came from, so that the
        # responses pass the client's NAT.
        self._stamp_top_via(request, top_via, peer)

        # 16.3 step 2: a scheme we cannot route.
        uri = request.uri
        if not isinstance(uri, SipURI):
            refuse(Refusal.UNSUPPORTED_SCHEME)
            return

        # 16.3 step 3: Max-Forwards; an OPTIONS to the server itself may be answered.
        max_forwards = request.max_forwards
        if max_forwards == 0:
            if method == "OPTIONS" and self._addresses_server(uri) and not request.has("route"):
                self._answer_options(transaction_id, request, destination, now)
            else:
                refuse(Refusal.TOO_MANY_HOPS)
            return

        # 16.3 step 4 (mandatory when forking, RFC 5393): a Via of ours carrying the
        # hash this request has now is a loop.
        loop_key = self._loop_key(request, received_uri)
        if self._looped(request, loop_key):
            refuse(Refusal.LOOP_DETECTED)
            return

        # 16.3 step 5: we support no Proxy-Require extension.
        required = request.proxy_require
        if required:
            refuse(Refusal.BAD_EXTENSION, [("Unsupported", ", ".join(required))])
            return

        in_dialog = request.to.tag is not None
        from_uri = request.from_.uri
        breadth_received = _max_breadth(request)

        # 16.4: route information preprocessing.
        last_own = self._preprocess_routes(request)
        routed = last_own is not None
        uri = request.uri
        if not isinstance(uri, SipURI):  # a strict router's last Route value
            refuse(Refusal.UNSUPPORTED_SCHEME)
            return
        has_route = request.has("route")
        to_server = not has_route and self._addresses_server(uri)

        # 16.3 step 6, RFC 3261 22.3: our users prove who they are, except in
        # requests within a dialog (which was authenticated when it was created) and
        # requests the server answers itself.  ACK and CANCEL never come here (22.1).
        from_domain = None
        if isinstance(from_uri, SipURI) and from_uri.host.lower() in self._domains:
            from_domain = from_uri.host.lower()
        authenticated = from_domain is not None
        authenticator = self._authenticator
        if authenticator is not None:
            authenticated = False
            if from_domain is not None and not in_dialog and not to_server:
                outcome = authenticator.check(request, realm=from_domain, proxy=True, now=now)
                if not outcome.ok:
                    self._answer(
                        transaction_id,
                        request,
                        destination,
                        outcome.status or 407,
                        outcome.reason,
                        outcome.challenges,
                        now,
                    )
                    return
                assert isinstance(from_uri, SipURI)
                if outcome.user is None or not _same_user(
                    outcome.user, address_of_record(from_uri)
                ):
                    authenticator.counters.failures[403, "forbidden_sender"] += 1
                    refuse(Refusal.FORBIDDEN_SENDER)
                    return
                authenticated = True
        self._remove_own_credentials(request)

        # 16.5: determining the targets.
        targets: list[Target]
        if has_route:
            # Loose routing: the Request-URI is the target, the first Route the next
            # hop (16.6 steps 6 and 7).
            if not (authenticated or (in_dialog and routed)):
                refuse(Refusal.RELAY_DENIED)
                return
            hop = self._resolve(request.routes[0].uri, peer)
            if isinstance(hop, Refusal):
                refuse(hop)
                return
            targets = [Target(None, hop.peer, hop.socket)]
        elif to_server:
            # The request is for the server itself: answer it as a UAS.
            if method == "OPTIONS":
                self._answer_options(transaction_id, request, destination, now)
            else:
                refuse(Refusal.METHOD_NOT_ALLOWED, [("Allow", _SERVER_METHODS)])
            return
        elif not in_dialog and uri.user is not None and self._names_us(uri):
            # One of our users: the location service (16.5).
            aor = address_of_record(uri)
            bindings = self._locator.lookup(aor)
            if not bindings:
                refuse(
                    Refusal.TEMPORARILY_UNAVAILABLE if self._known_user(aor) else Refusal.NOT_FOUND
                )
                return
            if method == "INVITE" and self._config.mode is ProxyMode.REDIRECT:
                self._redirect(transaction_id, request, destination, bindings, now)
                return
            targets = [
                target
                for target in (self._binding_target(binding, peer) for binding in bindings)
                if target is not None
            ]
            if not targets:
                refuse(Refusal.TEMPORARILY_UNAVAILABLE)
                return
        else:
            # A foreign Request-URI, or a mid-dialog request to its remote target
            # (through the device's flow when our Record-Route named one).
            if not (authenticated or (in_dialog and routed)):
                refuse(Refusal.RELAY_DENIED)
                return
            flow = self._flow_hop(last_own, peer) if in_dialog else None
            if flow is not None:
                targets = [Target(None, flow.peer, flow.socket, flow=True)]
            else:
                hop = self._resolve(uri, peer)
                if isinstance(hop, Refusal):
                    refuse(hop)
                    return
                targets = [Target(None, hop.peer, hop.socket)]

        # RFC 5393: the parallel branches allowed per wave.
        breadth = self._config.max_breadth
        if breadth_received is not None:
            breadth = min(breadth, breadth_received)
        waves = self._waves(targets)
        if breadth == 0 and len(waves[0]) > 1:
            refuse(Refusal.MAX_BREADTH_EXCEEDED)
            return

        # 16.6 step 4: dialog-creating requests are record-routed; a caller over TCP
        # or behind a NAT is reached through its flow (see the module docstring).
        record_route = (method in _DIALOG_CREATING and not in_dialog) or method == "NOTIFY"
        incoming_flow = None
        if record_route and (
            peer.reliable
            or top_via.host.strip("[]").lower() != peer.host.lower()
            or top_via.sent_by[1] != peer.port
        ):
            incoming_flow = self._flow_token(peer)
        plan = ForwardingPlan(
            template=request.copy(),
            incoming=peer,
            incoming_flow=incoming_flow,
            loop_hash=_loop_hash(loop_key, top_via),
            max_forwards=_DEFAULT_MAX_FORWARDS if max_forwards is None else max_forwards - 1,
            breadth=breadth,
            record_route=record_route,
        )
        context = ResponseContext(transaction_id, request, destination, waves, plan)
        self._contexts[transaction_id] = context
        self._advance(context, now)

    # ------------------------------------------------------------ 16.3 and 16.4

    def _stamp_top_via(self, request: Request, top_via: Via, peer: Peer) -> None:
        """RFC 3261 18.2.1: ``received`` when sent-by is not the source address;
        RFC 3581 4: with ``rport``, ``received`` always and the source port."""
        fill_rport = top_via.has_rport and top_via.rport is None
        add_received = (
            top_via.has_rport or top_via.host.strip("[]").lower() != peer.host.lower()
        ) and top_via.received != peer.host
        if not (fill_rport or add_received):
            return
        # The common shapes are edited as text (no re-serialization of the Via):
        # ";rport" once, at the end or before another parameter, and no received.
        text = request.values("via")[0]
        lowered = text.lower()
        start = lowered.find(";rport")
        end = start + 6
        if top_via.received is None and (
            not fill_rport
            or (
                start >= 0 and lowered[end : end + 1] in ("", ";") and ";rport" not in lowered[end:]
            )
        ):
            if fill_rport:
                text = f"{text[:end]}={peer.port}{text[end:]}"
            request.replace_first("Via", f"{text};received={peer.host}")
            return
        via = top_via.with_param("rport", str(peer.port)) if fill_rport else top_via
        request.replace_first("Via", str(via.with_param("received", peer.host)))

    def _names_us(self, uri: SipURI) -> bool:
        """Whether the host of ``uri`` is one of our domains or of our sockets."""
        return uri.host.lower() in self._domains or self._sockets.is_own_address(uri.host, uri.port)

    def _addresses_server(self, uri: SipURI) -> bool:
        """Whether ``uri`` names the server itself: no user part, and our host.

        With a port, the port must be one of ours too: a domain of ours may be an
        address (``sip:127.0.0.1`` for a node on 127.0.0.1), and a device's
        contact on that address at another port (``sip:127.0.0.1:5070``, the
        remote target of an in-dialog request, RFC 3261 12.2.1.1) is not us.
        """
        if uri.user is not None:
            return False
        if uri.port is None:
            return self._names_us(uri)
        return self._sockets.is_own_address(uri.host, uri.port) or (
            uri.host.lower() in self._domains and self._sockets.is_own_port(uri.port)
        )

    def _is_own_via(self, via: Via) -> bool:
        branch = via.branch
        return (
            branch is not None
            and branch.startswith(_COOKIE_DASH)
            and self._sockets.is_own_address(via.host, via.port)
        )

    def _loop_key(self, request: Request, received_uri: str) -> str:
        """The request's part of the 16.6 step 8 hash (see the module docstring)."""
        parts = [
            request.to.tag or "",
            request.from_.tag or "",
            request.call_id,
            received_uri,
            str(request.cseq.number),
        ]
        if request.has("proxy-require"):
            parts.append(", ".join(request.get_all("proxy-require")))
        if request.has("proxy-authorization"):
            texts = request.get_all("proxy-authorization")
            for text, credentials in zip(texts, request.proxy_authorization, strict=True):
                if (credentials.get("realm") or "").lower() not in self._domains:
                    parts.append(text)
        return "\x00".join(parts)

    def _looped(self, request: Request, loop_key: str) -> bool:
        """RFC 3261 16.3 step 4: whether a Via of ours carries the hash this request
        has now (a loop) rather than another one (a spiral)."""
        texts = request.values("via")
        for index in range(len(texts) - 1):
            text = texts[index]
            if _COOKIE_DASH not in text:
                continue  # cheap filter: every branch of ours has it
            try:
                via = parse_via(text)
                upstream = parse_via(texts[index + 1])
            except RemoteProtocolError:
                continue
            if not self._is_own_via(via):
                continue
            carried = (via.branch or "").rpartition(".")[2]
            if carried == _loop_hash(loop_key, upstream):
                return True
        return False

    def _preprocess_routes(self, request: Request) -> SipURI | None:
        """RFC 3261 16.4 (with RFC 5658): undo a strict router's rewrite, then remove
        every Route value naming us at the top.  Returns the last value of ours
        removed (or the Request-URI a strict router wrote), None when the request did
        not reach us through a route set."""
        uri = request.uri
        if isinstance(uri, SipURI) and uri.maddr is not None:
            self._strip_own_maddr(request, uri)
        if not request.has("route"):
            return None
        routes = request.routes
        last_own: SipURI | None = None
        uri = request.uri
        if (
            isinstance(uri, SipURI)
            and uri.user is None
            and self._sockets.is_own_address(uri.host, uri.port)
        ):
            # 16.4: the Request-URI is a Record-Route value of ours, so the previous
            # hop is a strict router: the real Request-URI is the last Route value.
            request.uri = routes[-1].uri
            routes = routes[:-1]
            _rewrite_routes(request, routes)
            last_own = uri
        for route in routes:
            own = route.uri
            if not isinstance(own, SipURI) or not self._names_us(own):
                break
            # 16.4: the first Route value is ours; RFC 5658: so may the next one be.
            request.pop_first("Route")
            last_own = own
        return last_own

    def _strip_own_maddr(self, request: Request, uri: SipURI) -> None:
        # 16.4: a maddr naming us is removed, with the port and transport.
        maddr = uri.maddr or ""
        if maddr.lower() in self._domains or self._sockets.is_own_address(maddr, uri.port):
            request.uri = uri.without_params("maddr", "transport")._replace(port=None)

    def _remove_own_credentials(self, request: Request) -> None:
        """RFC 3261 22.3: credentials for our realms are not forwarded."""
        if not request.has("proxy-authorization"):
            return
        texts = request.get_all("proxy-authorization")
        kept = [
            text
            for text, credentials in zip(texts, request.proxy_authorization, strict=True)
            if (credentials.get("realm") or "").lower() not in self._domains
        ]
        if len(kept) != len(texts):
            request.remove("Proxy-Authorization")
            for text in kept:
                request.add("Proxy-Authorization", text)

    # ------------------------------------------------------------------ flows

    def _flow_token(self, peer: Peer) -> str:
        """``peer`` as a Record-Route parameter value: its fields, base64url, and a
        keyed hash so that nobody can make us send into someone else's flow."""
        token = self._flow_tokens.get(peer)
        if token is None:
            token = self._make_flow_token(peer)
            if len(self._flow_tokens) >= _FLOW_MEMO:  # bounded: peers come from the network
                self._flow_tokens.clear()
            self._flow_tokens[peer] = token
            self._remember_flow(token, peer)
        return token

    def _remember_flow(self, token: str, peer: Peer) -> None:
        # Only tokens with a valid keyed hash get here: nobody else can fill it.
        peers = self._flow_peers
        if len(peers) >= _FLOW_MEMO:
            peers.popitem(last=False)  # the oldest entry, in O(1)
        peers[token] = peer

    def _make_flow_token(self, peer: Peer) -> str:
        connection = "" if peer.connection_id is None else str(peer.connection_id)
        transport = _TRANSPORT_LETTERS.get(peer.transport, peer.transport)
        text = f"{peer.lb_id}~{peer.socket_id}~{transport}~{peer.host}~{peer.port}~{connection}"
        data = text.encode("utf-8", "surrogateescape")
        encoded = base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
        return f"{encoded}.{self._flow_mac(data)}"

    def _flow_mac(self, data: bytes) -> str:
        return hashlib.blake2b(data, digest_size=6, key=self._flow_key).hexdigest()

    def _flow_hop(self, last_own: SipURI | None, source: Peer) -> _Hop | None:
        """The flow named by the Record-Route value a request came through, when it is
        ours, its socket still exists and the request does not come from it."""
        if last_own is None:
            return None
        token = last_own.param(_FLOW_PARAM)
        if not token:
            return None
        peer = self._flow_peers.get(token)
        if peer is None:
            peer = self._decode_flow_token(token)
            if peer is None:
                return None
            self._remember_flow(token, peer)
        if (peer.transport, peer.host, peer.port) == (source.transport, source.host, source.port):
            return None  # the request comes from that side: it goes the other way
        socket = self._sockets.socket(peer.lb_id, peer.socket_id)
        if socket is None or socket.transport != peer.transport:
            return None
        return _Hop(peer, socket)

    def _decode_flow_token(self, token: str) -> Peer | None:
        """The flow a token names, or None when it is not one of ours (its keyed
        hash does not verify) or is malformed."""
        encoded, _, mac = token.rpartition(".")
        try:
            data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except ValueError:
            return None
        expected = self._flow_mac(data).encode("ascii")
        if not hmac.compare_digest(mac.encode("utf-8", "surrogateescape"), expected):
            return None
        fields = data.decode("utf-8", "surrogateescape").split("~")
        if len(fields) != 6 or not fields[1].isdigit() or not fields[4].isdigit():
            return None
        lb_id, socket_id, letter, host, port, connection = fields
        transport = _LETTER_TRANSPORTS.get(letter, letter)
        return Peer(
            lb_id,
            int(socket_id),
            transport,
            host,
            int(port),
            int(connection) if connection.isdigit() else None,
        )

    # ------------------------------------------------------------------ 16.5

    def _resolve(self, uri: URI, preferred: Peer) -> _Hop | Refusal:
        """The next hop for a Route or Request-URI: an IP address (maddr first), the
        port (5060 by default) and the transport parameter (UDP by default), through
        a socket of ours, the one ``preferred`` came in on when it fits."""
        if not isinstance(uri, SipURI):
            return Refusal.UNSUPPORTED_SCHEME
        transport = uri.transport or "udp"
        if uri.secure or transport not in ("udp", "tcp"):
            return Refusal.UNSUPPORTED_TRANSPORT  # no TLS, SCTP or WebSocket here
        host = (uri.maddr or uri.host).strip("[]")
        address = _ip_address(host)
        if address is None:
            return Refusal.UNRESOLVABLE  # no DNS in the core
        if _forbidden_address(address):
            return Refusal.FORBIDDEN_DESTINATION
        choice = self._sockets.choose(transport, host, preferred)
        if choice is None:
            return Refusal.NO_SOCKET
        lb_id, socket = choice
        port = uri.port if uri.port is not None else 5060
        return _Hop(Peer(lb_id, socket.id, transport, host, port), socket)

    def _binding_target(self, binding: Binding, incoming: Peer) -> Target | None:
        """Where to reach one binding: through its registration flow when that socket
        still exists, else by its first Path value or its contact address; None when
        it cannot be reached."""
        try:
            uri = parse_uri(binding.uri)
        except RemoteProtocolError:
            return None
        q = 1.0 if binding.q is None else binding.q
        path = tuple(binding.path)
        received = binding.received
        if received is not None:
            socket = self._sockets.socket(received.lb_id, received.socket_id)
            if socket is not None and socket.transport == received.transport:
                return Target(uri, received, socket, path, q, flow=True)
        try:
            next_uri = parse_name_addr(path[0], "Path").uri if path else uri
        except RemoteProtocolError:
            return None
        hop = self._resolve(next_uri, incoming)
        if isinstance(hop, Refusal):
            return None
        return Target(uri, hop.peer, hop.socket, path, q)

    def _waves(self, targets: list[Target]) -> list[tuple[Target, ...]]:
        """Order the targets by decreasing q (stable: the location's order otherwise);
        one wave for parallel forking, one per q-value for serial forking."""
        if len(targets) == 1:
            return [(targets[0],)]
        ordered = sorted(targets, key=lambda target: -target.q)
        if self._config.forking is ForkingMode.PARALLEL:
            return [tuple(ordered)]
        return [tuple(group) for _, group in itertools.groupby(ordered, key=lambda t: t.q)]

    # ------------------------------------------------------------ local answers

    def _answer(
        self,
        transaction_id: TransactionId,
        request: Request,
        destination: Peer,
        status: int,
        reason: str | None,
        headers: Iterable[tuple[str, object]],
        now: float,
    ) -> None:
        """Answer a request ourselves (a UAS response, RFC 3261 8.2.6), with a To tag."""
        response = make_response(request, status, reason, to_tag=self._tokens(), headers=headers)
        self._layer.send_response(transaction_id, response, now, destination=destination)

    def _answer_options(
        self, transaction_id: TransactionId, request: Request, destination: Peer, now: float
    ) -> None:
        # RFC 3261 11.2: what the server itself accepts.
        headers = [
            ("Allow", _SERVER_METHODS),
            ("Accept", "application/sdp"),
            ("Supported", ", ".join(self._config.supported)),
        ]
        self._answer(transaction_id, request, destination, 200, None, headers, now)

    def _redirect(
        self,
        transaction_id: TransactionId,
        request: Request,
        destination: Peer,
        bindings: Sequence[Binding],
        now: float,
    ) -> None:
        # RFC 3261 8.3, 21.3.3: every binding as a Contact, with its q-value.
        headers = [
            (
                "Contact",
                f"<{binding.uri}>"
                if binding.q is None
                else f"<{binding.uri}>;q={_format_q(binding.q)}",
            )
            for binding in bindings
        ]
        self._answer(transaction_id, request, destination, 302, None, headers, now)

    # --------------------------------------------------------- 16.6 forwarding

    def _advance(self, context: ResponseContext, now: float) -> None:
        """Start the next wave when every branch so far has failed; send the best
        final response when nothing is left to try (RFC 3261 16.7 steps 4 and 6)."""
        while not context.final_sent:
            if any(branch.pending for branch in context.branches):
                return
            if context.waves and not context.forking_stopped:
                self._start_wave(context, now)
                continue
            assert context.request is not None  # settled only after the final response
            response = best_response(context.request, context.responses, self._tokens())
            self._send_final(context, response, now)
        context.settle()

    def _start_wave(self, context: ResponseContext, now: float) -> None:
        wave = context.waves.pop(0)
        plan = context.plan
        # Not settled: no final response was sent yet.
        assert plan is not None
        assert context.request is not None
        if len(wave) == 1:
            # One branch is not forking: it carries the whole Max-Breadth.
            self._start_branch(context, wave[0], plan.breadth, now)
            return
        if plan.breadth == 0:
            # RFC 5393: no parallel branch is allowed; the wave fails as a 440.
            context.responses.append(make_response(context.request, 440, to_tag=self._tokens()))
            return
        # RFC 5393: never more parallel branches than Max-Breadth, which they share.
        wave = wave[: plan.breadth]
        for target, share in zip(wave, _share(plan.breadth, len(wave)), strict=True):
            self._start_branch(context, target, share, now)

    def _start_branch(
        self, context: ResponseContext, target: Target, breadth: int, now: float
    ) -> None:
        """Forward one copy of the request to ``target`` (RFC 3261 16.6)."""
        plan = context.plan
        assert plan is not None  # not settled: no final response yet
        # 16.6 step 1: a copy of the request, as processed by 16.3 and 16.4.
        copy = plan.template.copy()
        # 16.6 step 2: the Request-URI becomes the target.
        if target.uri is not None:
            copy.uri = target.uri
        # 16.6 step 3 (70 when absent); RFC 5393 Max-Breadth.
        copy.set("Max-Forwards", plan.max_forwards)
        copy.set("Max-Breadth", breadth)
        # RFC 3327 5.3: the binding's Path values become its Route set.
        if target.path:
            copy.prepend("Route", ", ".join(target.path))
        # 16.6 step 4: stay on the path of the dialog.
        if plan.record_route:
            self._record_route(copy, plan, target)
        # 16.6 step 6: a strict router as the next hop.
        if copy.has("route"):
            _strict_route_fixup(copy)
        # 16.6 step 8: our Via; the branch routes the responses back to this worker
        # (cluster.ring) and ends with the loop hash (16.3 step 4).
        socket = target.socket
        branch_id = f"{self._branch_prefix}{self._tokens()}.{plan.loop_hash}"
        copy.prepend(
            "Via",
            f"SIP/2.0/{socket.transport.upper()} {socket.advertised};branch={branch_id};rport",
        )
        # 16.6 step 9: stream transports need Content-Length.
        if not copy.has("content-length"):
            copy.set("Content-Length", len(copy.body))
        # 16.6 steps 10 and 11: a new client transaction, with Timer C for an INVITE.
        destination = target.destination
        transaction_id = self._layer.send_request(
            copy,
            destination,
            reliable=destination.reliable,
            now=now,
            timer_c=context.invite and self._config.timer_c,
        )
        branch = Branch(context, transaction_id, copy, destination)
        context.branches.append(branch)
        context.live_branches += 1
        self._branches[transaction_id] = branch

    def _record_route(self, request: Request, plan: ForwardingPlan, target: Target) -> None:
        """16.6 step 4: our Record-Route; RFC 5658: when the request leaves through
        another socket than it came in on, a second value, so that each side of the
        dialog reaches us at the address it knows.  The topmost value names the
        socket facing the next hop.  A value facing a device reached through a flow
        names the flow (see the module docstring); a caller with a flow always
        gets a value of its own."""
        outgoing = target.socket
        incoming = plan.incoming
        outgoing_flow = self._flow_token(target.destination) if target.flow else None
        arrival = self._sockets.socket(incoming.lb_id, incoming.socket_id)
        other_socket = arrival is not None and (incoming.lb_id, incoming.socket_id) != (
            target.destination.lb_id,
            outgoing.id,
        )
        if other_socket or plan.incoming_flow is not None:
            request.prepend(
                "Record-Route", _record_route_value(arrival or outgoing, plan.incoming_flow)
            )
        request.prepend("Record-Route", _record_route_value(outgoing, outgoing_flow))

    # ---------------------------------------------------------------- 16.7

    def _handle_response(self, event: ResponseReceived, now: float) -> None:
        branch = self._branches.get(event.transaction_id)
        if branch is None:
            return  # a response to one of our CANCELs, or to nothing of ours
        context = branch.context
        response = event.response
        status = response.status
        # 16.7 step 3: our Via goes; what is left routes the response upstream.
        response.pop_first("Via")
        if not response.has("via"):
            if status < 200 or context.request is None:
                # A settled context sent its final response: nothing to stand in for.
                return
            # Downstream lost the upstream Vias: stand in with our own response.
            response = make_response(
                context.request, status, response.reason, to_tag=self._tokens()
            )
        if status < 200:
            self._provisional(branch, response, now)
        elif status < 300:
            self._success(branch, response, now)
        elif branch.pending:
            self._complete(branch, response, now)

    def _provisional(self, branch: Branch, response: Response, now: float) -> None:
        if branch.state is BranchState.TRYING:
            branch.state = BranchState.PROCEEDING
        if branch.cancel is CancelState.AWAITING_PROVISIONAL and branch.pending:
            # RFC 3261 9.1: the CANCEL waited for a provisional response.
            self._send_cancel(branch, now)
        context = branch.context
        # 16.7 step 5: provisional responses go upstream at once, except 100.
        if response.status != 100 and not context.final_sent and context.server_alive:
            self._layer.send_response(
                context.server_transaction_id,
                response,
                now,
                destination=context.response_destination,
            )

    def _success(self, branch: Branch, response: Response, now: float) -> None:
        context = branch.context
        branch.state = BranchState.COMPLETED
        final = context.final_status
        if context.invite:
            # 16.7 step 5: every 2xx to an INVITE goes upstream, even after another
            # final response (then statelessly: RFC 6026 7.1 allows no more on the
            # server transaction).
            if context.server_alive and (final is None or 200 <= final < 300):
                self._layer.send_response(
                    context.server_transaction_id,
                    response,
                    now,
                    destination=context.response_destination,
                )
            else:
                self._layer.send_stateless(response, context.response_destination)
            if final is None:
                context.final_status = response.status
            # 16.7 step 10: the other branches are CANCELled.
            context.forking_stopped = True
            self._cancel_pending(context, now)
        elif final is None:
            # A non-INVITE request has one final response: the first 2xx.
            if context.server_alive:
                self._layer.send_response(
                    context.server_transaction_id,
                    response,
                    now,
                    destination=context.response_destination,
                )
            context.final_status = response.status
            context.forking_stopped = True
        context.settle()

    def _complete(self, branch: Branch, response: Response, now: float) -> None:
        """A final response 300-699, received or stood in for, ends ``branch``."""
        branch.state = BranchState.COMPLETED
        context = branch.context
        context.responses.append(response)
        if response.status >= 600:
            # 16.7 step 5: a 6xx ends the search; the other branches are CANCELled and
            # the 6xx wins the choice of step 6.
            context.forking_stopped = True
            self._cancel_pending(context, now)
        self._advance(context, now)

    def _send_final(self, context: ResponseContext, response: Response, now: float) -> None:
        context.final_status = response.status
        if context.server_alive:
            self._layer.send_response(
                context.server_transaction_id,
                response,
                now,
                destination=context.response_destination,
            )

    def _stand_in(self, context: ResponseContext, status: int) -> Response:
        """A response the proxy makes for a branch that got none (408, 487, 503)."""
        assert context.request is not None  # a settled context has no pending branch
        return make_response(context.request, status, to_tag=self._tokens())

    # ------------------------------------------------------- 16.8, 16.9, 16.10

    def _cancel_pending(self, context: ResponseContext, now: float) -> None:
        """RFC 3261 16.10: CANCEL every branch still waiting for a final response;
        one without a provisional response is CANCELled when one comes (9.1)."""
        if not context.invite:
            return  # RFC 3261 9.1: a non-INVITE request is not CANCELled
        for branch in context.branches:
            if branch.pending and branch.live and branch.cancel is CancelState.NOT_REQUESTED:
                if branch.state is BranchState.PROCEEDING:
                    self._send_cancel(branch, now)
                else:
                    branch.cancel = CancelState.AWAITING_PROVISIONAL

    def _send_cancel(self, branch: Branch, now: float) -> None:
        # RFC 3261 9.1: built from the request as forwarded, sent where it went, on
        # a client transaction of its own.
        destination = branch.destination
        assert branch.request is not None  # only a pending branch is CANCELled
        transaction_id = self._layer.send_request(
            make_cancel(branch.request), destination, reliable=destination.reliable, now=now
        )
        self._cancels.add(transaction_id)
        branch.cancel = CancelState.SENT
        timers = self._timers
        heapq.heappush(timers, (now + self._cancel_wait, next(self._sequence), branch))
        if len(timers) > 1024 + 2 * len(self._branches):
            # Drop the entries of finished branches, in case the timer is not run.
            self._timers = [entry for entry in timers if entry[2].pending and entry[2].live]
            heapq.heapify(self._timers)

    def _abandon(self, branch: Branch, status: int, now: float) -> None:
        """End a branch without its final response (RFC 3261 9.1, 16.8); the context
        goes on as if ``status`` had been received."""
        try:
            self._layer.abandon_transaction(branch.transaction_id, now)
        except LocalProtocolError:
            return  # a final response or the transaction's end is already queued for us
        self._complete(branch, self._stand_in(branch.context, status), now)

    def _handle_cancel(self, event: CancelReceived, now: float) -> None:
        cancel = event.request
        try:
            destination = response_peer(_peer_of(event.source), cancel.via)
        except MessageError:
            return
        invite_id = event.invite_transaction_id
        if invite_id is None:
            refusal = Refusal.CALL_DOES_NOT_EXIST
            self._answer(
                event.transaction_id, cancel, destination, refusal.status, refusal.reason, (), now
            )
            return
        # 16.10: the proxy answers the CANCEL itself ...
        self._answer(event.transaction_id, cancel, destination, 200, None, (), now)
        context = self._contexts.get(invite_id)
        if context is None or context.final_sent:
            return
        # ... CANCELs every pending branch, and the INVITE gets its final response
        # from the branches (487 Request Terminated).
        context.cancelled = True
        context.forking_stopped = True
        self._cancel_pending(context, now)
        self._advance(context, now)

    def _handle_timer_c(self, event: TimerCFired, now: float) -> None:
        branch = self._branches.get(event.transaction_id)
        if branch is None or not branch.pending:
            return
        if branch.state is BranchState.PROCEEDING and branch.cancel is CancelState.NOT_REQUESTED:
            # 16.8: a branch that had a provisional response is CANCELled ...
            self._send_cancel(branch, now)
        else:
            # ... one that had none counts as a 408 (or as the 487 a CANCELled one
            # would have sent).
            self._abandon(branch, 408 if branch.cancel is CancelState.NOT_REQUESTED else 487, now)

    def _handle_timeout(self, event: TransactionTimedOut, now: float) -> None:
        branch = self._branches.get(event.transaction_id)
        if branch is None or not branch.pending:
            return
        # 16.7 step 6: a branch that timed out counts as a 408; a CANCELled one that
        # never answered (9.1) as the 487 it would have sent.
        status = 408 if branch.cancel is CancelState.NOT_REQUESTED else 487
        self._complete(branch, self._stand_in(branch.context, status), now)

    def _handle_transport_failure(self, event: TransportFailed, now: float) -> None:
        transaction_id = event.transaction_id
        branch = self._branches.get(transaction_id)
        if branch is not None:
            if branch.pending:
                # 16.9: as if the branch had received a 503.
                self._complete(branch, self._stand_in(branch.context, 503), now)
            return
        context = self._contexts.get(transaction_id)
        if context is not None and not context.final_sent:
            # The client cannot be reached any more: stop looking for the callee.
            context.forking_stopped = True
            self._cancel_pending(context, now)

    def _handle_terminated(self, event: TransactionTerminated, now: float) -> None:
        transaction_id = event.transaction_id
        branch = self._branches.pop(transaction_id, None)
        if branch is not None:
            branch.live = False
            context = branch.context
            context.live_branches -= 1
            if branch.pending:
                # Every way a client transaction ends reaches us first; just in case.
                self._complete(branch, self._stand_in(context, 408), now)
            if context.discardable:
                self._contexts.pop(context.server_transaction_id, None)
            return
        if transaction_id in self._cancels:
            self._cancels.discard(transaction_id)
            return
        server_context = self._contexts.get(transaction_id)
        if server_context is not None:
            server_context.server_alive = False
            if not server_context.final_sent:
                server_context.forking_stopped = True
                self._cancel_pending(server_context, now)
            if server_context.discardable:
                del self._contexts[transaction_id]

    # ------------------------------------------------- stateless forwarding

    def _handle_ack(self, event: AckReceived, now: float) -> None:
        """The ACK to a 2xx (RFC 3261 13.2.2.4): a transaction of its own, forwarded
        statelessly along the dialog's route set (16.11 for the branch)."""
        ack = event.request
        peer = _peer_of(event.source)
        try:
            max_forwards = ack.max_forwards
            if max_forwards == 0:
                return  # 16.3 step 3; an ACK is never answered
            top_via = ack.via
            received_uri = ack.uri_text
            self._stamp_top_via(ack, top_via, peer)
            # We record-route every dialog, so the ACK to a 2xx reaches us through a
            # Route naming us; any other ACK is not ours to relay.
            last_own = self._preprocess_routes(ack)
            if last_own is None:
                return
            if ack.has("route"):
                hop: _Hop | Refusal | None = self._resolve(_strict_route_fixup(ack), peer)
            else:
                hop = self._flow_hop(last_own, peer) or self._resolve(ack.uri, peer)
        except MessageError:
            return
        if not isinstance(hop, _Hop):
            return
        ack.set("Max-Forwards", _DEFAULT_MAX_FORWARDS if max_forwards is None else max_forwards - 1)
        # 16.11: a stateless branch is the same for each retransmission of the ACK.
        host, port = top_via.sent_by
        branch_id = (
            self._branch_prefix
            + "ack"
            + _digest(f"{top_via.branch}\x00{host}\x00{port}\x00{received_uri}")
        )
        socket = hop.socket
        ack.prepend(
            "Via",
            f"SIP/2.0/{socket.transport.upper()} {socket.advertised};branch={branch_id};rport",
        )
        self._layer.send_stateless(ack, hop.peer)

    def _handle_stray_response(self, event: StrayResponseReceived, now: float) -> None:
        """A response that matched no client transaction: a 2xx to an INVITE whose top
        Via is ours (the INVITE transaction ended) goes on statelessly (RFC 3261 16.7,
        RFC 6026 8.4); anything else is dropped."""
        response = event.response
        try:
            if not 200 <= response.status < 300 or response.cseq.method != "INVITE":
                return
            texts = response.values("via")
            if len(texts) < 2 or not self._is_own_via(parse_via(texts[0])):
                return
            upstream = parse_via(texts[1])
        except RemoteProtocolError:
            return
        destination = self._via_destination(upstream)
        if destination is None:
            return
        response.pop_first("Via")
        self._layer.send_stateless(response, destination)

    def _via_destination(self, via: Via) -> Peer | None:
        """Where a response goes by its (new) top Via: RFC 3261 18.2.2 (maddr, then
        received, then sent-by) with RFC 3581 (rport); an IP address only, never a
        broadcast or multicast one (RFC 4475 "bcast")."""
        transport = via.transport.lower()
        if transport not in ("udp", "tcp"):
            return None
        maddr = via.maddr
        if maddr:
            host = maddr
            port = via.port if via.port is not None else 5060
        else:
            host = via.received or via.host
            port = via.rport or (via.port if via.port is not None else 5060)
        host = host.strip("[]")
        address = _ip_address(host)
        if address is None or _forbidden_address(address):
            return None
        choice = self._sockets.choose(transport, host)
        if choice is None:
            return None
        lb_id, socket = choice
        return Peer(lb_id, socket.id, transport, host, port)


def _record_route_value(socket: LBSocket, flow: str | None = None) -> str:
    """Our Record-Route URI for ``socket``: its advertised address, the transport when
    it is not UDP, loose routing (RFC 3261 16.6 step 4), the flow token if any."""
    transport = "" if socket.transport == "udp" else f";transport={socket.transport}"
    flow_param = "" if flow is None else f";{_FLOW_PARAM}={flow}"
    return f"<sip:{socket.advertised}{transport};lr{flow_param}>"
