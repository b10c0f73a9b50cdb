"""Tests of sipcore._digest: SIP digest authentication, server side."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipcore._digest import (
    Challenge,
    Credentials,
    DigestAlgorithm,
    DigestResult,
    DigestServer,
    DigestVerdict,
    NonceKeyring,
    build_credentials,
    compute_ha1,
    compute_response,
    parse_challenge,
    parse_credentials,
)
from sipcore._errors import LocalProtocolError, RemoteProtocolError

REALM = "example.com"
URI = "sip:example.com"
METHOD = "REGISTER"
USERNAME = "alice"
PASSWORD = "correct horse"
SECRET = b"0123456789abcdef0123456789abcdef"
OTHER_SECRET = b"fedcba9876543210fedcba9876543210"
NOW = 1_700_000_000.0
RFC4475 = Path(__file__).parent / "conformance" / "rfc4475"

MD5 = DigestAlgorithm.MD5
SHA_256 = DigestAlgorithm.SHA_256


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def counting_random() -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom: distinct salts, call after call."""
    state = {"count": 0}

    def random_bytes(size: int) -> bytes:
        state["count"] += 1
        return state["count"].to_bytes(size, "big")

    return random_bytes


def make_server(keyring: NonceKeyring | None = None, **options: Any) -> DigestServer:
    if keyring is None:
        keyring = NonceKeyring({"k1": SECRET}, "k1")
    return DigestServer(keyring, random_bytes=counting_random(), **options)


def ha1_by_algorithm(
    password: str = PASSWORD, username: str = USERNAME, realm: str = REALM
) -> dict[DigestAlgorithm, str]:
    return {
        algorithm: compute_ha1(username, realm, password, algorithm) for algorithm in (MD5, SHA_256)
    }


def challenge_for(
    server: DigestServer, algorithm: DigestAlgorithm, *, now: float = NOW
) -> Challenge:
    for value in server.challenges(REALM, now):
        challenge = parse_challenge(value)
        if challenge.get("algorithm") == algorithm.value:
            return challenge
    raise AssertionError(f"no {algorithm} challenge")


def answer(
    challenge: Challenge,
    *,
    password: str = PASSWORD,
    nc: int = 1,
    uri: str = URI,
    cnonce: str = "0a4f113b",
) -> Credentials:
    return build_credentials(
        challenge,
        username=USERNAME,
        password=password,
        method=METHOD,
        uri=uri,
        cnonce=cnonce,
        nc=nc,
    )


def challenge_with_nonce(
    nonce: str, *, realm: str = REALM, algorithm: str = "SHA-256"
) -> Challenge:
    return Challenge(
        scheme="Digest",
        params=(("realm", realm), ("nonce", nonce), ("qop", "auth"), ("algorithm", algorithm)),
    )


def verify(
    server: DigestServer,
    credentials: Credentials,
    *,
    now: float = NOW,
    realm: str = REALM,
    request_uri: str = URI,
    password: str = PASSWORD,
) -> DigestResult:
    # Every credentials goes over the wire form first, as in real life.
    return server.verify(
        parse_credentials(str(credentials)),
        method=METHOD,
        request_uri=request_uri,
        realm=realm,
        ha1_lookup=ha1_by_algorithm(password, realm=realm),
        now=now,
    )


def replace_param(credentials: Credentials, name: str, value: str | None) -> Credentials:
    params = [(key, old) for key, old in credentials.params if key.lower() != name.lower()]
    if value is not None:
        params.append((name, value))
    return Credentials(scheme=credentials.scheme, params=tuple(params))


def without_param(challenge: Challenge, name: str) -> Challenge:
    params = tuple((key, value) for key, value in challenge.params if key != name)
    return Challenge(scheme=challenge.scheme, params=params)


def decode_nonce(nonce: str) -> bytes:
    return base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))


# --------------------------------------------------------------------------------------
# RFC test vectors
# --------------------------------------------------------------------------------------

RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        (MD5, "8ca523f5e9506fed4657c9700eebdbec"),
        (SHA_256, "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_section_3_9_1_response(algorithm: DigestAlgorithm, expected: str) -> None:
    ha1 = compute_ha1("Mufasa", "http-auth@example.org", "Circle of Life", algorithm)
    response = compute_response(
        algorithm,
        ha1,
        nonce=RFC7616_NONCE,
        method="GET",
        uri="/dir/index.html",
        qop="auth",
        nc="00000001",
        cnonce=RFC7616_CNONCE,
    )
    assert response == expected


def test_rfc2617_section_3_5_response() -> None:
    ha1 = compute_ha1("Mufasa", "testrealm@host.com", "Circle Of Life", MD5)
    response = compute_response(
        MD5,
        ha1,
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        method="GET",
        uri="/dir/index.html",
        qop="auth",
        nc="00000001",
        cnonce="0a4f113b",
    )
    assert response == "6629fae49393a05397450978507c4ef1"


def test_rfc7616_example_headers_parse_and_their_response_checks() -> None:
    # The RFC's layout: one parameter per folded line (RFC 3261 7.3.1 folding).
    challenge = parse_challenge(
        "Digest\r\n"
        '    realm="http-auth@example.org",\r\n'
        '    qop="auth, auth-int",\r\n'
        "    algorithm=SHA-256,\r\n"
        f'    nonce="{RFC7616_NONCE}",\r\n'
        f'    opaque="{RFC7616_OPAQUE}"'
    )
    assert challenge.scheme == "Digest"
    assert challenge.get("qop") == "auth, auth-int"
    assert challenge.get("ALGORITHM") == "SHA-256"
    credentials = parse_credentials(
        'Digest username="Mufasa",\r\n'
        '    realm="http-auth@example.org",\r\n'
        '    uri="/dir/index.html",\r\n'
        "    algorithm=MD5,\r\n"
        f'    nonce="{RFC7616_NONCE}",\r\n'
        "    nc=00000001,\r\n"
        f'    cnonce="{RFC7616_CNONCE}",\r\n'
        "    qop=auth,\r\n"
        '    response="8ca523f5e9506fed4657c9700eebdbec",\r\n'
        f'    opaque="{RFC7616_OPAQUE}"'
    )
    algorithm = DigestAlgorithm.from_token(credentials.get("algorithm") or "")
    assert algorithm is MD5
    ha1 = compute_ha1("Mufasa", "http-auth@example.org", "Circle of Life", algorithm)
    response = compute_response(
        algorithm,
        ha1,
        nonce=credentials.get("nonce") or "",
        method="GET",
        uri=credentials.get("uri") or "",
        qop=credentials.get("qop"),
        nc=credentials.get("nc"),
        cnonce=credentials.get("cnonce"),
    )
    assert response == credentials.get("response")


def test_compute_response_rfc2069_form() -> None:
    ha1 = compute_ha1("Mufasa", "testrealm@host.com", "Circle Of Life", MD5)
    ha2 = hashlib.md5(b"GET:/dir/index.html").hexdigest()
    expected = hashlib.md5(f"{ha1}:dcd98b7102dd2f0e8b11d0f600bfb0c093:{ha2}".encode()).hexdigest()
    response = compute_response(
        MD5,
        ha1,
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        method="GET",
        uri="/dir/index.html",
        qop=None,
    )
    assert response == expected


def test_compute_response_with_qop_needs_nc_and_cnonce() -> None:
    with pytest.raises(LocalProtocolError):
        compute_response(MD5, "0" * 32, nonce="n", method="GET", uri="/", qop="auth")


def test_compute_ha1_is_lowercase_hex_of_user_realm_password() -> None:
    assert compute_ha1("Mufasa", "testrealm@host.com", "Circle Of Life", MD5) == (
        hashlib.md5(b"Mufasa:testrealm@host.com:Circle Of Life").hexdigest()
    )
    assert compute_ha1("bob", "r", "p", SHA_256) == hashlib.sha256(b"bob:r:p").hexdigest()


def test_algorithm_from_token_is_case_insensitive() -> None:
    assert DigestAlgorithm.from_token("md5") is MD5
    assert DigestAlgorithm.from_token("sha-256") is SHA_256
    assert DigestAlgorithm.from_token("SHA-256") is SHA_256
    assert DigestAlgorithm.from_token("MD5-sess") is None
    assert DigestAlgorithm.from_token("SHA-512-256") is None


# --------------------------------------------------------------------------------------
# Challenges and nonces
# --------------------------------------------------------------------------------------


def test_challenges_default_order_is_sha256_then_md5_with_one_nonce() -> None:
    values = make_server().challenges(REALM, NOW)
    challenges = [parse_challenge(value) for value in values]
    assert [challenge.get("algorithm") for challenge in challenges] == ["SHA-256", "MD5"]
    assert all(challenge.scheme == "Digest" for challenge in challenges)
    assert all(challenge.get("realm") == REALM for challenge in challenges)
    assert all(challenge.get("qop") == "auth" for challenge in challenges)
    assert all(challenge.get("stale") is None for challenge in challenges)
    assert challenges[0].get("nonce") == challenges[1].get("nonce")
    # qop is quoted in a challenge, algorithm is a token (RFC 7616 3.3).
    assert 'qop="auth"' in values[0]
    assert "algorithm=SHA-256" in values[0]


def test_challenges_follow_the_configured_order() -> None:
    server = make_server(algorithms=(MD5, SHA_256))
    algorithms = [
        parse_challenge(value).get("algorithm") for value in server.challenges(REALM, NOW)
    ]
    assert algorithms == ["MD5", "SHA-256"]
    only_md5 = make_server(algorithms=(MD5,))
    assert len(only_md5.challenges(REALM, NOW)) == 1


def test_challenges_quote_the_realm() -> None:
    value = make_server().challenges('odd "realm", really', NOW)[0]
    assert parse_challenge(value).get("realm") == 'odd "realm", really'
    with pytest.raises(LocalProtocolError):
        make_server().challenges("bad\r\nrealm", NOW)


def test_each_challenge_gets_a_fresh_nonce() -> None:
    server = make_server()
    first = parse_challenge(server.challenges(REALM, NOW)[0]).get("nonce")
    second = parse_challenge(server.challenges(REALM, NOW)[0]).get("nonce")
    assert first != second


def test_nonce_layout_is_the_documented_one() -> None:
    long_secret = bytes(range(100))  # longer than the SHA-256 block: hashed first (RFC 2104)
    for key_id, secret in (("k1", SECRET), ("long-key.2", long_secret)):
        server = DigestServer(
            NonceKeyring({key_id: secret}, key_id), random_bytes=lambda size: b"\xab" * size
        )
        nonce = server.make_nonce(REALM, 1234.75)
        assert "=" not in nonce
        raw = decode_nonce(nonce)
        key_id_end = 1 + raw[0]
        assert raw[1:key_id_end] == key_id.encode()
        assert int.from_bytes(raw[key_id_end : key_id_end + 8], "big") == 1234
        assert raw[key_id_end + 8 : key_id_end + 16] == b"\xab" * 8
        signed = raw[: key_id_end + 16]
        expected_mac = hmac.new(secret, signed + REALM.encode(), hashlib.sha256).digest()[:16]
        assert raw[key_id_end + 16 :] == expected_mac


def test_make_nonce_rejects_a_short_random_source() -> None:
    server = DigestServer(NonceKeyring({"k1": SECRET}, "k1"), random_bytes=lambda size: b"x")
    with pytest.raises(LocalProtocolError):
        server.make_nonce(REALM, NOW)


@pytest.mark.parametrize(
    "options",
    [
        {"algorithms": ()},
        {"algorithms": (MD5, MD5)},
        {"nonce_lifetime": 0.0},
        {"max_clock_skew": -1.0},
        {"nc_cache_size": -1},
    ],
)
def test_server_rejects_unusable_settings(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is not the point
        make_server(**options)


# --------------------------------------------------------------------------------------
# Verification: the good path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [MD5, SHA_256])
def test_full_round_trip_verifies(algorithm: DigestAlgorithm) -> None:
    server = make_server()
    credentials = answer(challenge_for(server, algorithm))
    assert credentials.get("algorithm") == algorithm.value
    wire = str(credentials)
    assert parse_credentials(wire) == credentials
    result = verify(server, credentials, now=NOW + 10)
    assert result == DigestResult(verdict=DigestVerdict.OK, username=USERNAME)
    assert not result.verdict.challenge_again
    assert not result.verdict.bad_request


def test_other_workers_sharing_the_keyring_verify_the_nonce() -> None:
    keyring = NonceKeyring({"k1": SECRET}, "k1")
    issuer = make_server(keyring)
    other_worker = make_server(keyring)
    credentials = answer(challenge_for(issuer, SHA_256))
    assert verify(other_worker, credentials).verdict is DigestVerdict.OK


def test_missing_algorithm_means_md5() -> None:
    server = make_server()
    challenge = without_param(challenge_for(server, MD5), "algorithm")
    credentials = answer(challenge)
    assert credentials.get("algorithm") == "MD5"
    assert verify(server, replace_param(credentials, "algorithm", None)).verdict is DigestVerdict.OK


def test_algorithm_and_response_are_case_insensitive() -> None:
    server = make_server()
    credentials = answer(challenge_for(server, SHA_256))
    credentials = replace_param(credentials, "algorithm", "sha-256")
    credentials = replace_param(
        credentials, "response", (credentials.get("response") or "").upper()
    )
    assert verify(server, credentials).verdict is DigestVerdict.OK


def test_ha1_lookup_may_be_a_callable() -> None:
    server = make_server()
    credentials = parse_credentials(str(answer(challenge_for(server, SHA_256))))
    calls: list[tuple[str, DigestAlgorithm]] = []

    def lookup(username: str, algorithm: DigestAlgorithm) -> str | None:
        calls.append((username, algorithm))
        return compute_ha1(username, REALM, PASSWORD, algorithm)

    result = server.verify(
        credentials, method=METHOD, request_uri=URI, realm=REALM, ha1_lookup=lookup, now=NOW
    )
    assert result.verdict is DigestVerdict.OK
    assert calls == [(USERNAME, SHA_256)]


def test_uppercase_stored_ha1_still_verifies() -> None:
    server = make_server()
    credentials = parse_credentials(str(answer(challenge_for(server, MD5))))
    stored = {MD5: compute_ha1(USERNAME, REALM, PASSWORD, MD5).upper()}
    result = server.verify(
        credentials, method=METHOD, request_uri=URI, realm=REALM, ha1_lookup=stored, now=NOW
    )
    assert result.verdict is DigestVerdict.OK


# --------------------------------------------------------------------------------------
# Verification: failures
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [MD5, SHA_256])
def test_wrong_password_is_wrong_response(algorithm: DigestAlgorithm) -> None:
    server = make_server()
    credentials = answer(challenge_for(server, algorithm), password="wrong")
    result = verify(server, credentials)
    assert result.verdict is DigestVerdict.WRONG_RESPONSE
    assert result.username is None
    assert result.verdict.challenge_again
    assert not result.verdict.stale


def test_expired_nonce_with_right_password_is_stale_and_rechallenged_with_stale_true() -> None:
    server = make_server(nonce_lifetime=300.0)
    challenge = challenge_for(server, SHA_256, now=NOW)
    assert verify(server, answer(challenge, nc=1), now=NOW + 300).verdict is DigestVerdict.OK
    result = verify(server, answer(challenge, nc=2), now=NOW + 301)
    assert result.verdict is DigestVerdict.STALE
    assert result.verdict.challenge_again
    assert result.verdict.stale
    for value in server.challenges(REALM, NOW + 301, stale=result.verdict.stale):
        challenge = parse_challenge(value)
        assert challenge.get("stale") == "true"
        assert "stale=true" in value
    # The fresh nonce works.
    fresh = answer(challenge_for(server, SHA_256, now=NOW + 301))
    assert verify(server, fresh, now=NOW + 302).verdict is DigestVerdict.OK


def test_expired_nonce_with_wrong_password_is_wrong_response_not_stale() -> None:
    server = make_server(nonce_lifetime=300.0)
    credentials = answer(challenge_for(server, SHA_256, now=NOW), password="wrong")
    result = verify(server, credentials, now=NOW + 1000)
    assert result.verdict is DigestVerdict.WRONG_RESPONSE
    assert not result.verdict.stale


def test_nonce_lifetime_is_configurable() -> None:
    server = make_server(nonce_lifetime=30.0)
    credentials = answer(challenge_for(server, SHA_256, now=NOW))
    assert verify(server, credentials, now=NOW + 31).verdict is DigestVerdict.STALE


def test_nonce_from_the_future_is_invalid_beyond_the_skew() -> None:
    server = make_server(max_clock_skew=5.0)
    credentials = answer(challenge_for(server, SHA_256, now=NOW + 100))
    assert verify(server, credentials, now=NOW).verdict is DigestVerdict.INVALID_NONCE
    near = answer(challenge_for(server, SHA_256, now=NOW + 5))
    assert verify(server, near, now=NOW).verdict is DigestVerdict.OK


def tampered_nonces(nonce: str) -> list[str]:
    flipped_last = nonce[:-1] + ("A" if nonce[-1] != "A" else "B")
    flipped_middle = nonce[:20] + ("A" if nonce[20] != "A" else "B") + nonce[21:]
    return [
        flipped_last,
        flipped_middle,
        nonce[:-4],
        nonce + "AAAA",
        nonce[:-1] + "!",  # not base64url
        nonce.replace("-", "+").replace("_", "/") + "==",  # another alphabet, padded
        nonce + "=",
        "",
        "Zm9v",  # valid base64, far too short
        "é" * 10,
        "A" * 500,
    ]


def test_tampered_nonce_with_correct_digest_is_invalid_not_stale() -> None:
    server = make_server()
    nonce = challenge_for(server, SHA_256).get("nonce") or ""
    for tampered in tampered_nonces(nonce):
        # The digest over the tampered nonce is right: only the nonce is wrong.
        credentials = answer(challenge_with_nonce(tampered))
        result = verify(server, credentials)
        assert result.verdict is DigestVerdict.INVALID_NONCE, tampered
        assert result.verdict.challenge_again
        assert not result.verdict.stale
        # Even long after, a forged nonce never turns stale.
        assert verify(server, credentials, now=NOW + 10_000).verdict is DigestVerdict.INVALID_NONCE


def test_nonce_with_an_unknown_key_id_is_invalid() -> None:
    foreign = make_server(NonceKeyring({"k9": SECRET}, "k9"))
    credentials = answer(challenge_for(foreign, SHA_256))
    assert verify(make_server(), credentials).verdict is DigestVerdict.INVALID_NONCE


def test_nonce_signed_with_another_secret_is_invalid() -> None:
    impostor = make_server(NonceKeyring({"k1": OTHER_SECRET}, "k1"))
    credentials = answer(challenge_for(impostor, SHA_256))
    assert verify(make_server(), credentials).verdict is DigestVerdict.INVALID_NONCE


def test_nonce_of_another_realm_is_invalid() -> None:
    server = make_server()
    nonce = server.make_nonce("other.example.com", NOW)
    # A client of realm example.com presents it with a right digest.
    credentials = answer(challenge_with_nonce(nonce))
    assert verify(server, credentials).verdict is DigestVerdict.INVALID_NONCE


def test_key_rotation() -> None:
    keyring = NonceKeyring({"k1": SECRET}, "k1")
    server = make_server(keyring)
    old_challenge = challenge_for(server, SHA_256)
    old = answer(old_challenge)

    server.keyring = keyring.with_key("k2", OTHER_SECRET)
    assert server.keyring.current_key_id == "k2"
    assert server.keyring.key_ids == ("k1", "k2")
    new_challenge = challenge_for(server, SHA_256)
    new = answer(new_challenge)
    assert decode_nonce(new.get("nonce") or "")[1:3] == b"k2"
    assert verify(server, old).verdict is DigestVerdict.OK
    assert verify(server, new).verdict is DigestVerdict.OK

    server.keyring = server.keyring.without_key("k1")
    assert verify(server, answer(old_challenge, nc=2)).verdict is DigestVerdict.INVALID_NONCE
    assert verify(server, answer(new_challenge, nc=2)).verdict is DigestVerdict.OK


def test_keyring_with_key_can_stage_a_key_before_using_it() -> None:
    keyring = NonceKeyring({"k1": SECRET}, "k1").with_key("k2", OTHER_SECRET, make_current=False)
    assert keyring.current_key_id == "k1"
    assert set(keyring.key_ids) == {"k1", "k2"}


@pytest.mark.parametrize(
    ("keys", "current"),
    [
        ({"k1": SECRET}, "k2"),
        ({"k1": b"short"}, "k1"),
        ({"": SECRET}, ""),
        ({"bad id": SECRET}, "bad id"),
        ({"x" * 33: SECRET}, "x" * 33),
        ({}, "k1"),
    ],
)
def test_keyring_rejects_unusable_keys(keys: dict[str, bytes], current: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is not the point
        NonceKeyring(keys, current)


def test_keyring_cannot_drop_the_current_or_an_absent_key() -> None:
    keyring = NonceKeyring({"k1": SECRET, "k2": OTHER_SECRET}, "k1")
    with pytest.raises(ValueError, match="current"):
        keyring.without_key("k1")
    with pytest.raises(ValueError, match="not in the keyring"):
        keyring.without_key("k3")


def test_keyring_repr_hides_secrets() -> None:
    text = repr(NonceKeyring({"k1": SECRET}, "k1"))
    assert "k1" in text
    assert SECRET.decode() not in text


def test_replayed_nc_is_rejected_and_a_higher_nc_accepted() -> None:
    server = make_server()
    challenge = challenge_for(server, SHA_256)
    first = answer(challenge, nc=1)
    assert verify(server, first).verdict is DigestVerdict.OK
    replay = verify(server, first)
    assert replay.verdict is DigestVerdict.REPLAY
    assert replay.verdict.challenge_again
    assert not replay.verdict.stale
    assert verify(server, answer(challenge, nc=2)).verdict is DigestVerdict.OK
    assert verify(server, answer(challenge, nc=5)).verdict is DigestVerdict.OK
    assert verify(server, answer(challenge, nc=3)).verdict is DigestVerdict.REPLAY
    assert verify(server, answer(challenge, nc=5)).verdict is DigestVerdict.REPLAY
    assert verify(server, answer(challenge, nc=6)).verdict is DigestVerdict.OK


def test_failed_requests_do_not_advance_the_nc() -> None:
    server = make_server()
    challenge = challenge_for(server, SHA_256)
    assert verify(server, answer(challenge, nc=9, password="wrong")).verdict is (
        DigestVerdict.WRONG_RESPONSE
    )
    assert verify(server, answer(challenge, nc=1)).verdict is DigestVerdict.OK


def test_nc_cache_is_a_bounded_lru() -> None:
    server = make_server(nc_cache_size=2)
    first, second, third = (answer(challenge_for(server, SHA_256)) for _ in range(3))
    assert verify(server, first).verdict is DigestVerdict.OK
    assert verify(server, second).verdict is DigestVerdict.OK
    assert verify(server, answer(challenge_with_nonce(first.get("nonce") or ""), nc=2)).verdict is (
        DigestVerdict.OK
    )  # first is now the most recently used
    assert verify(server, third).verdict is DigestVerdict.OK  # evicts second
    assert verify(server, first).verdict is DigestVerdict.REPLAY
    assert verify(server, third).verdict is DigestVerdict.REPLAY
    # The documented limit: an evicted nonce's replay is no longer caught.
    assert verify(server, second).verdict is DigestVerdict.OK


def test_nc_cache_size_zero_disables_replay_checks() -> None:
    server = make_server(nc_cache_size=0)
    credentials = answer(challenge_for(server, SHA_256))
    assert verify(server, credentials).verdict is DigestVerdict.OK
    assert verify(server, credentials).verdict is DigestVerdict.OK


def test_uri_mismatch() -> None:
    server = make_server()
    credentials = answer(challenge_for(server, SHA_256), uri="sip:other.example.com")
    result = verify(server, credentials)
    assert result.verdict is DigestVerdict.URI_MISMATCH
    assert result.verdict.bad_request
    assert not result.verdict.challenge_again
    # String comparison of the value as the caller passes it.
    same = answer(challenge_for(server, SHA_256), uri="sip:EXAMPLE.com")
    assert verify(server, same, request_uri="sip:example.com").verdict is DigestVerdict.URI_MISMATCH


def test_realm_mismatch() -> None:
    server = make_server()
    credentials = answer(challenge_for(server, SHA_256))
    result = verify(server, credentials, realm="other.example.com")
    assert result.verdict is DigestVerdict.REALM_MISMATCH
    assert result.verdict.challenge_again


@pytest.mark.parametrize("token", ["MD5-sess", "SHA-256-sess", "SHA-512-256", "token"])
def test_unsupported_algorithm(token: str) -> None:
    server = make_server()
    credentials = answer(challenge_for(server, SHA_256))
    result = verify(server, replace_param(credentials, "algorithm", token))
    assert result.verdict is DigestVerdict.UNSUPPORTED_ALGORITHM
    assert result.verdict.challenge_again


def test_algorithm_not_offered_is_unsupported() -> None:
    server = make_server(algorithms=(SHA_256,))
    credentials = answer(challenge_with_nonce(server.make_nonce(REALM, NOW), algorithm="MD5"))
    assert verify(server, credentials).verdict is DigestVerdict.UNSUPPORTED_ALGORITHM
    # Nor may an MD5 client drop the algorithm directive to get MD5 (RFC 2617 default).
    bare = replace_param(credentials, "algorithm", None)
    assert verify(server, bare).verdict is DigestVerdict.UNSUPPORTED_ALGORITHM


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("username", None),
        ("realm", None),
        ("nonce", None),
        ("uri", None),
        ("response", None),
        ("cnonce", None),
        ("nc", None),
        ("nc", "1"),
        ("nc", "0000001"),
        ("nc", "000000001"),
        ("nc", "0000000g"),
        ("nc", "0x000001"),
        ("nc", "+0000001"),
        ("qop", "auth-int"),
        ("qop", "auth,auth-int"),
    ],
)
def test_missing_or_bad_fields_are_malformed(name: str, value: str | None) -> None:
    server = make_server()
    credentials = replace_param(answer(challenge_for(server, SHA_256)), name, value)
    result = verify(server, credentials)
    assert result.verdict is DigestVerdict.MALFORMED
    assert result.verdict.bad_request
    assert not result.verdict.challenge_again
    assert result.detail
    assert "\r" not in result.detail
    assert "\n" not in result.detail


