"""Response contexts (RFC 3261 16.7): the branches of one proxied request, and the
choice of the final response that goes back upstream.

This module keeps the book; it sends nothing.  ``worker/proxy.py`` creates one
``ResponseContext`` per server transaction it forwards, one ``Branch`` per client
transaction it starts, and asks ``best_response`` which final response to return
when every branch has finished (16.7 step 6 and 7).

Forking is expressed as *waves*: the targets of one wave are tried in parallel, the
next wave starts only when every branch of the current one has failed.  Parallel
forking is a single wave; serial forking (RFC 3261 16.6, by decreasing q-value) is
one wave per distinct q-value, so that targets of equal q are tried in parallel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from cluster.membership import LBSocket
from sipcore import URI, MessageError, Request, Response, TransactionId, make_response

from .transport import Peer

__all__ = [
    "Branch",
    "BranchState",
    "CancelState",
    "ForwardingPlan",
    "ResponseContext",
    "Target",
    "best_response",
]


class BranchState(Enum):
    """Where a branch (one client transaction of a response context) stands."""

    TRYING = "forwarded, nothing received yet"
    PROCEEDING = "a provisional response was received"
    COMPLETED = "a final response was received, or stood in for (timeout, transport error)"


class CancelState(Enum):
    """Whether a branch is being CANCELled (RFC 3261 9.1, 16.10)."""

    NOT_REQUESTED = "not cancelled"
    AWAITING_PROVISIONAL = "to be CANCELled once a provisional response arrives (9.1)"
    SENT = "the CANCEL was sent"


@dataclass(frozen=True, slots=True)
class Target:
    """Where one branch goes: the Request-URI, the next hop and the socket to use."""

    uri: URI | None
    """The new Request-URI (a contact from the location service), or None to keep
    the request's (RFC 3261 16.5: a foreign or routed Request-URI is the target)."""
    destination: Peer
    """The next hop: a binding's registration flow, or a Route / Request-URI address."""
    socket: LBSocket
    """The load balancer socket the request leaves from: its advertised address goes
    into Via and Record-Route."""
    path: tuple[str, ...] = ()
    """The binding's Path values, which become Route values (RFC 3327 5.3)."""
    q: float = 1.0
    """The binding's q-value (1.0 when it gave none), for the forking order."""
    flow: bool = False
    """Whether ``destination`` is a registration's flow (named in Record-Route)."""


@dataclass(frozen=True, slots=True)
class ForwardingPlan:
    """What every branch of one response context shares (RFC 3261 16.6)."""

    template: Request
    """A snapshot of the request after 16.3 and 16.4: each branch changes a copy of
    it (``Request.copy`` shares the values already parsed; parsing the serialized
    request again for each branch cost about 19 us per call, py-spy)."""
    incoming: Peer
    """Where the request came from (its socket gets the second Record-Route)."""
    incoming_flow: str | None
    """The caller's flow token when it is reached only through that flow (TCP, NAT),
    for a Record-Route value of its own; None otherwise."""
    loop_hash: str
    """The 16.6 step 8 hash, carried at the end of each branch (16.3 step 4)."""
    max_forwards: int
    """Max-Forwards of the copies (RFC 3261 16.6 step 3)."""
    breadth: int
    """The parallel branches allowed per wave, and the Max-Breadth they share
    (RFC 5393); a lone branch carries it whole."""
    record_route: bool
    """Whether the copies get Record-Route (16.6 step 4)."""


class Branch:
    """One client transaction of a response context."""

    __slots__ = (
        "cancel",
        "context",
        "destination",
        "live",
        "request",
        "state",
        "transaction_id",
    )

    def __init__(
        self,
        context: ResponseContext,
        transaction_id: TransactionId,
        request: Request,
        destination: Peer,
    ) -> None:
        self.context = context
        self.transaction_id = transaction_id
        self.request: Request | None = request
        """The request as forwarded (a CANCEL is built from it, RFC 3261 9.1); None
        once the context settled."""
        self.destination = destination
        self.state = BranchState.TRYING
        self.cancel = CancelState.NOT_REQUESTED
        self.live = True
        """False once the client transaction terminated."""

    @property
    def pending(self) -> bool:
        """Whether the branch still waits for a final response."""
        return self.state is not BranchState.COMPLETED


