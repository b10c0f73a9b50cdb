"""SIP digest authentication, server side, sans-IO.

RFC 3261 section 22 (and its ABNF in section 25.1), RFC 7616 (SHA-256, which SIP gets
through RFC 8760), RFC 2617 and its RFC 2069 compatibility form.  Algorithms MD5 and
SHA-256, ``qop=auth``.  Nothing here does I/O, reads the clock or draws randomness on its
own: ``now`` (seconds since the epoch) is passed in, and the salt of new nonces comes from
the ``random_bytes`` callable given to :class:`DigestServer` (``os.urandom`` by default).

Challenge order and deployed user agents
----------------------------------------
:meth:`DigestServer.challenges` returns one challenge per algorithm, in the configured
order (default: SHA-256 first, then MD5); each goes into its own ``WWW-Authenticate`` or
``Proxy-Authenticate`` header.  RFC 8760 section 2.4 says the server lists its preferred
algorithm first and a UA picks the first one it supports.  Many deployed UAs do not: they
read only the FIRST challenge header.  Older SIP phones and softphones that only know MD5
then fail outright when the first challenge says ``algorithm=SHA-256``.  Operators with
such a fleet put MD5 first (``algorithms=(DigestAlgorithm.MD5, DigestAlgorithm.SHA_256)``)
or offer MD5 only.

Stateless nonces, verifiable by every worker
--------------------------------------------
A nonce is base64url without padding (RFC 4648 section 5) of::

    key id length (1 octet) | key id | issue time (8 octets, integer seconds, big endian)
    | salt (8 octets) | HMAC-SHA-256(secret, all the above | realm), first 16 octets

Any worker holding the cluster secret verifies a nonce without shared state.  The key id
travels in the nonce so secrets can be rotated: a :class:`NonceKeyring` holds several
``key id -> secret`` pairs and names the current one, used for new nonces; nonces issued
under an older key keep verifying while that key stays in the ring.  An unknown key id, a
bad MAC, bad base64, a nonce bound to another realm or one issued in the future (beyond
``max_clock_skew``) is invalid.  A nonce older than ``nonce_lifetime`` is expired.

``stale=true`` (RFC 7616 section 3.3, RFC 2617 section 3.2.1) is sent ONLY when the
response digest verifies, i.e. the client knows the password, and the nonce merely
expired: the UA then retries with the fresh nonce without asking its user again.  A right
digest over a forged or unknown-key nonce is a failure (``INVALID_NONCE``), never stale.

Nonce-count (replay) checking is best-effort
--------------------------------------------
Each :class:`DigestServer` keeps a bounded LRU of ``nonce -> highest nc seen`` (RFC 7616
section 3.4: the server may reject a request whose nc it has already seen).  A request
whose nc is not above the highest seen for its nonce is a replay and fails.

What it stops: a captured request replayed verbatim to the worker that accepted it.  The
load balancer routes a request by its Call-ID, so a verbatim replay reaches that same
worker and is caught.

What it does not stop: a replay whose Call-ID was changed (the Call-ID is not covered by
the digest) reaches another worker, whose cache has never seen the nonce; a replay of a
nonce whose entry was evicted from the LRU; a replay after the worker restarted; a replay
of the RFC 2069 form, which has no nc at all.  In every case the nonce lifetime bounds the
window: once the nonce expires a replay only earns a ``stale`` challenge, which is useless
without the password.  Keep ``nonce_lifetime`` short (default 300 s) for that reason.

If two requests carrying the same nonce reach one worker out of order (UDP), the one
with the lower nc arrives second and is challenged again; the UA simply retries.

Credentials at rest
-------------------
Only HA1 values are stored, never passwords: :func:`compute_ha1` derives them for the
user-management code.  :meth:`DigestServer.verify` asks the caller for the HA1 of the
algorithm the client used; when there is none it answers ``UNKNOWN_USER``, which the
caller must answer exactly like a wrong password so that user names cannot be probed.

Typical use by a registrar::

    credentials = parse_credentials(header_value)  # RemoteProtocolError -> 400
    result = server.verify(credentials, method=request.method, request_uri=request.uri,
                           realm=realm, ha1_lookup=user_record.ha1_by_algorithm, now=now)
    if result.verdict is DigestVerdict.OK: ...          # result.username is authenticated
    elif result.verdict.challenge_again:                # 401 (407 for a proxy)
        headers = server.challenges(realm, now, stale=result.verdict.stale)
    else: ...                                           # 400, result.detail as reason

:func:`build_credentials` is the client side, for tests and the load generator.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from hmac import compare_digest
from typing import ClassVar, Final, TypeAlias

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Challenge",
    "Credentials",
    "DigestAlgorithm",
    "DigestResult",
    "DigestServer",
    "DigestVerdict",
    "NonceKeyring",
    "build_credentials",
    "compute_ha1",
    "compute_response",
    "parse_challenge",
    "parse_credentials",
]


# --------------------------------------------------------------------------------------
# Algorithms and the digest computation (RFC 7616 section 3.4.1-3.4.3, RFC 2617 3.2.2)
# --------------------------------------------------------------------------------------


class DigestAlgorithm(enum.Enum):
    """A digest algorithm this module implements (RFC 7616 section 3.3, RFC 8760)."""

    MD5 = "MD5"
    SHA_256 = "SHA-256"

    @classmethod
    def from_token(cls, token: str) -> DigestAlgorithm | None:
        """Return the algorithm named by ``token``, compared case-insensitively.

        Returns ``None`` for any other name (``MD5-sess``, ``SHA-512-256`` ...: RFC 7616
        section 3.3 makes the name case-insensitive, and these are not implemented).
        Never raises.
        """
        return _ALGORITHM_BY_LOWER_TOKEN.get(token.lower())


_ALGORITHM_BY_LOWER_TOKEN: Final[dict[str, DigestAlgorithm]] = {
    algorithm.value.lower(): algorithm for algorithm in DigestAlgorithm
}

_MD5: Final = DigestAlgorithm.MD5


def _hexdigest(algorithm: DigestAlgorithm, data: str) -> str:
    # Strings are hashed as UTF-8 (RFC 7616 section 4; SIP messages are UTF-8).
    # surrogateescape gives back the original octets of a header decoded that way.
    encoded = data.encode("utf-8", "surrogateescape")
    if algorithm is _MD5:
        return hashlib.md5(encoded).hexdigest()
    return hashlib.sha256(encoded).hexdigest()


def compute_ha1(username: str, realm: str, password: str, algorithm: DigestAlgorithm) -> str:
    """Return HA1 = H(username ":" realm ":" password) as lowercase hex.

    RFC 7616 section 3.4.2 (non "-sess" algorithms), RFC 3261 section 22.4.  This is the
    value to store instead of the password.  Raises ``UnicodeEncodeError`` if a string
    holds a lone surrogate that is not a surrogateescape'd octet.
    """
    return _hexdigest(algorithm, f"{username}:{realm}:{password}")


def compute_response(
    algorithm: DigestAlgorithm,
    ha1: str,
    *,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None,
    nc: str | None = None,
    cnonce: str | None = None,
) -> str:
    """Return the request-digest (the ``response`` parameter) as lowercase hex.

    With ``qop`` (RFC 7616 section 3.4.1, RFC 2617 section 3.2.2.1):
    ``H(HA1 ":" nonce ":" nc ":" cnonce ":" qop ":" HA2)``; without it, the RFC 2069
    compatibility form ``H(HA1 ":" nonce ":" HA2)``.  HA2 = ``H(method ":" uri)``
    (RFC 7616 section 3.4.3, ``qop=auth``).  ``nc`` is the 8-hex-digit string as sent.
    Raises ``LocalProtocolError`` if ``qop`` is given without ``nc`` and ``cnonce``.
    """
    ha2 = _hexdigest(algorithm, f"{method}:{uri}")
    if qop is None:
        return _hexdigest(algorithm, f"{ha1}:{nonce}:{ha2}")
    if nc is None or cnonce is None:
        raise LocalProtocolError("a response with qop needs nc and cnonce")
    return _hexdigest(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


# --------------------------------------------------------------------------------------
# Header grammar (RFC 3261 section 25.1)
# --------------------------------------------------------------------------------------

# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
_TOKEN: Final = r"[A-Za-z0-9\-.!%*_+`'~]+"
_TOKEN_RE: Final = re.compile(_TOKEN)

# LWS = [*WSP CRLF] 1*WSP.  RFC 3261 7.3.1: a line fold is equivalent to a single SP, so
# folds are replaced first and the rules below only deal with WSP.
_FOLD_RE: Final = re.compile(r"[ \t]*\r\n[ \t]+")

# challenge   = ("Digest" LWS digest-cln *(COMMA digest-cln)) / other-challenge
# credentials = ("Digest" LWS digest-response) / other-response
# other-challenge = auth-scheme LWS auth-param *(COMMA auth-param); auth-scheme = token
# (leading SWS: what is left of HCOLON's whitespace if the caller did not strip it)
_SCHEME_RE: Final = re.compile(rf"[ \t]*({_TOKEN})[ \t]+")

# auth-param    = auth-param-name EQUAL ( token / quoted-string )
# EQUAL         = SWS "=" SWS
# quoted-string = SWS DQUOTE *(qdtext / quoted-pair ) DQUOTE
# qdtext        = LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII
# quoted-pair   = "\" (%x00-09 / %x0B-0C / %x0E-7F)
# Possessive quantifiers (Python 3.11) keep an unterminated quote from backtracking.
_PARAM_RE: Final = re.compile(
    rf"({_TOKEN})[ \t]*=[ \t]*(?:({_TOKEN})"
    r'|"((?:[^"\\\x00-\x08\x0a-\x1f\x7f]++|\\[\x00-\x09\x0b\x0c\x0e-\x7f])*+)")'
)
_QUOTED_PAIR_RE: Final = re.compile(r"\\(.)", re.DOTALL)

# COMMA = SWS "," SWS
_COMMA_RE: Final = re.compile(r"[ \t]*,[ \t]*")
_END_RE: Final = re.compile(r"[ \t]*\Z")

# What a quoted-string cannot hold raw: DQUOTE, "\" and the controls outside qdtext; all
# are sent as quoted-pair.  CR and LF cannot be sent at all.
_NEEDS_ESCAPE_RE: Final = re.compile(r'["\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f]')
_UNSENDABLE_RE: Final = re.compile(r"[\r\n]")


def _quote(value: str) -> str:
    if _UNSENDABLE_RE.search(value) is not None:
        raise LocalProtocolError("a quoted-string cannot hold CR or LF")
    return '"' + _NEEDS_ESCAPE_RE.sub(lambda match: "\\" + match.group(), value) + '"'


@dataclass(frozen=True, slots=True, kw_only=True)
class _AuthHeaderValue:
    scheme: str
    """The auth-scheme as spelled by its sender; compare it case-insensitively."""
    params: tuple[tuple[str, str], ...]
    """The ``(name, value)`` pairs in order; quoted-string values are unescaped."""
    _index: dict[str, str] = field(init=False, repr=False, compare=False)

    # Parameters RFC 7616 section 3.3 / 3.4 always quotes, in this kind of header.
    _ALWAYS_QUOTED: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        index: dict[str, str] = {}
        for name, value in self.params:
            lowered = name.lower()
            if lowered in index:
                # RFC 7235 section 2.1: each parameter name occurs only once.
                raise LocalProtocolError(f"duplicate parameter {name!r}")
            index[lowered] = value
        object.__setattr__(self, "_index", index)

    def get(self, name: str) -> str | None:
        """Return the value of parameter ``name`` (case-insensitive), or ``None``."""
        return self._index.get(name.lower())

    def __str__(self) -> str:
        """Serialize to a header value (RFC 3261 section 25.1).

        Raises ``LocalProtocolError`` if the scheme or a name is not a token, or a value
        holds CR or LF.
        """
        if _TOKEN_RE.fullmatch(self.scheme) is None:
            raise LocalProtocolError(f"auth-scheme {self.scheme!r} is not a token")
        always_quoted = self._ALWAYS_QUOTED if self.scheme.lower() == "digest" else frozenset[str]()
        parts = []
        for name, value in self.params:
            if _TOKEN_RE.fullmatch(name) is None:
                raise LocalProtocolError(f"parameter name {name!r} is not a token")
            if name.lower() in always_quoted or _TOKEN_RE.fullmatch(value) is None:
                parts.append(f"{name}={_quote(value)}")
            else:
                parts.append(f"{name}={value}")
        return f"{self.scheme} {', '.join(parts)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials(_AuthHeaderValue):
    """An ``Authorization`` or ``Proxy-Authorization`` header value.

    ``get(name)`` reads a parameter case-insensitively; ``str()`` serializes it back.
    Constructing one with a parameter name twice raises ``LocalProtocolError``.
    """

    # RFC 7616 section 3.4: nc, qop and algorithm are tokens, these are quoted.
    _ALWAYS_QUOTED: ClassVar[frozenset[str]] = frozenset(
        {"username", "realm", "nonce", "uri", "response", "cnonce", "opaque"}
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge(_AuthHeaderValue):
    """A ``WWW-Authenticate`` or ``Proxy-Authenticate`` header value.

    ``get(name)`` reads a parameter case-insensitively; ``str()`` serializes it back.
    Constructing one with a parameter name twice raises ``LocalProtocolError``.
    """

    # RFC 7616 section 3.3: stale and algorithm are tokens, these are quoted.
    _ALWAYS_QUOTED: ClassVar[frozenset[str]] = frozenset(
        {"realm", "domain", "nonce", "opaque", "qop"}
    )


def _parse(value: str, what: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    if "\r" in value or "\n" in value:
        value = _FOLD_RE.sub(" ", value)
        if "\r" in value or "\n" in value:
            raise RemoteProtocolError(f"Malformed {what}: CR or LF outside a line fold")
    match = _SCHEME_RE.match(value)
    if match is None:
        raise RemoteProtocolError(f"Malformed {what}: expected auth-scheme LWS auth-param")
    scheme = match.group(1)
    position = match.end()
    params = []
    end = len(value)
    while True:
        match = _PARAM_RE.match(value, position)
        if match is None:
            raise RemoteProtocolError(f"Malformed {what}: bad auth-param at offset {position}")
        name, token, quoted = match.groups()
        if token is None:
            if "\\" in quoted:
                quoted = _QUOTED_PAIR_RE.sub(r"\1", quoted)
            params.append((name, quoted))
        else:
            params.append((name, token))
        position = match.end()
        if position == end:
            break
        match = _COMMA_RE.match(value, position)
        if match is None:
            if _END_RE.match(value, position) is not None:
                break
            raise RemoteProtocolError(f"Malformed {what}: expected a comma at offset {position}")
        position = match.end()
    return scheme, tuple(params)


def parse_credentials(value: str) -> Credentials:
    """Parse an ``Authorization`` / ``Proxy-Authorization`` header value.

    Any well-formed scheme is accepted (RFC 3261 25.1 ``other-response``), e.g.
    ``NoOneKnowsThisScheme opaque-data=here`` (RFC 4475 section 3.3.7); whether it is
    Digest is for :meth:`DigestServer.verify` to judge.  Raises ``RemoteProtocolError``
    (status hint 400) with a reason naming the problem if the value is malformed or names a
    parameter twice; never raises anything else.
    """
    scheme, params = _parse(value, "credentials")
    try:
        return Credentials(scheme=scheme, params=params)
    except LocalProtocolError as error:
        raise RemoteProtocolError(f"Malformed credentials: {error}") from None


def parse_challenge(value: str) -> Challenge:
    """Parse a ``WWW-Authenticate`` / ``Proxy-Authenticate`` header value.

    Any well-formed scheme is accepted (RFC 3261 25.1 ``other-challenge``).  Raises
    ``RemoteProtocolError`` (status hint 400) with a reason naming the problem if the value
    is malformed or names a parameter twice; never raises anything else.
    """
    scheme, params = _parse(value, "challenge")
    try:
        return Challenge(scheme=scheme, params=params)
    except LocalProtocolError as error:
        raise RemoteProtocolError(f"Malformed challenge: {error}") from None


# --------------------------------------------------------------------------------------
# Nonces
# --------------------------------------------------------------------------------------

_KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,32}")
_MINIMUM_SECRET_LENGTH: Final = 16
_SHA256_BLOCK_SIZE: Final = 64
_TIMESTAMP_LENGTH: Final = 8
_SALT_LENGTH: Final = 8
_MAC_LENGTH: Final = 16  # HMAC-SHA-256 truncated (RFC 2104 section 5 allows it)
# Longest valid nonce: 1 + 32 + 8 + 8 + 16 octets = 65 -> 87 base64 characters.
_MAXIMUM_NONCE_LENGTH: Final = 87
_BASE64_PADDING: Final = ("", "===", "==", "=")


class _HmacKey:
    """HMAC-SHA-256 (RFC 2104) with the keyed inner and outer states computed once.

    Copying two prepared hash states is about twice as fast as ``hmac.digest``, which
    derives them from the key on every call.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: bytes) -> None:
        if len(secret) > _SHA256_BLOCK_SIZE:
            secret = hashlib.sha256(secret).digest()
        secret = secret.ljust(_SHA256_BLOCK_SIZE, b"\0")
        self._inner = hashlib.sha256(bytes(octet ^ 0x36 for octet in secret))
        self._outer = hashlib.sha256(bytes(octet ^ 0x5C for octet in secret))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class NonceKeyring:
    """The cluster secrets that sign nonces: ``key id -> secret``, and the current key id.

    Immutable; rotate by building a new ring with :meth:`with_key` and, once nonces
    issued under the old key have expired, :meth:`without_key`, and assigning it to
    :attr:`DigestServer.keyring`.  Key ids are 1 to 32 characters out of letters, digits,
    ``.``, ``_`` and ``-``; secrets are at least 16 random octets.
    """

    __slots__ = ("_current_key_id", "_current_prefix", "_hmac_by_key_id", "_secrets")

    def __init__(self, keys: Mapping[str, bytes], current_key_id: str) -> None:
        """Build a keyring.

        Raises ``ValueError`` if a key id or a secret is unusable or ``current_key_id`` is
        not among ``keys``.
        """
        secrets: dict[str, bytes] = {}
        hmac_by_key_id: dict[bytes, _HmacKey] = {}
        for key_id, secret in keys.items():
            if _KEY_ID_RE.fullmatch(key_id) is None:
                raise ValueError(f"invalid nonce key id {key_id!r}")
            if len(secret) < _MINIMUM_SECRET_LENGTH:
                raise ValueError(f"nonce secret {key_id!r} is shorter than 16 octets")
            secrets[key_id] = bytes(secret)
            hmac_by_key_id[key_id.encode("ascii")] = _HmacKey(bytes(secret))
        if current_key_id not in secrets:
            raise ValueError(f"current nonce key id {current_key_id!r} is not in the keyring")
        self._secrets = secrets
        self._current_key_id = current_key_id
        self._hmac_by_key_id = hmac_by_key_id
        encoded_id = current_key_id.encode("ascii")
        self._current_prefix = bytes([len(encoded_id)]) + encoded_id

    @property
    def current_key_id(self) -> str:
        """The key id new nonces are signed with."""
        return self._current_key_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id whose nonces still verify."""
        return tuple(self._secrets)

    def with_key(self, key_id: str, secret: bytes, *, make_current: bool = True) -> NonceKeyring:
        """Return a new keyring that also holds ``key_id`` (replacing a key of that id).

        The new key becomes the current one unless ``make_current`` is false.  Raises
        ``ValueError`` like the constructor.
        """
        keys = dict(self._secrets)
        keys[key_id] = secret
        return NonceKeyring(keys, key_id if make_current else self._current_key_id)

    def without_key(self, key_id: str) -> NonceKeyring:
        """Return a new keyring without ``key_id``; its nonces stop verifying.

        Raises ``ValueError`` if ``key_id`` is the current key or is not in the ring.
        """
        if key_id == self._current_key_id:
            raise ValueError("cannot remove the current nonce key")
        if key_id not in self._secrets:
            raise ValueError(f"nonce key id {key_id!r} is not in the keyring")
        keys = {other: secret for other, secret in self._secrets.items() if other != key_id}
        return NonceKeyring(keys, self._current_key_id)

    def __repr__(self) -> str:
        # Never show the secrets.
        return f"NonceKeyring(key_ids={self.key_ids!r}, current_key_id={self._current_key_id!r})"


# --------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------


class DigestVerdict(enum.Enum):
    """The outcome of :meth:`DigestServer.verify` and what the caller does about it.

    ``OK``: accept.  ``challenge_again``: answer 401 (407 for a proxy) with fresh
    :meth:`DigestServer.challenges`, passing ``stale``.  ``bad_request``: answer 400.
    """

    OK = "ok"
    STALE = "stale"
    """Right password, expired nonce (RFC 7616 section 3.3): challenge with stale=true."""
    WRONG_RESPONSE = "wrong response"
    UNKNOWN_USER = "unknown user"
    """No HA1 for the user and algorithm; answer it exactly like WRONG_RESPONSE."""
    INVALID_NONCE = "invalid nonce"
    """Not a nonce of ours: bad format or MAC, unknown key, other realm, from the future."""
    REPLAY = "replay"
    """The nc was not above the highest seen for this nonce (RFC 7616 section 3.4)."""
    MALFORMED = "malformed"
    REALM_MISMATCH = "realm mismatch"
    URI_MISMATCH = "uri mismatch"
    UNSUPPORTED_ALGORITHM = "unsupported algorithm"
    UNSUPPORTED_SCHEME = "unsupported scheme"
    """Not Digest (e.g. RFC 4475 3.3.7): challenge in a scheme we know."""

    @property
    def challenge_again(self) -> bool:
        """True when the answer is a new challenge (401 / 407)."""
        return self in _CHALLENGE_AGAIN

    @property
    def stale(self) -> bool:
        """True when that new challenge carries ``stale=true``."""
        return self is DigestVerdict.STALE

    @property
    def bad_request(self) -> bool:
        """True when the answer is 400 Bad Request."""
        return self in _BAD_REQUEST


_BAD_REQUEST: Final = frozenset(
    {
        DigestVerdict.MALFORMED,
        # RFC 2617 section 3.2.2.5: a uri that does not match the Request-URI is a 400.
        DigestVerdict.URI_MISMATCH,
    }
)
_CHALLENGE_AGAIN: Final = frozenset(DigestVerdict) - _BAD_REQUEST - {DigestVerdict.OK}


@dataclass(frozen=True, slots=True, kw_only=True)
class DigestResult:
    """What :meth:`DigestServer.verify` concluded."""

    verdict: DigestVerdict
    """The outcome; its properties say how to answer."""
    username: str | None = None
    """The authenticated user name; set only when ``verdict`` is ``OK``."""
    detail: str = ""
    """A short reason for logs, or for the reason phrase of a 400; never peer text."""


def _failure(verdict: DigestVerdict, detail: str) -> DigestResult:
    return DigestResult(verdict=verdict, detail=detail)


# Failures carry no per-request data, so they are built once.
_UNSUPPORTED_SCHEME: Final = _failure(DigestVerdict.UNSUPPORTED_SCHEME, "Not a Digest scheme")
_MISSING_FIELD: Final = _failure(
    DigestVerdict.MALFORMED, "Credentials lack username, realm, nonce, uri or response"
)
_REALM_MISMATCH: Final = _failure(DigestVerdict.REALM_MISMATCH, "Credentials for another realm")
_UNSUPPORTED_ALGORITHM: Final = _failure(
    DigestVerdict.UNSUPPORTED_ALGORITHM, "Digest algorithm not offered"
)
_UNSUPPORTED_QOP: Final = _failure(DigestVerdict.MALFORMED, "Unsupported qop")
_MISSING_QOP: Final = _failure(DigestVerdict.MALFORMED, "qop missing")
_MISSING_NC_CNONCE: Final = _failure(DigestVerdict.MALFORMED, "qop without nc or cnonce")
_BAD_NC: Final = _failure(DigestVerdict.MALFORMED, "nc is not 8 hex digits")
_BAD_ENCODING: Final = _failure(DigestVerdict.MALFORMED, "Undecodable characters")
_URI_MISMATCH: Final = _failure(
    DigestVerdict.URI_MISMATCH, "Authorization uri does not match the Request-URI"
)
_INVALID_NONCE: Final = _failure(DigestVerdict.INVALID_NONCE, "Invalid nonce")
_UNKNOWN_USER: Final = _failure(DigestVerdict.UNKNOWN_USER, "Unknown user")
_WRONG_RESPONSE: Final = _failure(DigestVerdict.WRONG_RESPONSE, "Wrong response")
_STALE: Final = _failure(DigestVerdict.STALE, "Nonce expired")
_REPLAY: Final = _failure(DigestVerdict.REPLAY, "Nonce count replayed")

# nonce-count = "nc" EQUAL 8LHEX (RFC 3261 25.1; upper case accepted too)
_NC_RE: Final = re.compile(r"[0-9a-fA-F]{8}")


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------

Ha1Lookup: TypeAlias = Mapping[DigestAlgorithm, str] | Callable[[str, DigestAlgorithm], str | None]


class DigestServer:
    """Issues digest challenges and verifies credentials, for one worker process.

    ``keyring`` signs and checks nonces (assign :attr:`keyring` to rotate).
    ``algorithms`` are offered in this order (see the module docstring about UAs that
    read only the first challenge).  ``nonce_lifetime`` seconds after issue a nonce is
    stale; a nonce more than ``max_clock_skew`` seconds in the future is invalid (workers'
    clocks differ a little).  ``allow_rfc2069`` accepts credentials without qop.
    ``nc_cache_size`` bounds the replay LRU (0 disables it).  ``random_bytes(n)`` supplies
    nonce salt.
    """

    __slots__ = (
        "_algorithms",
        "_allow_rfc2069",
        "_challenge_tails",
        "_max_clock_skew",
        "_nc_cache",
        "_nc_cache_size",
        "_nonce_lifetime",
        "_random_bytes",
        "keyring",
    )

    def __init__(
        self,
        keyring: NonceKeyring,
        *,
        algorithms: tuple[DigestAlgorithm, ...] = (DigestAlgorithm.SHA_256, DigestAlgorithm.MD5),
        nonce_lifetime: float = 300.0,
        max_clock_skew: float = 5.0,
        allow_rfc2069: bool = True,
        nc_cache_size: int = 65536,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """Configure the server.  Raises ``ValueError`` on an unusable setting."""
        if not algorithms or len(set(algorithms)) != len(algorithms):
            raise ValueError("algorithms must be non-empty and without repetition")
        if not nonce_lifetime > 0:
            raise ValueError("nonce_lifetime must be positive")
        if not max_clock_skew >= 0:
            raise ValueError("max_clock_skew must not be negative")
        if nc_cache_size < 0:
            raise ValueError("nc_cache_size must not be negative")
        self.keyring = keyring
        """The nonce keys; assign a new :class:`NonceKeyring` to rotate."""
        self._algorithms = frozenset(algorithms)
        # RFC 7616 section 3.3: qop is quoted; "auth" is all we offer.
        self._challenge_tails = tuple(
            f'", qop="auth", algorithm={algorithm.value}' for algorithm in algorithms
        )
        self._nonce_lifetime = nonce_lifetime
        self._max_clock_skew = max_clock_skew
        self._allow_rfc2069 = allow_rfc2069
        self._nc_cache: OrderedDict[str, int] = OrderedDict()
        self._nc_cache_size = nc_cache_size
        self._random_bytes = random_bytes

    def make_nonce(self, realm: str, now: float) -> str:
        """Return a new nonce for ``realm``, issued at ``now`` (seconds since the epoch).

        Raises ``LocalProtocolError`` if ``random_bytes`` returns the wrong length, and
        ``OverflowError`` / ``ValueError`` if ``now`` is negative or not finite.
        """
        keyring = self.keyring
        salt = self._random_bytes(_SALT_LENGTH)
        if len(salt) != _SALT_LENGTH:
            raise LocalProtocolError("random_bytes returned the wrong number of octets")
        signed = keyring._current_prefix + int(now).to_bytes(_TIMESTAMP_LENGTH, "big") + salt
        mac_key = keyring._hmac_by_key_id[keyring._current_prefix[1:]]
        mac = mac_key.digest(signed + realm.encode("utf-8", "surrogateescape"))
        return base64.urlsafe_b64encode(signed + mac[:_MAC_LENGTH]).rstrip(b"=").decode("ascii")

    def challenges(self, realm: str, now: float, *, stale: bool = False) -> list[str]:
        """Return one Digest challenge header value per offered algorithm, in order.

        All share one fresh nonce.  ``stale`` adds ``stale=true`` (RFC 7616 section 3.3);
        pass ``verdict.stale``.  Raises ``LocalProtocolError`` if ``realm`` holds CR or LF,
        and what :meth:`make_nonce` raises.
        """
        head = f'Digest realm={_quote(realm)}, nonce="{self.make_nonce(realm, now)}'
        if stale:
            return [head + tail + ", stale=true" for tail in self._challenge_tails]
        return [head + tail for tail in self._challenge_tails]

    def _nonce_issue_time(self, nonce: str, realm: str, now: float) -> int | None:
        """Return the issue time of a nonce of ours for ``realm``, or ``None``."""
        if len(nonce) > _MAXIMUM_NONCE_LENGTH or not nonce.isascii():
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + _BASE64_PADDING[len(nonce) % 4])
        except (binascii.Error, ValueError):
            return None
        # The lenient decoder skips stray characters: demand the canonical spelling.
        if not raw or base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != nonce:
            return None
        key_id_end = 1 + raw[0]
        signed_end = key_id_end + _TIMESTAMP_LENGTH + _SALT_LENGTH
        if len(raw) != signed_end + _MAC_LENGTH:
            return None
        mac_key = self.keyring._hmac_by_key_id.get(raw[1:key_id_end])
        if mac_key is None:
            return None
        # The MAC covers the realm, so a nonce of one realm is worthless in another.
        mac = mac_key.digest(raw[:signed_end] + realm.encode("utf-8", "surrogateescape"))
        if not compare_digest(mac[:_MAC_LENGTH], raw[signed_end:]):
            return None
        issued = int.from_bytes(raw[key_id_end : key_id_end + _TIMESTAMP_LENGTH], "big")
        if issued > now + self._max_clock_skew:
            return None
        return issued

    def verify(
        self,
        credentials: Credentials,
        *,
        method: str,
        request_uri: str,
        realm: str,
        ha1_lookup: Ha1Lookup,
        now: float,
    ) -> DigestResult:
        """Check ``credentials`` sent with a request; never raises for peer input.

        ``method`` is the request's method and ``request_uri`` its Request-URI as it is
        compared with the ``uri`` parameter (string equality).  ``realm`` is the realm the
        request was challenged in.  ``ha1_lookup`` gives the user's HA1 (lowercase hex) per
        algorithm: a mapping ``algorithm -> HA1`` for the user named by
        ``credentials.get("username")``, or a callable ``(username, algorithm) -> HA1 or
        None``.  ``now`` is seconds since the epoch.  Records the nc of accepted requests.
        """
        # RFC 3261 22.4: Digest is the one scheme SIP defines.
        if credentials.scheme.lower() != "digest":
            return _UNSUPPORTED_SCHEME
        params = credentials._index
        username = params.get("username")
        credentials_realm = params.get("realm")
        nonce = params.get("nonce")
        uri = params.get("uri")
        response = params.get("response")
        if (
            username is None
            or credentials_realm is None
            or nonce is None
            or uri is None
            or response is None
        ):
            # RFC 3261 25.1 / RFC 7616 section 3.4: these directives are required.
            return _MISSING_FIELD
        # RFC 3261 22.4 item 1 (RFC 7616 3.4): the realm must be the one challenged.
        if credentials_realm != realm:
            return _REALM_MISMATCH
        # RFC 2617 section 3.2.1 / RFC 7616 3.3: no algorithm directive means MD5.
        algorithm_token = params.get("algorithm")
        if algorithm_token is None:
            algorithm: DigestAlgorithm | None = _MD5
        else:
            algorithm = _ALGORITHM_BY_LOWER_TOKEN.get(algorithm_token.lower())
        if algorithm is None or algorithm not in self._algorithms:
            return _UNSUPPORTED_ALGORITHM
        qop = params.get("qop")
        nc: str | None = None
        cnonce: str | None = None
        if qop is None:
            # RFC 2617 section 3.2.2.1: the RFC 2069 compatible form, no qop.
            if not self._allow_rfc2069:
                return _MISSING_QOP
        else:
            # RFC 7616 section 3.4: qop is one the server offered; we offer "auth".
            if qop.lower() != "auth":
                return _UNSUPPORTED_QOP
            # RFC 7616 section 3.4: with qop, cnonce and nc MUST be sent; nc is 8LHEX.
            nc = params.get("nc")
            cnonce = params.get("cnonce")
            if nc is None or cnonce is None:
                return _MISSING_NC_CNONCE
            if _NC_RE.fullmatch(nc) is None:
                return _BAD_NC
        # RFC 3261 22.4 item 4, RFC 2617 3.2.2.5: uri names the Request-URI.
        if uri != request_uri:
            return _URI_MISMATCH
        issued = self._nonce_issue_time(nonce, realm, now)
        if issued is None:
            return _INVALID_NONCE
        # A callable looks the user up; a mapping is the user's HA1 per algorithm.
        ha1 = ha1_lookup(username, algorithm) if callable(ha1_lookup) else ha1_lookup.get(algorithm)
        if ha1 is None:
            return _UNKNOWN_USER
        try:
            ha2 = _hexdigest(algorithm, f"{method}:{uri}")
            if nc is None:
                expected = _hexdigest(algorithm, f"{ha1.lower()}:{nonce}:{ha2}")
            else:
                expected = _hexdigest(algorithm, f"{ha1.lower()}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
        except UnicodeEncodeError:
            return _BAD_ENCODING
        # Constant time; compare_digest wants ASCII strings (RFC 7616: LHEX digits).
        if not response.isascii() or not compare_digest(expected, response.lower()):
            return _WRONG_RESPONSE
        # RFC 7616 section 3.3 / RFC 2617 3.2.1: stale only once the digest is right.
        if now - issued > self._nonce_lifetime:
            return _STALE
        if nc is not None and self._nc_cache_size:
            # RFC 7616 section 3.4: reject an nc already seen (best effort: module doc).
            count = int(nc, 16)
            cache = self._nc_cache
            highest = cache.get(nonce)
            if highest is None:
                cache[nonce] = count
                if len(cache) > self._nc_cache_size:
                    cache.popitem(last=False)
            elif count <= highest:
                return _REPLAY
            else:
                cache[nonce] = count
                cache.move_to_end(nonce)
        return DigestResult(verdict=DigestVerdict.OK, username=username)


# --------------------------------------------------------------------------------------
# Client side (tests, load generator)
# --------------------------------------------------------------------------------------


def build_credentials(
    challenge: Challenge,
    *,
    username: str,
    password: str,
    method: str,
    uri: str,
    cnonce: str,
    nc: int = 1,
) -> Credentials:
    """Answer a Digest ``challenge`` as a UAC would (RFC 3261 22.2/22.3, RFC 7616 3.4).

    Uses ``qop=auth`` when the challenge offers it and the RFC 2069 form when it has no
    qop.  ``cnonce`` is the caller's random string (sans-IO); ``nc`` counts the requests
    sent with this nonce, from 1.  Raises ``RemoteProtocolError`` (status hint ``None``)
    if the challenge is not Digest, lacks realm or nonce, or names an algorithm or qop
    this module does not implement; ``LocalProtocolError`` if ``nc`` is out of range.
    """
    if challenge.scheme.lower() != "digest":
        raise RemoteProtocolError("Challenge is not Digest", None)
    realm = challenge.get("realm")
    nonce = challenge.get("nonce")
    if realm is None or nonce is None:
        raise RemoteProtocolError("Digest challenge lacks realm or nonce", None)
    algorithm_token = challenge.get("algorithm")
    algorithm = _MD5 if algorithm_token is None else DigestAlgorithm.from_token(algorithm_token)
    if algorithm is None:
        raise RemoteProtocolError("Digest challenge names an unsupported algorithm", None)
    qop_options = challenge.get("qop")
    qop: str | None = None
    if qop_options is not None:
        # RFC 7616 section 3.3: qop-options is a quoted, comma separated list.
        if "auth" not in {option.strip().lower() for option in qop_options.split(",")}:
            raise RemoteProtocolError("Digest challenge offers no supported qop", None)
        qop = "auth"
    if not 0 < nc <= 0xFFFFFFFF:
        raise LocalProtocolError("nc must be between 1 and 2**32 - 1")
    ha1 = compute_ha1(username, realm, password, algorithm)
    params = [("username", username), ("realm", realm), ("nonce", nonce), ("uri", uri)]
    if qop is None:
        response = compute_response(algorithm, ha1, nonce=nonce, method=method, uri=uri, qop=None)
        params += [("response", response), ("algorithm", algorithm.value)]
    else:
        nc_text = f"{nc:08x}"
        response = compute_response(
            algorithm, ha1, nonce=nonce, method=method, uri=uri, qop=qop, nc=nc_text, cnonce=cnonce
        )
        params += [
            ("response", response),
            ("algorithm", algorithm.value),
            ("cnonce", cnonce),
            ("qop", qop),
            ("nc", nc_text),
        ]
    opaque = challenge.get("opaque")
    if opaque is not None:
        # RFC 7616 section 3.4: opaque is returned unchanged.
        params.append(("opaque", opaque))
    return Credentials(scheme="Digest", params=tuple(params))
