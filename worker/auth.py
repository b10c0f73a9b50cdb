"""Digest authentication of requests, for the registrar (401) and the proxy (407).

RFC 3261 22.2 (a UAS, here the registrar, challenges with 401 and
WWW-Authenticate) and 22.3 (a proxy challenges with 407 and Proxy-Authenticate);
the realm is the domain the user belongs to.  Credentials come from the user
directory (HA1 values kept in etcd, never passwords); nonces are stateless
(``sipcore.DigestServer``), so a request carrying credentials may land on any
worker and still verify.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from sipcore import (
    Credentials,
    DigestAlgorithm,
    DigestServer,
    DigestVerdict,
    MessageError,
    Request,
)

__all__ = [
    "AUTH_COUNTERS",
    "AuthCounters",
    "AuthOutcome",
    "Authenticator",
    "UserDirectory",
    "UserRecord",
]


@dataclass(slots=True)
class AuthCounters:
    """What authentication refused, in plain counters (the worker's metrics read
    them on a scrape), by ``(status, reason)``.

    A challenge is the expected first answer to a request without credentials
    (reason ``no_credentials``) or with a stale nonce (``stale_nonce``); a
    failure is credentials that did not verify (the ``DigestVerdict`` name:
    ``wrong_response``, ``unknown_user``, ``replay`` ...), malformed ones (400),
    or an authenticated user refused (403: ``forbidden_aor``, ``forbidden_sender``).
    """

    challenges: Counter[tuple[int, str]] = field(default_factory=Counter)
    failures: Counter[tuple[int, str]] = field(default_factory=Counter)


AUTH_COUNTERS = AuthCounters()
"""The counters of this process (one worker per process); every Authenticator
adds to them unless given others."""


class UserRecord(Protocol):
    """What the authenticator needs of a user's credentials."""

    @property
    def ha1(self) -> Mapping[DigestAlgorithm, str]:
        """HA1 hex per algorithm (RFC 7616 3.4.2)."""
        ...


class UserDirectory(Protocol):
    """Looks up a user's credentials by ``name@domain`` (no I/O: a cache)."""

    def get(self, user: str) -> UserRecord | None:
        """The user's record, or None when there is no such user."""
        ...


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """The result of checking a request's credentials."""

    user: str | None = None
    """The authenticated ``name@domain`` when the check passed."""
    status: int | None = None
    """None when it passed; else the status to answer (401, 407, 400, 403)."""
    reason: str | None = None
    """The reason phrase for that status."""
    challenges: tuple[tuple[str, str], ...] = ()
    """Header fields to add to a 401/407 (WWW- or Proxy-Authenticate)."""

    @property
    def ok(self) -> bool:
        """Whether the request is authenticated."""
        return self.status is None


class Authenticator:
    """Challenges and verifies requests with digest, against a user directory."""

    def __init__(
        self,
        digest: DigestServer,
        users: UserDirectory,
        clock: Callable[[], float] | None = None,
        counters: AuthCounters = AUTH_COUNTERS,
    ) -> None:
        """``clock``, when given, supplies the time for nonces instead of the ``now``
        passed to ``check``: nonces carry wall-clock time so that every worker can
        verify them, while a caller's ``now`` may be a monotonic clock.
        ``counters`` count the challenges and failures (see AuthCounters)."""
        self.digest = digest
        self.users = users
        self.clock = clock
        self.counters = counters

    def check(self, request: Request, *, realm: str, proxy: bool, now: float) -> AuthOutcome:
        """Check ``request``'s credentials for ``realm``.

        ``proxy`` selects Proxy-Authorization / 407 / Proxy-Authenticate
        (RFC 3261 22.3) instead of Authorization / 401 / WWW-Authenticate (22.2).
        A wrong password, an unknown user and a missing credential all get a new
        challenge, so that user names cannot be probed; an expired nonce whose
        digest is right gets ``stale=true`` (RFC 7616 3.3); malformed credentials
        get 400.
        """
        if self.clock is not None:
            now = self.clock()
        try:
            offered = request.proxy_authorization if proxy else request.authorization
        except MessageError as error:
            self.counters.failures[400, "malformed"] += 1
            return AuthOutcome(status=400, reason=f"Bad Request - {error.reason}")
        credentials = _for_realm(offered, realm)
        if credentials is None:
            self.counters.challenges[407 if proxy else 401, "no_credentials"] += 1
            return self._challenge(realm, proxy, now, stale=False)
        username = credentials.get("username") or ""
        user = username if "@" in username else f"{username}@{realm}"
        record = self.users.get(user)
        result = self.digest.verify(
            credentials,
            method=request.method,
            request_uri=request.uri_text,
            realm=realm,
            ha1_lookup=record.ha1 if record is not None else {},
            now=now,
        )
        verdict = result.verdict
        if verdict is DigestVerdict.OK:
            return AuthOutcome(user=user)
        if verdict.bad_request:
            self.counters.failures[400, verdict.name.lower()] += 1
            return AuthOutcome(status=400, reason=f"Bad Request - {result.detail}")
        if verdict.stale:
            self.counters.challenges[407 if proxy else 401, "stale_nonce"] += 1
        else:
            self.counters.failures[407 if proxy else 401, verdict.name.lower()] += 1
        return self._challenge(realm, proxy, now, stale=verdict.stale)

    def _challenge(self, realm: str, proxy: bool, now: float, *, stale: bool) -> AuthOutcome:
        header = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        challenges = tuple(
            (header, value) for value in self.digest.challenges(realm, now, stale=stale)
        )
        if proxy:
            return AuthOutcome(
                status=407, reason="Proxy Authentication Required", challenges=challenges
            )
        return AuthOutcome(status=401, reason="Unauthorized", challenges=challenges)


def _for_realm(offered: list[Credentials], realm: str) -> Credentials | None:
    """The Digest credentials for ``realm`` (RFC 3261 22.3: a request may carry
    credentials for several realms)."""
    for credentials in offered:
        if credentials.scheme.lower() == "digest" and credentials.get("realm") == realm:
            return credentials
    return None
