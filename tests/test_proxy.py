"""The proxy core (worker/proxy.py) against a real transaction layer, sans-IO.

Requests and responses go in as bytes through ``TransactionLayer.receive_*``; the
proxy runs on every event; what the layer would send comes out of
``messages_to_send()`` and is parsed back for the checks.  Time is virtual: the
``Harness`` fires the layer's and the proxy's timers in deadline order.  The
location service, the user directory and the load balancer sockets are in-memory
fakes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from cluster.config import Settings
from cluster.membership import LBRecord, LBSocket
from sipcore import (
    DigestAlgorithm,
    DigestServer,
    NonceKeyring,
    Request,
    Response,
    TransactionConfig,
    TransactionLayer,
    build_credentials,
    compute_ha1,
    make_response,
    parse_challenge,
    parse_message,
)
from worker._response_context import best_response
from worker.auth import Authenticator
from worker.proxy import ForkingMode, ProxyConfig, ProxyCore, ProxyMode, Refusal
from worker.transport import Peer, SocketDirectory, response_peer

DOMAIN = "example.com"
PUBLIC = "203.0.113.1"  # the advertised address of every load balancer socket here
OUR_VIA = f"SIP/2.0/UDP {PUBLIC}:5060;branch=z9hG4bK-w1-"
RECORD_ROUTE = f"<sip:{PUBLIC}:5060;lr>"
RECORD_ROUTE_TCP = f"<sip:{PUBLIC}:5060;transport=tcp;lr>"

CALLER = Peer("lb1", 0, "udp", "192.0.2.10", 5060)
CALLER_NAT = Peer("lb1", 0, "udp", "198.51.100.77", 40001)
BOB = Peer("lb1", 0, "udp", "198.51.100.20", 5062)
BOB_TCP = Peer("lb1", 1, "tcp", "198.51.100.20", 50123, 7)
BOB_TOO = Peer("lb1", 0, "udp", "198.51.100.21", 5060)
BOB_THREE = Peer("lb1", 0, "udp", "198.51.100.22", 5060)
CAROL_IP = "198.51.100.99"


# ------------------------------------------------------------------------ fakes


@dataclass(frozen=True)
class FakeBinding:
    uri: str
    received: Peer | None = None
    q: float | None = None
    path: tuple[str, ...] = ()


@dataclass
class FakeLocator:
    bindings: dict[str, list[FakeBinding]] = field(default_factory=dict)

    def lookup(self, aor: str) -> Sequence[FakeBinding]:
        return self.bindings.get(aor, [])


@dataclass(frozen=True)
class FakeUser:
    ha1: Mapping[DigestAlgorithm, str]


class FakeUsers:
    def __init__(self, passwords: Mapping[str, str]) -> None:
        self.records = {
            user: FakeUser(
                {
                    algorithm: compute_ha1(user.split("@")[0], DOMAIN, password, algorithm)
                    for algorithm in DigestAlgorithm
                }
            )
            for user, password in passwords.items()
        }

    def get(self, user: str) -> FakeUser | None:
        return self.records.get(user)


def socket_directory() -> SocketDirectory:
    directory = SocketDirectory()
    directory.update(
        {
            "lb1": LBRecord(
                id="lb1",
                endpoint="ipc:///tmp/lb1",
                sockets=(
                    LBSocket(0, "udp", "10.0.0.1", 5060, PUBLIC, 5060),
                    LBSocket(1, "tcp", "10.0.0.1", 5060, PUBLIC, 5060),
                ),
            )
        }
    )
    return directory


@dataclass
class Sent:
    message: Request | Response
    destination: Peer

    @property
    def request(self) -> Request:
        assert isinstance(self.message, Request)
        return self.message

    @property
    def response(self) -> Response:
        assert isinstance(self.message, Response)
        return self.message


class Harness:
    """A proxy on a transaction layer, with virtual time."""

    def __init__(
        self,
        *,
        bindings: Mapping[str, list[FakeBinding]] | None = None,
        known: Iterable[str] = ("bob@example.com", "alice@example.com"),
        authenticator: Authenticator | None = None,
        transaction_config: TransactionConfig | None = None,
        domain: str = DOMAIN,
        flow_key: bytes | None = None,
        **config: object,
    ) -> None:
        self.now = 1000.0
        self.layer = TransactionLayer(transaction_config)
        self.locator = FakeLocator(dict(bindings or {}))
        self.known = set(known)
        counter = itertools.count(1)
        self.proxy = ProxyCore(
            self.layer,
            worker_id="w1",
            sockets=socket_directory(),
            locator=self.locator,
            known_user=self.known.__contains__,
            config=ProxyConfig(domains=frozenset({domain}), **config),  # type: ignore[arg-type]
            authenticator=authenticator,
            tokens=lambda: f"t{next(counter)}",
            flow_key=flow_key,
        )

    def run(self) -> list[Sent]:
        """Let the proxy take every pending event; return what goes out."""
        while (event := self.layer.next_event()) is not None:
            self.proxy.handle_event(event, self.now)
        sent = []
        for outgoing in self.layer.messages_to_send():
            message = parse_message(outgoing.data)
            message.validate()
            assert isinstance(outgoing.destination, Peer)
            sent.append(Sent(message, outgoing.destination))
        return sent

    def receive(self, data: bytes | Request | Response, source: Peer) -> list[Sent]:
        """Feed one message from ``source``; return what goes out."""
        raw = data if isinstance(data, bytes) else data.to_bytes()
        message = parse_message(raw)
        message.validate()
        if isinstance(message, Request):
            self.layer.receive_request(message, source, reliable=source.reliable, now=self.now)
        else:
            self.layer.receive_response(message, source, self.now)
        return self.run()

    def advance(self, seconds: float) -> list[Sent]:
        """Move time forward, firing every timer that falls due, in order."""
        end = self.now + seconds
        sent: list[Sent] = []
        while True:
            deadlines = [
                deadline
                for deadline in (self.layer.get_timer(), self.proxy.get_timer())
                if deadline is not None and deadline <= end
            ]
            if not deadlines:
                break
            self.now = max(self.now, min(deadlines))
            self.layer.handle_timer(self.now)
            sent.extend(self.run())
            self.proxy.handle_timer(self.now)
            sent.extend(self.run())
        self.now = end
        return sent


# --------------------------------------------------------------------- messages


def request_bytes(
    method: str = "INVITE",
    uri: str = "sip:bob@example.com",
    *,
    branch: str = "z9hG4bKcaller1",
    via_host: str = "192.0.2.10",
    rport: bool = False,
    from_uri: str = "sip:alice@example.com",
    to_uri: str = "sip:bob@example.com",
    to_tag: str | None = None,
    call_id: str = "call-1@192.0.2.10",
    cseq: int = 1,
    max_forwards: int | None = 70,
    headers: Sequence[str] = (),
    extra_vias: Sequence[str] = (),
) -> bytes:
    lines = [f"{method} {uri} SIP/2.0"]
    lines.append(f"Via: SIP/2.0/UDP {via_host}:5060;branch={branch}" + (";rport" if rport else ""))
    lines.extend(f"Via: {via}" for via in extra_vias)
    if max_forwards is not None:
        lines.append(f"Max-Forwards: {max_forwards}")
    lines.append(f"From: <{from_uri}>;tag=alicetag")
    lines.append(f"To: <{to_uri}>" + (f";tag={to_tag}" if to_tag else ""))
    lines.append(f"Call-ID: {call_id}")
    lines.append(f"CSeq: {cseq} {method}")
    if method in ("INVITE", "SUBSCRIBE"):
        lines.append("Contact: <sip:alice@192.0.2.10:5060>")
    lines.extend(headers)
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(request: Request, status: int, *, tag: str = "bobtag", **options: object) -> Response:
    """A UAS's response to a forwarded request."""
    response = make_response(request, status, to_tag=tag, **options)  # type: ignore[arg-type]
    if 200 <= status < 300 and request.method == "INVITE":
        response.add("Contact", "<sip:bob@198.51.100.20:5062>")
    return response


