"""Micro-benchmarks of the SIP core on one core (``make bench``).

Prints throughput for:

* a full parse of the headers a proxy needs (RFC 3261 16.3 and 16.6: Request-URI,
  top Via, Max-Forwards, Route, Proxy-Require, Call-ID, CSeq, From and To tags,
  Content-Length) in a typical 762-byte INVITE.  Every INVITE is distinct (its own
  Call-ID, branch and From tag, callers and callees from 1,000 accounts) so the
  value memo only helps where real traffic repeats itself;
* the same with every header the core knows (Contact, all Vias, Allow,
  Supported, Content-Type ...), for comparison;
* Call-ID extraction alone, what the load balancer does per request;
* a digest verification (nonce check and response check), SHA-256 and MD5;
* a call through the worker's sans-IO core: INVITE, 180, 200, ACK, BYE and its
  200 as a SIPp caller and callee send them, each parsed and validated, through
  the transaction layer and the record-routing proxy (``worker/proxy.py``), and
  every message it sends serialized; timers fire on 10 ms ticks of virtual time
  at 2,000 calls/s.  Only the worker's share is timed (building the callee's
  answers is not), per call.  What it leaves out, and the worker pays too: the
  ZeroMQ frames and msgpack envelopes, the event loop, metrics;
* the same call in the sustained state: timed after 33 s of virtual time, when
  the first calls' transactions reach their 32 s timers (RFC 3261 Timers D and
  J, RFC 6026 Timers L and M) and some 260,000 transactions are live, as in a
  worker that has carried 2,000 calls/s for half a minute.

Each figure is the best of five rounds (the sustained call: of two).
Usage: ``python -m loadtest.bench_core``.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

from cluster.membership import LBRecord, LBSocket
from loadtest.messages import INVITE, distinct_invites
from registry import Binding
from sipcore import (
    DigestAlgorithm,
    DigestServer,
    NonceKeyring,
    TransactionLayer,
    build_credentials,
    compute_ha1,
    extract_call_id,
    parse_challenge,
    parse_message,
)
from sipcore import Request as SipRequest
from worker.proxy import ProxyConfig, ProxyCore
from worker.server import GC_THRESHOLDS
from worker.transport import Peer, SocketDirectory

ROUNDS = 5
# 33 s of virtual time at 2,000 calls/s before the sustained call is timed, then 2 s.
SUSTAINED_WARM = 66_000
SUSTAINED_CALLS = 4_000


def best_rate(work: Callable[[], int]) -> float:
    """Run ``work`` (which returns how many operations it did) ROUNDS times and
    return the best rate in operations per second."""
    best = 0.0
    for _ in range(ROUNDS):
        gc.collect()
        started = time.perf_counter()
        count = work()
        elapsed = time.perf_counter() - started
        best = max(best, count / elapsed)
    return best


def proxy_parse(messages: Sequence[bytes]) -> Callable[[], int]:
    def work() -> int:
        for data in messages:
            message = parse_message(data)
            message.uri  # noqa: B018
            message.via  # noqa: B018
            message.max_forwards  # noqa: B018
            message.routes  # noqa: B018
            message.proxy_require  # noqa: B018
            message.call_id  # noqa: B018
            message.cseq  # noqa: B018
            message.from_.tag  # noqa: B018
            message.to.tag  # noqa: B018
            message.content_length  # noqa: B018
        return len(messages)

    return work


def full_parse(messages: Sequence[bytes]) -> Callable[[], int]:
    def work() -> int:
        for data in messages:
            parse_message(data).parse_all()
        return len(messages)

    return work


def call_id_extraction(messages: Sequence[bytes]) -> Callable[[], int]:
    def work() -> int:
        for data in messages:
            extract_call_id(data)
        return len(messages)

    return work


def digest_verification(algorithm: DigestAlgorithm, count: int) -> Callable[[], int]:
    realm = "example.com"
    keyring = NonceKeyring({"k1": b"0123456789abcdef0123456789abcdef"}, "k1")
    server = DigestServer(keyring)
    now = 1_700_000_000.0
    ha1 = {algorithm: compute_ha1("alice", realm, "secret", algorithm)}
    requests = []
    for index in range(count):
        challenge = next(
            parsed
            for parsed in map(parse_challenge, server.challenges(realm, now))
            if parsed.get("algorithm") == algorithm.value
        )
        credentials = build_credentials(
            challenge,
            username="alice",
            password="secret",
            method="REGISTER",
            uri="sip:example.com",
            cnonce=f"c{index}",
        )
        requests.append(credentials)

    def work() -> int:
        # Nonces are stateless: a fresh server (an empty replay cache, as on another
        # worker) verifies them; each round so starts without replays.
        verifier = DigestServer(keyring)
        for credentials in requests:
            verifier.verify(
                credentials,
                method="REGISTER",
                request_uri="sip:example.com",
                realm=realm,
                ha1_lookup=ha1,
                now=now,
            )
        return len(requests)

    return work


class _Locator:
    """One binding per callee, as the worker's location cache holds it."""

    def __init__(self, callee: Peer, accounts: int) -> None:
        self.bindings = {
            f"bob{index}@example.com": [
                Binding(
                    aor=f"bob{index}@example.com",
                    binding_id="b1",
                    contact=f"<sip:bob{index}@127.0.0.1:5080>",
                    uri=f"sip:bob{index}@127.0.0.1:5080",
                    expires_at=float("inf"),
                    q=None,
                    call_id=f"reg-{index}",
                    cseq=1,
                    received=callee,
                )
            ]
            for index in range(accounts)
        }

    def lookup(self, aor: str) -> list[Binding]:
        return self.bindings.get(aor, [])


