"""The registry of header names: compact forms, canonical spellings, list rules.

Header names are case-insensitive (RFC 3261 7.3.1).  Inside the core every header
is known by its long name in lower case ("call-id", "via" ...); the compact forms
of RFC 3261 7.3.3 and later RFCs map onto it here, in one place.
"""

from __future__ import annotations

__all__ = [
    "COMPACT_FORMS",
    "LIST_HEADERS",
    "SINGLE_HEADERS",
    "canonical_name",
    "display_name",
]

# RFC 3261 7.3.3 and 20 (i, m, f, t, v, l, c, e, s, k), RFC 3265 (o, u),
# RFC 3515 (r), RFC 3892 (b), RFC 3841 (a, j, d), RFC 4028 (x), RFC 4474 (y, n).
COMPACT_FORMS: dict[str, str] = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

# Spellings used when the core writes a header it created or changed.  Headers not
# listed are written with each hyphen-separated word capitalized.
_DISPLAY_NAMES: dict[str, str] = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version",
    "rack": "RAck",
    "rseq": "RSeq",
    "sip-etag": "SIP-ETag",
    "sip-if-match": "SIP-If-Match",
    "p-asserted-identity": "P-Asserted-Identity",
}

# Headers whose grammar is a comma-separated list (RFC 3261 7.3.1: such a header may
# appear several times or hold several comma-separated values, and the two forms are
# equivalent).  The authentication headers are deliberately absent: their
# parameters are separated by commas, so splitting them would break them (RFC 3261
# 7.3.1, last paragraph).  Unknown headers are never split either.
LIST_HEADERS: frozenset[str] = frozenset(
    {
        "accept",
        "accept-contact",
        "accept-encoding",
        "accept-language",
        "alert-info",
        "allow",
        "allow-events",
        "call-info",
        "contact",
        "content-encoding",
        "content-language",
        "error-info",
        "history-info",
        "in-reply-to",
        "p-asserted-identity",
        "p-preferred-identity",
        "path",
        "proxy-require",
        "reason",
        "record-route",
        "reject-contact",
        "request-disposition",
        "require",
        "route",
        "security-client",
        "security-server",
        "security-verify",
        "service-route",
        "supported",
        "unsupported",
        "via",
        "warning",
    }
)

# Headers that may appear at most once (RFC 3261 20: the grammar gives them a single
# value, and RFC 4475 3.3.8 and 3.3.9 require 400 when they repeat).
SINGLE_HEADERS: frozenset[str] = frozenset(
    {
        "call-id",
        "content-length",
        "content-type",
        "cseq",
        "expires",
        "from",
        "max-forwards",
        "min-expires",
        "to",
    }
)


_NAME_CACHE: dict[str, str] = {}


def canonical_name(name: str) -> str:
    """Return the core's key for a header name: the long form, in lower case.

    ``name`` may be in any case and may be a compact form ("i", "V", "Call-Id").
    """
    key = _NAME_CACHE.get(name)
    if key is None:
        lowered = name.lower()
        key = COMPACT_FORMS.get(lowered, lowered)
        if len(_NAME_CACHE) < 4096:  # bounded: header names come from the network
            _NAME_CACHE[name] = key
    return key


def display_name(name: str) -> str:
    """Return the spelling the core writes for the canonical header name ``name``."""
    spelled = _DISPLAY_NAMES.get(name)
    if spelled is None:
        spelled = "-".join(word[:1].upper() + word[1:] for word in name.split("-"))
        if len(_DISPLAY_NAMES) < 4096:  # bounded: names come from the network
            _DISPLAY_NAMES[name] = spelled
    return spelled