def only(sent: list[Sent], kind: type[Request] | type[Response] | None = None) -> Sent:
    chosen = [item for item in sent if kind is None or isinstance(item.message, kind)]
    assert len(chosen) == 1, chosen
    return chosen[0]


def requests(sent: list[Sent], method: str | None = None) -> list[Sent]:
    return [
        item
        for item in sent
        if isinstance(item.message, Request) and (method is None or item.message.method == method)
    ]


def responses(sent: list[Sent], status: int | None = None) -> list[Sent]:
    return [
        item
        for item in sent
        if isinstance(item.message, Response) and (status is None or item.message.status == status)
    ]


def finals(sent: list[Sent], status: int | None = None) -> list[Response]:
    """The distinct final responses (UDP retransmissions by Timer G counted once)."""
    seen: dict[bytes, Response] = {}
    for item in responses(sent, status):
        if item.response.status >= 200:
            seen.setdefault(item.response.to_bytes(), item.response)
    return list(seen.values())


def bob_bindings(*bindings: FakeBinding) -> dict[str, list[FakeBinding]]:
    return {"bob@example.com": list(bindings)}


BOB_BINDING = FakeBinding("sip:bob@198.51.100.20:5062", received=BOB)


def call_bob(harness: Harness, data: bytes | None = None) -> tuple[list[Sent], list[Sent]]:
    """Send the caller's INVITE; return (to the caller, the forwarded INVITEs)."""
    sent = harness.receive(data or request_bytes(), CALLER)
    return responses(sent), requests(sent, "INVITE")


def refused_with(harness: Harness, data: bytes, source: Peer = CALLER) -> Response:
    sent = harness.receive(data, source)
    assert not requests(sent), "nothing is forwarded"
    final = [item for item in responses(sent) if item.response.status >= 200]
    assert len(final) == 1
    assert final[0].destination == source
    return final[0].response


# ------------------------------------------------------------ a basic call flow


def test_invite_is_forwarded_to_the_binding_with_record_route_and_our_via() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    upstream, forwarded = call_bob(harness, request_bytes(rport=True, via_host="10.1.1.1"))
    trying = only(upstream)
    assert trying.response.status == 100
    invite = only(forwarded)
    request = invite.request
    assert invite.destination == BOB  # the registration's flow
    assert request.uri_text == "sip:bob@198.51.100.20:5062"
    # The caller is behind a NAT (its Via names 10.1.1.1): one Record-Route value per
    # side, each naming the flow that reaches that side.
    facing_callee, facing_caller = request.get_all("Record-Route")
    assert facing_callee.startswith(f"<sip:{PUBLIC}:5060;lr;flow=")
    assert facing_caller.startswith(f"<sip:{PUBLIC}:5060;lr;flow=")
    assert facing_callee != facing_caller
    vias = request.get_all("Via")
    assert vias[0].startswith(OUR_VIA)
    assert vias[0].endswith(";rport")
    # RFC 3261 18.2.1 / RFC 3581: where the request really came from.
    assert request.vias[1].received == "192.0.2.10"
    assert request.vias[1].rport == 5060
    assert request.max_forwards == 69
    assert request.get("Max-Breadth") == "60"
    assert not request.has("Route")


def test_one_record_route_when_the_caller_is_reached_at_its_via_address() -> None:
    carol = f"sip:carol@{CAROL_IP}"
    sent = Harness().receive(request_bytes(uri=carol, to_uri=carol), CALLER)
    assert only(requests(sent, "INVITE")).request.get_all("Record-Route") == [RECORD_ROUTE]


def caller_in_dialog(method: str, facing_caller: str, facing_callee: str) -> bytes:
    """The NAT'ed caller's ACK or BYE to bob's private contact: route set = the
    INVITE's Record-Route reversed (RFC 3261 12.1.2)."""
    return request_bytes(
        method,
        "sip:bob@192.168.1.20:5062",
        via_host="10.1.1.1",
        branch=f"z9hG4bK{method}",
        to_tag="bobtag",
        cseq=2,
        headers=[f"Route: {facing_caller}, {facing_callee}"],
    )


