"""The four transaction state machines of RFC 3261 section 17, as amended by RFC 6026.

Each machine is one transition table ``{(state, input): (actions, next_state)}`` with an
Enum of states and an Enum of inputs, after h11's ``_state.py`` and h2's ``stream.py``.
The tables say *what* happens; ``_transactions.py`` does it (sends bytes, schedules
timers, queues events for the transaction user).  A pair missing from a table is an
illegal transition: ``Machine.transition`` raises LocalProtocolError, never a silent
no-op.  Where the RFC says that a message is "absorbed" or "discarded", the table holds
an explicit ``Action.DISCARD`` entry.

Inputs come from three places:

* the network (responses for client machines; request retransmissions and ACKs for
  server machines).  A peer may send anything at any time, so every such input has an
  entry in every state but Terminated (``Machine.network_inputs``);
* our own transaction user (TU: responses on a server transaction, abandoning an INVITE
  client transaction).  Where the RFC forbids the input the pair is absent, so the
  TU's bug surfaces as LocalProtocolError;
* timers and the transport (``TRANSPORT_ERROR``).  A timer runs only in the states
  listed in ``Machine.timers_by_state``; it is cancelled on leaving them, so its input
  has an entry exactly in those states.  Transport failures are reported
  asynchronously by the transport, possibly after the transaction moved on, so they
  have an entry in every state in which the transaction has already sent something.

Timer durations (RFC 3261 17.1.1.2, 17.1.2.2, 17.2.1, 17.2.2 and the table of
Appendix A; RFC 6026 7.1 and 7.2; RFC 3261 16.6 step 11 for Timer C):

====  ===============================  ==================  =========================
name  role                             unreliable          reliable transport
====  ===============================  ==================  =========================
A     INVITE request retransmission    T1, doubling        not started
B     INVITE transaction timeout       64*T1               64*T1
C     proxy INVITE timeout (optional)  > 3 min (180 s)     > 3 min
D     wait for response retransmits    >= 32 s             0 (immediate)
E     non-INVITE retransmission        T1, doubling, <=T2  not started
F     non-INVITE transaction timeout   64*T1               64*T1
G     INVITE response retransmission   T1, doubling, <=T2  not started
H     wait for ACK receipt             64*T1               64*T1
I     wait for ACK retransmits         T4                  0 (immediate)
J     wait for request retransmits     64*T1               0 (immediate)
K     wait for response retransmits    T4                  0 (immediate)
L     wait for INVITE retransmits      64*T1               64*T1 (RFC 6026 7.1)
M     wait for 2xx retransmits         64*T1               64*T1 (RFC 6026 7.2)
====  ===============================  ==================  =========================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeAlias, TypeVar

from ._errors import LocalProtocolError

__all__ = [
    "INVITE_CLIENT",
    "INVITE_SERVER",
    "MACHINES",
    "NON_INVITE_CLIENT",
    "NON_INVITE_SERVER",
    "Action",
    "Actions",
    "InviteClientInput",
    "InviteClientState",
    "InviteServerInput",
    "InviteServerState",
    "Machine",
    "NonInviteClientInput",
    "NonInviteClientState",
    "NonInviteServerInput",
    "NonInviteServerState",
    "Timer",
    "TransactionState",
]


class _IdentityEnum(Enum):
    """An Enum hashed by identity.

    Members are singletons compared by identity, so identity hashing is consistent;
    it runs in C, where Enum's own ``__hash__`` (hash of the name) runs in Python on
    every table and timer look-up (CPython 3.11).
    """

    __hash__ = object.__hash__


class Timer(_IdentityEnum):
    """The transaction timers of RFC 3261 17 (A to K), 16.6 (C) and RFC 6026 (L, M)."""

    A = "A"
    B = "B"
    C = "C"
    D = "D"
    E = "E"
    F = "F"
    G = "G"
    H = "H"
    I = "I"  # noqa: E741 - the RFC's name
    J = "J"
    K = "K"
    L = "L"
    M = "M"


class Action(_IdentityEnum):
    """What a transition does, in the order listed in its table entry."""

    SEND_REQUEST = "send the request (creation of a client transaction)"
    RESEND_REQUEST = "pass the same request bytes to the transport again"
    PASS_REQUEST = "pass the request to the TU (creation of a server transaction)"
    SEND_TRYING = "send 100 Trying unless the layer is configured not to (17.2.1)"
    PASS_RESPONSE = "pass the response to the TU"
    SEND_ACK = "build the ACK for a 300-699 response and send it (17.1.1.3)"
    RESEND_ACK = "pass the same ACK bytes to the transport again (17.1.1.2)"
    SEND_RESPONSE = "send the TU's response and remember it as the last one sent"
    RESEND_RESPONSE = "pass the last response sent to the transport again"
    PASS_ACK = "pass the ACK to the TU (RFC 6026 7.1, Accepted)"
    START_TIMER_A = "start Timer A at T1 (unreliable transports only)"
    RESTART_TIMER_A = "restart Timer A with twice its last interval"
    START_TIMER_B = "start Timer B at 64*T1"
    START_TIMER_C = "start Timer C when the TU asked for it (16.6 step 11)"
    RESTART_TIMER_C = "restart Timer C on a provisional response other than 100 (16.7)"
    START_TIMER_D = "start Timer D (0 s on reliable transports)"
    START_TIMER_E = "start Timer E at T1 (unreliable transports only)"
    RESTART_TIMER_E = "restart Timer E with twice its last interval, at most T2"
    RESTART_TIMER_E_WITH_T2 = "restart Timer E at T2 (17.1.2.2, Proceeding)"
    START_TIMER_F = "start Timer F at 64*T1"
    START_TIMER_G = "start Timer G at T1 (unreliable transports only)"
    RESTART_TIMER_G = "restart Timer G with twice its last interval, at most T2"
    START_TIMER_H = "start Timer H at 64*T1"
    START_TIMER_I = "start Timer I at T4 (0 s on reliable transports)"
    START_TIMER_J = "start Timer J at 64*T1 (0 s on reliable transports)"
    START_TIMER_K = "start Timer K at T4 (0 s on reliable transports)"
    START_TIMER_L = "start Timer L at 64*T1 (RFC 6026 7.1)"
    START_TIMER_M = "start Timer M at 64*T1 (RFC 6026 7.2)"
    REPORT_TIMEOUT = "tell the TU that the transaction timed out (Timer B, F or H)"
    REPORT_TRANSPORT_ERROR = "tell the TU that the transport failed (17.1.4, 17.2.4)"
    REPORT_TIMER_C = "tell the TU that Timer C fired (16.8)"
    DISCARD = "absorb the input on purpose: nothing to do"


StateT = TypeVar("StateT", bound=Enum)
InputT = TypeVar("InputT", bound=Enum)
Actions: TypeAlias = tuple[Action, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Machine(Generic[StateT, InputT]):
    """One transaction state machine: its Enums, its table and its timers."""

    name: str
    """The machine's name, for error messages."""
    states: type[StateT]
    """The Enum of its states."""
    inputs: type[InputT]
    """The Enum of its inputs."""
    initial_state: StateT
    """The state a new transaction starts in."""
    initial_actions: Actions
    """What a new transaction does on creation, before any input."""
    terminated: StateT
    """The final state: it accepts no input."""
    table: Mapping[tuple[StateT, InputT], tuple[Actions, StateT]]
    """The transition table: (state, input) -> (actions, next state)."""
    network_inputs: frozenset[InputT]
    """Inputs a peer produces; each has an entry in every state but ``terminated``."""
    timer_inputs: Mapping[Timer, InputT]
    """The input each timer of this machine produces when it fires."""
    timers_by_state: Mapping[StateT, frozenset[Timer]]
    """The timers that may run in each state; leaving a state cancels the others."""

    def transition(self, state: StateT, machine_input: InputT) -> tuple[Actions, StateT]:
        """Return (actions, next state) for ``machine_input`` in ``state``.

        Raises LocalProtocolError when the pair is not in the table: the input is
        not allowed in that state (a TU misuse, or a timer that should have been
        cancelled).
        """
        entry = self.table.get((state, machine_input))
        if entry is None:
            raise LocalProtocolError(
                f"{self.name} transaction: {machine_input.name} is not allowed "
                f"in state {state.name}"
            )
        return entry