def test_rfc2069_form_is_accepted_by_default() -> None:
    server = make_server()
    challenge = without_param(challenge_for(server, MD5), "qop")
    credentials = answer(challenge)
    assert credentials.get("qop") is None
    assert credentials.get("nc") is None
    assert credentials.get("cnonce") is None
    assert verify(server, credentials).verdict is DigestVerdict.OK
    assert verify(server, answer(challenge, password="wrong")).verdict is (
        DigestVerdict.WRONG_RESPONSE
    )


def test_rfc2069_form_is_rejected_when_disabled() -> None:
    server = make_server(allow_rfc2069=False)
    credentials = answer(without_param(challenge_for(server, MD5), "qop"))
    result = verify(server, credentials)
    assert result.verdict is DigestVerdict.MALFORMED
    assert result.verdict.bad_request


def test_unknown_user() -> None:
    server = make_server()
    credentials = parse_credentials(str(answer(challenge_for(server, SHA_256))))
    by_mapping = server.verify(
        credentials, method=METHOD, request_uri=URI, realm=REALM, ha1_lookup={}, now=NOW
    )
    # An HA1 for another algorithm than the client used does not count either.
    only_md5 = server.verify(
        credentials,
        method=METHOD,
        request_uri=URI,
        realm=REALM,
        ha1_lookup={MD5: compute_ha1(USERNAME, REALM, PASSWORD, MD5)},
        now=NOW,
    )
    by_callable = server.verify(
        credentials,
        method=METHOD,
        request_uri=URI,
        realm=REALM,
        ha1_lookup=lambda username, algorithm: None,
        now=NOW,
    )
    for result in (by_mapping, only_md5, by_callable):
        assert result.verdict is DigestVerdict.UNKNOWN_USER
        assert result.username is None
        # Answered exactly like a wrong password.
        assert result.verdict.challenge_again
        assert not result.verdict.stale