def test_in_dialog_requests_reach_nat_devices_through_their_flows() -> None:
    private_bob = FakeBinding("sip:bob@192.168.1.20:5062", received=BOB)
    harness = Harness(bindings=bob_bindings(private_bob))
    sent = harness.receive(request_bytes(via_host="10.1.1.1"), CALLER_NAT)
    invite = only(requests(sent, "INVITE")).request
    facing_callee, facing_caller = invite.get_all("Record-Route")
    harness.receive(answer(invite, 200), BOB)
    for method in ("ACK", "BYE"):
        data = caller_in_dialog(method, facing_caller, facing_callee)
        sent = harness.receive(data, CALLER_NAT)
        assert only(requests(sent, method)).destination == BOB
    # The callee's BYE: route set = Record-Route in order; the caller's contact is a
    # private address, its flow is where its requests came from.
    bye = (
        "BYE sip:alice@10.1.1.1:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 192.168.1.20:5062;branch=z9hG4bKbobbye;rport\r\n"
        "Max-Forwards: 70\r\n"
        f"Route: {facing_callee}, {facing_caller}\r\n"
        "From: <sip:bob@example.com>;tag=bobtag\r\n"
        "To: <sip:alice@example.com>;tag=alicetag\r\n"
        "Call-ID: call-1@192.0.2.10\r\n"
        "CSeq: 1 BYE\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    sent = harness.receive(bye, BOB)
    assert only(requests(sent, "BYE")).destination == CALLER_NAT


def test_a_flow_token_made_by_another_worker_is_followed() -> None:
    # Workers share the flow key (worker/server.py): the worker that record-routed
    # the INVITE is not necessarily the one that gets the ACK and the BYE.  The
    # second request with the same token takes the flow the first one decoded.
    key = b"k" * 16
    private_bob = FakeBinding("sip:bob@192.168.1.20:5062", received=BOB)
    first = Harness(bindings=bob_bindings(private_bob), flow_key=key)
    invite = only(requests(first.receive(request_bytes(via_host="10.1.1.1"), CALLER_NAT), "INVITE"))
    facing_callee, facing_caller = invite.request.get_all("Record-Route")
    for other_key, expected in ((key, BOB), (b"x" * 16, None)):
        other = Harness(flow_key=other_key)
        for method in ("ACK", "BYE"):
            data = caller_in_dialog(method, facing_caller, facing_callee)
            sent = only(requests(other.receive(data, CALLER_NAT), method))
            if expected is not None:
                assert sent.destination == expected
            else:  # another key: not our token, the Request-URI decides
                assert (sent.destination.host, sent.destination.port) == ("192.168.1.20", 5062)


def test_the_flows_remembered_are_bounded_and_the_oldest_go_first() -> None:
    # Flows come from the network: the memo of tokens keeps the newest 4,096.
    proxy = Harness().proxy
    tokens = [
        proxy._flow_token(Peer("lb1", 0, "udp", f"198.51.{n // 256}.{n % 256}", 5060))
        for n in range(4100)
    ]
    assert len(proxy._flow_peers) == 4096
    assert tokens[0] not in proxy._flow_peers
    assert tokens[4] in proxy._flow_peers
    assert proxy._flow_peers[tokens[-1]].host == "198.51.16.3"


def test_unbound_user_names_initial_requests_for_our_users_without_binding() -> None:
    # What a worker checks against etcd before the proxy answers 404 or 480: the
    # user may have just registered through another worker (worker/server.py).
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    proxy = harness.proxy

    def unbound(data: bytes) -> str | None:
        request = parse_message(data)
        assert isinstance(request, Request)
        return proxy.unbound_user(request)

    carol = "sip:carol@example.com"
    assert unbound(request_bytes("INVITE", carol, to_uri=carol)) == "carol@example.com"
    assert unbound(request_bytes("MESSAGE", carol, to_uri=carol)) == "carol@example.com"
    assert unbound(request_bytes("INVITE")) is None  # bob has a binding
    assert unbound(request_bytes("INVITE", carol, to_uri=carol, to_tag="t")) is None  # dialog
    assert unbound(request_bytes("REGISTER", "sip:example.com", to_uri=carol)) is None
    foreign = "sip:dave@elsewhere.example.org"
    assert unbound(request_bytes("INVITE", foreign, to_uri=foreign)) is None
    assert unbound(request_bytes("INVITE", "sip:example.com", to_uri=carol)) is None  # no user


def test_a_forged_flow_token_is_ignored() -> None:
    harness = Harness()
    forged = f"<sip:{PUBLIC}:5060;lr;flow=bGIxfjB-dX4xOTguNTEuMTAwLjk5fjUwNjB-.000000000000>"
    data = request_bytes(
        "BYE",
        "sip:bob@198.51.100.20:5062",
        to_tag="bobtag",
        headers=[f"Route: {forged}"],
    )
    bye = only(requests(harness.receive(data, CALLER), "BYE"))
    assert (bye.destination.host, bye.destination.port) == ("198.51.100.20", 5062)
    escaped = forged.replace(".000000000000", ".%C3%A9")
    data = data.replace(forged.encode(), escaped.encode())
    data = data.replace(b"z9hG4bKcaller1", b"z9hG4bKcaller2")
    bye = only(requests(harness.receive(data, CALLER), "BYE"))
    assert bye.destination.host == "198.51.100.20"


def test_provisional_and_final_responses_are_relayed_without_our_via() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness)
    invite = forwarded[0].request
    ringing = only(harness.receive(answer(invite, 180), BOB))
    assert ringing.response.status == 180
    assert ringing.destination == CALLER
    assert len(ringing.response.get_all("Via")) == 1
    assert ringing.response.via.branch == "z9hG4bKcaller1"
    ok = only(harness.receive(answer(invite, 200), BOB))
    assert ok.response.status == 200
    assert ok.destination == CALLER
    assert len(ok.response.vias) == 1
    assert ok.response.to.tag == "bobtag"


def test_100_trying_from_downstream_is_not_forwarded() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness)
    assert harness.receive(answer(forwarded[0].request, 100, tag=""), BOB) == []


def test_a_486_is_relayed_and_acknowledged_downstream() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness)
    sent = harness.receive(answer(forwarded[0].request, 486), BOB)
    ack = only(requests(sent, "ACK"))  # the client transaction's ACK (17.1.1.3)
    assert ack.destination == BOB
    busy = only(responses(sent))
    assert busy.response.status == 486
    assert busy.destination == CALLER
    assert len(busy.response.vias) == 1


def test_ack_for_2xx_follows_the_route_and_bye_works_in_both_directions() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness)
    harness.receive(answer(forwarded[0].request, 200), BOB)
    route = f"Route: {RECORD_ROUTE}"
    ack_bytes = request_bytes(
        "ACK",
        "sip:bob@198.51.100.20:5062",
        branch="z9hG4bKack1",
        to_tag="bobtag",
        headers=[route],
    )
    ack = only(harness.receive(ack_bytes, CALLER))
    assert ack.request.method == "ACK"
    assert ack.destination.host == "198.51.100.20"
    assert ack.destination.port == 5062
    assert not ack.request.has("Route")
    assert ack.request.get_all("Via")[0].startswith(OUR_VIA)
    assert ack.request.max_forwards == 69
    # A retransmission of the ACK gets the same branch (RFC 3261 16.11).
    again = only(harness.receive(ack_bytes, CALLER))
    assert again.request.via.branch == ack.request.via.branch

    # The caller hangs up: the BYE follows the route set to the callee's contact.
    bye_bytes = request_bytes(
        "BYE",
        "sip:bob@198.51.100.20:5062",
        branch="z9hG4bKbye1",
        to_tag="bobtag",
        cseq=2,
        headers=[route],
    )
    sent = harness.receive(bye_bytes, CALLER)
    bye = only(requests(sent, "BYE"))
    assert (bye.destination.host, bye.destination.port) == ("198.51.100.20", 5062)
    assert not bye.request.has("Record-Route")
    ok = only(harness.receive(answer(bye.request, 200), bye.destination))
    assert ok.destination == CALLER
    assert ok.response.cseq.method == "BYE"