_DISCARD: Actions = (Action.DISCARD,)
_NO_ACTION: Actions = ()


# ------------------------------------------------------------- INVITE client (ICT)
#
# RFC 3261 17.1.1, Figure 5, with the "Accepted" state of RFC 6026 7.2 (Figure 5 of
# RFC 6026).  Creation: the INVITE is sent, Timer A (unreliable only) and Timer B
# start, and Timer C when the TU (a proxy) asks for it (RFC 3261 16.6 step 11).
#
#   Calling    --Timer A--------> Calling     resend INVITE, A doubles (17.1.1.2)
#   Calling    --Timer B--------> Terminated  inform TU of the timeout
#   Calling    --1xx------------> Proceeding  pass to TU (A and B stop)
#   Calling    --2xx------------> Accepted    pass to TU, start M (RFC 6026 7.2)
#   Calling    --300-699--------> Completed   send ACK, pass to TU, start D
#   Calling    --transport err--> Terminated  inform TU (17.1.4)
#   Proceeding --1xx------------> Proceeding  pass to TU
#   Proceeding --2xx------------> Accepted    pass to TU, start M (RFC 6026 7.2)
#   Proceeding --300-699--------> Completed   send ACK, pass to TU, start D
#   Completed  --300-699--------> Completed   resend the ACK, not to the TU (17.1.1.2)
#   Completed  --Timer D--------> Terminated
#   Completed  --transport err--> Terminated  inform TU (17.1.4: sending the ACK failed)
#   Accepted   --2xx------------> Accepted    pass to TU (RFC 6026 7.2)
#   Accepted   --Timer M--------> Terminated  (RFC 6026 7.2)
#
# Additions that the figures leave implicit:
#   * Timer C (RFC 3261 16.6 step 11, 16.7 step 2, 16.8) runs in Calling and
#     Proceeding: a provisional response other than 100 restarts it, firing it only
#     reports to the TU (which CANCELs or acts as on a 408); a final response stops it.
#   * TU_ABANDON: the TU destroys the transaction before any final response, as
#     RFC 3261 9.1 (no final response 64*T1 after a CANCEL) and 16.8 (Timer C: "or
#     terminate the client transaction") allow.  Without it an INVITE whose next hop
#     never answers finally would stay in Proceeding for ever.
#   * Network inputs in every state: in Completed a 1xx is discarded and a 2xx (not a
#     retransmission of the non-2xx final) is still passed to the TU so that it can
#     ACK and end the session (RFC 3261 13.2.2.4, 16.7 step 5 forwards every 2xx); in
#     Accepted 1xx and 300-699 are discarded (RFC 6026 7.2).
#   * A transport error reported in Proceeding concerns the INVITE sent while
#     Calling and ends the transaction (17.1.4: "SHOULD transition directly to the
#     Terminated state"); in Accepted the transaction sends nothing and a late report
#     is discarded.