def _answer(request: bytes, status: str, to_tag: str, contact: bool = True) -> bytes:
    """A SIPp callee's answer: the request's Via, Record-Route, From, To, Call-ID
    and CSeq lines copied, a To tag added."""
    head = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    kept = [
        line + (b";tag=" + to_tag.encode() if line.startswith(b"To:") and to_tag else b"")
        for line in head
        if line.split(b":", 1)[0] in (b"Via", b"Record-Route", b"From", b"To", b"Call-ID", b"CSeq")
    ]
    if contact:
        kept.append(b"Contact: <sip:bob@127.0.0.1:5080>")
    return b"\r\n".join([b"SIP/2.0 " + status.encode(), *kept, b"Content-Length: 0", b"", b""])


def proxy_call_cost(calls: int, accounts: int = 100, warm: int = 0) -> float:
    """The worker's sans-IO CPU per call, in seconds (see the module docstring),
    over the calls after the first ``warm`` ones."""
    caller = Peer("lb1", 0, "udp", "127.0.0.1", 5070)
    callee = Peer("lb1", 0, "udp", "127.0.0.1", 5080)
    sockets = SocketDirectory()
    sockets.update(
        {
            "lb1": LBRecord(
                "lb1", "ipc:///bench", (LBSocket(0, "udp", "127.0.0.1", 5060, "127.0.0.1", 5060),)
            )
        }
    )
    layer = TransactionLayer()
    proxy = ProxyCore(
        layer,
        worker_id="w1",
        sockets=sockets,
        locator=_Locator(callee, accounts),
        known_user=lambda aor: True,
        config=ProxyConfig(domains=frozenset({"example.com"})),
    )
    now = 1000.0
    spent = 0.0

    timed = warm == 0

    def feed(data: bytes, source: Peer) -> list[bytes]:
        nonlocal spent
        started = time.perf_counter()
        message = parse_message(data, datagram=True)
        message.validate()
        if isinstance(message, SipRequest):
            layer.receive_request(message, source, reliable=False, now=now)
        else:
            layer.receive_response(message, source, now)
        while (event := layer.next_event()) is not None:
            proxy.handle_event(event, now)
        sent = [outgoing.data for outgoing in layer.messages_to_send()]
        if timed:
            spent += time.perf_counter() - started
        return sent

    def tick() -> None:
        nonlocal spent
        started = time.perf_counter()
        layer.handle_timer(now)
        proxy.handle_timer(now)
        while (event := layer.next_event()) is not None:
            proxy.handle_event(event, now)
        layer.messages_to_send()
        if timed:
            spent += time.perf_counter() - started

    for index in range(calls):
        timed = index >= warm
        user = index % accounts
        common = (
            f"From: sipp <sip:alice{user}@example.com>;tag={index}SIPpTag001\r\n"
            f"Call-ID: {index}-4242@127.0.0.1\r\n"
        )
        invite = (
            f"INVITE sip:bob{user}@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{index}-1-0\r\n{common}"
            f"To: <sip:bob{user}@example.com>\r\nCSeq: 1 INVITE\r\n"
            "Contact: <sip:alice@127.0.0.1:5070>\r\nMax-Forwards: 70\r\n"
            "Content-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=0\n"
        ).encode()
        forwarded = next(data for data in feed(invite, caller) if data.startswith(b"INVITE"))
        feed(_answer(forwarded, "180 Ringing", "bobtag"), callee)
        sent = feed(_answer(forwarded, "200 OK", "bobtag"), callee)
        ok = next(data for data in sent if data.startswith(b"SIP/2.0 200"))
        routes = "".join(
            f"Route: {line[14:].decode()}\r\n"
            for line in ok.split(b"\r\n")
            if line.startswith(b"Record-Route: ")
        )
        for method, cseq in (("ACK", 1), ("BYE", 2)):
            request = (
                f"{method} sip:bob@127.0.0.1:5080 SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{index}-{method}\r\n{routes}"
                f"{common}To: <sip:bob{user}@example.com>;tag=bobtag\r\n"
                f"CSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).encode()
            sent = feed(request, caller)
        bye = next(data for data in sent if data.startswith(b"BYE"))
        feed(_answer(bye, "200 OK", "", contact=False), callee)
        now += 0.0005  # 2,000 calls/s
        if index % 20 == 19:
            tick()  # the worker's 10 ms timer ticks
        if index % 1000 == 999:
            gc.freeze()  # as the worker does every 0.5 s (worker/server.py)
    return spent / (calls - warm)


def best_call_rate(calls: int, warm: int = 0, rounds: int = ROUNDS) -> float:
    """Calls per second of one core over the calls after the first ``warm``, best
    of ``rounds``, under the worker's garbage collector policy (thresholds and
    periodic freezing, worker/server.py)."""
    best = 0.0
    thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        for _ in range(rounds):
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            best = max(best, 1 / proxy_call_cost(warm + calls, warm=warm))
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    return best


def main() -> int:
    """Run the benchmarks and print a table."""
    invites = distinct_invites(20_000)
    print(f"# sipcore micro-benchmarks, one core, best of {ROUNDS}")
    print(f"# python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus")
    print(f"# typical INVITE: {len(INVITE)} bytes; {len(invites)} distinct INVITEs per round")
    rows = [
        ("INVITE parse, headers a proxy needs", best_rate(proxy_parse(invites)), 40_000),
        ("INVITE parse, every known header", best_rate(full_parse(invites)), None),
        ("Call-ID extraction (load balancer)", best_rate(call_id_extraction(invites)), 500_000),
        (
            "digest verification, SHA-256",
            best_rate(digest_verification(DigestAlgorithm.SHA_256, 20_000)),
            None,
        ),
        (
            "digest verification, MD5",
            best_rate(digest_verification(DigestAlgorithm.MD5, 20_000)),
            None,
        ),
        ("call through the proxy core (per call)", best_call_rate(5_000), None),
        (
            "the same, sustained (32 s timers firing)",
            best_call_rate(SUSTAINED_CALLS, warm=SUSTAINED_WARM, rounds=2),
            None,
        ),
    ]
    print(f"{'operation':40s} {'per second':>12s} {'us each':>9s} {'target':>10s}")
    for name, rate, target in rows:
        target_text = f">= {target:,}" if target else "-"
        print(f"{name:40s} {rate:12,.0f} {1e6 / rate:9.2f} {target_text:>10s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