def test_an_in_dialog_request_to_a_contact_on_our_address_is_forwarded() -> None:
    # The domain is the node's own address (as `make run` has it) and a device's
    # contact is on that address at another port, without a user part: the BYE's
    # Request-URI is that remote target (RFC 3261 12.2.1.1), not the server
    # itself, and is forwarded rather than answered 405.
    harness = Harness(domain=PUBLIC)
    bye_bytes = request_bytes(
        "BYE",
        f"sip:{PUBLIC}:5070",
        branch="z9hG4bKbye9",
        to_tag="bobtag",
        cseq=2,
        headers=[f"Route: {RECORD_ROUTE}"],
    )
    bye = only(requests(harness.receive(bye_bytes, CALLER), "BYE"))
    assert (bye.destination.host, bye.destination.port) == (PUBLIC, 5070)
    # Our own address and port without a user is still the server itself.
    options = harness.receive(request_bytes("OPTIONS", f"sip:{PUBLIC}:5060"), CALLER)
    assert only(responses(options)).response.status == 200


def test_bye_from_the_callee_reaches_the_caller_contact() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness)
    harness.receive(answer(forwarded[0].request, 200), BOB)
    bye_bytes = (
        "BYE sip:alice@192.0.2.10:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.20:5062;branch=z9hG4bKbobbye\r\n"
        "Max-Forwards: 70\r\n"
        f"Route: {RECORD_ROUTE}\r\n"
        "From: <sip:bob@example.com>;tag=bobtag\r\n"
        "To: <sip:alice@example.com>;tag=alicetag\r\n"
        "Call-ID: call-1@192.0.2.10\r\n"
        "CSeq: 1 BYE\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    sent = harness.receive(bye_bytes, BOB)
    bye = only(requests(sent, "BYE"))
    assert (bye.destination.host, bye.destination.port) == ("192.0.2.10", 5060)
    assert bye.request.uri_text == "sip:alice@192.0.2.10:5060"
    ok = only(harness.receive(answer(bye.request, 200, tag="alicetag"), CALLER))
    assert ok.destination.host == "198.51.100.20"
    assert ok.response.via.branch == "z9hG4bKbobbye"


def test_ack_that_does_not_come_through_our_route_set_is_dropped() -> None:
    harness = Harness()
    ack = request_bytes("ACK", f"sip:carol@{CAROL_IP}", to_tag="x", from_uri="sip:a@evil.test")
    assert harness.receive(ack, CALLER) == []


# ----------------------------------------------------------------------- CANCEL


def test_cancel_after_ringing_cancels_the_branch_and_487_is_relayed() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness)
    invite = forwarded[0].request
    harness.receive(answer(invite, 180), BOB)
    sent = harness.receive(request_bytes("CANCEL"), CALLER)
    ok = only(responses(sent))
    assert (ok.response.status, ok.response.cseq.method) == (200, "CANCEL")
    cancel = only(requests(sent, "CANCEL"))
    assert cancel.destination == BOB
    assert cancel.request.via.branch == invite.via.branch  # RFC 3261 9.1
    assert cancel.request.uri_text == invite.uri_text
    harness.receive(answer(cancel.request, 200), BOB)
    sent = harness.receive(answer(invite, 487), BOB)
    terminated = only(responses(sent))
    assert terminated.response.status == 487
    assert terminated.destination == CALLER


def test_cancel_waits_for_a_provisional_response_of_the_branch() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness)
    invite = forwarded[0].request
    sent = harness.receive(request_bytes("CANCEL"), CALLER)
    assert [item.response.status for item in responses(sent)] == [200]
    assert not requests(sent, "CANCEL")  # RFC 3261 9.1: not before a provisional
    sent = harness.receive(answer(invite, 180), BOB)
    cancel = only(requests(sent, "CANCEL"))
    assert cancel.destination == BOB
    sent = harness.receive(answer(invite, 487), BOB)
    assert only(responses(sent)).response.status == 487


def test_cancelled_branch_that_never_answers_is_given_up_after_64_t1() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING), timer_c=False)
    _, forwarded = call_bob(harness)
    harness.receive(answer(forwarded[0].request, 180), BOB)
    harness.receive(request_bytes("CANCEL"), CALLER)
    assert harness.proxy.get_timer() == pytest.approx(harness.now + 32.0)
    sent = harness.advance(33.0)
    assert [response.status for response in finals(sent)] == [487]
    assert {item.destination for item in responses(sent)} == {CALLER}


def test_cancel_matching_nothing_is_answered_481() -> None:
    harness = Harness()
    sent = harness.receive(request_bytes("CANCEL"), CALLER)
    assert only(sent).response.status == 481


def test_cancel_is_never_challenged() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING), authenticator=authenticator())
    harness.receive(request_bytes(), CALLER)  # challenged: 407
    sent = harness.receive(request_bytes("CANCEL"), CALLER)
    assert only(sent).response.status == 200


# --------------------------------------------------------------------- forking

TWO_BINDINGS = bob_bindings(
    FakeBinding("sip:bob@198.51.100.20:5062", received=BOB),
    FakeBinding("sip:bob@198.51.100.21", received=BOB_TOO),
)


def test_parallel_forking_first_2xx_wins_and_the_other_branch_is_cancelled() -> None:
    harness = Harness(bindings=TWO_BINDINGS)
    _, forwarded = call_bob(harness)
    assert {item.destination for item in forwarded} == {BOB, BOB_TOO}
    first, second = (item.request for item in forwarded)
    assert first.via.branch != second.via.branch
    assert first.get("Max-Breadth") == second.get("Max-Breadth") == "30"
    harness.receive(answer(first, 180), BOB)
    harness.receive(answer(second, 180, tag="other"), BOB_TOO)
    sent = harness.receive(answer(first, 200), BOB)
    assert only(responses(sent)).response.status == 200
    cancel = only(requests(sent, "CANCEL"))
    assert cancel.destination == BOB_TOO
    # The other branch answered too before it saw the CANCEL: relayed as well.
    sent = harness.receive(answer(second, 200, tag="other"), BOB_TOO)
    late = only(responses(sent))
    assert (late.response.status, late.response.to.tag) == (200, "other")
    assert late.destination == CALLER