class InviteClientState(_IdentityEnum):
    """States of the INVITE client transaction (RFC 3261 Figure 5, RFC 6026 Figure 5)."""

    CALLING = "Calling"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


class InviteClientInput(_IdentityEnum):
    """Inputs of the INVITE client transaction."""

    RESPONSE_1XX = "1xx received"
    RESPONSE_2XX = "2xx received"
    RESPONSE_300_699 = "300-699 received"
    TIMER_A = "Timer A fired"
    TIMER_B = "Timer B fired"
    TIMER_C = "Timer C fired"
    TIMER_D = "Timer D fired"
    TIMER_M = "Timer M fired"
    TRANSPORT_ERROR = "transport error"
    TU_ABANDON = "the TU abandons the transaction"


_ICS = InviteClientState
_ICI = InviteClientInput

INVITE_CLIENT: Machine[InviteClientState, InviteClientInput] = Machine(
    name="INVITE client",
    states=InviteClientState,
    inputs=InviteClientInput,
    initial_state=_ICS.CALLING,
    # RFC 3261 17.1.1.2: send the INVITE, start A (unreliable) and B; 16.6 step 11: C.
    initial_actions=(
        Action.SEND_REQUEST,
        Action.START_TIMER_A,
        Action.START_TIMER_B,
        Action.START_TIMER_C,
    ),
    terminated=_ICS.TERMINATED,
    table={
        # ---- Calling (RFC 3261 17.1.1.2)
        (_ICS.CALLING, _ICI.TIMER_A): (
            (Action.RESEND_REQUEST, Action.RESTART_TIMER_A),
            _ICS.CALLING,
        ),
        (_ICS.CALLING, _ICI.TIMER_B): ((Action.REPORT_TIMEOUT,), _ICS.TERMINATED),
        (_ICS.CALLING, _ICI.TIMER_C): ((Action.REPORT_TIMER_C,), _ICS.CALLING),
        (_ICS.CALLING, _ICI.RESPONSE_1XX): (
            (Action.PASS_RESPONSE, Action.RESTART_TIMER_C),
            _ICS.PROCEEDING,
        ),
        (_ICS.CALLING, _ICI.RESPONSE_2XX): (
            (Action.PASS_RESPONSE, Action.START_TIMER_M),
            _ICS.ACCEPTED,
        ),
        (_ICS.CALLING, _ICI.RESPONSE_300_699): (
            (Action.SEND_ACK, Action.PASS_RESPONSE, Action.START_TIMER_D),
            _ICS.COMPLETED,
        ),
        (_ICS.CALLING, _ICI.TRANSPORT_ERROR): (
            (Action.REPORT_TRANSPORT_ERROR,),
            _ICS.TERMINATED,
        ),
        (_ICS.CALLING, _ICI.TU_ABANDON): (_NO_ACTION, _ICS.TERMINATED),
        # ---- Proceeding (RFC 3261 17.1.1.2: no more retransmissions)
        (_ICS.PROCEEDING, _ICI.TIMER_C): ((Action.REPORT_TIMER_C,), _ICS.PROCEEDING),
        (_ICS.PROCEEDING, _ICI.RESPONSE_1XX): (
            (Action.PASS_RESPONSE, Action.RESTART_TIMER_C),
            _ICS.PROCEEDING,
        ),
        (_ICS.PROCEEDING, _ICI.RESPONSE_2XX): (
            (Action.PASS_RESPONSE, Action.START_TIMER_M),
            _ICS.ACCEPTED,
        ),
        (_ICS.PROCEEDING, _ICI.RESPONSE_300_699): (
            (Action.SEND_ACK, Action.PASS_RESPONSE, Action.START_TIMER_D),
            _ICS.COMPLETED,
        ),
        (_ICS.PROCEEDING, _ICI.TRANSPORT_ERROR): (
            (Action.REPORT_TRANSPORT_ERROR,),
            _ICS.TERMINATED,
        ),
        (_ICS.PROCEEDING, _ICI.TU_ABANDON): (_NO_ACTION, _ICS.TERMINATED),
        # ---- Completed (RFC 3261 17.1.1.2)
        (_ICS.COMPLETED, _ICI.RESPONSE_1XX): (_DISCARD, _ICS.COMPLETED),
        (_ICS.COMPLETED, _ICI.RESPONSE_2XX): ((Action.PASS_RESPONSE,), _ICS.COMPLETED),
        (_ICS.COMPLETED, _ICI.RESPONSE_300_699): ((Action.RESEND_ACK,), _ICS.COMPLETED),
        (_ICS.COMPLETED, _ICI.TIMER_D): (_NO_ACTION, _ICS.TERMINATED),
        (_ICS.COMPLETED, _ICI.TRANSPORT_ERROR): (
            (Action.REPORT_TRANSPORT_ERROR,),
            _ICS.TERMINATED,
        ),
        # ---- Accepted (RFC 6026 7.2)
        (_ICS.ACCEPTED, _ICI.RESPONSE_1XX): (_DISCARD, _ICS.ACCEPTED),
        (_ICS.ACCEPTED, _ICI.RESPONSE_2XX): ((Action.PASS_RESPONSE,), _ICS.ACCEPTED),
        (_ICS.ACCEPTED, _ICI.RESPONSE_300_699): (_DISCARD, _ICS.ACCEPTED),
        (_ICS.ACCEPTED, _ICI.TIMER_M): (_NO_ACTION, _ICS.TERMINATED),
        (_ICS.ACCEPTED, _ICI.TRANSPORT_ERROR): (_DISCARD, _ICS.ACCEPTED),
    },
    network_inputs=frozenset({_ICI.RESPONSE_1XX, _ICI.RESPONSE_2XX, _ICI.RESPONSE_300_699}),
    timer_inputs={
        Timer.A: _ICI.TIMER_A,
        Timer.B: _ICI.TIMER_B,
        Timer.C: _ICI.TIMER_C,
        Timer.D: _ICI.TIMER_D,
        Timer.M: _ICI.TIMER_M,
    },
    timers_by_state={
        _ICS.CALLING: frozenset({Timer.A, Timer.B, Timer.C}),
        _ICS.PROCEEDING: frozenset({Timer.C}),
        _ICS.COMPLETED: frozenset({Timer.D}),
        _ICS.ACCEPTED: frozenset({Timer.M}),
        _ICS.TERMINATED: frozenset(),
    },
)