class ResponseContext:
    """Everything a stateful proxy keeps for one server transaction (RFC 3261 16.7)."""

    __slots__ = (
        "branches",
        "cancelled",
        "final_status",
        "forking_stopped",
        "invite",
        "live_branches",
        "plan",
        "request",
        "response_destination",
        "responses",
        "server_alive",
        "server_transaction_id",
        "waves",
    )

    def __init__(
        self,
        server_transaction_id: TransactionId,
        request: Request,
        response_destination: Peer,
        waves: Iterable[Sequence[Target]],
        plan: ForwardingPlan,
    ) -> None:
        self.server_transaction_id = server_transaction_id
        self.plan: ForwardingPlan | None = plan
        """How branches are made; None once settled."""
        self.request: Request | None = request
        """The request as received (top Via with received/rport): the template of the
        responses the proxy makes itself (408, 487, 500 ...); None once settled."""
        self.response_destination = response_destination
        """Where responses go (RFC 3261 18.2.2, RFC 3581)."""
        self.invite = request.method == "INVITE"
        # A list: one wave is the rule, and an empty deque alone takes some 600 bytes.
        self.waves: list[Sequence[Target]] = list(waves)
        """Target waves not started yet (serial forking), the next first."""
        self.branches: list[Branch] = []
        self.responses: list[Response] = []
        """Final responses 300-699 kept for the choice of 16.7 step 6, in arrival order."""
        self.final_status: int | None = None
        """The status of the final response sent upstream, None while none was."""
        self.cancelled = False
        """A CANCEL for the request was received (RFC 3261 16.10)."""
        self.forking_stopped = False
        """No new branch may start: a 2xx, a 6xx (16.7 step 5) or a CANCEL arrived."""
        self.server_alive = True
        """False once the server transaction terminated."""
        self.live_branches = 0

    @property
    def final_sent(self) -> bool:
        """Whether a final response was sent upstream."""
        return self.final_status is not None

    def pending_branches(self) -> list[Branch]:
        """The branches still waiting for a final response."""
        return [branch for branch in self.branches if branch.pending]

    @property
    def finished(self) -> bool:
        """Whether every branch has completed and no wave is left to start."""
        if any(branch.pending for branch in self.branches):
            return False
        return self.forking_stopped or not self.waves

    def settle(self) -> None:
        """Drop what only the choice of a final response needs, once that choice is
        over: the final response went upstream and no branch waits for one (RFC 3261
        16.7 steps 4 to 6; a CANCEL goes only to a pending branch, 9.1).  The
        context itself stays until its transactions end, for the 2xx
        retransmissions of RFC 6026 and the ACKs and CANCELs that name it, some
        32 s for an INVITE: without its parsed requests a call keeps a fraction
        of the memory.  Does nothing before that, or once settled."""
        if self.request is None or not self.final_sent:
            return
        if any(branch.pending for branch in self.branches):
            return
        self.request = None
        self.plan = None
        self.responses.clear()
        self.waves.clear()
        for branch in self.branches:
            branch.request = None

    @property
    def discardable(self) -> bool:
        """Whether nothing can use the context any more: the server transaction and
        every client transaction terminated."""
        return not self.server_alive and self.live_branches == 0


# RFC 3261 16.7 step 6: within the 4xx class, responses that tell the client how to
# resubmit the request are preferred.
_PREFERRED_4XX = (401, 407, 415, 420, 484)
_AUTHENTICATE_HEADERS = ("WWW-Authenticate", "Proxy-Authenticate")


def _choose(responses: Sequence[Response]) -> Response:
    """RFC 3261 16.7 step 6: a 6xx if any, else one of the lowest class, preferring
    401, 407, 415, 420 and 484 within the 4xx class, else the first received."""
    six = [response for response in responses if response.status >= 600]
    if six:
        return six[0]
    lowest = min(response.status // 100 for response in responses)
    candidates = [response for response in responses if response.status // 100 == lowest]
    if lowest == 4:
        for status in _PREFERRED_4XX:
            for response in candidates:
                if response.status == status:
                    return response
    return candidates[0]


def best_response(request: Request, responses: Sequence[Response], to_tag: str) -> Response:
    """The final response a proxy returns when every branch has finished.

    RFC 3261 16.7 step 6: a 6xx wins, otherwise the lowest class; with no response at
    all, a 408.  A chosen 503 becomes a 500 (the 503 was about the downstream
    element, not this proxy).  16.7 step 7: a chosen 401 or 407 carries every
    WWW-Authenticate and Proxy-Authenticate value of all the 401 and 407 responses.
    ``to_tag`` tags the responses made here.
    """
    if not responses:
        return make_response(request, 408, to_tag=to_tag)
    chosen = _choose(responses)
    if chosen.status == 503:
        tag = _to_tag(chosen)
        return make_response(request, 500, to_tag=tag if tag is not None else to_tag)
    if chosen.status in (401, 407):
        for response in responses:
            if response is chosen or response.status not in (401, 407):
                continue
            for header in _AUTHENTICATE_HEADERS:
                present = set(chosen.get_all(header))
                for value in response.get_all(header):
                    if value not in present:
                        chosen.add(header, value)
                        present.add(value)
    return chosen


def _to_tag(response: Response) -> str | None:
    try:
        return response.to.tag
    except MessageError:
        return None