def test_unknown_scheme_is_challenged_again() -> None:
    # RFC 4475 3.3.7: a registrar doing auth answers 401 with a scheme it knows.
    credentials = parse_credentials("NoOneKnowsThisScheme opaque-data=here")
    result = make_server().verify(
        credentials, method=METHOD, request_uri=URI, realm=REALM, ha1_lookup={}, now=NOW
    )
    assert result.verdict is DigestVerdict.UNSUPPORTED_SCHEME
    assert result.verdict.challenge_again


def test_digest_scheme_name_is_case_insensitive_in_verify() -> None:
    server = make_server()
    credentials = answer(challenge_for(server, SHA_256))
    lowered = Credentials(scheme="digest", params=credentials.params)
    assert verify(server, lowered).verdict is DigestVerdict.OK


def test_odd_response_values_never_raise() -> None:
    server = make_server()
    credentials = answer(challenge_for(server, SHA_256))
    for response in ("", "é" * 64, "\x00", "z" * 1000):
        result = verify(server, replace_param(credentials, "response", response))
        assert result.verdict is DigestVerdict.WRONG_RESPONSE


def test_verdict_table() -> None:
    bad_request = {DigestVerdict.MALFORMED, DigestVerdict.URI_MISMATCH}
    for verdict in DigestVerdict:
        assert verdict.stale is (verdict is DigestVerdict.STALE)
        assert verdict.bad_request is (verdict in bad_request)
        expected = verdict is not DigestVerdict.OK and verdict not in bad_request
        assert verdict.challenge_again is expected