# --------------------------------------------------------- non-INVITE client (NICT)
#
# RFC 3261 17.1.2, Figure 6.  Creation: the request is sent, Timer E (unreliable only)
# and Timer F start.
#
#   Trying     --Timer E--------> Trying      resend, E doubles up to T2 (17.1.2.2)
#   Trying     --Timer F--------> Terminated  inform TU of the timeout
#   Trying     --1xx------------> Proceeding  pass to TU (E and F keep running)
#   Trying     --200-699--------> Completed   pass to TU, start K
#   Trying     --transport err--> Terminated  inform TU (17.1.4)
#   Proceeding --Timer E--------> Proceeding  resend, E restarts at T2 (17.1.2.2)
#   Proceeding --Timer F--------> Terminated  inform TU of the timeout
#   Proceeding --1xx------------> Proceeding  pass to TU
#   Proceeding --200-699--------> Completed   pass to TU, start K
#   Proceeding --transport err--> Terminated  inform TU (17.1.4)
#   Completed  --any response---> Completed   absorbed (17.1.2.2)
#   Completed  --Timer K--------> Terminated
#
# The figure's "200-699" is two inputs here (2xx, 300-699) with the same entries, so
# that the four machines share their response inputs.  In Completed a late transport
# error report is discarded: the final response proved the request was delivered.