def test_a_context_settles_once_its_final_response_went_upstream() -> None:
    """RFC 3261 16.7: once the final response is sent and no branch pends, the
    context keeps no parsed request (a call's memory for the 32 s its transactions
    wait); the 2xx retransmissions of RFC 6026 are still relayed."""
    harness = Harness(bindings=TWO_BINDINGS)
    _, forwarded = call_bob(harness)
    first, second = (item.request for item in forwarded)
    harness.receive(answer(second, 180, tag="other"), BOB_TOO)
    sent = harness.receive(answer(first, 200), BOB)
    assert only(requests(sent, "CANCEL")).destination == BOB_TOO
    (context,) = harness.proxy._contexts.values()
    # The CANCELled branch still pends: a 408 may have to stand in for it.
    assert context.request is not None
    harness.receive(answer(second, 487, tag="other"), BOB_TOO)
    assert context.request is None
    assert context.plan is None
    assert [branch.request for branch in context.branches] == [None, None]
    sent = harness.receive(answer(first, 200), BOB)  # a retransmission
    relayed = only(responses(sent))
    assert (relayed.response.status, relayed.destination) == (200, CALLER)
    harness.receive(request_bytes("ACK", branch="z9hG4bKcaller2", to_tag="bobtag"), CALLER)
    harness.advance(60.0)
    assert harness.proxy.context_count == 0


def test_a_6xx_cancels_the_other_branches_and_is_the_final_response() -> None:
    harness = Harness(bindings=TWO_BINDINGS)
    _, forwarded = call_bob(harness)
    first, second = (item.request for item in forwarded)
    harness.receive(answer(second, 180, tag="other"), BOB_TOO)
    sent = harness.receive(answer(first, 603), BOB)
    assert only(requests(sent, "CANCEL")).destination == BOB_TOO
    assert not responses(sent)  # 16.7: the 6xx waits for the other branch
    sent = harness.receive(answer(second, 487, tag="other"), BOB_TOO)
    assert only(responses(sent)).response.status == 603


def test_serial_forking_goes_by_q_and_fails_over_on_4xx() -> None:
    bindings = bob_bindings(
        FakeBinding("sip:bob@198.51.100.21", received=BOB_TOO, q=0.5),
        FakeBinding("sip:bob@198.51.100.20:5062", received=BOB, q=1.0),
    )
    harness = Harness(bindings=bindings, forking=ForkingMode.SERIAL)
    _, forwarded = call_bob(harness)
    assert only(forwarded).destination == BOB  # q=1.0 first
    sent = harness.receive(answer(forwarded[0].request, 486), BOB)
    assert not responses(sent)
    second = only(requests(sent, "INVITE"))
    assert second.destination == BOB_TOO
    sent = harness.receive(answer(second.request, 200, tag="too"), BOB_TOO)
    assert only(responses(sent)).response.status == 200


def test_serial_forking_returns_the_best_response_when_everything_fails() -> None:
    bindings = bob_bindings(
        FakeBinding("sip:bob@198.51.100.21", received=BOB_TOO, q=0.5),
        FakeBinding("sip:bob@198.51.100.20:5062", received=BOB, q=0.9),
    )
    harness = Harness(bindings=bindings, forking=ForkingMode.SERIAL)
    _, forwarded = call_bob(harness)
    sent = harness.receive(answer(forwarded[0].request, 486), BOB)
    second = only(requests(sent, "INVITE"))
    sent = harness.receive(answer(second.request, 404, tag="too"), BOB_TOO)
    # 16.7 step 6: the lowest class; within it, the first received.
    assert only(responses(sent)).response.status == 486


def test_serial_forking_stops_at_cancel() -> None:
    bindings = bob_bindings(
        FakeBinding("sip:bob@198.51.100.21", received=BOB_TOO, q=0.5),
        FakeBinding("sip:bob@198.51.100.20:5062", received=BOB, q=0.9),
    )
    harness = Harness(bindings=bindings, forking=ForkingMode.SERIAL)
    _, forwarded = call_bob(harness)
    invite = only(forwarded).request
    harness.receive(answer(invite, 180), BOB)
    harness.receive(request_bytes("CANCEL"), CALLER)
    sent = harness.receive(answer(invite, 487), BOB)
    assert not requests(sent, "INVITE")  # no new branch after a CANCEL (16.10)
    assert only(responses(sent)).response.status == 487


def test_a_2xx_racing_a_6xx_wins() -> None:
    harness = Harness(bindings=TWO_BINDINGS)
    _, forwarded = call_bob(harness)
    first, second = (item.request for item in forwarded)
    harness.receive(answer(second, 180, tag="other"), BOB_TOO)
    harness.receive(answer(first, 603), BOB)  # waits for the CANCELled branch
    sent = harness.receive(answer(second, 200, tag="other"), BOB_TOO)
    assert only(responses(sent)).response.status == 200


def test_a_2xx_after_a_final_response_is_relayed_statelessly() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness)
    invite = forwarded[0].request
    harness.receive(answer(invite, 486), BOB)
    # RFC 3261 16.7 step 5: every 2xx goes upstream, here outside the server
    # transaction, which already sent its final response.
    sent = harness.receive(answer(invite, 200, tag="late"), BOB)
    late = only(responses(sent))
    assert (late.response.status, late.response.to.tag) == (200, "late")
    assert late.destination == CALLER


def test_401_and_407_challenges_of_all_branches_are_merged() -> None:
    harness = Harness(bindings=TWO_BINDINGS)
    _, forwarded = call_bob(harness)
    first, second = (item.request for item in forwarded)
    challenge_one = 'Digest realm="one.test", nonce="1"'
    challenge_two = 'Digest realm="two.test", nonce="2"'
    harness.receive(answer(first, 407, headers=[("Proxy-Authenticate", challenge_one)]), BOB)
    sent = harness.receive(
        answer(second, 401, tag="x", headers=[("WWW-Authenticate", challenge_two)]), BOB_TOO
    )
    final = only(responses(sent)).response
    assert final.status in (401, 407)
    assert final.get_all("Proxy-Authenticate") == [challenge_one]
    assert final.get_all("WWW-Authenticate") == [challenge_two]


def test_503_from_downstream_becomes_500() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness)
    sent = harness.receive(answer(forwarded[0].request, 503), BOB)
    final = only(responses(sent)).response
    assert final.status == 500
    assert final.to.tag == "bobtag"


def test_a_transport_failure_counts_as_503_and_is_returned_as_500() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    call_bob(harness)
    (branch_id,) = harness.proxy._branches  # the one client transaction
    harness.layer.transport_failed(branch_id, harness.now)
    sent = harness.run()
    assert [response.status for response in finals(sent)] == [500]


def test_a_non_invite_request_gets_the_first_2xx_only() -> None:
    harness = Harness(bindings=TWO_BINDINGS)
    sent = harness.receive(request_bytes("MESSAGE"), CALLER)
    first, second = (item.request for item in requests(sent, "MESSAGE"))
    sent = harness.receive(answer(first, 202), BOB)
    assert only(responses(sent)).response.status == 202
    assert not requests(sent)  # a non-INVITE request is never CANCELled (9.1)
    assert harness.receive(answer(second, 200, tag="other"), BOB_TOO) == []


