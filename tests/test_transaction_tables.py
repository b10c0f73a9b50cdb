"""The four transaction tables of sipcore._state against RFC 3261 17 and RFC 6026.

After h2's tests/test_state_machines.py: Hypothesis feeds every (state, input) pair to
each machine, which either has a table entry or raises LocalProtocolError.  The
explicit list below is written from the RFC figures, independently of the tables,
and must match them transition for transition.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipcore._errors import LocalProtocolError
from sipcore._state import (
    INVITE_CLIENT,
    INVITE_SERVER,
    MACHINES,
    NON_INVITE_CLIENT,
    NON_INVITE_SERVER,
    Action,
    InviteClientInput,
    InviteClientState,
    InviteServerInput,
    InviteServerState,
    Machine,
    NonInviteClientInput,
    NonInviteClientState,
    NonInviteServerInput,
    NonInviteServerState,
    Timer,
)

AnyMachine = Machine[Any, Any]

ICS, ICI = InviteClientState, InviteClientInput
NCS, NCI = NonInviteClientState, NonInviteClientInput
ISS, ISI = InviteServerState, InviteServerInput
NSS, NSI = NonInviteServerState, NonInviteServerInput

# Every transition of the four machines: (machine, state, input, next state), from
# RFC 3261 Figures 5 to 8 and RFC 6026 Figures 5 and 7, plus the explicit discards and
# the additions documented in sipcore/_state.py.
EXPECTED_TRANSITIONS: list[tuple[AnyMachine, Enum, Enum, Enum]] = [
    # ---- INVITE client: RFC 3261 Figure 5, RFC 6026 Figure 5
    (INVITE_CLIENT, ICS.CALLING, ICI.TIMER_A, ICS.CALLING),
    (INVITE_CLIENT, ICS.CALLING, ICI.TIMER_B, ICS.TERMINATED),
    (INVITE_CLIENT, ICS.CALLING, ICI.TIMER_C, ICS.CALLING),
    (INVITE_CLIENT, ICS.CALLING, ICI.RESPONSE_1XX, ICS.PROCEEDING),
    (INVITE_CLIENT, ICS.CALLING, ICI.RESPONSE_2XX, ICS.ACCEPTED),
    (INVITE_CLIENT, ICS.CALLING, ICI.RESPONSE_300_699, ICS.COMPLETED),
    (INVITE_CLIENT, ICS.CALLING, ICI.TRANSPORT_ERROR, ICS.TERMINATED),
    (INVITE_CLIENT, ICS.CALLING, ICI.TU_ABANDON, ICS.TERMINATED),
    (INVITE_CLIENT, ICS.PROCEEDING, ICI.TIMER_C, ICS.PROCEEDING),
    (INVITE_CLIENT, ICS.PROCEEDING, ICI.RESPONSE_1XX, ICS.PROCEEDING),
    (INVITE_CLIENT, ICS.PROCEEDING, ICI.RESPONSE_2XX, ICS.ACCEPTED),
    (INVITE_CLIENT, ICS.PROCEEDING, ICI.RESPONSE_300_699, ICS.COMPLETED),
    (INVITE_CLIENT, ICS.PROCEEDING, ICI.TRANSPORT_ERROR, ICS.TERMINATED),
    (INVITE_CLIENT, ICS.PROCEEDING, ICI.TU_ABANDON, ICS.TERMINATED),
    (INVITE_CLIENT, ICS.COMPLETED, ICI.RESPONSE_1XX, ICS.COMPLETED),
    (INVITE_CLIENT, ICS.COMPLETED, ICI.RESPONSE_2XX, ICS.COMPLETED),
    (INVITE_CLIENT, ICS.COMPLETED, ICI.RESPONSE_300_699, ICS.COMPLETED),
    (INVITE_CLIENT, ICS.COMPLETED, ICI.TIMER_D, ICS.TERMINATED),
    (INVITE_CLIENT, ICS.COMPLETED, ICI.TRANSPORT_ERROR, ICS.TERMINATED),
    (INVITE_CLIENT, ICS.ACCEPTED, ICI.RESPONSE_1XX, ICS.ACCEPTED),
    (INVITE_CLIENT, ICS.ACCEPTED, ICI.RESPONSE_2XX, ICS.ACCEPTED),
    (INVITE_CLIENT, ICS.ACCEPTED, ICI.RESPONSE_300_699, ICS.ACCEPTED),
    (INVITE_CLIENT, ICS.ACCEPTED, ICI.TIMER_M, ICS.TERMINATED),
    (INVITE_CLIENT, ICS.ACCEPTED, ICI.TRANSPORT_ERROR, ICS.ACCEPTED),
    # ---- non-INVITE client: RFC 3261 Figure 6
    (NON_INVITE_CLIENT, NCS.TRYING, NCI.TIMER_E, NCS.TRYING),
    (NON_INVITE_CLIENT, NCS.TRYING, NCI.TIMER_F, NCS.TERMINATED),
    (NON_INVITE_CLIENT, NCS.TRYING, NCI.RESPONSE_1XX, NCS.PROCEEDING),
    (NON_INVITE_CLIENT, NCS.TRYING, NCI.RESPONSE_2XX, NCS.COMPLETED),
    (NON_INVITE_CLIENT, NCS.TRYING, NCI.RESPONSE_300_699, NCS.COMPLETED),
    (NON_INVITE_CLIENT, NCS.TRYING, NCI.TRANSPORT_ERROR, NCS.TERMINATED),
    (NON_INVITE_CLIENT, NCS.PROCEEDING, NCI.TIMER_E, NCS.PROCEEDING),
    (NON_INVITE_CLIENT, NCS.PROCEEDING, NCI.TIMER_F, NCS.TERMINATED),
    (NON_INVITE_CLIENT, NCS.PROCEEDING, NCI.RESPONSE_1XX, NCS.PROCEEDING),
    (NON_INVITE_CLIENT, NCS.PROCEEDING, NCI.RESPONSE_2XX, NCS.COMPLETED),
    (NON_INVITE_CLIENT, NCS.PROCEEDING, NCI.RESPONSE_300_699, NCS.COMPLETED),
    (NON_INVITE_CLIENT, NCS.PROCEEDING, NCI.TRANSPORT_ERROR, NCS.TERMINATED),
    (NON_INVITE_CLIENT, NCS.COMPLETED, NCI.RESPONSE_1XX, NCS.COMPLETED),
    (NON_INVITE_CLIENT, NCS.COMPLETED, NCI.RESPONSE_2XX, NCS.COMPLETED),
    (NON_INVITE_CLIENT, NCS.COMPLETED, NCI.RESPONSE_300_699, NCS.COMPLETED),
    (NON_INVITE_CLIENT, NCS.COMPLETED, NCI.TIMER_K, NCS.TERMINATED),
    (NON_INVITE_CLIENT, NCS.COMPLETED, NCI.TRANSPORT_ERROR, NCS.COMPLETED),
    # ---- INVITE server: RFC 3261 Figure 7, RFC 6026 Figure 7
    (INVITE_SERVER, ISS.PROCEEDING, ISI.REQUEST, ISS.PROCEEDING),
    (INVITE_SERVER, ISS.PROCEEDING, ISI.ACK, ISS.PROCEEDING),
    (INVITE_SERVER, ISS.PROCEEDING, ISI.TU_1XX, ISS.PROCEEDING),
    (INVITE_SERVER, ISS.PROCEEDING, ISI.TU_2XX, ISS.ACCEPTED),
    (INVITE_SERVER, ISS.PROCEEDING, ISI.TU_300_699, ISS.COMPLETED),
    (INVITE_SERVER, ISS.PROCEEDING, ISI.TRANSPORT_ERROR, ISS.TERMINATED),
    (INVITE_SERVER, ISS.COMPLETED, ISI.REQUEST, ISS.COMPLETED),
    (INVITE_SERVER, ISS.COMPLETED, ISI.ACK, ISS.CONFIRMED),
    (INVITE_SERVER, ISS.COMPLETED, ISI.TIMER_G, ISS.COMPLETED),
    (INVITE_SERVER, ISS.COMPLETED, ISI.TIMER_H, ISS.TERMINATED),
    (INVITE_SERVER, ISS.COMPLETED, ISI.TRANSPORT_ERROR, ISS.TERMINATED),
    (INVITE_SERVER, ISS.CONFIRMED, ISI.REQUEST, ISS.CONFIRMED),
    (INVITE_SERVER, ISS.CONFIRMED, ISI.ACK, ISS.CONFIRMED),
    (INVITE_SERVER, ISS.CONFIRMED, ISI.TIMER_I, ISS.TERMINATED),
    (INVITE_SERVER, ISS.CONFIRMED, ISI.TRANSPORT_ERROR, ISS.CONFIRMED),
    (INVITE_SERVER, ISS.ACCEPTED, ISI.REQUEST, ISS.ACCEPTED),
    (INVITE_SERVER, ISS.ACCEPTED, ISI.ACK, ISS.ACCEPTED),
    (INVITE_SERVER, ISS.ACCEPTED, ISI.TU_2XX, ISS.ACCEPTED),
    (INVITE_SERVER, ISS.ACCEPTED, ISI.TIMER_L, ISS.TERMINATED),
    (INVITE_SERVER, ISS.ACCEPTED, ISI.TRANSPORT_ERROR, ISS.ACCEPTED),
    # ---- non-INVITE server: RFC 3261 Figure 8
    (NON_INVITE_SERVER, NSS.TRYING, NSI.REQUEST, NSS.TRYING),
    (NON_INVITE_SERVER, NSS.TRYING, NSI.TU_1XX, NSS.PROCEEDING),
    (NON_INVITE_SERVER, NSS.TRYING, NSI.TU_2XX, NSS.COMPLETED),
    (NON_INVITE_SERVER, NSS.TRYING, NSI.TU_300_699, NSS.COMPLETED),
    (NON_INVITE_SERVER, NSS.PROCEEDING, NSI.REQUEST, NSS.PROCEEDING),
    (NON_INVITE_SERVER, NSS.PROCEEDING, NSI.TU_1XX, NSS.PROCEEDING),
    (NON_INVITE_SERVER, NSS.PROCEEDING, NSI.TU_2XX, NSS.COMPLETED),
    (NON_INVITE_SERVER, NSS.PROCEEDING, NSI.TU_300_699, NSS.COMPLETED),
    (NON_INVITE_SERVER, NSS.PROCEEDING, NSI.TRANSPORT_ERROR, NSS.TERMINATED),
    (NON_INVITE_SERVER, NSS.COMPLETED, NSI.REQUEST, NSS.COMPLETED),
    (NON_INVITE_SERVER, NSS.COMPLETED, NSI.TU_2XX, NSS.COMPLETED),
    (NON_INVITE_SERVER, NSS.COMPLETED, NSI.TU_300_699, NSS.COMPLETED),
    (NON_INVITE_SERVER, NSS.COMPLETED, NSI.TIMER_J, NSS.TERMINATED),
    (NON_INVITE_SERVER, NSS.COMPLETED, NSI.TRANSPORT_ERROR, NSS.TERMINATED),
]

# Rules of the RFC text that a transition's actions must follow: (machine, state,
# input, actions that must be there, actions that must not).
EXPECTED_ACTIONS: list[tuple[AnyMachine, Enum, Enum, set[Action], set[Action]]] = [
    # RFC 3261 17.1.1.2: Timer A retransmits and doubles.
    (
        INVITE_CLIENT,
        ICS.CALLING,
        ICI.TIMER_A,
        {Action.RESEND_REQUEST, Action.RESTART_TIMER_A},
        set(),
    ),
    (INVITE_CLIENT, ICS.CALLING, ICI.TIMER_B, {Action.REPORT_TIMEOUT}, set()),
    # RFC 3261 17.1.1.3: the client transaction ACKs a 300-699 and passes it up once.
    (
        INVITE_CLIENT,
        ICS.PROCEEDING,
        ICI.RESPONSE_300_699,
        {Action.SEND_ACK, Action.PASS_RESPONSE, Action.START_TIMER_D},
        set(),
    ),
    (
        INVITE_CLIENT,
        ICS.COMPLETED,
        ICI.RESPONSE_300_699,
        {Action.RESEND_ACK},
        {Action.PASS_RESPONSE, Action.SEND_ACK},
    ),
    # RFC 6026 7.2: 2xx passed to the TU, never ACKed by the transaction.
    (
        INVITE_CLIENT,
        ICS.CALLING,
        ICI.RESPONSE_2XX,
        {Action.PASS_RESPONSE, Action.START_TIMER_M},
        {Action.SEND_ACK},
    ),
    (INVITE_CLIENT, ICS.ACCEPTED, ICI.RESPONSE_2XX, {Action.PASS_RESPONSE}, {Action.SEND_ACK}),
    (INVITE_CLIENT, ICS.ACCEPTED, ICI.RESPONSE_300_699, {Action.DISCARD}, set()),
    # RFC 3261 16.7 step 2 / 16.8: Timer C.
    (INVITE_CLIENT, ICS.PROCEEDING, ICI.RESPONSE_1XX, {Action.RESTART_TIMER_C}, set()),
    (INVITE_CLIENT, ICS.PROCEEDING, ICI.TIMER_C, {Action.REPORT_TIMER_C}, set()),
    # RFC 3261 17.1.2.2: E doubles in Trying, T2 in Proceeding; Completed absorbs.
    (NON_INVITE_CLIENT, NCS.TRYING, NCI.TIMER_E, {Action.RESTART_TIMER_E}, set()),
    (
        NON_INVITE_CLIENT,
        NCS.PROCEEDING,
        NCI.TIMER_E,
        {Action.RESEND_REQUEST, Action.RESTART_TIMER_E_WITH_T2},
        set(),
    ),
    (NON_INVITE_CLIENT, NCS.COMPLETED, NCI.RESPONSE_2XX, {Action.DISCARD}, set()),
    (NON_INVITE_CLIENT, NCS.TRYING, NCI.RESPONSE_300_699, {Action.START_TIMER_K}, set()),
    # RFC 3261 17.2.1: retransmitted INVITEs re-send the last response; ACK absorbed.
    (INVITE_SERVER, ISS.PROCEEDING, ISI.REQUEST, {Action.RESEND_RESPONSE}, set()),
    (INVITE_SERVER, ISS.COMPLETED, ISI.REQUEST, {Action.RESEND_RESPONSE}, set()),
    (INVITE_SERVER, ISS.COMPLETED, ISI.ACK, {Action.START_TIMER_I}, {Action.PASS_ACK}),
    (INVITE_SERVER, ISS.CONFIRMED, ISI.ACK, {Action.DISCARD}, set()),
    (INVITE_SERVER, ISS.CONFIRMED, ISI.REQUEST, {Action.DISCARD}, set()),
    (
        INVITE_SERVER,
        ISS.PROCEEDING,
        ISI.TU_300_699,
        {Action.SEND_RESPONSE, Action.START_TIMER_G, Action.START_TIMER_H},
        set(),
    ),
    # RFC 6026 7.1: Accepted absorbs INVITEs, passes ACKs, sends the TU's 2xx.
    (INVITE_SERVER, ISS.ACCEPTED, ISI.REQUEST, {Action.DISCARD}, {Action.RESEND_RESPONSE}),
    (INVITE_SERVER, ISS.ACCEPTED, ISI.ACK, {Action.PASS_ACK}, set()),
    (INVITE_SERVER, ISS.ACCEPTED, ISI.TU_2XX, {Action.SEND_RESPONSE}, set()),
    (INVITE_SERVER, ISS.ACCEPTED, ISI.TRANSPORT_ERROR, {Action.REPORT_TRANSPORT_ERROR}, set()),
    # RFC 3261 17.2.2: Trying discards retransmissions; Completed discards TU finals.
    (NON_INVITE_SERVER, NSS.TRYING, NSI.REQUEST, {Action.DISCARD}, {Action.RESEND_RESPONSE}),
    (NON_INVITE_SERVER, NSS.PROCEEDING, NSI.REQUEST, {Action.RESEND_RESPONSE}, set()),
    (NON_INVITE_SERVER, NSS.COMPLETED, NSI.REQUEST, {Action.RESEND_RESPONSE}, set()),
    (NON_INVITE_SERVER, NSS.COMPLETED, NSI.TU_2XX, {Action.DISCARD}, {Action.SEND_RESPONSE}),
]

# Which timer each timer-starting action starts.
ACTION_TIMERS = {
    Action.START_TIMER_A: Timer.A,
    Action.RESTART_TIMER_A: Timer.A,
    Action.START_TIMER_B: Timer.B,
    Action.START_TIMER_C: Timer.C,
    Action.RESTART_TIMER_C: Timer.C,
    Action.START_TIMER_D: Timer.D,
    Action.START_TIMER_E: Timer.E,
    Action.RESTART_TIMER_E: Timer.E,
    Action.RESTART_TIMER_E_WITH_T2: Timer.E,
    Action.START_TIMER_F: Timer.F,
    Action.START_TIMER_G: Timer.G,
    Action.RESTART_TIMER_G: Timer.G,
    Action.START_TIMER_H: Timer.H,
    Action.START_TIMER_I: Timer.I,
    Action.START_TIMER_J: Timer.J,
    Action.START_TIMER_K: Timer.K,
    Action.START_TIMER_L: Timer.L,
    Action.START_TIMER_M: Timer.M,
}


def _name(value: object) -> str:
    return value.name if isinstance(value, Enum) else str(getattr(value, "name", value))


@st.composite
def machine_state_input(draw: st.DrawFn) -> tuple[AnyMachine, Enum, Enum]:
    machine = draw(st.sampled_from(MACHINES))
    state = draw(st.sampled_from(list(machine.states)))
    machine_input = draw(st.sampled_from(list(machine.inputs)))
    return machine, state, machine_input


@given(machine_state_input())
def test_every_pair_has_an_entry_or_raises(pair: tuple[AnyMachine, Enum, Enum]) -> None:
    machine, state, machine_input = pair
    if (state, machine_input) in machine.table:
        actions, next_state = machine.transition(state, machine_input)
        assert (actions, next_state) == machine.table[state, machine_input]
        assert isinstance(next_state, machine.states)
        assert all(isinstance(action, Action) for action in actions)
    else:
        with pytest.raises(LocalProtocolError):
            machine.transition(state, machine_input)


@pytest.mark.parametrize("machine", MACHINES, ids=[machine.name for machine in MACHINES])
def test_every_pair_exhaustively(machine: AnyMachine) -> None:
    # The same property as above over the whole product, so no pair is left to chance.
    for state in machine.states:
        for machine_input in machine.inputs:
            if (state, machine_input) in machine.table:
                assert (
                    machine.transition(state, machine_input) == machine.table[state, machine_input]
                )
            else:
                with pytest.raises(LocalProtocolError):
                    machine.transition(state, machine_input)
            if machine_input in machine.network_inputs:
                assert ((state, machine_input) in machine.table) == (
                    state is not machine.terminated
                )


@given(machine_state_input())
def test_network_inputs_are_accepted_in_every_live_state(
    pair: tuple[AnyMachine, Enum, Enum],
) -> None:
    machine, state, machine_input = pair
    if state is machine.terminated or machine_input not in machine.network_inputs:
        return
    # A peer may send anything at any time: never an error, at worst a discard.
    actions, _ = machine.transition(state, machine_input)
    assert actions


@given(machine_state_input())
def test_terminated_accepts_nothing(pair: tuple[AnyMachine, Enum, Enum]) -> None:
    machine, _, machine_input = pair
    with pytest.raises(LocalProtocolError):
        machine.transition(machine.terminated, machine_input)


@given(
    st.sampled_from(MACHINES).flatmap(
        lambda machine: st.tuples(
            st.just(machine),
            st.lists(st.sampled_from(list(machine.inputs)), max_size=30),
        )
    )
)
def test_random_walks_stay_in_the_table(walk: tuple[AnyMachine, list[Enum]]) -> None:
    machine, inputs = walk
    state = machine.initial_state
    for machine_input in inputs:
        try:
            _, state = machine.transition(state, machine_input)
        except LocalProtocolError:
            assert (state, machine_input) not in machine.table
        # The state reached is always one with a timer set of its own.
        assert state in machine.timers_by_state


@pytest.mark.parametrize(
    ("machine", "state", "machine_input", "next_state"),
    EXPECTED_TRANSITIONS,
    ids=[
        f"{machine.name}-{_name(state)}-{_name(machine_input)}"
        for machine, state, machine_input, _ in EXPECTED_TRANSITIONS
    ],
)
def test_transition_follows_the_rfc_figures(
    machine: AnyMachine, state: Enum, machine_input: Enum, next_state: Enum
) -> None:
    _, actual = machine.transition(state, machine_input)
    assert actual is next_state


@pytest.mark.parametrize("machine", MACHINES, ids=[machine.name for machine in MACHINES])
def test_every_transition_is_listed(machine: AnyMachine) -> None:
    expected = {
        (state, machine_input)
        for listed, state, machine_input, _ in EXPECTED_TRANSITIONS
        if listed is machine
    }
    assert set(machine.table) == expected


@pytest.mark.parametrize(
    ("machine", "state", "machine_input", "required", "forbidden"),
    EXPECTED_ACTIONS,
    ids=[
        f"{machine.name}-{_name(state)}-{_name(machine_input)}"
        for machine, state, machine_input, _, _ in EXPECTED_ACTIONS
    ],
)
def test_transition_actions_follow_the_rfc_text(
    machine: AnyMachine,
    state: Enum,
    machine_input: Enum,
    required: set[Action],
    forbidden: set[Action],
) -> None:
    actions, _ = machine.transition(state, machine_input)
    assert required <= set(actions)
    assert not forbidden & set(actions)


@pytest.mark.parametrize("machine", MACHINES, ids=[machine.name for machine in MACHINES])
def test_timer_inputs_exist_exactly_where_their_timer_runs(machine: AnyMachine) -> None:
    for timer, machine_input in machine.timer_inputs.items():
        for state in machine.states:
            running = timer in machine.timers_by_state[state]
            assert ((state, machine_input) in machine.table) == running, (state, timer)


@pytest.mark.parametrize("machine", MACHINES, ids=[machine.name for machine in MACHINES])
def test_timers_start_only_in_the_states_where_they_run(machine: AnyMachine) -> None:
    for (_, _), (actions, next_state) in machine.table.items():
        for action in actions:
            if action in ACTION_TIMERS:
                assert ACTION_TIMERS[action] in machine.timers_by_state[next_state], action
    for action in machine.initial_actions:
        if action in ACTION_TIMERS:
            timer = ACTION_TIMERS[action]
            assert timer in machine.timers_by_state[machine.initial_state]


@pytest.mark.parametrize("machine", MACHINES, ids=[machine.name for machine in MACHINES])
def test_every_state_is_reachable_and_can_terminate(machine: AnyMachine) -> None:
    successors: dict[Enum, set[Enum]] = {state: set() for state in machine.states}
    for (state, _), (_, next_state) in machine.table.items():
        successors[state].add(next_state)
    reachable = {machine.initial_state}
    frontier = [machine.initial_state]
    while frontier:
        for next_state in successors[frontier.pop()]:
            if next_state not in reachable:
                reachable.add(next_state)
                frontier.append(next_state)
    assert reachable == set(machine.states.__members__.values())
    for state in machine.states:
        seen = {state}
        frontier = [state]
        while frontier:
            for next_state in successors[frontier.pop()]:
                if next_state not in seen:
                    seen.add(next_state)
                    frontier.append(next_state)
        assert machine.terminated in seen, state