class NonInviteClientState(_IdentityEnum):
    """States of the non-INVITE client transaction (RFC 3261 Figure 6)."""

    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    TERMINATED = "Terminated"


class NonInviteClientInput(_IdentityEnum):
    """Inputs of the non-INVITE client transaction."""

    RESPONSE_1XX = "1xx received"
    RESPONSE_2XX = "2xx received"
    RESPONSE_300_699 = "300-699 received"
    TIMER_E = "Timer E fired"
    TIMER_F = "Timer F fired"
    TIMER_K = "Timer K fired"
    TRANSPORT_ERROR = "transport error"


_NCS = NonInviteClientState
_NCI = NonInviteClientInput

NON_INVITE_CLIENT: Machine[NonInviteClientState, NonInviteClientInput] = Machine(
    name="non-INVITE client",
    states=NonInviteClientState,
    inputs=NonInviteClientInput,
    initial_state=_NCS.TRYING,
    # RFC 3261 17.1.2.2: send the request, start E (unreliable) and F.
    initial_actions=(Action.SEND_REQUEST, Action.START_TIMER_E, Action.START_TIMER_F),
    terminated=_NCS.TERMINATED,
    table={
        # ---- Trying (RFC 3261 17.1.2.2)
        (_NCS.TRYING, _NCI.TIMER_E): (
            (Action.RESEND_REQUEST, Action.RESTART_TIMER_E),
            _NCS.TRYING,
        ),
        (_NCS.TRYING, _NCI.TIMER_F): ((Action.REPORT_TIMEOUT,), _NCS.TERMINATED),
        (_NCS.TRYING, _NCI.RESPONSE_1XX): ((Action.PASS_RESPONSE,), _NCS.PROCEEDING),
        (_NCS.TRYING, _NCI.RESPONSE_2XX): (
            (Action.PASS_RESPONSE, Action.START_TIMER_K),
            _NCS.COMPLETED,
        ),
        (_NCS.TRYING, _NCI.RESPONSE_300_699): (
            (Action.PASS_RESPONSE, Action.START_TIMER_K),
            _NCS.COMPLETED,
        ),
        (_NCS.TRYING, _NCI.TRANSPORT_ERROR): (
            (Action.REPORT_TRANSPORT_ERROR,),
            _NCS.TERMINATED,
        ),
        # ---- Proceeding (RFC 3261 17.1.2.2)
        (_NCS.PROCEEDING, _NCI.TIMER_E): (
            (Action.RESEND_REQUEST, Action.RESTART_TIMER_E_WITH_T2),
            _NCS.PROCEEDING,
        ),
        (_NCS.PROCEEDING, _NCI.TIMER_F): ((Action.REPORT_TIMEOUT,), _NCS.TERMINATED),
        (_NCS.PROCEEDING, _NCI.RESPONSE_1XX): ((Action.PASS_RESPONSE,), _NCS.PROCEEDING),
        (_NCS.PROCEEDING, _NCI.RESPONSE_2XX): (
            (Action.PASS_RESPONSE, Action.START_TIMER_K),
            _NCS.COMPLETED,
        ),
        (_NCS.PROCEEDING, _NCI.RESPONSE_300_699): (
            (Action.PASS_RESPONSE, Action.START_TIMER_K),
            _NCS.COMPLETED,
        ),
        (_NCS.PROCEEDING, _NCI.TRANSPORT_ERROR): (
            (Action.REPORT_TRANSPORT_ERROR,),
            _NCS.TERMINATED,
        ),
        # ---- Completed (RFC 3261 17.1.2.2: retransmitted responses are absorbed)
        (_NCS.COMPLETED, _NCI.RESPONSE_1XX): (_DISCARD, _NCS.COMPLETED),
        (_NCS.COMPLETED, _NCI.RESPONSE_2XX): (_DISCARD, _NCS.COMPLETED),
        (_NCS.COMPLETED, _NCI.RESPONSE_300_699): (_DISCARD, _NCS.COMPLETED),
        (_NCS.COMPLETED, _NCI.TIMER_K): (_NO_ACTION, _NCS.TERMINATED),
        (_NCS.COMPLETED, _NCI.TRANSPORT_ERROR): (_DISCARD, _NCS.COMPLETED),
    },
    network_inputs=frozenset({_NCI.RESPONSE_1XX, _NCI.RESPONSE_2XX, _NCI.RESPONSE_300_699}),
    timer_inputs={Timer.E: _NCI.TIMER_E, Timer.F: _NCI.TIMER_F, Timer.K: _NCI.TIMER_K},
    timers_by_state={
        _NCS.TRYING: frozenset({Timer.E, Timer.F}),
        _NCS.PROCEEDING: frozenset({Timer.E, Timer.F}),
        _NCS.COMPLETED: frozenset({Timer.K}),
        _NCS.TERMINATED: frozenset(),
    },
)