def test_best_response_prefers_lowest_class_and_retry_information() -> None:
    request = parse_message(request_bytes())
    assert isinstance(request, Request)
    made = [make_response(request, status, to_tag="t") for status in (486, 302, 404)]
    assert best_response(request, made, "x").status == 302
    made = [make_response(request, status, to_tag="t") for status in (486, 415, 404)]
    assert best_response(request, made, "x").status == 415
    assert best_response(request, [], "x").status == 408


def test_max_breadth_caps_the_parallel_branches() -> None:
    three = bob_bindings(
        FakeBinding("sip:bob@198.51.100.20:5062", received=BOB),
        FakeBinding("sip:bob@198.51.100.21", received=BOB_TOO),
        FakeBinding("sip:bob@198.51.100.22", received=BOB_THREE),
    )
    harness = Harness(bindings=three, max_breadth=2)
    _, forwarded = call_bob(harness)
    assert len(forwarded) == 2
    assert [item.request.get("Max-Breadth") for item in forwarded] == ["1", "1"]

    harness = Harness(bindings=three)
    _, forwarded = call_bob(harness, request_bytes(headers=["Max-Breadth: 5"]))
    assert sorted(item.request.get("Max-Breadth") or "" for item in forwarded) == ["1", "2", "2"]

    harness = Harness(bindings=three)
    final = refused_with(harness, request_bytes(headers=["Max-Breadth: 0"]))
    assert final.status == 440


def test_a_single_branch_keeps_max_breadth_zero() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness, request_bytes(headers=["Max-Breadth: 0"]))
    assert only(forwarded).request.get("Max-Breadth") == "0"


# ---------------------------------------------------------------------- timers


def test_timer_c_cancels_a_ringing_branch() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness)
    invite = forwarded[0].request
    harness.receive(answer(invite, 180), BOB)
    assert harness.advance(179.0) == []
    sent = harness.advance(1.1)
    cancel = only(requests(sent, "CANCEL"))
    assert cancel.destination == BOB
    assert not responses(sent)
    harness.receive(answer(cancel.request, 200), BOB)
    sent = harness.receive(answer(invite, 487), BOB)
    assert only(responses(sent)).response.status == 487


def test_timer_c_without_a_provisional_counts_as_408() -> None:
    harness = Harness(
        bindings=bob_bindings(BOB_BINDING),
        transaction_config=TransactionConfig(timer_c=10.0),
    )
    call_bob(harness)
    sent = harness.advance(10.1)
    assert [response.status for response in finals(sent)] == [408]
    assert not requests(sent, "CANCEL")
    assert harness.layer.transaction_count == 1  # only the server transaction is left


def test_a_branch_timing_out_counts_as_408() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    call_bob(harness)
    sent = harness.advance(40.0)  # Timer B: 64*T1 = 32 s
    assert [response.status for response in finals(sent)] == [408]
    assert {item.destination for item in responses(sent)} == {CALLER}


def test_contexts_are_discarded_when_every_transaction_ended() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness)
    harness.receive(answer(forwarded[0].request, 486), BOB)
    assert harness.proxy.context_count == 1
    harness.receive(request_bytes("ACK", branch="z9hG4bKcaller1", to_tag="bobtag"), CALLER)
    harness.advance(60.0)
    assert harness.proxy.context_count == 0
    assert harness.layer.transaction_count == 0


# ------------------------------------------------------------ 16.3 validation


def test_unknown_user_is_404_and_known_user_without_binding_is_480() -> None:
    harness = Harness()
    assert refused_with(harness, request_bytes(uri="sip:nobody@example.com")).status == 404
    final = refused_with(harness, request_bytes(branch="z9hG4bKb2", rport=True))
    assert (final.status, final.reason) == (480, "Temporarily Unavailable")
    assert final.to.tag is not None
    assert (final.via.received, final.via.rport) == ("192.0.2.10", 5060)  # RFC 3581


def test_max_forwards_zero_is_483_except_options_to_the_server() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    assert refused_with(harness, request_bytes(max_forwards=0)).status == 483
    options = request_bytes("OPTIONS", f"sip:{DOMAIN}", max_forwards=0, branch="z9hG4bKo")
    assert refused_with(harness, options).status == 200


def test_missing_max_forwards_is_added_as_70() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    _, forwarded = call_bob(harness, request_bytes(max_forwards=None))
    assert only(forwarded).request.max_forwards == 70


def test_a_loop_is_482_and_a_spiral_is_forwarded() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    carol = f"sip:carol@{CAROL_IP}"
    sent = harness.receive(request_bytes(uri=carol, to_uri=carol), CALLER)
    relayed = only(requests(sent, "INVITE"))
    assert relayed.destination.host == CAROL_IP
    # The request comes back unchanged: a loop (RFC 3261 16.3 step 4) ...
    looped = harness.receive(relayed.request, relayed.destination)
    assert [response.status for response in finals(looped)] == [482]
    # ... also through another proxy, which added its Via.
    data = relayed.request.to_bytes()
    carol_via = f"Via: SIP/2.0/UDP {CAROL_IP}:5060;branch=z9hG4bKcarol".encode()
    through_carol = data.replace(b"\r\nVia: ", b"\r\n" + carol_via + b"1\r\nVia: ", 1)
    looped = harness.receive(through_carol, relayed.destination)
    assert [response.status for response in finals(looped)] == [482]
    # The request retargeted (another Request-URI): a spiral, forwarded.
    spiral_bytes = data.replace(b"\r\nVia: ", b"\r\n" + carol_via + b"2\r\nVia: ", 1).replace(
        carol.encode() + b" SIP/2.0", b"sip:bob@example.com SIP/2.0", 1
    )
    forwarded = only(requests(harness.receive(spiral_bytes, relayed.destination), "INVITE"))
    assert forwarded.destination == BOB
    assert len(forwarded.request.vias) == 4


def test_proxy_require_is_420_with_unsupported() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    final = refused_with(harness, request_bytes(headers=["Proxy-Require: foo, bar"]))
    assert final.status == 420
    assert final.get("Unsupported") == "foo, bar"


@pytest.mark.parametrize("uri", ["tel:+15551234567", "im:bob@example.com"])
def test_unsupported_request_uri_scheme_is_416(uri: str) -> None:
    assert refused_with(Harness(), request_bytes(uri=uri)).status == 416


def test_malformed_header_is_400() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    final = refused_with(harness, request_bytes(headers=["Route: <sip:bad"]))
    assert final.status == 400


# ---------------------------------------------------------- the server itself


def test_options_to_the_server_is_answered_with_allow_accept_supported() -> None:
    harness = Harness()
    for index, uri in enumerate((f"sip:{DOMAIN}", f"sip:{PUBLIC}:5060", f"sip:{PUBLIC}")):
        final = refused_with(harness, request_bytes("OPTIONS", uri, branch=f"z9hG4bKo{index}"))
        assert final.status == 200
        assert final.get("Allow") == "OPTIONS, REGISTER"
        assert final.get("Accept") == "application/sdp"
        assert final.get("Supported") == "path"


