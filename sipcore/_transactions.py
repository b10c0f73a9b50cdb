"""The SIP transaction layer (RFC 3261 section 17, RFC 6026), sans-IO.

``TransactionLayer`` follows aioquic's connection: parsed messages and the current
time go in (``receive_request``, ``receive_response``, ``send_request``,
``send_response``, ``transport_failed``, ``handle_timer``), and out come bytes to
send (``messages_to_send``), the next deadline (``get_timer``) and events for the
transaction user (``next_event``).  It reads no clock and does no I/O: addresses
are opaque hashable objects chosen by the caller.

What each transaction does in each state is in the four tables of ``_state.py``;
this module matches messages to transactions (RFC 3261 17.1.3, 17.2.3, 9.2),
carries out the tables' actions and runs the timers of all the transactions in
buckets of a quarter of a second of deadlines: a bucket waits as a dict, from
which a stopped timer is deleted, and becomes a heap when it is the earliest;
there a stopped timer leaves its entry behind, recognized as stale when it comes
up.  Starting and stopping a timer cost O(1), or O(log n) in the earliest bucket.

Per message the work is a few dictionary look-ups: the match key, the transition
table, the action handlers.  Every message the layer sends is serialized once;
retransmissions pass the same bytes again (RFC 3261 17.1.1.2).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import Enum
from typing import Any, NewType, TypeAlias

from ._errors import LocalProtocolError, MessageError
from ._message import Request, Response, make_ack, make_response
from ._state import (
    INVITE_CLIENT,
    INVITE_SERVER,
    NON_INVITE_CLIENT,
    NON_INVITE_SERVER,
    Action,
    Actions,
    InviteClientInput,
    InviteServerInput,
    Machine,
    NonInviteClientInput,
    NonInviteServerInput,
    Timer,
    TransactionState,
)
from ._values import Via

__all__ = [
    "AckReceived",
    "Address",
    "CancelReceived",
    "Event",
    "OutgoingMessage",
    "RequestReceived",
    "ResponseReceived",
    "StrayResponseReceived",
    "TimerCFired",
    "TransactionConfig",
    "TransactionId",
    "TransactionLayer",
    "TransactionTerminated",
    "TransactionTimedOut",
    "TransportFailed",
]

TransactionId = NewType("TransactionId", int)
"""Identifies one transaction of one layer; never reused by that layer."""

Address: TypeAlias = Hashable
"""An opaque transport address chosen by the caller (e.g. a (host, port) tuple)."""


# ---------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionConfig:
    """The timer values (RFC 3261 17 and Appendix A) and the layer's options."""

    t1: float = 0.5
    """T1, the round-trip time estimate: 500 ms by default (RFC 3261 17.1.1.1)."""
    t2: float = 4.0
    """T2, the longest retransmit interval of non-INVITE requests and INVITE
    responses: 4 s by default (RFC 3261 17.1.2.2)."""
    t4: float = 5.0
    """T4, the longest time a message stays in the network: 5 s by default
    (RFC 3261 17.1.2.2); Timers I and K on unreliable transports."""
    timer_d: float = 32.0
    """Timer D on unreliable transports: at least 32 s (RFC 3261 17.1.1.2)."""
    timer_c: float = 180.0
    """Timer C, a proxy's INVITE timeout: more than 3 minutes (RFC 3261 16.6 step 11)."""
    auto_trying: bool = True
    """Whether an INVITE server transaction sends 100 Trying at once.  RFC 3261 17.2.1
    requires it unless the TU answers within 200 ms; turn it off only for a TU that
    always does."""

    def __post_init__(self) -> None:
        """Check the values; raises LocalProtocolError when one is not usable."""
        for name in ("t1", "t2", "t4", "timer_d", "timer_c"):
            if not getattr(self, name) > 0:
                raise LocalProtocolError(f"TransactionConfig.{name} must be positive")
        if self.t2 < self.t1:
            raise LocalProtocolError("TransactionConfig.t2 must be at least t1")


# ------------------------------------------------------------------------ output


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """Bytes for the transport to send."""

    data: bytes
    """One whole serialized SIP message."""
    destination: Address
    """Where to send it: the address given by the TU or the request's source."""