# ------------------------------------------------------------- INVITE server (IST)
#
# RFC 3261 17.2.1, Figure 7, with the "Accepted" state of RFC 6026 7.1 (Figure 7 of
# RFC 6026).  Creation: the INVITE is passed to the TU and a 100 Trying is sent at
# once (17.2.1: MUST, unless the TU answers within 200 ms; the layer can be
# configured to leave that to the TU).
#
#   Proceeding --INVITE---------> Proceeding  resend the last provisional (17.2.1)
#   Proceeding --1xx from TU----> Proceeding  send it
#   Proceeding --2xx from TU----> Accepted    send it, start L (RFC 6026 7.1)
#   Proceeding --300-699 from TU> Completed   send it, start G (unreliable) and H
#   Proceeding --transport err--> Terminated  inform TU (17.2.4)
#   Completed  --INVITE---------> Completed   resend the final response (17.2.1)
#   Completed  --Timer G--------> Completed   resend it, G doubles up to T2
#   Completed  --ACK------------> Confirmed   absorbed, start I (G and H stop)
#   Completed  --Timer H--------> Terminated  inform TU of the timeout
#   Completed  --transport err--> Terminated  inform TU (17.2.4)
#   Confirmed  --INVITE, ACK----> Confirmed   absorbed (17.2.1)
#   Confirmed  --Timer I--------> Terminated
#   Accepted   --INVITE---------> Accepted    absorbed (RFC 6026 7.1)
#   Accepted   --ACK------------> Accepted    passed to the TU (RFC 6026 7.1)
#   Accepted   --2xx from TU----> Accepted    send it: the TU retransmits its 2xx
#                                             (RFC 3261 13.3.1.4, RFC 6026 7.1)
#   Accepted   --transport err--> Accepted    inform TU (RFC 6026 7.1)
#   Accepted   --Timer L--------> Terminated  (RFC 6026 7.1)
#
# Network inputs in every state: an ACK in Proceeding (no final response sent yet)
# cannot belong to this transaction and is discarded.  TU responses after a final
# response (other than 2xx in Accepted) are illegal: a proxy forwards a 2xx that
# arrives after a non-2xx final response statelessly (RFC 3261 16.7 step 5).  In
# Confirmed a late transport error report (for a response retransmission) is
# discarded: the ACK proved delivery.


class InviteServerState(_IdentityEnum):
    """States of the INVITE server transaction (RFC 3261 Figure 7, RFC 6026 Figure 7)."""

    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


class InviteServerInput(_IdentityEnum):
    """Inputs of the INVITE server transaction."""

    REQUEST = "INVITE retransmission received"
    ACK = "ACK received"
    TU_1XX = "1xx from the TU"
    TU_2XX = "2xx from the TU"
    TU_300_699 = "300-699 from the TU"
    TIMER_G = "Timer G fired"
    TIMER_H = "Timer H fired"
    TIMER_I = "Timer I fired"
    TIMER_L = "Timer L fired"
    TRANSPORT_ERROR = "transport error"


_ISS = InviteServerState
_ISI = InviteServerInput