# --------------------------------------------------------------------------------------
# Client side helper
# --------------------------------------------------------------------------------------


def test_build_credentials_quotes_and_tokens_as_rfc7616_does() -> None:
    challenge = parse_challenge(
        f'Digest realm="{REALM}", nonce="abc", qop="auth-int, auth", algorithm=MD5, opaque="xyz"'
    )
    credentials = answer(challenge, nc=0x1F)
    text = str(credentials)
    for quoted in ("username", "realm", "nonce", "uri", "response", "cnonce", "opaque"):
        assert f'{quoted}="' in text
    assert "algorithm=MD5" in text
    assert "qop=auth" in text
    assert "nc=0000001f" in text
    assert credentials.get("opaque") == "xyz"


@pytest.mark.parametrize(
    "value",
    [
        "Basic realm=x",
        "Digest nonce=abc",
        "Digest realm=x",
        'Digest realm=x, nonce=y, algorithm="MD5-sess"',
        'Digest realm=x, nonce=y, qop="auth-int"',
    ],
)
def test_build_credentials_rejects_challenges_it_cannot_answer(value: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        answer(parse_challenge(value))
    assert caught.value.status_hint is None


@pytest.mark.parametrize("nc", [0, -1, 2**32])
def test_build_credentials_rejects_nc_out_of_range(nc: int) -> None:
    with pytest.raises(LocalProtocolError):
        answer(challenge_with_nonce("abc"), nc=nc)


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------


def test_rfc4475_regaut01_unknown_scheme_parses() -> None:
    raw = (RFC4475 / "regaut01.dat").read_bytes().decode("utf-8", "surrogateescape")
    (value,) = (
        line.split(":", 1)[1].strip()
        for line in raw.split("\r\n")
        if line.lower().startswith("authorization:")
    )
    credentials = parse_credentials(value)
    assert credentials.scheme == "NoOneKnowsThisScheme"
    assert credentials.params == (("opaque-data", "here"),)
    assert str(credentials) == "NoOneKnowsThisScheme opaque-data=here"
    assert parse_challenge(value).get("OPAQUE-DATA") == "here"


@pytest.mark.parametrize(
    "value",
    [
        'Digest realm="a",nonce="b",algorithm=MD5',
        'Digest realm="a", nonce="b", algorithm=MD5',
        'Digest realm = "a" , nonce= "b" ,algorithm =MD5',
        'Digest\trealm\t=\t"a"\t,\tnonce="b",\talgorithm=MD5',
        'Digest   realm="a"  ,   nonce="b",algorithm=MD5   ',
        '  Digest realm="a", nonce="b", algorithm=MD5',
        'Digest realm="a",\r\n nonce="b",\r\n\talgorithm=MD5',
        'Digest\r\n realm="a" ,\r\n  nonce="b"\r\n , algorithm=MD5',
        'Digest realm=a, nonce=b, algorithm="MD5"',
    ],
)
def test_whitespace_variants_parse_alike(value: str) -> None:
    challenge = parse_challenge(value)
    assert challenge.scheme == "Digest"
    assert challenge.params == (("realm", "a"), ("nonce", "b"), ("algorithm", "MD5"))


def test_escaped_quotes_and_backslashes_in_quoted_strings() -> None:
    credentials = parse_credentials(r'Digest username="a \"quoted\" name\\", realm="x\yz"')
    assert credentials.get("username") == 'a "quoted" name\\'
    assert credentials.get("realm") == "xyz"
    assert parse_credentials(str(credentials)) == credentials
    assert str(credentials) == r'Digest username="a \"quoted\" name\\", realm="xyz"'


def test_commas_and_equals_inside_quoted_strings_do_not_split() -> None:
    challenge = parse_challenge(
        'Digest realm="a, b=c", qop="auth,auth-int", nonce="x,y", opaque=",,"'
    )
    assert challenge.params == (
        ("realm", "a, b=c"),
        ("qop", "auth,auth-int"),
        ("nonce", "x,y"),
        ("opaque", ",,"),
    )


def test_scheme_and_parameter_names_are_case_insensitive() -> None:
    credentials = parse_credentials('dIgEsT UserName="alice", REALM="r"')
    assert credentials.scheme == "dIgEsT"  # kept for re-serialization
    assert credentials.get("username") == "alice"
    assert credentials.get("USERNAME") == "alice"
    assert credentials.get("Realm") == "r"
    assert credentials.get("nonce") is None
    assert str(credentials) == 'dIgEsT UserName="alice", REALM="r"'


def test_utf8_and_tabs_inside_quoted_strings() -> None:
    credentials = parse_credentials('Digest username="jösé\tü", realm="€"')
    assert credentials.get("username") == "jösé\tü"
    assert parse_credentials(str(credentials)) == credentials


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "Digest",
        "Digest ",
        "Digest,",
        'Digest realm="a",',
        'Digest realm="a",,nonce="b"',
        'Digest , realm="a"',
        "Digest realm",
        "Digest realm=",
        'Digest realm="a" nonce="b"',
        'Digest realm="unterminated',
        'Digest realm="bad \\',
        'Digest realm=a"b"',
        "Digest realm=a b",
        'Digest realm="a\x01b"',
        'Digest realm="a\\\rb"',
        'Digest realm="a"\r\nnonce="b"',
        'Digest realm="a",\nnonce="b"',
        'Digest realm="a"\r',
        "Digest realm=(a)",
        "Digest réalm=a",
        "Digest=realm",
        '"Digest" realm=a',
        "Digest realm=a, realm=b",
        "Digest realm=a, REALM=b",
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",  # token68: not RFC 3261 25.1
    ],
)
def test_malformed_values_raise_remote_protocol_error(value: str) -> None:
    for parse in (parse_credentials, parse_challenge):
        with pytest.raises(RemoteProtocolError) as caught:
            parse(value)
        assert caught.value.status_hint == 400
        assert caught.value.reason.startswith("Malformed")


