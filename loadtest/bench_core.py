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
* a digest verification (nonce check and response check), SHA-256 and MD5.

Each figure is the best of five rounds.  Usage: ``python -m loadtest.bench_core``.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

from loadtest.messages import INVITE, distinct_invites
from sipcore import (
    DigestAlgorithm,
    DigestServer,
    NonceKeyring,
    build_credentials,
    compute_ha1,
    extract_call_id,
    parse_challenge,
    parse_message,
)

ROUNDS = 5


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
    ]
    print(f"{'operation':40s} {'per second':>12s} {'us each':>9s} {'target':>10s}")
    for name, rate, target in rows:
        target_text = f">= {target:,}" if target else "-"
        print(f"{name:40s} {rate:12,.0f} {1e6 / rate:9.2f} {target_text:>10s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