INVITE_SERVER: Machine[InviteServerState, InviteServerInput] = Machine(
    name="INVITE server",
    states=InviteServerState,
    inputs=InviteServerInput,
    initial_state=_ISS.PROCEEDING,
    # RFC 3261 17.2.1: pass the INVITE to the TU, send 100 Trying.
    initial_actions=(Action.PASS_REQUEST, Action.SEND_TRYING),
    terminated=_ISS.TERMINATED,
    table={
        # ---- Proceeding (RFC 3261 17.2.1)
        (_ISS.PROCEEDING, _ISI.REQUEST): ((Action.RESEND_RESPONSE,), _ISS.PROCEEDING),
        (_ISS.PROCEEDING, _ISI.ACK): (_DISCARD, _ISS.PROCEEDING),
        (_ISS.PROCEEDING, _ISI.TU_1XX): ((Action.SEND_RESPONSE,), _ISS.PROCEEDING),
        (_ISS.PROCEEDING, _ISI.TU_2XX): (
            (Action.SEND_RESPONSE, Action.START_TIMER_L),
            _ISS.ACCEPTED,
        ),
        (_ISS.PROCEEDING, _ISI.TU_300_699): (
            (Action.SEND_RESPONSE, Action.START_TIMER_G, Action.START_TIMER_H),
            _ISS.COMPLETED,
        ),
        (_ISS.PROCEEDING, _ISI.TRANSPORT_ERROR): (
            (Action.REPORT_TRANSPORT_ERROR,),
            _ISS.TERMINATED,
        ),
        # ---- Completed (RFC 3261 17.2.1)
        (_ISS.COMPLETED, _ISI.REQUEST): ((Action.RESEND_RESPONSE,), _ISS.COMPLETED),
        (_ISS.COMPLETED, _ISI.ACK): ((Action.START_TIMER_I,), _ISS.CONFIRMED),
        (_ISS.COMPLETED, _ISI.TIMER_G): (
            (Action.RESEND_RESPONSE, Action.RESTART_TIMER_G),
            _ISS.COMPLETED,
        ),
        (_ISS.COMPLETED, _ISI.TIMER_H): ((Action.REPORT_TIMEOUT,), _ISS.TERMINATED),
        (_ISS.COMPLETED, _ISI.TRANSPORT_ERROR): (
            (Action.REPORT_TRANSPORT_ERROR,),
            _ISS.TERMINATED,
        ),
        # ---- Confirmed (RFC 3261 17.2.1: absorb ACKs and INVITEs until Timer I)
        (_ISS.CONFIRMED, _ISI.REQUEST): (_DISCARD, _ISS.CONFIRMED),
        (_ISS.CONFIRMED, _ISI.ACK): (_DISCARD, _ISS.CONFIRMED),
        (_ISS.CONFIRMED, _ISI.TIMER_I): (_NO_ACTION, _ISS.TERMINATED),
        (_ISS.CONFIRMED, _ISI.TRANSPORT_ERROR): (_DISCARD, _ISS.CONFIRMED),
        # ---- Accepted (RFC 6026 7.1)
        (_ISS.ACCEPTED, _ISI.REQUEST): (_DISCARD, _ISS.ACCEPTED),
        (_ISS.ACCEPTED, _ISI.ACK): ((Action.PASS_ACK,), _ISS.ACCEPTED),
        (_ISS.ACCEPTED, _ISI.TU_2XX): ((Action.SEND_RESPONSE,), _ISS.ACCEPTED),
        (_ISS.ACCEPTED, _ISI.TIMER_L): (_NO_ACTION, _ISS.TERMINATED),
        (_ISS.ACCEPTED, _ISI.TRANSPORT_ERROR): (
            (Action.REPORT_TRANSPORT_ERROR,),
            _ISS.ACCEPTED,
        ),
    },
    network_inputs=frozenset({_ISI.REQUEST, _ISI.ACK}),
    timer_inputs={
        Timer.G: _ISI.TIMER_G,
        Timer.H: _ISI.TIMER_H,
        Timer.I: _ISI.TIMER_I,
        Timer.L: _ISI.TIMER_L,
    },
    timers_by_state={
        _ISS.PROCEEDING: frozenset(),
        _ISS.COMPLETED: frozenset({Timer.G, Timer.H}),
        _ISS.CONFIRMED: frozenset({Timer.I}),
        _ISS.ACCEPTED: frozenset({Timer.L}),
        _ISS.TERMINATED: frozenset(),
    },
)


# --------------------------------------------------------- non-INVITE server (NIST)
#
# RFC 3261 17.2.2, Figure 8.  Creation: the request is passed to the TU.
#
#   Trying     --request--------> Trying      discarded (17.2.2)
#   Trying     --1xx from TU----> Proceeding  send it
#   Trying     --200-699 from TU> Completed   send it, start J
#   Proceeding --request--------> Proceeding  resend the last provisional
#   Proceeding --1xx from TU----> Proceeding  send it
#   Proceeding --200-699 from TU> Completed   send it, start J
#   Proceeding --transport err--> Terminated  inform TU (17.2.4)
#   Completed  --request--------> Completed   resend the final response
#   Completed  --200-699 from TU> Completed   discarded (17.2.2: "MUST be discarded")
#   Completed  --Timer J--------> Terminated
#   Completed  --transport err--> Terminated  inform TU (17.2.4)
#
# Nothing has been sent in Trying, so a transport error there is illegal, as is a
# provisional response from the TU after the final one (RFC 3261 16.7 step 5 forwards
# no provisional after a final response).  An ACK never matches a non-INVITE server
# transaction (17.2.3), so the machine has no ACK input.