def test_other_methods_to_the_server_are_405_with_allow() -> None:
    final = refused_with(Harness(), request_bytes("MESSAGE", f"sip:{DOMAIN}"))
    assert final.status == 405
    assert final.get("Allow") == "OPTIONS, REGISTER"


def test_options_and_message_to_a_user_are_proxied_like_invite() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING))
    for method in ("OPTIONS", "MESSAGE", "SUBSCRIBE", "FOO"):
        sent = harness.receive(request_bytes(method, branch=f"z9hG4bK{method}"), CALLER)
        forwarded = only(requests(sent, method))
        assert forwarded.destination == BOB
        record_routed = forwarded.request.has("Record-Route")
        assert record_routed == (method == "SUBSCRIBE")
        ok = harness.receive(answer(forwarded.request, 200), BOB)
        assert only(ok).response.status == 200


# ---------------------------------------------------------------- redirect


def test_redirect_mode_answers_302_with_every_contact() -> None:
    bindings = bob_bindings(
        FakeBinding("sip:bob@198.51.100.20:5062", received=BOB, q=0.7),
        FakeBinding("sip:bob@198.51.100.21"),
    )
    harness = Harness(bindings=bindings, mode=ProxyMode.REDIRECT)
    final = refused_with(harness, request_bytes())
    assert final.status == 302
    assert final.get_all("Contact") == [
        "<sip:bob@198.51.100.20:5062>;q=0.7",
        "<sip:bob@198.51.100.21>",
    ]
    # Other methods are still proxied.
    sent = harness.receive(request_bytes("MESSAGE", branch="z9hG4bKm"), CALLER)
    assert len(requests(sent, "MESSAGE")) == 2


# ---------------------------------------------------------------------- auth

SECRET = b"0123456789abcdef0123456789abcdef"


def authenticator() -> Authenticator:
    digest = DigestServer(NonceKeyring({"k1": SECRET}, "k1"), random_bytes=lambda size: b"r" * size)
    users = FakeUsers({"alice@example.com": "wonderland", "bob@example.com": "builder"})
    return Authenticator(digest, users)


def with_credentials(data: bytes, challenge_text: str, username: str, password: str) -> bytes:
    request = parse_message(data)
    assert isinstance(request, Request)
    credentials = build_credentials(
        parse_challenge(challenge_text),
        username=username,
        password=password,
        method=request.method,
        uri=request.uri_text,
        cnonce="cnonce1",
    )
    request.add("Proxy-Authorization", str(credentials))
    request.add(
        "Proxy-Authorization",
        'Digest username="x", realm="other.test", nonce="n", '
        'uri="sip:bob@example.com", response="0"',
    )
    return request.to_bytes()


def test_our_users_are_challenged_then_forwarded_without_our_credentials() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING), authenticator=authenticator())
    challenge = refused_with(harness, request_bytes())
    assert challenge.status == 407
    offered = challenge.get_all("Proxy-Authenticate")
    assert offered
    assert all(f'realm="{DOMAIN}"' in value for value in offered)
    harness.receive(request_bytes("ACK", to_tag=challenge.to.tag), CALLER)

    retry = with_credentials(
        request_bytes(branch="z9hG4bKcaller2", cseq=2), offered[0], "alice", "wonderland"
    )
    _, forwarded = call_bob(harness, retry)
    request = only(forwarded).request
    # RFC 3261 22.3: our realm's credentials stay here, the others go on.
    assert request.get_all("Proxy-Authorization") == [
        'Digest username="x", realm="other.test", nonce="n", '
        'uri="sip:bob@example.com", response="0"'
    ]


def test_authenticated_user_must_be_the_from_user() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING), authenticator=authenticator())
    challenge = refused_with(harness, request_bytes())
    retry = with_credentials(
        request_bytes(branch="z9hG4bKcaller2", cseq=2),
        challenge.get_all("Proxy-Authenticate")[0],
        "bob",
        "builder",
    )
    final = refused_with(harness, retry)
    assert final.status == 403
    assert final.reason == Refusal.FORBIDDEN_SENDER.reason


def test_foreign_callers_and_in_dialog_requests_are_not_challenged() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING), authenticator=authenticator())
    _, forwarded = call_bob(harness, request_bytes(from_uri="sip:someone@elsewhere.test"))
    assert only(forwarded).destination == BOB
    bye = request_bytes(
        "BYE",
        "sip:bob@198.51.100.20:5062",
        to_tag="bobtag",
        branch="z9hG4bKbye",
        headers=[f"Route: {RECORD_ROUTE}"],
    )
    assert only(requests(harness.receive(bye, CALLER), "BYE")).destination.port == 5062


def test_ack_is_never_challenged() -> None:
    harness = Harness(bindings=bob_bindings(BOB_BINDING), authenticator=authenticator())
    ack = request_bytes(
        "ACK", "sip:bob@198.51.100.20:5062", to_tag="bobtag", headers=[f"Route: {RECORD_ROUTE}"]
    )
    assert only(harness.receive(ack, CALLER)).request.method == "ACK"


# ----------------------------------------------------------------- relaying


def test_relaying_to_a_foreign_domain_needs_one_of_our_users() -> None:
    harness = Harness()
    carol = f"sip:carol@{CAROL_IP}"
    final = refused_with(harness, request_bytes(uri=carol, from_uri="sip:eve@evil.test"))
    assert final.status == 403
    assert final.reason == Refusal.RELAY_DENIED.reason
    sent = harness.receive(request_bytes(uri=carol, branch="z9hG4bKr2"), CALLER)
    relayed = only(requests(sent, "INVITE"))
    assert (relayed.destination.host, relayed.destination.port) == (CAROL_IP, 5060)
    assert relayed.request.uri_text == carol


def test_a_foreign_host_name_is_refused_without_dns() -> None:
    final = refused_with(Harness(), request_bytes(uri="sip:carol@elsewhere.test"))
    assert final.status == 403
    assert final.reason == Refusal.UNRESOLVABLE.reason


def test_a_broadcast_request_uri_is_refused() -> None:
    final = refused_with(Harness(), request_bytes(uri="sip:x@255.255.255.255"))
    assert final.reason == Refusal.FORBIDDEN_DESTINATION.reason


# ---------------------------------------------------------------- routing


def test_strict_route_fix_up() -> None:
    # A strict router put our Record-Route into the Request-URI (RFC 3261 16.4).
    harness = Harness()
    data = request_bytes(
        "BYE",
        f"sip:{PUBLIC}:5060;lr",
        to_tag="bobtag",
        headers=["Route: <sip:bob@198.51.100.20:5062>"],
    )
    bye = only(requests(harness.receive(data, CALLER), "BYE"))
    assert bye.request.uri_text == "sip:bob@198.51.100.20:5062"
    assert not bye.request.has("Route")
    assert (bye.destination.host, bye.destination.port) == ("198.51.100.20", 5062)