def test_duplicate_parameter_reason_names_it() -> None:
    with pytest.raises(RemoteProtocolError, match=r"(?i)nonce"):
        parse_credentials('Digest nonce="a", Nonce="b"')
    with pytest.raises(LocalProtocolError):
        Credentials(scheme="Digest", params=(("nonce", "a"), ("NONCE", "b")))


def test_serialization_quotes_what_rfc7616_quotes() -> None:
    credentials = Credentials(
        scheme="Digest",
        params=(
            ("username", "u"),
            ("realm", "r"),
            ("nonce", "n"),
            ("uri", "sip:a"),
            ("response", "0f"),
            ("cnonce", "c"),
            ("opaque", "o"),
            ("algorithm", "MD5"),
            ("qop", "auth"),
            ("nc", "00000001"),
            ("other", "token"),
            ("spaced", "two words"),
            ("empty", ""),
        ),
    )
    assert str(credentials) == (
        'Digest username="u", realm="r", nonce="n", uri="sip:a", response="0f", cnonce="c", '
        'opaque="o", algorithm=MD5, qop=auth, nc=00000001, other=token, spaced="two words", '
        'empty=""'
    )
    challenge = Challenge(
        scheme="Digest",
        params=(("realm", "r"), ("domain", "sip:a"), ("qop", "auth"), ("stale", "true")),
    )
    assert str(challenge) == 'Digest realm="r", domain="sip:a", qop="auth", stale=true'
    # Other schemes: a token when it is one, quoted otherwise.
    other = Credentials(scheme="Other", params=(("realm", "r"), ("x", "a b")))
    assert str(other) == 'Other realm=r, x="a b"'