# ------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of the events the layer reports to the transaction user."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestReceived(Event):
    """A new request created a server transaction (not an ACK, not a CANCEL)."""

    request: Request
    """The request."""
    source: Address
    """The address it came from."""
    transaction_id: TransactionId
    """The new server transaction: answer with ``send_response``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelReceived(Event):
    """A new CANCEL created its own non-INVITE server transaction (RFC 3261 9.2)."""

    request: Request
    """The CANCEL."""
    source: Address
    """The address it came from."""
    transaction_id: TransactionId
    """The CANCEL's own server transaction: answer it (200, or 481 when
    ``invite_transaction_id`` is None) with ``send_response``."""
    invite_transaction_id: TransactionId | None
    """The INVITE server transaction it cancels (RFC 3261 9.2), None when none matched."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AckReceived(Event):
    """An ACK for the TU: one that is not absorbed by a transaction (an ACK to a 2xx)."""

    request: Request
    """The ACK."""
    source: Address
    """The address it came from."""
    transaction_id: TransactionId | None
    """The INVITE server transaction in Accepted that it matched (RFC 6026 7.1), or
    None when it matched no transaction (the usual ACK to a 2xx, RFC 3261 17.2.3)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseReceived(Event):
    """A response matched a client transaction, which passed it up."""

    response: Response
    """The response."""
    transaction_id: TransactionId
    """The client transaction (``send_request``'s result)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StrayResponseReceived(Event):
    """A response matched no client transaction (RFC 3261 17.1.3).

    A proxy forwards it statelessly when it is a 2xx to an INVITE (RFC 3261 16.7,
    RFC 6026 8.4); a user agent core drops it.
    """

    response: Response
    """The response."""
    source: Address
    """The address it came from."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionTimedOut(Event):
    """Timer B, F or H fired: the transaction failed and is terminated."""

    transaction_id: TransactionId
    """The transaction."""
    timer: Timer
    """Timer.B (INVITE client: no response, a 408 for the TU, RFC 3261 17.1.1.2),
    Timer.F (non-INVITE client, 17.1.2.2) or Timer.H (INVITE server: no ACK, 17.2.1)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportFailed(Event):
    """A transport failure reported by ``transport_failed`` reached the TU
    (RFC 3261 17.1.4, 17.2.4; RFC 6026 7.1)."""

    transaction_id: TransactionId
    """The transaction; it is terminated unless it is an INVITE server transaction in
    Accepted."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerCFired(Event):
    """Timer C of an INVITE client transaction fired (RFC 3261 16.8).

    The transaction stays as it is.  The TU CANCELs the INVITE when a provisional
    response was received, and otherwise acts as if a 408 had been received; it may
    end the transaction with ``abandon_transaction``.
    """

    transaction_id: TransactionId
    """The INVITE client transaction."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionTerminated(Event):
    """The transaction reached Terminated and was removed from the layer."""

    transaction_id: TransactionId
    """The transaction; the layer no longer knows it."""


# ------------------------------------------------------------------ transactions


@dataclass(frozen=True, slots=True)
class _Kind:
    """One of the four transaction kinds: its machine and the inputs the layer feeds."""

    machine: Machine[Any, Any]
    is_client: bool
    status_inputs: tuple[Enum, Enum, Enum]
    """For 1xx, 2xx and 300-699: received (client) or from the TU (server)."""
    request_input: Enum | None
    ack_input: Enum | None
    transport_error_input: Enum
    abandon_input: Enum | None


_INVITE_CLIENT = _Kind(
    INVITE_CLIENT,
    True,
    (
        InviteClientInput.RESPONSE_1XX,
        InviteClientInput.RESPONSE_2XX,
        InviteClientInput.RESPONSE_300_699,
    ),
    None,
    None,
    InviteClientInput.TRANSPORT_ERROR,
    InviteClientInput.TU_ABANDON,
)
_NON_INVITE_CLIENT = _Kind(
    NON_INVITE_CLIENT,
    True,
    (
        NonInviteClientInput.RESPONSE_1XX,
        NonInviteClientInput.RESPONSE_2XX,
        NonInviteClientInput.RESPONSE_300_699,
    ),
    None,
    None,
    NonInviteClientInput.TRANSPORT_ERROR,
    None,
)
_INVITE_SERVER = _Kind(
    INVITE_SERVER,
    False,
    (InviteServerInput.TU_1XX, InviteServerInput.TU_2XX, InviteServerInput.TU_300_699),
    InviteServerInput.REQUEST,
    InviteServerInput.ACK,
    InviteServerInput.TRANSPORT_ERROR,
    None,
)
_NON_INVITE_SERVER = _Kind(
    NON_INVITE_SERVER,
    False,
    (
        NonInviteServerInput.TU_1XX,
        NonInviteServerInput.TU_2XX,
        NonInviteServerInput.TU_300_699,
    ),
    NonInviteServerInput.REQUEST,
    None,
    NonInviteServerInput.TRANSPORT_ERROR,
    None,
)


_SETTLED_STATES: frozenset[Any] = frozenset(
    state
    for machine in (INVITE_CLIENT, NON_INVITE_CLIENT, INVITE_SERVER, NON_INVITE_SERVER)
    for state in machine.states
    if state.name in ("COMPLETED", "CONFIRMED", "ACCEPTED")
)


_CLIENTS, _SERVERS, _LEGACY_SERVERS, _LEGACY_INVITES = range(4)
_TIMERS_BY_NAME: dict[str, Timer] = {timer.value: timer for timer in Timer}
# The span of deadlines one timer heap holds (seconds of the caller's clock): a
# bucket is small (the timers started in a quarter of a second) and the heap of
# bucket numbers short (Timer C, the longest, spans some 720 of them).
_BUCKET = 0.25
_RUNNING_TIMER_NAMES: dict[Any, frozenset[str]] = {
    state: frozenset(timer.value for timer in timers)
    for machine in (INVITE_CLIENT, NON_INVITE_CLIENT, INVITE_SERVER, NON_INVITE_SERVER)
    for state, timers in machine.timers_by_state.items()
}


def _request_of(transaction: _Transaction) -> Request:
    """The transaction's request; only a settled transaction has dropped it, and no
    action of a settled state needs it."""
    request = transaction.request
    if request is None:
        raise LocalProtocolError("the request of a settled transaction is gone")
    return request


def _status_index(status: int) -> int:
    """0 for 1xx, 1 for 2xx, 2 for 300-699: the index into ``_Kind.status_inputs``."""
    if status < 200:
        return 0
    return 1 if status < 300 else 2


class _Transaction:
    """One transaction's data; its behaviour is its machine's table."""

    __slots__ = (
        "ack_bytes",
        "destination",
        "identifier",
        "interval",
        "keys",
        "kind",
        "last_response_bytes",
        "legacy",
        "method",
        "reliable",
        "request",
        "request_bytes",
        "response_destination",
        "response_to_tag",
        "source",
        "state",
        "timer_c",
        "timers",
    )

    def __init__(
        self,
        identifier: TransactionId,
        kind: _Kind,
        request: Request,
        *,
        reliable: bool,
        destination: Address,
        source: Address,
    ) -> None:
        self.identifier = identifier
        self.kind = kind
        self.state: TransactionState = kind.machine.initial_state
        self.request: Request | None = request
        self.method = request.method
        self.reliable = reliable
        self.destination = destination  # client: where the request goes
        self.source = source  # server: where the request came from
        self.request_bytes = b""
        self.ack_bytes = b""
        self.last_response_bytes = b""
        self.response_destination: Address = source
        self.response_to_tag: str | None = None
        self.legacy = False  # matched by the RFC 2543 rules (RFC 3261 17.2.3)
        self.timer_c = False
        self.interval = 0.0  # the current interval of Timer A, E or G
        # Each running timer's deadline, by name (the Enum's value: a dict of str
        # and float is ignored by the garbage collector, an Enum-keyed one is not).
        self.timers: dict[str, float] = {}
        # The (table index, key) pairs under which the transaction can be matched.
        self.keys: tuple[tuple[int, Any], ...] = ()


# RFC 3261 17.2.3 keys.  Magic cookie: (branch, sent-by, method), an ACK looking up
# method INVITE.  RFC 2543 fallback: Request-URI, To tag, From tag, Call-ID, CSeq
# number and method, top Via; for an ACK the To tag is compared separately.
_ServerKey: TypeAlias = tuple[str, tuple[str, int], str]
_LegacyKey: TypeAlias = tuple[str, str | None, str | None, str, int, str, Via]
_LegacyAckKey: TypeAlias = tuple[str, str | None, str, int, Via]


def _legacy_key(request: Request, via: Via, method: str) -> _LegacyKey:
    cseq = request.cseq
    return (
        request.uri_text,
        request.to.tag,
        request.from_.tag,
        request.call_id,
        cseq.number,
        method,
        via,
    )


def _legacy_ack_key(request: Request, via: Via) -> _LegacyAckKey:
    return (request.uri_text, request.from_.tag, request.call_id, request.cseq.number, via)


class _Step:
    """What one input brings to the actions of its transition."""

    __slots__ = ("address", "message", "now", "timer")

    def __init__(
        self,
        now: float,
        message: Any = None,
        address: Address = None,
        timer: Timer | None = None,
    ) -> None:
        self.now = now
        self.message = message  # the request or response that is the input, if any
        self.address = address  # its source, or the destination of a TU response
        self.timer = timer  # the timer that fired, if any


_ActionHandler: TypeAlias = Callable[[_Transaction, _Step], "Enum | None"]


# ------------------------------------------------------------------------- layer


class TransactionLayer:
    """Every client and server transaction of one SIP element, without I/O.

    Feed it messages from the transport and requests and responses from the TU;
    after each call drain ``messages_to_send()`` and ``next_event()`` and re-arm a
    timer for ``get_timer()``, calling ``handle_timer(now)`` when it expires.
    """

    def __init__(self, config: TransactionConfig | None = None) -> None:
        """Create an empty layer with ``config`` (the RFC defaults when None)."""
        self.config = config if config is not None else TransactionConfig()
        self._long = 64 * self.config.t1  # Timers B, F, H, J, L, M: 64*T1
        self._transactions: dict[TransactionId, _Transaction] = {}
        self._clients: dict[tuple[str, str], _Transaction] = {}
        self._servers: dict[_ServerKey, _Transaction] = {}
        self._legacy_servers: dict[_LegacyKey, _Transaction] = {}
        self._legacy_invites: dict[_LegacyAckKey, _Transaction] = {}
        # By index, as transactions name them in their keys (_CLIENTS ...).
        self._tables: tuple[dict[Any, _Transaction], ...] = (
            self._clients,
            self._servers,
            self._legacy_servers,
            self._legacy_invites,
        )
        self._events: deque[Event] = deque()
        self._outgoing: list[OutgoingMessage] = []
        # Timers: one bucket per _BUCKET seconds of deadlines, and a heap of the
        # bucket numbers.  A bucket waits as a dict, (transaction id, timer name)
        # -> deadline, in the order the timers started, until it is the earliest
        # one; then it becomes a heap of entries (deadline, sequence, transaction
        # id, timer name), the sequence keeping equal deadlines in that order.  A
        # timer stopped or restarted while its bucket waits is deleted from the
        # dict; in a heap it leaves its entry behind (stale: the transaction's
        # deadline for that timer no longer matches), dropped when it reaches the
        # top, at its deadline at the latest.  Most stopped timers are far ahead
        # (Timers B, F: 32 s; Timer C: 3 minutes) and leave nothing: a call's
        # stale entries no longer wait 32 s to 3 minutes among the live ones.
        # Nothing ever rebuilds a whole heap: compacting one heap of every timer
        # when it grew to twice the live ones stalled a worker for some 100 ms at
        # 1,200 calls/s (121,000 entries; docs/performance.md).
        self._waiting: dict[int, dict[tuple[TransactionId, str], float]] = {}
        self._heaps: dict[int, list[tuple[float, int, TransactionId, str]]] = {}
        self._bucket_order: list[int] = []
        self._sequence = itertools.count()
        self._identifiers = itertools.count(1)
        starter = self._timer_starter
        self._handlers: dict[Action, _ActionHandler] = {
            Action.SEND_REQUEST: self._send_request_bytes,
            Action.RESEND_REQUEST: self._send_request_bytes,
            Action.PASS_REQUEST: self._pass_request,
            Action.SEND_TRYING: self._send_trying,
            Action.PASS_RESPONSE: self._pass_response,
            Action.SEND_ACK: self._send_ack,
            Action.RESEND_ACK: self._resend_ack,
            Action.SEND_RESPONSE: self._send_response,
            Action.RESEND_RESPONSE: self._resend_response,
            Action.PASS_ACK: self._pass_ack,
            Action.START_TIMER_A: starter(Timer.A, self._first_retransmit_delay),
            Action.RESTART_TIMER_A: starter(Timer.A, self._doubled_delay),
            Action.START_TIMER_B: starter(Timer.B, self._long_delay),
            Action.START_TIMER_C: starter(Timer.C, self._timer_c_delay),
            Action.RESTART_TIMER_C: self._restart_timer_c,
            Action.START_TIMER_D: starter(Timer.D, self._timer_d_delay),
            Action.START_TIMER_E: starter(Timer.E, self._first_retransmit_delay),
            Action.RESTART_TIMER_E: starter(Timer.E, self._doubled_capped_delay),
            Action.RESTART_TIMER_E_WITH_T2: starter(Timer.E, self._t2_delay),
            Action.START_TIMER_F: starter(Timer.F, self._long_delay),
            Action.START_TIMER_G: starter(Timer.G, self._first_retransmit_delay),
            Action.RESTART_TIMER_G: starter(Timer.G, self._doubled_capped_delay),
            Action.START_TIMER_H: starter(Timer.H, self._long_delay),
            Action.START_TIMER_I: starter(Timer.I, self._t4_delay),
            Action.START_TIMER_J: starter(Timer.J, self._timer_j_delay),
            Action.START_TIMER_K: starter(Timer.K, self._t4_delay),
            Action.START_TIMER_L: starter(Timer.L, self._long_delay),
            Action.START_TIMER_M: starter(Timer.M, self._long_delay),
            Action.REPORT_TIMEOUT: self._report_timeout,
            Action.REPORT_TRANSPORT_ERROR: self._report_transport_error,
            Action.REPORT_TIMER_C: self._report_timer_c,
            Action.DISCARD: self._discard,
        }

    # ------------------------------------------------------------ from the network

    def receive_request(
        self, request: Request, source: Address, *, reliable: bool, now: float
    ) -> None:
        """Feed a parsed, validated request from the transport.

        A retransmission goes to its server transaction (RFC 3261 17.2.3); an ACK
        that no transaction absorbs becomes AckReceived; any other new request
        creates a server transaction and is reported as RequestReceived or
        CancelReceived.  ``reliable`` says whether it came over a reliable transport.
        Raises MessageError when a header needed for matching is malformed (the
        caller should have validated the request).
        """
        via = request.via
        method = request.method
        transaction: _Transaction | None
        branch = via.branch
        if branch is not None and via.has_magic_cookie:
            # RFC 3261 17.2.3: branch, sent-by and method; an ACK matches the INVITE.
            server_key: _ServerKey = (
                branch,
                via.sent_by,
                "INVITE" if method == "ACK" else method,
            )
            transaction = self._servers.get(server_key)
            legacy_key = None
        elif method == "ACK":
            # RFC 3261 17.2.3, RFC 2543 rules: the ACK matches the INVITE by
            # Request-URI, From tag, Call-ID, CSeq number and top Via, and by the To
            # tag of the response the server transaction sent.
            transaction = self._legacy_invites.get(_legacy_ack_key(request, via))
            if transaction is not None and transaction.response_to_tag != request.to.tag:
                transaction = None
            legacy_key = None
        else:
            legacy_key = _legacy_key(request, via, method)
            transaction = self._legacy_servers.get(legacy_key)

        if method == "ACK":
            if transaction is None:
                # RFC 3261 17.2.3 / 13.3.1.4: an ACK to a 2xx is a transaction of its
                # own and goes straight to the TU.
                self._events.append(
                    AckReceived(request=request, source=source, transaction_id=None)
                )
                return
            ack_input = transaction.kind.ack_input
            assert ack_input is not None  # only INVITE transactions are ACK-matched
            self._apply(transaction, ack_input, _Step(now, request, source))
            return
        if transaction is not None:
            # A retransmission of the request (RFC 3261 17.2.1, 17.2.2).
            request_input = transaction.kind.request_input
            assert request_input is not None
            self._apply(transaction, request_input, _Step(now, request, source))
            return

        kind = _INVITE_SERVER if method == "INVITE" else _NON_INVITE_SERVER
        transaction = _Transaction(
            TransactionId(next(self._identifiers)),
            kind,
            request,
            reliable=reliable,
            destination=source,
            source=source,
        )
        if legacy_key is None:
            self._register(transaction, _SERVERS, server_key)
        else:
            transaction.legacy = True
            self._register(transaction, _LEGACY_SERVERS, legacy_key)
            if method == "INVITE":
                self._register(transaction, _LEGACY_INVITES, _legacy_ack_key(request, via))
        self._transactions[transaction.identifier] = transaction
        self._run(transaction, kind.machine.initial_actions, _Step(now, request, source))

    def receive_response(self, response: Response, source: Address, now: float) -> None:
        """Feed a parsed, validated response from the transport.

        It goes to the client transaction whose request had the same top Via branch
        and whose method is the response's CSeq method (RFC 3261 17.1.3); when there
        is none it is reported as StrayResponseReceived.  Raises MessageError when
        its Via or CSeq is malformed (the caller should have validated it).
        """
        branch = response.via.branch
        transaction = None
        if branch is not None:
            transaction = self._clients.get((branch, response.cseq.method))
        if transaction is None:
            self._events.append(StrayResponseReceived(response=response, source=source))
            return
        machine_input = transaction.kind.status_inputs[_status_index(response.status)]
        self._apply(transaction, machine_input, _Step(now, response, source))

    # ----------------------------------------------------------------- from the TU

    def send_request(
        self,
        request: Request,
        destination: Address,
        *,
        reliable: bool,
        now: float,
        timer_c: bool = False,
    ) -> TransactionId:
        """Start a client transaction for ``request`` and send it to ``destination``.

        An INVITE gets an INVITE client transaction, any other method a non-INVITE
        one.  ``reliable`` says whether the transport to ``destination`` is reliable
        (no retransmissions, RFC 3261 17.1.1.2 and 17.1.2.2).  ``timer_c`` starts
        Timer C for an INVITE forwarded by a proxy (RFC 3261 16.6 step 11).

        Raises LocalProtocolError for an ACK (an ACK to a 2xx is sent with
        ``send_stateless``; the ACK to a non-2xx is the transaction's own), for a
        request without a top Via carrying a magic-cookie branch (RFC 3261 8.1.1.7),
        for a branch already used by a client transaction of the same method, and
        for ``timer_c`` on a non-INVITE request.
        """
        method = request.method
        if method == "ACK":
            raise LocalProtocolError(
                "an ACK is never sent through a client transaction: "
                "use send_stateless for an ACK to a 2xx (RFC 3261 17.1.1.3, 13.2.2.4)"
            )
        try:
            via = request.via
            cseq_method = request.cseq.method
        except MessageError as error:
            raise LocalProtocolError(f"cannot send the request: {error.reason}") from None
        if not via.has_magic_cookie:
            raise LocalProtocolError(
                "the top Via of a request needs a branch starting with z9hG4bK (RFC 3261 8.1.1.7)"
            )
        if cseq_method != method:
            raise LocalProtocolError("the CSeq method must be the request method (8.1.1.5)")
        if timer_c and method != "INVITE":
            raise LocalProtocolError("Timer C applies to INVITE transactions only (16.6)")
        key = (via.branch, method)
        if key in self._clients:
            raise LocalProtocolError(
                f"branch {via.branch!r} is already used by a {method} client transaction"
            )
        kind = _INVITE_CLIENT if method == "INVITE" else _NON_INVITE_CLIENT
        transaction = _Transaction(
            TransactionId(next(self._identifiers)),
            kind,
            request,
            reliable=reliable,
            destination=destination,
            source=destination,
        )
        transaction.timer_c = timer_c
        transaction.request_bytes = request.to_bytes()
        self._register(transaction, _CLIENTS, key)
        self._transactions[transaction.identifier] = transaction
        self._run(transaction, kind.machine.initial_actions, _Step(now, request, destination))
        return transaction.identifier

    def send_response(
        self,
        transaction_id: TransactionId,
        response: Response,
        now: float,
        *,
        destination: Address | None = None,
    ) -> None:
        """Send the TU's ``response`` on a server transaction.

        The response goes to ``destination``, by default the address the request
        came from (the transport applies RFC 3261 18.2.2 / RFC 3581 if it wants
        another), and its retransmissions go to the same place.

        Raises LocalProtocolError when the transaction does not exist (any more), is
        a client transaction, answers another method, or is in a state where the
        RFC forbids this response (e.g. a second final response to an INVITE).
        """
        transaction = self._known(transaction_id)
        kind = transaction.kind
        if kind.is_client:
            raise LocalProtocolError("send_response needs a server transaction")
        if response.cseq.method != transaction.method:
            raise LocalProtocolError(
                f"a response to {response.cseq.method} sent on a {transaction.method} transaction"
            )
        machine_input = kind.status_inputs[_status_index(response.status)]
        address = transaction.source if destination is None else destination
        self._apply(transaction, machine_input, _Step(now, response, address))

    def abandon_transaction(self, transaction_id: TransactionId, now: float) -> None:
        """Destroy an INVITE client transaction that has no final response yet.

        RFC 3261 9.1: a client that CANCELled and got no final response within 64*T1
        SHOULD destroy the INVITE transaction; 16.8: on Timer C a proxy may
        terminate the transaction.  TransactionTerminated follows.  Raises
        LocalProtocolError for an unknown transaction, another kind of transaction
        or one that already has a final response.
        """
        transaction = self._known(transaction_id)
        abandon_input = transaction.kind.abandon_input
        if abandon_input is None:
            raise LocalProtocolError("only an INVITE client transaction can be abandoned")
        self._apply(transaction, abandon_input, _Step(now))

    def client_transaction_of(self, request: Request) -> TransactionId | None:
        """The client transaction that sent ``request`` (a copy of it, for example
        handed back by a transport that could not send it): the one with the same
        top Via branch and method (RFC 3261 17.1.3), or None.  Raises MessageError
        when the top Via is malformed."""
        branch = request.via.branch
        if branch is None:
            return None
        method = "INVITE" if request.method == "ACK" else request.method
        transaction = self._clients.get((branch, method))
        return None if transaction is None else transaction.identifier

    def transport_failed(self, transaction_id: TransactionId, now: float) -> bool:
        """Report that the transport could not send a message of the transaction.

        The transaction informs the TU (TransportFailed) and usually terminates
        (RFC 3261 17.1.4, 17.2.4; RFC 6026 7.1).  Returns False, doing nothing,
        when the transaction no longer exists: transports report failures
        asynchronously and a transaction over a reliable transport may end as soon
        as its last message is queued (Timers D, I, J, K are 0 s).  Raises
        LocalProtocolError when the transaction has sent nothing yet (a non-INVITE
        server transaction in Trying).
        """
        transaction = self._transactions.get(transaction_id)
        if transaction is None:
            return False
        self._apply(transaction, transaction.kind.transport_error_input, _Step(now))
        return True

    def send_stateless(self, message: Request | Response, destination: Address) -> None:
        """Queue ``message`` for ``destination`` outside any transaction.

        For the ACK to a 2xx (RFC 3261 13.2.2.4: the UAC core sends it directly to
        the transport) and for responses a proxy forwards statelessly (16.7, 16.11).
        """
        self._outgoing.append(OutgoingMessage(message.to_bytes(), destination))

    # ---------------------------------------------------------------------- output

    def messages_to_send(self) -> list[OutgoingMessage]:
        """Return and forget the messages queued for the transport, oldest first."""
        outgoing = self._outgoing
        self._outgoing = []
        return outgoing

    def next_event(self) -> Event | None:
        """Return the oldest event for the TU, or None when there is none."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """Return the earliest deadline of all running timers, or None."""
        order = self._bucket_order
        transactions = self._transactions
        while order:
            bucket = self._earliest_heap()
            while bucket:
                deadline, _, identifier, name = bucket[0]
                transaction = transactions.get(identifier)
                if transaction is not None and transaction.timers.get(name) == deadline:
                    return deadline
                heapq.heappop(bucket)  # stale: cancelled, restarted or terminated
            del self._heaps[heapq.heappop(order)]
        return None

    def handle_timer(self, now: float) -> None:
        """Fire every timer whose deadline is ``now`` or earlier, in deadline order."""
        order = self._bucket_order
        transactions = self._transactions
        while order:
            bucket = self._earliest_heap()
            # A timer started by one that fires is due at ``now`` or later: in this
            # bucket or a later one, never an earlier one.
            while bucket and bucket[0][0] <= now:
                deadline, _, identifier, name = heapq.heappop(bucket)
                transaction = transactions.get(identifier)
                if transaction is None or transaction.timers.get(name) != deadline:
                    continue
                del transaction.timers[name]
                timer = _TIMERS_BY_NAME[name]
                machine_input = transaction.kind.machine.timer_inputs[timer]
                self._apply(transaction, machine_input, _Step(now, timer=timer))
            if bucket:
                return
            del self._heaps[heapq.heappop(order)]

    def _earliest_heap(self) -> list[tuple[float, int, TransactionId, str]]:
        """The heap of the earliest bucket (``_bucket_order`` is not empty), made
        from its dict when it was still waiting."""
        number = self._bucket_order[0]
        heap = self._heaps.get(number)
        if heap is None:
            waiting = self._waiting.pop(number)
            sequence = self._sequence
            heap = [
                (deadline, next(sequence), identifier, name)
                for (identifier, name), deadline in waiting.items()
            ]
            heapq.heapify(heap)
            self._heaps[number] = heap
        return heap

    @property
    def timer_entries(self) -> int:
        """The timer entries held, live and stale (for memory checks)."""
        return sum(len(heap) for heap in self._heaps.values()) + sum(
            len(bucket) for bucket in self._waiting.values()
        )

    # ------------------------------------------------------------------ inspection

    def transaction_state(self, transaction_id: TransactionId) -> TransactionState | None:
        """Return the state of a transaction, None when it is terminated or unknown."""
        transaction = self._transactions.get(transaction_id)
        return None if transaction is None else transaction.state

    @property
    def transaction_count(self) -> int:
        """The number of transactions that are not terminated."""
        return len(self._transactions)

    def owed_count(self) -> int:
        """The transactions that still owe something to a peer: every server
        transaction (one that answered still absorbs retransmitted requests and
        retransmits its response until acknowledged, RFC 3261 17.2.1 and 17.2.2),
        and every client transaction but those in Completed, which only wait for
        retransmitted responses to absorb (Timers D and K, 17.1.1.2 and 17.1.2.2):
        a proxy forwards such a response statelessly when no transaction is left
        (16.7).  A draining server may leave once this is zero.  O(transactions).
        """
        return sum(
            1
            for transaction in self._transactions.values()
            if not (transaction.kind.is_client and transaction.state in _SETTLED_STATES)
        )

    # ------------------------------------------------------------------- machinery

    def _known(self, transaction_id: TransactionId) -> _Transaction:
        transaction = self._transactions.get(transaction_id)
        if transaction is None:
            raise LocalProtocolError(
                f"transaction {transaction_id} does not exist (it may have terminated)"
            )
        return transaction

    def _register(self, transaction: _Transaction, table_index: int, key: Any) -> None:
        self._tables[table_index][key] = transaction
        transaction.keys += ((table_index, key),)

    def _apply(self, transaction: _Transaction, machine_input: Enum, step: _Step) -> None:
        """Take one transition: look it up (LocalProtocolError when illegal), cancel
        the timers of the state left, run the actions, then terminate or take the
        input of a timer that fired at once (0 s on a reliable transport)."""
        machine = transaction.kind.machine
        actions, next_state = machine.transition(transaction.state, machine_input)
        if next_state is not transaction.state:
            transaction.state = next_state
            timers = transaction.timers
            if timers:
                # Leaving a state stops its timers (their entries are deleted, or go
                # stale in the earliest bucket).
                running = _RUNNING_TIMER_NAMES[next_state]
                for stopped in [name for name in timers if name not in running]:
                    self._forget_timer(transaction.identifier, stopped, timers.pop(stopped))
        immediate = self._run(transaction, actions, step)
        if next_state in _SETTLED_STATES:
            # A settled transaction needs only its keys and the bytes it re-sends:
            # dropping the parsed request keeps the thousands of transactions that
            # wait out Timers D, I, J, K, L, M light (and the garbage collector fast).
            transaction.request = None
        if next_state is machine.terminated:
            self._terminate(transaction)
        elif immediate is not None:
            self._apply(transaction, immediate, _Step(step.now))

    def _run(self, transaction: _Transaction, actions: Actions, step: _Step) -> Enum | None:
        """Run ``actions``; return the input of a timer started at 0 s, if any."""
        immediate = None
        handlers = self._handlers
        for action in actions:
            result = handlers[action](transaction, step)
            if result is not None:
                immediate = result
        return immediate

    def _terminate(self, transaction: _Transaction) -> None:
        # RFC 3261 17.1.1.2, 17.2.1: destroyed the instant it enters Terminated, so
        # that memory is bounded by the live transactions.
        tables = self._tables
        for table_index, key in transaction.keys:
            table = tables[table_index]
            if table.get(key) is transaction:
                del table[key]
        del self._transactions[transaction.identifier]
        timers = transaction.timers
        for name, deadline in timers.items():
            self._forget_timer(transaction.identifier, name, deadline)
        timers.clear()
        self._events.append(TransactionTerminated(transaction_id=transaction.identifier))

    def _start_timer(
        self, transaction: _Transaction, timer: Timer, delay: float, now: float
    ) -> Enum | None:
        """Start (or restart) ``timer``.  A 0 s timer is not scheduled: its input is
        returned, for ``_apply`` to take right after the current transition."""
        if delay <= 0:
            fired: Enum = transaction.kind.machine.timer_inputs[timer]
            return fired
        name = timer.value
        identifier = transaction.identifier
        timers = transaction.timers
        previous = timers.get(name)
        if previous is not None:
            self._forget_timer(identifier, name, previous)  # a restart
        deadline = now + delay
        timers[name] = deadline
        number = int(deadline // _BUCKET)
        heap = self._heaps.get(number)
        if heap is not None:
            heapq.heappush(heap, (deadline, next(self._sequence), identifier, name))
            return None
        waiting = self._waiting.get(number)
        if waiting is None:
            waiting = self._waiting[number] = {}
            heapq.heappush(self._bucket_order, number)
        waiting[identifier, name] = deadline
        return None

    def _forget_timer(self, identifier: TransactionId, name: str, deadline: float) -> None:
        """Delete a stopped timer's entry if its bucket still waits as a dict (in
        a heap the entry stays, stale)."""
        waiting = self._waiting.get(int(deadline // _BUCKET))
        if waiting is not None:
            waiting.pop((identifier, name), None)

    # ------------------------------------------------------------- action handlers
    # One per Action (see ``_state.Action``); each returns the input of a timer that
    # fired at once, or None.

    def _send_request_bytes(self, transaction: _Transaction, step: _Step) -> None:
        # RFC 3261 17.1.1.2: a retransmission passes the same request again.
        self._outgoing.append(OutgoingMessage(transaction.request_bytes, transaction.destination))

    def _pass_request(self, transaction: _Transaction, step: _Step) -> None:
        request = _request_of(transaction)
        if request.method == "CANCEL":
            self._events.append(
                CancelReceived(
                    request=request,
                    source=transaction.source,
                    transaction_id=transaction.identifier,
                    invite_transaction_id=self._cancelled_invite(transaction),
                )
            )
        else:
            self._events.append(
                RequestReceived(
                    request=request,
                    source=transaction.source,
                    transaction_id=transaction.identifier,
                )
            )

    def _cancelled_invite(self, cancel_transaction: _Transaction) -> TransactionId | None:
        """RFC 3261 9.2: the INVITE server transaction a CANCEL targets, found by the
        rules of 17.2.3 with the method taken as INVITE."""
        cancel = _request_of(cancel_transaction)
        via = cancel.via
        if cancel_transaction.legacy:
            invite = self._legacy_servers.get(_legacy_key(cancel, via, "INVITE"))
        else:
            # Not legacy: the branch is there, with the magic cookie.
            invite = self._servers.get((via.branch or "", via.sent_by, "INVITE"))
        return None if invite is None else invite.identifier

    def _send_trying(self, transaction: _Transaction, step: _Step) -> None:
        # RFC 3261 17.2.1: the server transaction MUST send a 100 Trying unless the
        # TU answers within 200 ms; it is the last provisional response sent.
        if self.config.auto_trying:
            data = make_response(_request_of(transaction), 100).to_bytes()
            transaction.last_response_bytes = data
            self._outgoing.append(OutgoingMessage(data, transaction.response_destination))

    def _pass_response(self, transaction: _Transaction, step: _Step) -> None:
        self._events.append(
            ResponseReceived(response=step.message, transaction_id=transaction.identifier)
        )

    def _send_ack(self, transaction: _Transaction, step: _Step) -> None:
        # RFC 3261 17.1.1.3: the client transaction builds the ACK for a 300-699 and
        # sends it where the INVITE went; it is serialized once for its resends.
        transaction.ack_bytes = make_ack(_request_of(transaction), step.message).to_bytes()
        self._outgoing.append(OutgoingMessage(transaction.ack_bytes, transaction.destination))

    def _resend_ack(self, transaction: _Transaction, step: _Step) -> None:
        # RFC 3261 17.1.1.2: each retransmitted final response re-sends the ACK.
        self._outgoing.append(OutgoingMessage(transaction.ack_bytes, transaction.destination))

    def _send_response(self, transaction: _Transaction, step: _Step) -> None:
        response = step.message
        data = response.to_bytes()
        transaction.last_response_bytes = data
        transaction.response_destination = step.address
        if transaction.legacy:
            # RFC 3261 17.2.3: an RFC 2543 ACK is matched by this response's To tag.
            transaction.response_to_tag = response.to.tag
        self._outgoing.append(OutgoingMessage(data, step.address))

    def _resend_response(self, transaction: _Transaction, step: _Step) -> None:
        # RFC 3261 17.2.1, 17.2.2: a retransmitted request (or Timer G) re-sends the
        # last response; nothing when none was sent yet (auto_trying off).
        if transaction.last_response_bytes:
            self._outgoing.append(
                OutgoingMessage(transaction.last_response_bytes, transaction.response_destination)
            )

    def _pass_ack(self, transaction: _Transaction, step: _Step) -> None:
        # RFC 6026 7.1: an ACK matching a transaction in Accepted goes to the TU.
        self._events.append(
            AckReceived(
                request=step.message, source=step.address, transaction_id=transaction.identifier
            )
        )

    def _restart_timer_c(self, transaction: _Transaction, step: _Step) -> Enum | None:
        # RFC 3261 16.7 step 2: a provisional response other than 100 resets Timer C.
        if not transaction.timer_c or step.message.status == 100:
            return None
        return self._start_timer(transaction, Timer.C, self.config.timer_c, step.now)

    def _report_timeout(self, transaction: _Transaction, step: _Step) -> None:
        assert step.timer is not None  # only Timers B, F and H report a timeout
        self._events.append(
            TransactionTimedOut(transaction_id=transaction.identifier, timer=step.timer)
        )

    def _report_transport_error(self, transaction: _Transaction, step: _Step) -> None:
        self._events.append(TransportFailed(transaction_id=transaction.identifier))

    def _report_timer_c(self, transaction: _Transaction, step: _Step) -> None:
        self._events.append(TimerCFired(transaction_id=transaction.identifier))

    def _discard(self, transaction: _Transaction, step: _Step) -> None:
        # Absorbed on purpose, as the table says (e.g. RFC 3261 17.1.2.2, 17.2.1).
        return None

    # Delay rules for ``_timer_starter``: the delay of a timer being (re)started, or
    # None when it is not started at all.

    def _first_retransmit_delay(self, transaction: _Transaction) -> float | None:
        # Timers A, E, G start at T1 on unreliable transports only (RFC 3261
        # 17.1.1.2, 17.1.2.2, 17.2.1).
        if transaction.reliable:
            return None
        transaction.interval = self.config.t1
        return transaction.interval

    def _doubled_delay(self, transaction: _Transaction) -> float | None:
        # RFC 3261 17.1.1.2: Timer A doubles each time, without a cap (B ends it).
        transaction.interval *= 2
        return transaction.interval

    def _doubled_capped_delay(self, transaction: _Transaction) -> float | None:
        # RFC 3261 17.1.2.2 (Timer E) and 17.2.1 (Timer G): doubling, at most T2.
        transaction.interval = min(2 * transaction.interval, self.config.t2)
        return transaction.interval

    def _t2_delay(self, transaction: _Transaction) -> float | None:
        # RFC 3261 17.1.2.2: in Proceeding, Timer E is reset to T2.
        transaction.interval = self.config.t2
        return transaction.interval

    def _long_delay(self, transaction: _Transaction) -> float | None:
        # Timers B, F, H (RFC 3261 17), L and M (RFC 6026 7): 64*T1 on any transport.
        return self._long

    def _timer_c_delay(self, transaction: _Transaction) -> float | None:
        # RFC 3261 16.6 step 11: only when the TU (a proxy) asked for Timer C.
        return self.config.timer_c if transaction.timer_c else None

    def _timer_d_delay(self, transaction: _Transaction) -> float | None:
        # RFC 3261 17.1.1.2: at least 32 s on unreliable transports, 0 on reliable.
        return 0.0 if transaction.reliable else self.config.timer_d

    def _t4_delay(self, transaction: _Transaction) -> float | None:
        # Timer I (RFC 3261 17.2.1) and Timer K (17.1.2.2): T4, 0 on reliable.
        return 0.0 if transaction.reliable else self.config.t4

    def _timer_j_delay(self, transaction: _Transaction) -> float | None:
        # RFC 3261 17.2.2: Timer J is 64*T1 on unreliable transports, 0 on reliable.
        return 0.0 if transaction.reliable else self._long

    def _timer_starter(
        self, name: Timer, delay_rule: Callable[[_Transaction], float | None]
    ) -> _ActionHandler:
        """Return the handler of an action that (re)starts timer ``name``."""

        def start(transaction: _Transaction, step: _Step) -> Enum | None:
            delay = delay_rule(transaction)
            if delay is None:
                return None
            return self._start_timer(transaction, name, delay, step.now)

        return start