def test_a_strict_next_hop_gets_the_request_uri_as_last_route() -> None:
    harness = Harness()
    data = request_bytes(
        "BYE",
        "sip:bob@198.51.100.20:5062",
        to_tag="bobtag",
        headers=[f"Route: {RECORD_ROUTE}, <sip:198.51.100.50>"],
    )
    bye = only(requests(harness.receive(data, CALLER), "BYE"))
    assert bye.request.uri_text == "sip:198.51.100.50"
    assert bye.request.get_all("Route") == ["<sip:bob@198.51.100.20:5062>"]
    assert bye.destination.host == "198.51.100.50"


def test_double_record_route_when_the_transport_changes() -> None:
    binding = FakeBinding("sip:bob@198.51.100.20:5062;transport=tcp", received=BOB_TCP)
    harness = Harness(bindings=bob_bindings(binding))
    _, forwarded = call_bob(harness)
    invite = only(forwarded)
    assert invite.destination == BOB_TCP
    # RFC 5658: the topmost value faces the callee (TCP), the next the caller (UDP).
    facing_callee, facing_caller = invite.request.get_all("Record-Route")
    assert facing_callee.startswith(f"<sip:{PUBLIC}:5060;transport=tcp;lr;flow=")
    assert facing_caller == RECORD_ROUTE
    assert invite.request.get_all("Via")[0].startswith("SIP/2.0/TCP 203.0.113.1:5060;")
    # Both Route values of ours are removed from requests within the dialog, and the
    # request goes through the callee's TCP connection.
    bye = request_bytes(
        "BYE",
        "sip:bob@198.51.100.20:5062;transport=tcp",
        to_tag="bobtag",
        headers=[f"Route: {facing_caller}, {facing_callee}"],
    )
    forwarded_bye = only(requests(harness.receive(bye, CALLER), "BYE"))
    assert not forwarded_bye.request.has("Route")
    assert forwarded_bye.destination == BOB_TCP


def test_path_becomes_route() -> None:
    edge = Peer("lb1", 0, "udp", "198.51.100.60", 5060)
    binding = FakeBinding(
        "sip:bob@10.9.9.9:5060",
        received=edge,
        path=("<sip:198.51.100.60;lr>", "<sip:198.51.100.61;lr>"),
    )
    harness = Harness(bindings=bob_bindings(binding))
    _, forwarded = call_bob(harness)
    invite = only(forwarded)
    assert invite.destination == edge
    assert [str(route.uri) for route in invite.request.routes] == [
        "sip:198.51.100.60;lr",
        "sip:198.51.100.61;lr",
    ]
    assert invite.request.uri_text == "sip:bob@10.9.9.9:5060"


def test_binding_without_flow_is_reached_at_its_contact_address() -> None:
    binding = FakeBinding("sip:bob@198.51.100.30:5070;transport=tcp")
    harness = Harness(bindings=bob_bindings(binding))
    _, forwarded = call_bob(harness)
    destination = only(forwarded).destination
    assert destination == Peer("lb1", 1, "tcp", "198.51.100.30", 5070)


# ---------------------------------------------------------- stray responses


def stray_ok(second_via: str) -> bytes:
    return (
        "SIP/2.0 200 OK\r\n"
        f"Via: {OUR_VIA}gone.abc;rport\r\n"
        f"Via: {second_via}\r\n"
        "From: <sip:alice@example.com>;tag=alicetag\r\n"
        "To: <sip:bob@example.com>;tag=bobtag\r\n"
        "Call-ID: stray@192.0.2.10\r\n"
        "CSeq: 1 INVITE\r\n"
        "Contact: <sip:bob@198.51.100.20:5062>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def test_stray_2xx_retransmission_is_forwarded_statelessly() -> None:
    harness = Harness()
    data = stray_ok("SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bKx;received=192.0.2.10;rport=5070")
    forwarded = only(harness.receive(data, BOB))
    assert forwarded.destination == Peer("lb1", 0, "udp", "192.0.2.10", 5070)
    assert len(forwarded.response.vias) == 1


def test_stray_response_without_our_via_is_dropped() -> None:
    data = stray_ok("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKx").replace(
        OUR_VIA.encode(), b"SIP/2.0/UDP 198.51.100.5:5060;branch=z9hG4bK-"
    )
    assert Harness().receive(data, BOB) == []


def test_response_to_a_broadcast_via_is_dropped() -> None:
    data = stray_ok("SIP/2.0/UDP 255.255.255.255:5060;branch=z9hG4bKx")
    assert Harness().receive(data, BOB) == []
    data = stray_ok("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKx;maddr=224.0.0.1")
    assert Harness().receive(data, BOB) == []


# -------------------------------------------------------------- configuration


def test_config_rejects_zero_breadth_and_lowers_domains() -> None:
    with pytest.raises(ValueError, match="max_breadth"):
        ProxyConfig(max_breadth=0)
    assert ProxyConfig(domains=frozenset({"Example.COM"})).domains == frozenset({DOMAIN})


def test_config_from_settings() -> None:
    settings = dataclasses.replace(
        Settings(), domain=("Example.com",), mode="redirect", forking="serial", max_breadth=5
    )
    config = ProxyConfig.from_settings(settings)
    assert config.domains == frozenset({DOMAIN})
    assert (config.mode, config.forking, config.max_breadth) == (
        ProxyMode.REDIRECT,
        ForkingMode.SERIAL,
        5,
    )


def test_refusals_have_distinct_answers() -> None:
    values: Callable[[Refusal], tuple[int, str]] = lambda refusal: (refusal.status, refusal.reason)  # noqa: E731
    assert len({values(refusal) for refusal in Refusal}) == len(Refusal)


def test_responses_go_to_the_via_port_unless_rport_or_a_connection() -> None:
    """RFC 3261 18.2.2 and RFC 3581 4: the source address, at the sent-by port
    (default 5060) or with rport at the source port; over TCP the connection."""
    via = parse_message(request_bytes(via_host="192.0.2.10")).via  # port 5060
    assert response_peer(CALLER, via) is CALLER  # from its sent-by port
    moved = Peer("lb1", 0, "udp", "192.0.2.10", 40000)
    assert response_peer(moved, via) == Peer("lb1", 0, "udp", "192.0.2.10", 5060, None)
    no_port = parse_message(request_bytes().replace(b":5060;branch", b";branch")).via
    assert response_peer(moved, no_port).port == 5060
    with_rport = parse_message(request_bytes(rport=True)).via
    assert response_peer(moved, with_rport) is moved
    assert response_peer(BOB_TCP, via) is BOB_TCP