def test_token_parameters_that_are_not_tokens_get_quoted() -> None:
    credentials = Credentials(scheme="Digest", params=(("algorithm", "MD5 sess"), ("nc", "")))
    assert str(credentials) == 'Digest algorithm="MD5 sess", nc=""'
    assert parse_credentials(str(credentials)) == credentials


def test_controls_are_sent_as_quoted_pairs() -> None:
    credentials = Credentials(scheme="Digest", params=(("opaque", "a\x00b\x7fc\x1b"),))
    assert str(credentials) == 'Digest opaque="a\\\x00b\\\x7fc\\\x1b"'
    assert parse_credentials(str(credentials)) == credentials


@pytest.mark.parametrize(
    "credentials",
    [
        Credentials(scheme="Digest", params=(("realm", "a\r\nb"),)),
        Credentials(scheme="Digest", params=(("realm", "a\nb"),)),
        Credentials(scheme="Di gest", params=(("realm", "a"),)),
        Credentials(scheme="Digest", params=(("re alm", "a"),)),
        Credentials(scheme="", params=(("realm", "a"),)),
    ],
)
def test_unserializable_values_raise_local_protocol_error(credentials: Credentials) -> None:
    with pytest.raises(LocalProtocolError):
        str(credentials)


def test_credentials_and_challenges_are_frozen_and_hashable() -> None:
    credentials = parse_credentials('Digest realm="a"')
    with pytest.raises(AttributeError):
        credentials.scheme = "Other"  # type: ignore[misc]
    assert hash(credentials) == hash(parse_credentials('Digest realm="a"'))
    challenge: object = parse_challenge('Digest realm="a"')
    assert credentials != challenge
    assert "_index" not in repr(credentials)