class NonInviteServerState(_IdentityEnum):
    """States of the non-INVITE server transaction (RFC 3261 Figure 8)."""

    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    TERMINATED = "Terminated"


class NonInviteServerInput(_IdentityEnum):
    """Inputs of the non-INVITE server transaction."""

    REQUEST = "request retransmission received"
    TU_1XX = "1xx from the TU"
    TU_2XX = "2xx from the TU"
    TU_300_699 = "300-699 from the TU"
    TIMER_J = "Timer J fired"
    TRANSPORT_ERROR = "transport error"


_NSS = NonInviteServerState
_NSI = NonInviteServerInput

NON_INVITE_SERVER: Machine[NonInviteServerState, NonInviteServerInput] = Machine(
    name="non-INVITE server",
    states=NonInviteServerState,
    inputs=NonInviteServerInput,
    initial_state=_NSS.TRYING,
    # RFC 3261 17.2.2: the request is passed to the TU.
    initial_actions=(Action.PASS_REQUEST,),
    terminated=_NSS.TERMINATED,
    table={
        # ---- Trying (RFC 3261 17.2.2)
        (_NSS.TRYING, _NSI.REQUEST): (_DISCARD, _NSS.TRYING),
        (_NSS.TRYING, _NSI.TU_1XX): ((Action.SEND_RESPONSE,), _NSS.PROCEEDING),
        (_NSS.TRYING, _NSI.TU_2XX): (
            (Action.SEND_RESPONSE, Action.START_TIMER_J),
            _NSS.COMPLETED,
        ),
        (_NSS.TRYING, _NSI.TU_300_699): (
            (Action.SEND_RESPONSE, Action.START_TIMER_J),
            _NSS.COMPLETED,
        ),
        # ---- Proceeding (RFC 3261 17.2.2)
        (_NSS.PROCEEDING, _NSI.REQUEST): ((Action.RESEND_RESPONSE,), _NSS.PROCEEDING),
        (_NSS.PROCEEDING, _NSI.TU_1XX): ((Action.SEND_RESPONSE,), _NSS.PROCEEDING),
        (_NSS.PROCEEDING, _NSI.TU_2XX): (
            (Action.SEND_RESPONSE, Action.START_TIMER_J),
            _NSS.COMPLETED,
        ),
        (_NSS.PROCEEDING, _NSI.TU_300_699): (
            (Action.SEND_RESPONSE, Action.START_TIMER_J),
            _NSS.COMPLETED,
        ),
        (_NSS.PROCEEDING, _NSI.TRANSPORT_ERROR): (
            (Action.REPORT_TRANSPORT_ERROR,),
            _NSS.TERMINATED,
        ),
        # ---- Completed (RFC 3261 17.2.2)
        (_NSS.COMPLETED, _NSI.REQUEST): ((Action.RESEND_RESPONSE,), _NSS.COMPLETED),
        (_NSS.COMPLETED, _NSI.TU_2XX): (_DISCARD, _NSS.COMPLETED),
        (_NSS.COMPLETED, _NSI.TU_300_699): (_DISCARD, _NSS.COMPLETED),
        (_NSS.COMPLETED, _NSI.TIMER_J): (_NO_ACTION, _NSS.TERMINATED),
        (_NSS.COMPLETED, _NSI.TRANSPORT_ERROR): (
            (Action.REPORT_TRANSPORT_ERROR,),
            _NSS.TERMINATED,
        ),
    },
    network_inputs=frozenset({_NSI.REQUEST}),
    timer_inputs={Timer.J: _NSI.TIMER_J},
    timers_by_state={
        _NSS.TRYING: frozenset(),
        _NSS.PROCEEDING: frozenset(),
        _NSS.COMPLETED: frozenset({Timer.J}),
        _NSS.TERMINATED: frozenset(),
    },
)

TransactionState: TypeAlias = (
    InviteClientState | NonInviteClientState | InviteServerState | NonInviteServerState
)
"""The state of any transaction."""

MACHINES: tuple[Machine[Any, Any], ...] = (
    INVITE_CLIENT,
    NON_INVITE_CLIENT,
    INVITE_SERVER,
    NON_INVITE_SERVER,
)
"""The four machines, for tests and documentation."""
