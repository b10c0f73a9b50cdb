"""The transaction layer (sipcore._transactions) on virtual time.

Timers are asserted through ``get_timer()`` values; time only moves when a test
passes a larger ``now``.  The last tests connect two layers through a fake link
that can lose chosen messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipcore._errors import LocalProtocolError
from sipcore._message import Request, Response, make_cancel, make_response, parse_message
from sipcore._state import (
    InviteClientState,
    InviteServerState,
    NonInviteClientState,
    NonInviteServerState,
    Timer,
)
from sipcore._transactions import (
    AckReceived,
    CancelReceived,
    Event,
    OutgoingMessage,
    RequestReceived,
    ResponseReceived,
    StrayResponseReceived,
    TimerCFired,
    TransactionConfig,
    TransactionId,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimedOut,
    TransportFailed,
)

CLIENT = ("192.0.2.1", 5060)
SERVER = ("198.51.100.7", 5060)

INVITE_BYTES = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP client.atlanta.example.com:5060;branch=z9hG4bK74bf9\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b"Call-ID: 3848276298220188511@atlanta.example.com\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:alice@client.atlanta.example.com>\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


# ----------------------------------------------------------------------- helpers


def parse_request(data: bytes) -> Request:
    message = parse_message(data)
    assert isinstance(message, Request)
    message.validate()
    return message


def parse_response(data: bytes) -> Response:
    message = parse_message(data)
    assert isinstance(message, Response)
    message.validate()
    return message


def build_request(
    method: str = "INVITE",
    branch: str | None = "z9hG4bKbranch1",
    *,
    transport: str = "UDP",
    sent_by: str = "client.atlanta.example.com",
    call_id: str = "call-1@atlanta.example.com",
    cseq: int = 1,
    cseq_method: str | None = None,
    to_tag: str | None = None,
    uri: str = "sip:bob@biloxi.example.com",
) -> Request:
    """A request from literal bytes, as the transport would hand it over."""
    via = f"SIP/2.0/{transport} {sent_by}" + ("" if branch is None else f";branch={branch}")
    to = "Bob <sip:bob@biloxi.example.com>" + ("" if to_tag is None else f";tag={to_tag}")
    data = (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "Max-Forwards: 70\r\n"
        f"To: {to}\r\n"
        "From: Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {cseq_method or method}\r\n"
        "Content-Length: 0\r\n"
        "\r\n"
    ).encode()
    return parse_request(data)


def response_to(request: Request, status: int, to_tag: str | None = "bobtag") -> Response:
    """A response to ``request`` as it arrives from the network (parsed bytes)."""
    tag = to_tag if status > 100 else None
    return parse_response(make_response(request, status, to_tag=tag).to_bytes())


def ack_for(
    request: Request, to_tag: str | None = "bobtag", *, branch: str | None = "same"
) -> Request:
    """The ACK a UAC sends: the request's branch for a non-2xx (17.1.1.3), another
    one for a 2xx (13.2.2.4), or none at all (``branch=None``, RFC 2543)."""
    via = request.via
    return build_request(
        "ACK",
        via.branch if branch == "same" else branch,
        transport=via.transport,
        sent_by=via.host,
        call_id=request.call_id,
        cseq=request.cseq.number,
        to_tag=to_tag,
        uri=request.uri_text,
    )


def events(layer: TransactionLayer) -> list[Event]:
    drained = []
    while (event := layer.next_event()) is not None:
        drained.append(event)
    return drained


def sent(layer: TransactionLayer) -> list[bytes]:
    return [message.data for message in layer.messages_to_send()]


def start_line(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


def run_timers(
    layer: TransactionLayer, until: float
) -> list[tuple[float, list[bytes], list[Event]]]:
    """Fire every timer up to ``until``; return (time, bytes sent, events) per firing."""
    log = []
    while (deadline := layer.get_timer()) is not None and deadline <= until:
        layer.handle_timer(deadline)
        log.append((deadline, sent(layer), events(layer)))
    return log


def server_transaction(
    layer: TransactionLayer, request: Request, *, reliable: bool = False, now: float = 0.0
) -> TransactionId:
    layer.receive_request(request, CLIENT, reliable=reliable, now=now)
    (event,) = [event for event in events(layer) if isinstance(event, RequestReceived)]
    sent(layer)
    return event.transaction_id


def test_owed_count_leaves_out_clients_waiting_only_for_retransmissions() -> None:
    layer = TransactionLayer()
    invite = build_request()
    layer.send_request(invite, SERVER, reliable=False, now=0.0)
    assert (layer.transaction_count, layer.owed_count()) == (1, 1)  # Calling
    layer.receive_response(response_to(invite, 486), SERVER, now=1.0)
    # Completed: only absorbs retransmitted 486s until Timer D (RFC 3261 17.1.1.2).
    assert (layer.transaction_count, layer.owed_count()) == (1, 0)
    options = build_request("OPTIONS")
    served = server_transaction(layer, options, now=1.0)
    layer.send_response(served, response_to(options, 200), now=1.0)
    # A server transaction that answered still absorbs retransmitted requests
    # (Timer J, 17.2.2): owed.
    assert (layer.transaction_count, layer.owed_count()) == (2, 1)


# ------------------------------------------------------------- client: schedules


def test_invite_client_over_udp_retransmits_until_timer_b() -> None:
    layer = TransactionLayer()
    invite = parse_request(INVITE_BYTES)
    transaction = layer.send_request(invite, SERVER, reliable=False, now=0.0)
    first = layer.messages_to_send()
    assert first == [OutgoingMessage(invite.to_bytes(), SERVER)]
    assert layer.get_timer() == 0.5
    log = run_timers(layer, until=100.0)
    resent_at = [time for time, data, _ in log if data]
    assert resent_at == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    # RFC 3261 17.1.1.2: a retransmission is the same bytes again.
    assert all(data == [first[0].data] for _, data, _ in log if data)
    time, data, fired = log[-1]
    assert (time, data) == (32.0, [])
    assert fired == [
        TransactionTimedOut(transaction_id=transaction, timer=Timer.B),
        TransactionTerminated(transaction_id=transaction),
    ]
    assert layer.get_timer() is None
    assert layer.transaction_state(transaction) is None


def test_invite_client_over_reliable_transport_does_not_retransmit() -> None:
    layer = TransactionLayer()
    transaction = layer.send_request(build_request(), SERVER, reliable=True, now=0.0)
    assert len(sent(layer)) == 1
    assert layer.get_timer() == 32.0  # only Timer B
    log = run_timers(layer, until=100.0)
    assert [(time, data) for time, data, _ in log] == [(32.0, [])]
    assert log[0][2][0] == TransactionTimedOut(transaction_id=transaction, timer=Timer.B)


def test_invite_client_proceeding_stops_retransmissions_and_timer_b() -> None:
    layer = TransactionLayer()
    invite = build_request()
    transaction = layer.send_request(invite, SERVER, reliable=False, now=0.0)
    sent(layer)
    layer.receive_response(response_to(invite, 180), SERVER, now=0.7)
    assert layer.transaction_state(transaction) is InviteClientState.PROCEEDING
    # RFC 3261 17.1.1.2: no more retransmissions, and Timer B only runs in Calling.
    assert layer.get_timer() is None
    assert [type(event) for event in events(layer)] == [ResponseReceived]


def test_non_invite_client_over_udp_retransmits_until_timer_f() -> None:
    layer = TransactionLayer()
    transaction = layer.send_request(build_request("OPTIONS"), SERVER, reliable=False, now=0.0)
    assert len(sent(layer)) == 1
    log = run_timers(layer, until=100.0)
    resent_at = [time for time, data, _ in log if data]
    # RFC 3261 17.1.2.2: T1, doubling, capped at T2 = 4 s.
    assert resent_at == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert log[-1][0] == 32.0
    assert log[-1][2] == [
        TransactionTimedOut(transaction_id=transaction, timer=Timer.F),
        TransactionTerminated(transaction_id=transaction),
    ]


def test_non_invite_client_in_proceeding_retransmits_every_t2() -> None:
    layer = TransactionLayer()
    request = build_request("REGISTER")
    transaction = layer.send_request(request, SERVER, reliable=False, now=0.0)
    sent(layer)
    layer.receive_response(response_to(request, 100), SERVER, now=0.2)
    assert layer.transaction_state(transaction) is NonInviteClientState.PROCEEDING
    log = run_timers(layer, until=100.0)
    resent_at = [time for time, data, _ in log if data]
    # The pending Timer E fires at 0.5, then restarts at T2 (RFC 3261 17.1.2.2).
    assert resent_at == [0.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5]
    assert log[-1][0] == 32.0
    assert isinstance(log[-1][2][0], TransactionTimedOut)


def test_non_invite_client_over_reliable_transport_only_has_timer_f() -> None:
    layer = TransactionLayer()
    layer.send_request(build_request("OPTIONS"), SERVER, reliable=True, now=0.0)
    sent(layer)
    assert layer.get_timer() == 32.0
    log = run_timers(layer, until=100.0)
    assert [(time, data) for time, data, _ in log] == [(32.0, [])]


def test_custom_t1_and_t2() -> None:
    config = TransactionConfig(t1=0.25, t2=1.0)
    layer = TransactionLayer(config)
    layer.send_request(build_request(), SERVER, reliable=False, now=0.0)
    log = run_timers(layer, until=100.0)
    assert [time for time, data, _ in log if data] == [0.25, 0.75, 1.75, 3.75, 7.75, 15.75]
    assert log[-1][0] == 16.0  # Timer B = 64*T1

    layer = TransactionLayer(config)
    layer.send_request(build_request("OPTIONS"), SERVER, reliable=False, now=0.0)
    log = run_timers(layer, until=100.0)
    resent_at = [time for time, data, _ in log if data]
    assert resent_at[:6] == [0.25, 0.75, 1.75, 2.75, 3.75, 4.75]  # capped at T2 = 1 s
    assert log[-1][0] == 16.0  # Timer F = 64*T1


def test_config_rejects_unusable_values() -> None:
    with pytest.raises(LocalProtocolError):
        TransactionConfig(t1=0)
    with pytest.raises(LocalProtocolError):
        TransactionConfig(t1=5.0, t2=4.0)
    with pytest.raises(FrozenInstanceError):
        TransactionConfig().t1 = 1.0  # type: ignore[misc]


# ------------------------------------------------------------- client: outcomes


def test_invite_client_acks_a_failure_and_waits_timer_d() -> None:
    layer = TransactionLayer()
    invite = build_request()
    transaction = layer.send_request(invite, SERVER, reliable=False, now=0.0)
    sent(layer)
    busy = response_to(invite, 486)
    layer.receive_response(busy, SERVER, now=1.0)
    (ack,) = layer.messages_to_send()
    assert ack.destination == SERVER
    ack_request = parse_request(ack.data)
    # RFC 3261 17.1.1.3: same branch, CSeq number, To tag of the response.
    assert ack_request.method == "ACK"
    assert ack_request.via.branch == invite.via.branch
    assert ack_request.cseq.number == 1
    assert ack_request.cseq.method == "ACK"
    assert ack_request.to.tag == "bobtag"
    assert events(layer) == [ResponseReceived(response=busy, transaction_id=transaction)]
    assert layer.transaction_state(transaction) is InviteClientState.COMPLETED
    assert layer.get_timer() == 33.0  # Timer D = 32 s
    # A retransmitted 486 re-sends the same ACK and is not passed up again.
    layer.receive_response(response_to(invite, 486), SERVER, now=2.0)
    assert sent(layer) == [ack.data]
    assert events(layer) == []
    log = run_timers(layer, until=100.0)
    assert log == [(33.0, [], [TransactionTerminated(transaction_id=transaction)])]


def test_timer_d_is_configurable_and_zero_over_reliable_transports() -> None:
    layer = TransactionLayer(TransactionConfig(timer_d=40.0))
    invite = build_request()
    layer.send_request(invite, SERVER, reliable=False, now=0.0)
    layer.receive_response(response_to(invite, 603), SERVER, now=1.0)
    assert layer.get_timer() == 41.0

    layer = TransactionLayer()
    invite = build_request(transport="TCP")
    transaction = layer.send_request(invite, SERVER, reliable=True, now=0.0)
    sent(layer)
    layer.receive_response(response_to(invite, 404), SERVER, now=1.0)
    assert [start_line(data) for data in sent(layer)] == [b"ACK sip:bob@biloxi.example.com SIP/2.0"]
    assert [type(event) for event in events(layer)] == [ResponseReceived, TransactionTerminated]
    assert layer.transaction_state(transaction) is None
    assert layer.get_timer() is None


def test_non_invite_client_timer_k() -> None:
    layer = TransactionLayer()
    request = build_request("OPTIONS")
    transaction = layer.send_request(request, SERVER, reliable=False, now=0.0)
    layer.receive_response(response_to(request, 200), SERVER, now=1.0)
    assert layer.transaction_state(transaction) is NonInviteClientState.COMPLETED
    assert layer.get_timer() == 6.0  # Timer K = T4
    # RFC 3261 17.1.2.2: retransmitted responses are absorbed in Completed.
    layer.receive_response(response_to(request, 200), SERVER, now=2.0)
    assert [type(event) for event in events(layer)] == [ResponseReceived]
    assert run_timers(layer, until=100.0)[-1][2] == [
        TransactionTerminated(transaction_id=transaction)
    ]

    layer = TransactionLayer()
    request = build_request("OPTIONS", transport="TLS")
    transaction = layer.send_request(request, SERVER, reliable=True, now=0.0)
    layer.receive_response(response_to(request, 200), SERVER, now=1.0)
    assert [type(event) for event in events(layer)] == [ResponseReceived, TransactionTerminated]
    assert layer.get_timer() is None


def test_invite_client_accepted_passes_every_2xx_until_timer_m() -> None:
    layer = TransactionLayer()
    invite = build_request()
    transaction = layer.send_request(invite, SERVER, reliable=False, now=0.0)
    sent(layer)
    layer.receive_response(response_to(invite, 180), SERVER, now=0.5)
    layer.receive_response(response_to(invite, 200), SERVER, now=1.0)
    assert layer.transaction_state(transaction) is InviteClientState.ACCEPTED
    assert sent(layer) == []  # the ACK to a 2xx is the TU's (RFC 3261 13.2.2.4)
    assert layer.get_timer() == 33.0  # Timer M = 64*T1 (RFC 6026 7.2)
    # RFC 6026 7.2: retransmissions (and forked 2xx) go to the TU; others do not.
    layer.receive_response(response_to(invite, 200), SERVER, now=2.0)
    layer.receive_response(response_to(invite, 200, to_tag="othertag"), SERVER, now=2.5)
    layer.receive_response(response_to(invite, 486), SERVER, now=3.0)
    layer.receive_response(response_to(invite, 180), SERVER, now=3.5)
    received = [event for event in events(layer) if isinstance(event, ResponseReceived)]
    assert [event.response.status for event in received] == [180, 200, 200, 200]
    assert received[-1].response.to.tag == "othertag"
    assert run_timers(layer, until=100.0) == [
        (33.0, [], [TransactionTerminated(transaction_id=transaction)])
    ]
    # After Timer M a 2xx is stray: a proxy forwards it statelessly (RFC 6026 8.4).
    late = response_to(invite, 200)
    layer.receive_response(late, SERVER, now=40.0)
    assert events(layer) == [StrayResponseReceived(response=late, source=SERVER)]


def test_invite_client_in_completed_still_passes_a_2xx() -> None:
    layer = TransactionLayer()
    invite = build_request()
    transaction = layer.send_request(invite, SERVER, reliable=False, now=0.0)
    layer.receive_response(response_to(invite, 500), SERVER, now=1.0)
    events(layer)
    sent(layer)
    layer.receive_response(response_to(invite, 100), SERVER, now=1.5)
    assert events(layer) == []  # a 1xx in Completed is discarded
    layer.receive_response(response_to(invite, 200), SERVER, now=2.0)
    assert [type(event) for event in events(layer)] == [ResponseReceived]
    assert sent(layer) == []
    assert layer.transaction_state(transaction) is InviteClientState.COMPLETED


def test_timer_c_restarts_on_provisional_responses_and_reports() -> None:
    layer = TransactionLayer()
    invite = build_request()
    transaction = layer.send_request(invite, SERVER, reliable=True, now=0.0, timer_c=True)
    sent(layer)
    layer.receive_response(response_to(invite, 100), SERVER, now=1.0)
    # A 100 does not restart Timer C (RFC 3261 16.7 step 2: "anything but 100").
    assert layer.get_timer() == 180.0
    layer.receive_response(response_to(invite, 180), SERVER, now=2.0)
    assert layer.get_timer() == 182.0
    layer.receive_response(response_to(invite, 183), SERVER, now=50.0)
    assert layer.get_timer() == 230.0
    events(layer)
    log = run_timers(layer, until=1000.0)
    # RFC 3261 16.8: the TU is told; the transaction itself stays in Proceeding.
    assert log == [(230.0, [], [TimerCFired(transaction_id=transaction)])]
    assert layer.transaction_state(transaction) is InviteClientState.PROCEEDING
    # The TU CANCELs, and may give up on the INVITE (RFC 3261 9.1).
    layer.abandon_transaction(transaction, now=300.0)
    assert events(layer) == [TransactionTerminated(transaction_id=transaction)]
    assert layer.transaction_count == 0


def test_timer_c_in_calling_and_cancelled_by_a_final_response() -> None:
    layer = TransactionLayer(TransactionConfig(timer_c=10.0))
    invite = build_request()
    transaction = layer.send_request(invite, SERVER, reliable=True, now=0.0, timer_c=True)
    sent(layer)
    assert layer.get_timer() == 10.0
    assert run_timers(layer, until=10.0) == [(10.0, [], [TimerCFired(transaction_id=transaction)])]
    assert layer.transaction_state(transaction) is InviteClientState.CALLING
    assert layer.get_timer() == 32.0  # Timer B still runs

    layer = TransactionLayer()
    invite = build_request()
    transaction = layer.send_request(invite, SERVER, reliable=False, now=0.0, timer_c=True)
    layer.receive_response(response_to(invite, 180), SERVER, now=1.0)
    layer.receive_response(response_to(invite, 487), SERVER, now=2.0)
    assert layer.get_timer() == 34.0  # only Timer D: Timer C is gone with Proceeding


def test_timer_c_is_off_unless_asked_for() -> None:
    layer = TransactionLayer()
    invite = build_request()
    layer.send_request(invite, SERVER, reliable=True, now=0.0)
    layer.receive_response(response_to(invite, 180), SERVER, now=1.0)
    assert layer.get_timer() is None
    with pytest.raises(LocalProtocolError):
        layer.send_request(build_request("OPTIONS"), SERVER, reliable=True, now=0.0, timer_c=True)


# ------------------------------------------------------------- client: matching


def test_response_matching_uses_branch_and_cseq_method() -> None:
    layer = TransactionLayer()
    invite = build_request()
    invite_transaction = layer.send_request(invite, SERVER, reliable=False, now=0.0)
    cancel = parse_request(make_cancel(invite).to_bytes())
    cancel_transaction = layer.send_request(cancel, SERVER, reliable=False, now=0.1)
    assert cancel.via.branch == invite.via.branch  # RFC 3261 9.1
    # The CANCEL's 200 matches the CANCEL's transaction only (RFC 3261 17.1.3).
    ok = response_to(cancel, 200)
    layer.receive_response(ok, SERVER, now=0.2)
    assert events(layer) == [ResponseReceived(response=ok, transaction_id=cancel_transaction)]
    assert layer.transaction_state(invite_transaction) is InviteClientState.CALLING
    assert layer.transaction_state(cancel_transaction) is NonInviteClientState.COMPLETED
    terminated = response_to(invite, 487)
    layer.receive_response(terminated, SERVER, now=0.3)
    assert events(layer) == [
        ResponseReceived(response=terminated, transaction_id=invite_transaction)
    ]


def test_unmatched_responses_are_stray() -> None:
    layer = TransactionLayer()
    invite = build_request()
    layer.send_request(invite, SERVER, reliable=False, now=0.0)
    other_branch = response_to(build_request(branch="z9hG4bKother"), 200)
    other_method = response_to(build_request("BYE"), 200)  # same branch, CSeq BYE
    case_changed = response_to(build_request(branch="z9hG4bKBRANCH1"), 200)
    no_branch = response_to(build_request(branch=None), 200)
    for response in (other_branch, other_method, case_changed, no_branch):
        layer.receive_response(response, SERVER, now=0.1)
        assert events(layer) == [StrayResponseReceived(response=response, source=SERVER)]


# ------------------------------------------------------------- server: schedules


def test_invite_server_sends_100_trying_at_once() -> None:
    layer = TransactionLayer()
    invite = parse_request(INVITE_BYTES)
    layer.receive_request(invite, CLIENT, reliable=False, now=0.0)
    (event,) = events(layer)
    assert isinstance(event, RequestReceived)
    assert (event.request, event.source) == (invite, CLIENT)
    (trying,) = layer.messages_to_send()
    assert trying.destination == CLIENT
    response = parse_response(trying.data)
    assert response.status == 100
    assert response.to.tag is None
    assert response.via.branch == "z9hG4bK74bf9"
    assert layer.transaction_state(event.transaction_id) is InviteServerState.PROCEEDING

    quiet = TransactionLayer(TransactionConfig(auto_trying=False))
    quiet.receive_request(invite, CLIENT, reliable=False, now=0.0)
    assert sent(quiet) == []
    # With nothing sent yet, a retransmission has nothing to re-send.
    quiet.receive_request(invite, CLIENT, reliable=False, now=0.5)
    assert sent(quiet) == []
    assert [type(event) for event in events(quiet)] == [RequestReceived]


def test_invite_server_retransmits_a_failure_with_timer_g_until_timer_h() -> None:
    layer = TransactionLayer()
    invite = build_request()
    transaction = server_transaction(layer, invite)
    layer.send_response(transaction, make_response(invite, 486, to_tag="t"), now=0.0)
    (busy,) = sent(layer)
    log = run_timers(layer, until=100.0)
    resent_at = [time for time, data, _ in log if data]
    # RFC 3261 17.2.1: T1, doubling, capped at T2; H at 64*T1.
    assert resent_at == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert all(data == [busy] for _, data, _ in log if data)
    assert log[-1] == (
        32.0,
        [],
        [
            TransactionTimedOut(transaction_id=transaction, timer=Timer.H),
            TransactionTerminated(transaction_id=transaction),
        ],
    )


def test_invite_server_with_custom_timers() -> None:
    layer = TransactionLayer(TransactionConfig(t1=0.1, t2=0.3))
    invite = build_request()
    transaction = server_transaction(layer, invite)
    layer.send_response(transaction, make_response(invite, 480, to_tag="t"), now=0.0)
    log = run_timers(layer, until=100.0)
    resent_at = [round(time, 6) for time, data, _ in log if data]
    assert resent_at[:5] == [0.1, 0.3, 0.6, 0.9, 1.2]
    assert log[-1][0] == pytest.approx(6.4)


def test_invite_server_over_reliable_transport_waits_timer_h_without_retransmitting() -> None:
    layer = TransactionLayer()
    invite = build_request(transport="TCP")
    transaction = server_transaction(layer, invite, reliable=True)
    layer.send_response(transaction, make_response(invite, 486, to_tag="t"), now=0.0)
    sent(layer)
    assert layer.get_timer() == 32.0
    log = run_timers(layer, until=100.0)
    assert [(time, data) for time, data, _ in log] == [(32.0, [])]


def test_invite_server_absorbs_the_ack_of_a_failure_and_waits_timer_i() -> None:
    layer = TransactionLayer()
    invite = build_request()
    transaction = server_transaction(layer, invite)
    layer.send_response(transaction, make_response(invite, 486, to_tag="bobtag"), now=0.0)
    sent(layer)
    layer.receive_request(ack_for(invite), CLIENT, reliable=False, now=1.0)
    # RFC 3261 17.2.1: the ACK is absorbed, not passed to the TU.
    assert events(layer) == []
    assert layer.transaction_state(transaction) is InviteServerState.CONFIRMED
    assert layer.get_timer() == 6.0  # Timer I = T4; G and H are cancelled
    layer.receive_request(ack_for(invite), CLIENT, reliable=False, now=2.0)
    layer.receive_request(invite, CLIENT, reliable=False, now=3.0)
    assert (sent(layer), events(layer)) == ([], [])
    assert run_timers(layer, until=100.0) == [
        (6.0, [], [TransactionTerminated(transaction_id=transaction)])
    ]


def test_invite_server_timer_i_is_zero_over_reliable_transports() -> None:
    layer = TransactionLayer()
    invite = build_request(transport="TCP")
    transaction = server_transaction(layer, invite, reliable=True)
    layer.send_response(transaction, make_response(invite, 486, to_tag="bobtag"), now=0.0)
    layer.receive_request(ack_for(invite), CLIENT, reliable=True, now=1.0)
    assert events(layer) == [TransactionTerminated(transaction_id=transaction)]
    assert layer.get_timer() is None


def test_retransmitted_invite_resends_the_last_response() -> None:
    layer = TransactionLayer()
    invite = build_request()
    layer.receive_request(invite, CLIENT, reliable=False, now=0.0)
    (event,) = events(layer)
    assert isinstance(event, RequestReceived)
    transaction = event.transaction_id
    (trying,) = sent(layer)
    layer.receive_request(invite, CLIENT, reliable=False, now=0.5)
    assert sent(layer) == [trying]
    assert events(layer) == []  # a retransmission is not a new request
    layer.send_response(transaction, make_response(invite, 180, to_tag="t"), now=1.0)
    (ringing,) = sent(layer)
    layer.receive_request(invite, CLIENT, reliable=False, now=1.5)
    assert sent(layer) == [ringing]
    layer.send_response(transaction, make_response(invite, 404, to_tag="t"), now=2.0)
    (not_found,) = sent(layer)
    layer.receive_request(invite, CLIENT, reliable=False, now=2.1)
    assert sent(layer) == [not_found]


def test_invite_server_accepted_state() -> None:
    layer = TransactionLayer()
    invite = build_request()
    transaction = server_transaction(layer, invite)
    ok = make_response(invite, 200, to_tag="bobtag")
    layer.send_response(transaction, ok, now=1.0)
    assert sent(layer) == [ok.to_bytes()]
    assert layer.transaction_state(transaction) is InviteServerState.ACCEPTED
    assert layer.get_timer() == 33.0  # Timer L = 64*T1, no Timer G for a 2xx
    # RFC 6026 7.1: a retransmitted INVITE is absorbed, not re-answered.
    layer.receive_request(invite, CLIENT, reliable=False, now=1.5)
    assert (sent(layer), events(layer)) == ([], [])
    # The TU retransmits its 2xx (RFC 3261 13.3.1.4) through the transaction.
    layer.send_response(transaction, ok, now=1.5)
    assert sent(layer) == [ok.to_bytes()]
    # An ACK that matches the transaction goes to the TU.
    ack = ack_for(invite)
    layer.receive_request(ack, CLIENT, reliable=False, now=2.0)
    assert events(layer) == [AckReceived(request=ack, source=CLIENT, transaction_id=transaction)]
    # A transport error is reported and the transaction stays (RFC 6026 7.1).
    assert layer.transport_failed(transaction, now=3.0)
    assert events(layer) == [TransportFailed(transaction_id=transaction)]
    assert layer.transaction_state(transaction) is InviteServerState.ACCEPTED
    with pytest.raises(LocalProtocolError):
        layer.send_response(transaction, make_response(invite, 486, to_tag="t"), now=4.0)
    assert run_timers(layer, until=100.0) == [
        (33.0, [], [TransactionTerminated(transaction_id=transaction)])
    ]
    with pytest.raises(LocalProtocolError):
        layer.send_response(transaction, ok, now=40.0)


def test_ack_to_a_2xx_goes_to_the_tu_without_a_transaction() -> None:
    layer = TransactionLayer()
    invite = build_request()
    transaction = server_transaction(layer, invite)
    layer.send_response(transaction, make_response(invite, 200, to_tag="bobtag"), now=0.0)
    sent(layer)
    # RFC 3261 13.2.2.4: the ACK to a 2xx has a branch of its own.
    ack = ack_for(invite, branch="z9hG4bKack2xx")
    layer.receive_request(ack, CLIENT, reliable=False, now=0.1)
    assert events(layer) == [AckReceived(request=ack, source=CLIENT, transaction_id=None)]
    assert sent(layer) == []
    assert layer.transaction_count == 1  # no transaction for an ACK


def test_non_invite_server_timer_j_and_retransmissions() -> None:
    layer = TransactionLayer()
    request = build_request("REGISTER")
    transaction = server_transaction(layer, request)
    assert layer.transaction_state(transaction) is NonInviteServerState.TRYING
    # RFC 3261 17.2.2: in Trying a retransmission is discarded.
    layer.receive_request(request, CLIENT, reliable=False, now=0.5)
    assert (sent(layer), events(layer)) == ([], [])
    layer.send_response(transaction, make_response(request, 100), now=0.6)
    (trying,) = sent(layer)
    layer.receive_request(request, CLIENT, reliable=False, now=1.5)
    assert sent(layer) == [trying]
    layer.send_response(transaction, make_response(request, 200, to_tag="t"), now=2.0)
    (ok,) = sent(layer)
    assert layer.get_timer() == 34.0  # Timer J = 64*T1
    layer.receive_request(request, CLIENT, reliable=False, now=3.5)
    assert sent(layer) == [ok]
    assert events(layer) == []
    # RFC 3261 17.2.2: other final responses from the TU are discarded in Completed.
    layer.send_response(transaction, make_response(request, 500), now=4.0)
    assert sent(layer) == []
    # ... but a provisional response after the final one is a TU bug.
    with pytest.raises(LocalProtocolError):
        layer.send_response(transaction, make_response(request, 180), now=4.0)
    assert run_timers(layer, until=100.0) == [
        (34.0, [], [TransactionTerminated(transaction_id=transaction)])
    ]


def test_non_invite_server_timer_j_is_zero_over_reliable_transports() -> None:
    layer = TransactionLayer()
    request = build_request("OPTIONS", transport="TCP")
    transaction = server_transaction(layer, request, reliable=True)
    layer.send_response(transaction, make_response(request, 200, to_tag="t"), now=0.0)
    assert len(sent(layer)) == 1
    assert events(layer) == [TransactionTerminated(transaction_id=transaction)]
    assert layer.get_timer() is None
    # The transaction is gone: the same request again is a new one.
    layer.receive_request(request, CLIENT, reliable=True, now=1.0)
    assert [type(event) for event in events(layer)] == [RequestReceived]


def test_response_destination_defaults_to_the_source_and_can_be_given() -> None:
    layer = TransactionLayer()
    request = build_request("OPTIONS")
    transaction = server_transaction(layer, request)
    elsewhere = ("203.0.113.9", 5070)
    layer.send_response(
        transaction, make_response(request, 200, to_tag="t"), now=0.0, destination=elsewhere
    )
    assert [message.destination for message in layer.messages_to_send()] == [elsewhere]
    layer.receive_request(request, CLIENT, reliable=False, now=1.0)
    assert [message.destination for message in layer.messages_to_send()] == [elsewhere]


# ------------------------------------------------------------- server: matching


def test_cancel_matches_its_invite_and_gets_its_own_transaction() -> None:
    layer = TransactionLayer()
    invite = build_request()
    invite_transaction = server_transaction(layer, invite)
    cancel = parse_request(make_cancel(invite).to_bytes())
    layer.receive_request(cancel, CLIENT, reliable=False, now=1.0)
    (event,) = events(layer)
    assert isinstance(event, CancelReceived)
    assert event.invite_transaction_id == invite_transaction
    assert event.transaction_id != invite_transaction
    assert sent(layer) == []  # no 100 Trying for a non-INVITE
    layer.send_response(event.transaction_id, make_response(cancel, 200, to_tag="t"), now=1.0)
    layer.send_response(invite_transaction, make_response(invite, 487, to_tag="t"), now=1.0)
    statuses = [parse_response(data).cseq for data in sent(layer)]
    assert [(cseq.number, cseq.method) for cseq in statuses] == [(1, "CANCEL"), (1, "INVITE")]
    # A retransmitted CANCEL goes to the CANCEL's transaction.
    layer.receive_request(cancel, CLIENT, reliable=False, now=1.5)
    assert events(layer) == []
    assert [parse_response(data).cseq.method for data in sent(layer)] == ["CANCEL"]


def test_cancel_with_another_branch_matches_nothing() -> None:
    layer = TransactionLayer()
    invite = build_request()
    server_transaction(layer, invite)
    cancel = build_request("CANCEL", branch="z9hG4bKdifferent")
    layer.receive_request(cancel, CLIENT, reliable=False, now=1.0)
    (event,) = events(layer)
    assert isinstance(event, CancelReceived)
    assert event.invite_transaction_id is None


def test_server_matching_uses_branch_sent_by_and_method() -> None:
    layer = TransactionLayer()
    invite = build_request(sent_by="Client.Atlanta.Example.COM")
    server_transaction(layer, invite)
    # Same branch, sent-by differing only in host case and an explicit default port.
    layer.receive_request(
        build_request(sent_by="client.atlanta.example.com:5060"), CLIENT, reliable=False, now=1.0
    )
    assert events(layer) == []
    # Another sent-by, another method or another branch spelling: new transactions.
    for request in (
        build_request(sent_by="other.example.com"),
        build_request(sent_by="client.atlanta.example.com:5080"),
        build_request("OPTIONS"),
        build_request(branch="z9hG4bKBRANCH1"),  # branches compare case-sensitively
    ):
        layer.receive_request(request, CLIENT, reliable=False, now=1.0)
        assert [type(event) for event in events(layer)] == [RequestReceived]
    assert layer.transaction_count == 5


def test_rfc2543_requests_without_magic_cookie() -> None:
    layer = TransactionLayer()
    invite = build_request(branch=None)
    transaction = server_transaction(layer, invite)
    # The retransmission matches by Request-URI, tags, Call-ID, CSeq and top Via.
    layer.receive_request(build_request(branch=None), CLIENT, reliable=False, now=0.5)
    assert events(layer) == []
    assert len(sent(layer)) == 1  # the 100 Trying again
    # Another Call-ID or CSeq is another transaction.
    layer.receive_request(build_request(branch=None, cseq=2), CLIENT, reliable=False, now=0.6)
    layer.receive_request(build_request(branch=None, call_id="x"), CLIENT, reliable=False, now=0.6)
    assert [type(event) for event in events(layer)] == [RequestReceived, RequestReceived]
    sent(layer)
    # CANCEL: the same fields with method INVITE (RFC 3261 9.2).
    cancel = build_request("CANCEL", branch=None)
    layer.receive_request(cancel, CLIENT, reliable=False, now=0.7)
    (event,) = events(layer)
    assert isinstance(event, CancelReceived)
    assert event.invite_transaction_id == transaction
    # ACK: matched by the To tag of the response sent (RFC 3261 17.2.3).
    layer.send_response(transaction, make_response(invite, 486, to_tag="bobtag"), now=1.0)
    sent(layer)
    wrong_tag = ack_for(invite, to_tag="sometag", branch=None)
    layer.receive_request(wrong_tag, CLIENT, reliable=False, now=1.1)
    assert events(layer) == [AckReceived(request=wrong_tag, source=CLIENT, transaction_id=None)]
    assert layer.transaction_state(transaction) is InviteServerState.COMPLETED
    layer.receive_request(ack_for(invite, branch=None), CLIENT, reliable=False, now=1.2)
    assert events(layer) == []
    assert layer.transaction_state(transaction) is InviteServerState.CONFIRMED


def test_bare_magic_cookie_branch_uses_rfc2543_matching() -> None:
    # RFC 4475 3.2.1: a branch that is exactly "z9hG4bK" carries no identifier.
    layer = TransactionLayer()
    first = build_request(branch="z9hG4bK", call_id="one")
    second = build_request(branch="z9hG4bK", call_id="two")
    server_transaction(layer, first)
    layer.receive_request(second, CLIENT, reliable=False, now=0.1)
    assert [type(event) for event in events(layer)] == [RequestReceived]
    layer.receive_request(first, CLIENT, reliable=False, now=0.2)
    assert events(layer) == []
    assert layer.transaction_count == 2


def test_rfc2543_ack_to_a_2xx_reaches_the_accepted_transaction() -> None:
    layer = TransactionLayer()
    invite = build_request(branch=None)
    transaction = server_transaction(layer, invite)
    layer.send_response(transaction, make_response(invite, 200, to_tag="bobtag"), now=0.0)
    ack = ack_for(invite, branch=None)
    layer.receive_request(ack, CLIENT, reliable=False, now=0.5)
    assert events(layer) == [AckReceived(request=ack, source=CLIENT, transaction_id=transaction)]


# ------------------------------------------------------- transport failures, misuse


def test_a_request_handed_back_by_the_transport_finds_its_client_transaction() -> None:
    layer = TransactionLayer()
    invite = layer.send_request(build_request(), SERVER, reliable=True, now=0.0)
    options = layer.send_request(
        build_request("OPTIONS", branch="z9hG4bKoptions"), SERVER, reliable=True, now=0.0
    )
    # A copy of what was sent, parsed again (RFC 3261 17.1.3: branch and method).
    assert layer.client_transaction_of(build_request()) == invite
    assert layer.client_transaction_of(build_request("OPTIONS", "z9hG4bKoptions")) == options
    assert layer.client_transaction_of(build_request("OPTIONS")) is None
    assert layer.client_transaction_of(build_request(branch="z9hG4bKother")) is None
    assert layer.client_transaction_of(build_request(branch=None)) is None


def test_transport_failures() -> None:
    layer = TransactionLayer()
    client = layer.send_request(build_request(), SERVER, reliable=True, now=0.0)
    assert layer.transport_failed(client, now=0.1)
    assert events(layer) == [
        TransportFailed(transaction_id=client),
        TransactionTerminated(transaction_id=client),
    ]
    # Reported again, late: the transaction is gone and the report is ignored.
    assert not layer.transport_failed(client, now=0.2)

    request = build_request("OPTIONS")
    server = server_transaction(layer, request)
    # Nothing was sent yet in Trying: a failure there is our own bug.
    with pytest.raises(LocalProtocolError):
        layer.transport_failed(server, now=0.3)
    layer.send_response(server, make_response(request, 100), now=0.4)
    assert layer.transport_failed(server, now=0.5)
    assert [type(event) for event in events(layer)] == [TransportFailed, TransactionTerminated]

    invite = build_request(branch="z9hG4bKinvite2")
    invite_server = server_transaction(layer, invite)
    layer.send_response(invite_server, make_response(invite, 486, to_tag="t"), now=0.6)
    assert layer.transport_failed(invite_server, now=0.7)
    assert [type(event) for event in events(layer)] == [TransportFailed, TransactionTerminated]
    assert layer.get_timer() is None
    assert layer.transaction_count == 0


def test_illegal_tu_calls_raise() -> None:
    layer = TransactionLayer()
    invite = build_request()
    with pytest.raises(LocalProtocolError):
        layer.send_request(ack_for(invite), SERVER, reliable=False, now=0.0)
    with pytest.raises(LocalProtocolError):
        layer.send_request(build_request(branch="1234"), SERVER, reliable=False, now=0.0)
    with pytest.raises(LocalProtocolError):
        layer.send_request(build_request(branch="z9hG4bK"), SERVER, reliable=False, now=0.0)
    with pytest.raises(LocalProtocolError):
        layer.send_request(Request("OPTIONS", "sip:bob@example.com"), SERVER, reliable=False, now=0)
    client = layer.send_request(invite, SERVER, reliable=False, now=0.0)
    with pytest.raises(LocalProtocolError):
        layer.send_request(build_request(), SERVER, reliable=False, now=0.0)  # branch reused
    with pytest.raises(LocalProtocolError):
        layer.send_response(client, make_response(invite, 200), now=0.0)  # client transaction
    with pytest.raises(LocalProtocolError):
        layer.send_response(TransactionId(999), make_response(invite, 200), now=0.0)
    with pytest.raises(LocalProtocolError):
        layer.abandon_transaction(TransactionId(999), now=0.0)
    layer.receive_response(response_to(invite, 486), SERVER, now=1.0)
    with pytest.raises(LocalProtocolError):
        layer.abandon_transaction(client, now=1.0)  # it has a final response

    options = build_request("OPTIONS", branch="z9hG4bKoptions")
    options_client = layer.send_request(options, SERVER, reliable=False, now=0.0)
    with pytest.raises(LocalProtocolError):
        layer.abandon_transaction(options_client, now=0.0)

    server_layer = TransactionLayer()
    server = server_transaction(server_layer, invite)
    with pytest.raises(LocalProtocolError):
        server_layer.send_response(server, make_response(options, 200), now=0.0)  # other method
    server_layer.send_response(server, make_response(invite, 486, to_tag="t"), now=0.0)
    with pytest.raises(LocalProtocolError):
        server_layer.send_response(server, make_response(invite, 200, to_tag="t"), now=0.1)
    with pytest.raises(LocalProtocolError):
        server_layer.send_response(server, make_response(invite, 500, to_tag="t"), now=0.1)
    assert server_layer.transaction_state(server) is InviteServerState.COMPLETED


def test_send_stateless_queues_bytes_without_a_transaction() -> None:
    layer = TransactionLayer()
    ack = ack_for(build_request(), branch="z9hG4bKack")
    layer.send_stateless(ack, SERVER)
    assert layer.messages_to_send() == [OutgoingMessage(ack.to_bytes(), SERVER)]
    assert layer.messages_to_send() == []
    assert layer.transaction_count == 0
    assert layer.get_timer() is None


def test_timers_fire_in_deadline_order() -> None:
    layer = TransactionLayer()
    first = layer.send_request(build_request("OPTIONS"), SERVER, reliable=True, now=2.0)
    second = layer.send_request(build_request(branch="z9hG4bKb2"), SERVER, reliable=True, now=1.0)
    third = layer.send_request(
        build_request("BYE", branch="z9hG4bKb3"), SERVER, reliable=True, now=3.0
    )
    layer.handle_timer(100.0)  # late: all three are due
    timed_out = [event for event in events(layer) if isinstance(event, TransactionTimedOut)]
    assert [(event.transaction_id, event.timer) for event in timed_out] == [
        (second, Timer.B),
        (first, Timer.F),
        (third, Timer.F),
    ]


def test_a_stopped_timer_leaves_an_entry_only_in_the_earliest_bucket() -> None:
    layer = TransactionLayer()
    invite = build_request(branch="z9hG4bKstop")
    layer.send_request(invite, SERVER, reliable=False, now=0.0, timer_c=True)
    assert layer.timer_entries == 3  # Timers A (0.5 s), B (32 s) and C (180 s)
    assert layer.get_timer() == 0.5  # Timer A's bucket is now the earliest: a heap
    # RFC 3261 17.1.1.2: a provisional stops Timers A and B; 16.7 step 2: it
    # restarts Timer C.  B's and C's buckets still wait: nothing is left of them.
    layer.receive_response(response_to(invite, 180), SERVER, now=0.1)
    assert layer.timer_entries == 2  # Timer A's entry (stale, in its heap), Timer C
    assert layer.get_timer() == 180.1  # the stale entry is dropped on the way
    assert layer.timer_entries == 1
    layer.receive_response(response_to(invite, 180), SERVER, now=60.0)
    assert layer.get_timer() == 240.0
    assert layer.timer_entries == 1
    events(layer)  # the two 180s
    assert run_timers(layer, until=239.9) == []
    ((when, _, fired),) = run_timers(layer, until=240.0)
    assert when == 240.0
    assert [type(event) for event in fired] == [TimerCFired]


def test_terminated_transactions_are_removed_and_memory_stays_bounded() -> None:
    layer = TransactionLayer()
    for number in range(3000):
        request = build_request("OPTIONS", branch=f"z9hG4bK{number}", call_id=f"c{number}")
        layer.receive_request(request, CLIENT, reliable=False, now=number * 0.001)
        (event,) = [event for event in events(layer) if isinstance(event, RequestReceived)]
        layer.send_response(
            event.transaction_id, make_response(request, 200, to_tag="t"), now=number * 0.001
        )
        invite = build_request(branch=f"z9hG4bKi{number}", call_id=f"i{number}")
        client = layer.send_request(invite, SERVER, reliable=False, now=number * 0.001)
        # A provisional stops Timers A and B: their buckets still wait, so their
        # entries go at once.
        layer.receive_response(response_to(invite, 180), SERVER, now=number * 0.001)
        layer.abandon_transaction(client, now=number * 0.001)
    layer.messages_to_send()
    events(layer)
    assert layer.transaction_count == 3000  # the server transactions wait for Timer J
    assert layer.timer_entries == 3000  # Timer J of each server transaction
    # At 33 s a third of Timers J (32 s after 0 to 3 s) have fired.
    run_timers(layer, until=33.0)
    assert layer.timer_entries == layer.transaction_count
    assert layer.transaction_count < 2100
    run_timers(layer, until=1000.0)
    assert layer.timer_entries == 0
    assert layer.transaction_count == 0
    assert layer.get_timer() is None
    assert layer._servers == {}
    assert layer._clients == {}
    assert layer._transactions == {}


# ------------------------------------------------ any sequence of inputs (Hypothesis)

PROPERTY_INVITE = {
    reliable: build_request(branch="z9hG4bKprop", transport="TCP" if reliable else "UDP")
    for reliable in (False, True)
}
SERVER_OPERATIONS = [
    "invite",
    "ack",
    "ack to 2xx",
    "cancel",
    "tu 180",
    "tu 200",
    "tu 486",
    "timer",
    "transport failure",
]
CLIENT_OPERATIONS = [
    "100",
    "180",
    "200",
    "200 other tag",
    "486",
    "cancel 200",
    "timer",
    "transport failure",
    "abandon",
]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(SERVER_OPERATIONS), max_size=30), st.booleans())
def test_invite_server_survives_any_sequence(operations: list[str], reliable: bool) -> None:
    invite = PROPERTY_INVITE[reliable]
    cancel = parse_request(make_cancel(invite).to_bytes())
    layer = TransactionLayer()
    now = 0.0
    invites = [server_transaction(layer, invite, reliable=reliable)]
    cancels: list[TransactionId] = []
    for operation in operations:
        now += 0.25
        transaction = invites[-1]
        before = layer.transaction_state(transaction)
        if operation == "invite":
            layer.receive_request(invite, CLIENT, reliable=reliable, now=now)
        elif operation == "ack":
            layer.receive_request(ack_for(invite), CLIENT, reliable=reliable, now=now)
        elif operation == "ack to 2xx":
            ack = ack_for(invite, branch="z9hG4bKother")
            layer.receive_request(ack, CLIENT, reliable=reliable, now=now)
        elif operation == "cancel":
            layer.receive_request(cancel, CLIENT, reliable=reliable, now=now)
        elif operation.startswith("tu "):
            response = make_response(invite, int(operation[3:]), to_tag="bobtag")
            try:
                layer.send_response(transaction, response, now)
            except LocalProtocolError:
                # RFC 3261 17.2.1 / RFC 6026 7.1: refused, and nothing changed.
                assert before is not InviteServerState.PROCEEDING
                assert layer.transaction_state(transaction) is before
        elif operation == "timer":
            deadline = layer.get_timer()
            if deadline is not None:
                now = max(now, deadline)
                layer.handle_timer(now)
        else:
            layer.transport_failed(transaction, now)  # never raises for an INVITE server
        for event in events(layer):
            if isinstance(event, RequestReceived):
                # Only once the previous transaction is gone is the INVITE new again.
                assert layer.transaction_state(transaction) is None
                invites.append(event.transaction_id)
            elif isinstance(event, CancelReceived):
                cancels.append(event.transaction_id)
                assert event.invite_transaction_id in (invites[-1], None)
            elif isinstance(event, AckReceived) and event.transaction_id is not None:
                # Only an ACK matching a transaction in Accepted reaches the TU.
                assert layer.transaction_state(event.transaction_id) is InviteServerState.ACCEPTED
        # Every message sent is a response to this INVITE or to its CANCEL.
        for data in sent(layer):
            assert parse_response(data).via.branch == "z9hG4bKprop"
    # The TU finishes its work; then every transaction ends on its own timers.
    for transaction in invites:
        if layer.transaction_state(transaction) is InviteServerState.PROCEEDING:
            layer.send_response(transaction, make_response(invite, 487, to_tag="t"), now)
    for cancel_transaction in cancels:
        if layer.transaction_state(cancel_transaction) is NonInviteServerState.TRYING:
            layer.send_response(cancel_transaction, make_response(cancel, 200), now)
    run_timers(layer, until=now + 1000.0)
    assert layer.transaction_count == 0
    assert layer.get_timer() is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(CLIENT_OPERATIONS), max_size=30), st.booleans())
def test_invite_client_survives_any_sequence(operations: list[str], reliable: bool) -> None:
    invite = PROPERTY_INVITE[reliable]
    cancel = parse_request(make_cancel(invite).to_bytes())
    layer = TransactionLayer()
    now = 0.0
    transaction = layer.send_request(invite, SERVER, reliable=reliable, now=now, timer_c=True)
    cancel_transaction = layer.send_request(cancel, SERVER, reliable=reliable, now=now)
    sent(layer)
    passed: list[int] = []
    acks = 0
    for operation in operations:
        now += 0.25
        if operation == "timer":
            deadline = layer.get_timer()
            if deadline is not None:
                now = max(now, deadline)
                layer.handle_timer(now)
        elif operation == "transport failure":
            layer.transport_failed(transaction, now)
        elif operation == "abandon":
            state = layer.transaction_state(transaction)
            try:
                layer.abandon_transaction(transaction, now)
            except LocalProtocolError:
                assert state not in (InviteClientState.CALLING, InviteClientState.PROCEEDING)
        elif operation == "cancel 200":
            layer.receive_response(response_to(cancel, 200), SERVER, now)
        elif operation == "200 other tag":
            layer.receive_response(response_to(invite, 200, to_tag="other"), SERVER, now)
        else:
            layer.receive_response(response_to(invite, int(operation)), SERVER, now)
        for event in events(layer):
            if isinstance(event, ResponseReceived) and event.transaction_id == transaction:
                passed.append(event.response.status)
        for data in sent(layer):
            line = start_line(data)
            assert line.startswith((b"INVITE ", b"CANCEL ", b"ACK "))
            acks += line.startswith(b"ACK ")
    # RFC 3261 17.1.1.2: one non-2xx final at most reaches the TU, and nothing but a
    # 2xx after a final; an ACK is sent only when a non-2xx final arrived.
    finals = [status for status in passed if status >= 200]
    assert len([status for status in finals if status >= 300]) <= 1
    if finals:
        first_final = passed.index(finals[0])
        assert all(status == 200 for status in passed[first_final + 1 :])
    assert (acks > 0) <= (486 in finals)
    # Whatever happened, the transactions end once the TU gives up on the INVITE.
    if layer.transaction_state(transaction) in (
        InviteClientState.CALLING,
        InviteClientState.PROCEEDING,
    ):
        layer.abandon_transaction(transaction, now)
    run_timers(layer, until=now + 1000.0)
    assert layer.transaction_state(cancel_transaction) is None
    assert layer.transaction_count == 0


# ------------------------------------------------------------- UAC/UAS, fake link


class FakeLink:
    """Two layers and a lossy link between them, on one virtual clock.

    ``drop`` decides, for each message (direction "to server" or "to client", start
    line, how many such start lines went that way before), whether it is lost.
    ``answer`` plays the server's TU: it is called with each server event.
    """

    def __init__(
        self,
        answer: Callable[[TransactionLayer, Event, float], None],
        drop: Callable[[str, bytes, int], bool] = lambda direction, line, count: False,
        *,
        reliable: bool = False,
    ) -> None:
        self.client = TransactionLayer()
        self.server = TransactionLayer()
        self.answer = answer
        self.drop = drop
        self.reliable = reliable
        self.now = 0.0
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        self.wire: list[tuple[float, str, bytes, bool]] = []  # (time, way, line, lost)
        self._counts: dict[tuple[str, bytes], int] = {}

    def flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for message in self.client.messages_to_send():
                moved = True
                self._carry("to server", message, self.server, CLIENT)
            for message in self.server.messages_to_send():
                moved = True
                self._carry("to client", message, self.client, SERVER)
            while (event := self.client.next_event()) is not None:
                self.client_events.append(event)
            while (event := self.server.next_event()) is not None:
                self.server_events.append(event)
                self.answer(self.server, event, self.now)
                moved = True

    def _carry(
        self, way: str, message: OutgoingMessage, layer: TransactionLayer, source: Any
    ) -> None:
        line = start_line(message.data)
        count = self._counts.get((way, line), 0)
        self._counts[way, line] = count + 1
        lost = self.drop(way, line, count)
        self.wire.append((self.now, way, line, lost))
        if lost:
            return
        parsed = parse_message(message.data)
        parsed.validate()
        if isinstance(parsed, Request):
            layer.receive_request(parsed, source, reliable=self.reliable, now=self.now)
        else:
            layer.receive_response(parsed, source, now=self.now)

    def run(self, until: float) -> None:
        self.flush()
        while True:
            deadlines = [
                deadline
                for deadline in (self.client.get_timer(), self.server.get_timer())
                if deadline is not None and deadline <= until
            ]
            if not deadlines:
                break
            self.now = min(deadlines)
            self.client.handle_timer(self.now)
            self.server.handle_timer(self.now)
            self.flush()

    def delivered(self, way: str, prefix: bytes) -> list[float]:
        return [
            time
            for time, direction, line, lost in self.wire
            if direction == way and line.startswith(prefix) and not lost
        ]


def answer_with(status: int) -> Callable[[TransactionLayer, Event, float], None]:
    def answer(layer: TransactionLayer, event: Event, now: float) -> None:
        if isinstance(event, RequestReceived):
            response = make_response(event.request, status, to_tag="uastag")
            layer.send_response(event.transaction_id, response, now)

    return answer


def test_invite_whose_first_two_transmissions_are_lost_still_completes() -> None:
    link = FakeLink(
        answer_with(200),
        drop=lambda way, line, count: line.startswith(b"INVITE") and count < 2,
    )
    invite = build_request()
    transaction = link.client.send_request(invite, SERVER, reliable=False, now=0.0)
    link.run(until=10.0)
    assert [time for time, way, line, _ in link.wire if line.startswith(b"INVITE")] == [
        0.0,
        0.5,
        1.5,
    ]
    responses = [event for event in link.client_events if isinstance(event, ResponseReceived)]
    assert [event.response.status for event in responses] == [100, 200]
    assert link.client.transaction_state(transaction) is InviteClientState.ACCEPTED
    # The UAC's TU ACKs the 2xx itself (RFC 3261 13.2.2.4).
    ack = ack_for(invite, to_tag="uastag", branch="z9hG4bKack")
    link.client.send_stateless(ack, SERVER)
    link.run(until=100.0)
    acks = [event for event in link.server_events if isinstance(event, AckReceived)]
    assert [event.transaction_id for event in acks] == [None]
    assert link.client.transaction_count == 0
    assert link.server.transaction_count == 0


def test_lost_ack_for_a_486_makes_the_server_retransmit_and_the_client_re_ack() -> None:
    link = FakeLink(
        answer_with(486),
        drop=lambda way, line, count: line.startswith(b"ACK") and count == 0,
    )
    invite = build_request()
    client = link.client.send_request(invite, SERVER, reliable=False, now=0.0)
    link.run(until=0.0)
    (server,) = [
        event.transaction_id for event in link.server_events if isinstance(event, RequestReceived)
    ]
    assert link.server.transaction_state(server) is InviteServerState.COMPLETED
    link.run(until=0.5)
    # Timer G re-sent the 486 at 0.5; the client re-sent the same ACK, which arrived.
    assert link.delivered("to client", b"SIP/2.0 486") == [0.0, 0.5]
    assert [time for time, _, line, _ in link.wire if line.startswith(b"ACK")] == [0.0, 0.5]
    assert link.server.transaction_state(server) is InviteServerState.CONFIRMED
    # The 486 reached the client's TU once; the ACK never reached the server's TU.
    responses = [event for event in link.client_events if isinstance(event, ResponseReceived)]
    assert [event.response.status for event in responses] == [100, 486]
    assert not [event for event in link.server_events if isinstance(event, AckReceived)]
    link.run(until=100.0)
    assert link.client.transaction_state(client) is None
    assert link.server.transaction_count == 0


def test_lost_non_invite_response_is_answered_from_the_server_transaction() -> None:
    link = FakeLink(
        answer_with(200),
        drop=lambda way, line, count: line.startswith(b"SIP/2.0 200") and count == 0,
    )
    request = build_request("REGISTER")
    transaction = link.client.send_request(request, SERVER, reliable=False, now=0.0)
    link.run(until=1.0)
    assert link.delivered("to server", b"REGISTER") == [0.0, 0.5]
    assert [time for time, _, line, _ in link.wire if line.startswith(b"SIP/2.0 200")] == [
        0.0,
        0.5,
    ]
    # The server's TU saw the request once; the retransmission was answered from
    # the Completed transaction's last response (RFC 3261 17.2.2).
    assert [type(event) for event in link.server_events] == [RequestReceived]
    responses = [event for event in link.client_events if isinstance(event, ResponseReceived)]
    assert [event.response.status for event in responses] == [200]
    assert link.client.transaction_state(transaction) is NonInviteClientState.COMPLETED
    link.run(until=100.0)
    assert link.client.transaction_count == 0
    assert link.server.transaction_count == 0


def test_cancel_over_the_link() -> None:
    def answer(layer: TransactionLayer, event: Event, now: float) -> None:
        if isinstance(event, RequestReceived):
            response = make_response(event.request, 180, to_tag="uastag")
            layer.send_response(event.transaction_id, response, now)
            answer.invite = event  # type: ignore[attr-defined]
        elif isinstance(event, CancelReceived):
            assert event.invite_transaction_id is not None
            layer.send_response(
                event.transaction_id, make_response(event.request, 200, to_tag="uastag"), now
            )
            invite_event = answer.invite  # type: ignore[attr-defined]
            response = make_response(invite_event.request, 487, to_tag="uastag")
            layer.send_response(event.invite_transaction_id, response, now)

    link = FakeLink(answer, reliable=True)
    invite = build_request(transport="TCP")
    invite_transaction = link.client.send_request(invite, SERVER, reliable=True, now=0.0)
    link.run(until=0.0)
    assert link.client.transaction_state(invite_transaction) is InviteClientState.PROCEEDING
    cancel_transaction = link.client.send_request(
        make_cancel(invite), SERVER, reliable=True, now=0.0
    )
    link.run(until=0.0)
    by_transaction = {
        (event.transaction_id, event.response.status)
        for event in link.client_events
        if isinstance(event, ResponseReceived)
    }
    assert by_transaction == {
        (invite_transaction, 100),
        (invite_transaction, 180),
        (cancel_transaction, 200),
        (invite_transaction, 487),
    }
    # Over TCP Timers D, I and J are 0: everything is over at once.
    assert link.client.transaction_count == 0
    assert link.server.transaction_count == 0