# --------------------------------------------------------------------------------------
# Hypothesis
# --------------------------------------------------------------------------------------

TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
tokens = st.text(alphabet=TOKEN_ALPHABET, min_size=1, max_size=12)
known_names = st.sampled_from(
    [
        "username",
        "realm",
        "nonce",
        "uri",
        "response",
        "cnonce",
        "opaque",
        "qop",
        "nc",
        "algorithm",
        "stale",
        "domain",
        "Realm",
        "NC",
    ]
)
values = st.one_of(
    tokens,
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"),
        max_size=24,
    ),
    st.text(alphabet=' \t"\\,=;:/abc', max_size=12),
)
param_lists = st.lists(
    st.tuples(st.one_of(known_names, tokens), values),
    min_size=1,
    max_size=8,
    unique_by=lambda pair: pair[0].lower(),
).map(tuple)
schemes = st.one_of(st.sampled_from(["Digest", "digest", "DIGEST", "Basic"]), tokens)


@settings(max_examples=200, deadline=None)
@given(scheme=schemes, params=param_lists)
def test_credentials_round_trip(scheme: str, params: tuple[tuple[str, str], ...]) -> None:
    credentials = Credentials(scheme=scheme, params=params)
    assert parse_credentials(str(credentials)) == credentials


@settings(max_examples=200, deadline=None)
@given(scheme=schemes, params=param_lists)
def test_challenge_round_trip(scheme: str, params: tuple[tuple[str, str], ...]) -> None:
    challenge = Challenge(scheme=scheme, params=params)
    assert parse_challenge(str(challenge)) == challenge


def assert_parses_or_raises_remote_protocol_error(value: str) -> None:
    errors: list[RemoteProtocolError] = []
    for parse in (parse_credentials, parse_challenge):
        try:
            parse(value)
        except RemoteProtocolError as error:  # anything else fails the test
            errors.append(error)
    for caught in errors:
        assert caught.status_hint == 400
        assert "\r" not in caught.reason
        assert "\n" not in caught.reason


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=200))
def test_parsing_arbitrary_text_raises_only_remote_protocol_error(value: str) -> None:
    assert_parses_or_raises_remote_protocol_error(value)


@settings(max_examples=200, deadline=None)
@given(value=st.text(alphabet=st.sampled_from(list('Digest realm=",\\ \t\r\n\x00é')), max_size=80))
def test_parsing_header_like_text_raises_only_remote_protocol_error(value: str) -> None:
    assert_parses_or_raises_remote_protocol_error(value)
    assert_parses_or_raises_remote_protocol_error("Digest " + value)


@settings(max_examples=200, deadline=None)
@given(
    params=st.lists(st.tuples(st.sampled_from(["realm", "nonce", "response"]), values), max_size=5)
)
def test_verify_never_raises_on_parsed_input(params: list[tuple[str, str]]) -> None:
    server = make_server()
    base = dict(answer(challenge_for(server, SHA_256)).params)
    base.update(params)
    credentials = Credentials(scheme="Digest", params=tuple(base.items()))
    result = verify(server, credentials)
    assert isinstance(result.verdict, DigestVerdict)
