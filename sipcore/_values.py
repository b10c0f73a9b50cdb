"""Parsed header values: Via, name-addr (From, To, Contact, Route ...), CSeq.

Every value type is a named tuple (immutable, hashable and cheap to build: the
message path builds several per message) whose ``str()`` is a valid header
value.  Parameters keep the order and the spelling they had on the wire; their
names are looked up case-insensitively (RFC 3261 7.3.1).  Quoted-string
parameter values keep their quotes in ``params`` and lose them through
``param()``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import NamedTuple, TypeAlias

from . import _abnf as abnf
from ._errors import RemoteProtocolError
from ._memo import memoized
from ._uri import URI, check_host, format_host, parse_host, parse_uri

__all__ = [
    "MAGIC_COOKIE",
    "CSeq",
    "Contact",
    "NameAddr",
    "Params",
    "Via",
    "default_port",
    "parse_contact",
    "parse_cseq",
    "parse_name_addr",
    "parse_params",
    "parse_token_list",
    "parse_via",
    "quote",
    "split_list",
    "unquote",
]

Params: TypeAlias = tuple[tuple[str, str | None], ...]

# RFC 3261 8.1.1.7: a branch starting with this cookie was built by an RFC 3261
# element and is unique in space and time.
MAGIC_COOKIE = "z9hG4bK"

# RFC 3261 19.1.2 (sip 5060, sips 5061), RFC 7118 (ws 80, wss 443).
_DEFAULT_PORTS = {"UDP": 5060, "TCP": 5060, "SCTP": 5060, "TLS": 5061, "WS": 80, "WSS": 443}


def default_port(transport: str) -> int:
    """Return the default port of a Via transport name (5060 when unknown)."""
    return _DEFAULT_PORTS.get(transport.upper(), 5060)


def unquote(text: str) -> str:
    """Remove the quotes of a quoted-string and resolve its quoted-pairs.

    ``text`` is returned unchanged when it is not quoted.
    """
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        if "\\" in inner:
            inner = abnf.QUOTED_PAIR_RE.sub(lambda match: match.group(1), inner)
        return inner
    return text


def quote(text: str) -> str:
    """Return ``text`` as a quoted-string, escaping '"' and '\\' (RFC 3261 25.1)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def split_list(text: str, header: str) -> list[str]:
    """Split a comma-separated header value into its elements (RFC 3261 7.3.1).

    Commas inside quoted strings and inside angle brackets do not separate (a URI
    in a name-addr may contain commas).  An empty element is a syntax error
    (RFC 4475 3.1.2.1), reported as RemoteProtocolError (400).
    """
    if "," not in text:
        item = text.strip(" \t")
        if not item:
            raise RemoteProtocolError(f"Empty element in {header}")
        return [item]
    if '"' not in text and "<" not in text:
        items = text.split(",")
    else:
        items = []
        start = 0
        in_quotes = in_angle = False
        index = 0
        length = len(text)
        while index < length:
            char = text[index]
            if in_quotes:
                if char == "\\":
                    index += 1
                elif char == '"':
                    in_quotes = False
            elif char == '"':
                in_quotes = True
            elif char == "<":
                in_angle = True
            elif char == ">":
                in_angle = False
            elif char == "," and not in_angle:
                items.append(text[start:index])
                start = index + 1
            index += 1
        if in_quotes:
            raise RemoteProtocolError(f"Unterminated quoted string in {header}")
        items.append(text[start:])
    result = [item.strip(" \t") for item in items]
    if any(not item for item in result):
        raise RemoteProtocolError(f"Empty element in {header}")
    return result


def _split_params(text: str, header: str) -> list[str]:
    """Split ``;param;param`` (text after the first ';') on semicolons outside quotes."""
    if '"' not in text:
        return text.split(";")
    items = []
    start = 0
    in_quotes = False
    index = 0
    while index < len(text):
        char = text[index]
        if in_quotes:
            if char == "\\":
                index += 1
            elif char == '"':
                in_quotes = False
        elif char == '"':
            in_quotes = True
        elif char == ";":
            items.append(text[start:index])
            start = index + 1
        index += 1
    if in_quotes:
        raise RemoteProtocolError(f"Unterminated quoted string in {header} parameters")
    items.append(text[start:])
    return items


# *( SEMI generic-param ) without quoted strings, checked in one pass:
# generic-param = token [ EQUAL gen-value ] ; gen-value = token / host
# (a hostname or an IPv4 address is a token; an IPv6 reference is bracketed).
_PLAIN_VALUE = rf"(?:{abnf.TOKEN}|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+)"
_PLAIN_PARAMS_RE = re.compile(
    rf"(?:[ \t]*{abnf.TOKEN}(?:[ \t]*=[ \t]*{_PLAIN_VALUE})?[ \t]*"
    rf"(?:;[ \t]*{abnf.TOKEN}(?:[ \t]*=[ \t]*{_PLAIN_VALUE})?[ \t]*)*)"
)


def parse_params(text: str, header: str) -> Params:
    """Parse header parameters ``text`` (everything after the first ';').

    generic-param = token [ EQUAL gen-value ] ; gen-value = token / host /
    quoted-string (RFC 3261 25.1).  Raises RemoteProtocolError (400) on an empty or
    malformed parameter.
    """
    if '"' not in text and _PLAIN_PARAMS_RE.fullmatch(text) is not None:
        params: list[tuple[str, str | None]] = []
        for item in text.split(";"):
            name, equals, value = item.partition("=")
            if equals:
                params.append((name.strip(" \t"), value.strip(" \t")))
            else:
                params.append((name.strip(" \t"), None))
        return tuple(params)
    params = []
    for item in _split_params(text, header):
        name, equals, value = item.partition("=")
        name = name.strip(" \t")
        if abnf.TOKEN_RE.fullmatch(name) is None:
            raise RemoteProtocolError(f"Malformed parameter {item.strip()!r} in {header}")
        if equals:
            value = value.strip(" \t")
            if abnf.GEN_VALUE_RE.fullmatch(value) is None:
                raise RemoteProtocolError(f"Malformed parameter {item.strip()!r} in {header}")
            params.append((name, value))
        else:
            params.append((name, None))
    return tuple(params)


def _get_param(params: Params, name: str) -> str | None:
    """Return the unquoted value of parameter ``name``; "" if valueless; None if absent."""
    lowered = name.lower()
    for key, value in params:
        if key.lower() == lowered:
            return "" if value is None else unquote(value)
    return None


def _set_param(params: Params, name: str, value: str | None) -> Params:
    lowered = name.lower()
    kept = [(key, old) for key, old in params if key.lower() != lowered]
    for index, (key, _) in enumerate(params):
        if key.lower() == lowered:
            kept.insert(index, (name, value))
            break
    else:
        kept.append((name, value))
    return tuple(kept)


def _without_param(params: Params, name: str) -> Params:
    lowered = name.lower()
    return tuple((key, value) for key, value in params if key.lower() != lowered)


def _format_params(params: Params) -> str:
    return "".join(f";{name}" if value is None else f";{name}={value}" for name, value in params)


def parse_token_list(text: str, header: str) -> tuple[str, ...]:
    """Parse a list of tokens (Require, Supported, Allow ...: RFC 3261 20).

    An empty value is an empty list.  Raises RemoteProtocolError (400) when an
    element is not a token.
    """
    if not text:
        return ()
    items = split_list(text, header)
    for item in items:
        if abnf.TOKEN_RE.fullmatch(item) is None:
            raise RemoteProtocolError(f"Malformed {header} element {item!r}")
    return tuple(items)


# --------------------------------------------------------------------------- Via


class Via(NamedTuple):
    """One Via value (RFC 3261 20.42): sent-protocol, sent-by and parameters."""

    transport: str
    """The transport in upper case (UDP, TCP, TLS, SCTP, WS, WSS or another token)."""
    host: str
    """The sent-by host (an IPv6 address keeps its brackets)."""
    port: int | None = None
    """The sent-by port, None when absent."""
    params: Params = ()
    """The via-params in order, as on the wire."""
    protocol: str = "SIP"
    """The protocol name of sent-protocol."""
    version: str = "2.0"
    """The protocol version of sent-protocol."""

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return (
            f"{self.protocol}/{self.version}/{self.transport} "
            f"{format_host(self.host)}{port}{_format_params(self.params)}"
        )

    def param(self, name: str) -> str | None:
        """Return parameter ``name`` (case-insensitive), "" if valueless, else None."""
        return _get_param(self.params, name)

    @property
    def branch(self) -> str | None:
        """The branch parameter (RFC 3261 8.1.1.7), or None."""
        return _get_param(self.params, "branch")

    @property
    def has_magic_cookie(self) -> bool:
        """Whether the branch was built by an RFC 3261 element (RFC 3261 17.2.3).

        A branch that is exactly the cookie carries no identifier: RFC 4475 3.2.1
        allows treating it as an RFC 2543 branch, which is what this does.
        """
        branch = self.branch
        return branch is not None and branch.startswith(MAGIC_COOKIE) and branch != MAGIC_COOKIE

    @property
    def received(self) -> str | None:
        """The received parameter (RFC 3261 18.2.1), or None."""
        return _get_param(self.params, "received")

    @property
    def rport(self) -> int | None:
        """The rport value (RFC 3581); None when absent or present without a value."""
        value = _get_param(self.params, "rport")
        return int(value) if value else None

    @property
    def has_rport(self) -> bool:
        """Whether the rport parameter is present, with or without a value (RFC 3581)."""
        return _get_param(self.params, "rport") is not None

    @property
    def maddr(self) -> str | None:
        """The maddr parameter, or None."""
        return _get_param(self.params, "maddr")

    @property
    def ttl(self) -> int | None:
        """The ttl parameter, or None."""
        value = _get_param(self.params, "ttl")
        return int(value) if value else None

    @property
    def sent_by(self) -> tuple[str, int]:
        """(host in lower case, port or the transport's default) for matching."""
        port = self.port if self.port is not None else default_port(self.transport)
        return self.host.lower(), port

    @property
    def reliable(self) -> bool:
        """Whether the transport is reliable (RFC 3261 17: TCP, TLS, SCTP, WS, WSS)."""
        return self.transport != "UDP"

    def with_param(self, name: str, value: str | None) -> Via:
        """Return a copy with parameter ``name`` set (None: present, no value)."""
        return self._replace(params=_set_param(self.params, name, value))

    def without_param(self, name: str) -> Via:
        """Return a copy without parameter ``name``."""
        return self._replace(params=_without_param(self.params, name))


def _is_address(value: str) -> bool:
    """Whether ``value`` is an IPv4address or an IPv6address, bracketed or not
    (RFC 3261 25.1; RFC 5118 4.5).  The IPv4 pattern first: ``ipaddress`` costs
    1.8 us a call, the pattern 0.2."""
    if ":" not in value:
        return abnf.IPV4_ADDRESS_RE.fullmatch(value) is not None
    try:
        ipaddress.IPv6Address(value.strip("[]"))
    except ValueError:
        return False
    return True


def _check_via_params(params: Params, text: str) -> None:
    # via-ttl = "ttl" EQUAL ttl ; ttl = 1*3DIGIT ; 0 to 255
    # via-maddr = "maddr" EQUAL host
    # via-received = "received" EQUAL (IPv4address / IPv6address)
    # via-branch = "branch" EQUAL token
    # response-port = "rport" [EQUAL 1*DIGIT]   (RFC 3581)
    for name, value in params:
        key = name.lower()
        if key == "ttl":
            if value is None or not value.isdigit() or int(value) > 255:
                raise RemoteProtocolError(f"Malformed ttl in Via {text!r}")
        elif key == "maddr":
            if value is None:
                raise RemoteProtocolError(f"Malformed maddr in Via {text!r}")
            parse_host(value)
        elif key == "received":
            if value is None or not _is_address(value):
                raise RemoteProtocolError(f"Malformed received in Via {text!r}")
        elif key == "branch":
            if not value or abnf.TOKEN_RE.fullmatch(value) is None:
                raise RemoteProtocolError(f"Malformed branch in Via {text!r}")
        elif key == "rport" and value is not None and (not value.isdigit() or int(value) > 65535):
            raise RemoteProtocolError(f"Malformed rport in Via {text!r}")


def _parse_via(text: str) -> Via:
    """Parse one via-parm (RFC 3261 20.42); raises RemoteProtocolError (400)."""
    match = abnf.VIA_RE.fullmatch(text)
    if match is None:
        raise RemoteProtocolError(f"Malformed Via {text!r}")
    protocol, version, transport, host, port_text, params_text = match.groups()
    if abnf.HOSTNAME_OR_ADDRESS_RE.fullmatch(host) is None:
        raise RemoteProtocolError(f"Malformed sent-by in Via {text!r}")
    port = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise RemoteProtocolError(f"Malformed port in Via {text!r}")
    params: Params = ()
    if params_text is not None:
        params = parse_params(params_text[1:], "Via")
        _check_via_params(params, text)
    if (host[-1].isdigit() or host[0] == "[") and not check_host(host):
        raise RemoteProtocolError(f"Malformed sent-by in Via {text!r}")
    return Via(transport.upper(), host, port, params, protocol, version)


# Memoized (see _memo): a response's top Via is the one this element wrote into
# the request, parsed when its client transaction started (RFC 3261 17.1.3 matches
# the response by it), so the response's parse is a memo hit; a request's own Via,
# new for each transaction, passes through.
parse_via: Callable[[str], Via] = memoized(_parse_via)


# --------------------------------------------------------------------- name-addr


class NameAddr(NamedTuple):
    """A name-addr or addr-spec with header parameters (From, To, Route ...).

    RFC 3261 20.10: in the addr-spec form (no angle brackets) every parameter
    after the URI is a header parameter, never a URI parameter.
    """

    uri: URI
    """The URI."""
    display_name: str | None = None
    """The display name, unquoted; None when absent."""
    params: Params = ()
    """The header parameters in order, values as on the wire."""

    def __str__(self) -> str:
        display = "" if self.display_name is None else quote(self.display_name) + " "
        return f"{display}<{self.uri}>{_format_params(self.params)}"

    def param(self, name: str) -> str | None:
        """Return parameter ``name`` unquoted, "" if valueless, None if absent."""
        return _get_param(self.params, name)

    @property
    def tag(self) -> str | None:
        """The tag parameter (RFC 3261 19.3), case-sensitive; None when absent."""
        return _get_param(self.params, "tag")

    def with_param(self, name: str, value: str | None) -> NameAddr:
        """Return a copy with parameter ``name`` set (None: present, no value)."""
        return self._replace(params=_set_param(self.params, name, value))

    def without_param(self, name: str) -> NameAddr:
        """Return a copy without parameter ``name``."""
        return self._replace(params=_without_param(self.params, name))


def _parse_display_name(text: str, header: str) -> str | None:
    # display-name = *(token LWS) / quoted-string
    # RFC 4475 3.1.1.6: no LWS between a token display name and '<' is accepted.
    text = text.strip(" \t")
    if not text:
        return None
    if text[0] == '"':
        match = abnf.QUOTED_STRING_RE.fullmatch(text)
        if match is None:
            raise RemoteProtocolError(f"Malformed display name in {header}")
        return unquote(text)
    words = text.split()
    for word in words:
        if abnf.TOKEN_RE.fullmatch(word) is None:
            raise RemoteProtocolError(f"Malformed display name in {header}")
    return " ".join(words)


# name-addr = [ display-name ] LAQUOT addr-spec RAQUOT, then *( SEMI param ), in one
# pass for the common shapes; anything else takes the detailed path below, which
# also names the problem.
_NAME_ADDR_RE = re.compile(
    rf"[ \t]*(?:({abnf.QUOTED_STRING})|([{abnf.TOKEN_CHARS} \t]*?))[ \t]*"
    r"<([^<> \t]+)>[ \t]*(?:;(.*))?",
    re.DOTALL,
)


def _parse_name_addr(text: str, header: str) -> NameAddr:
    """Parse ``( name-addr / addr-spec ) *( SEMI generic-param )``.

    Raises RemoteProtocolError (400) naming ``header`` when the value is malformed.
    Memoized by text as ``parse_name_addr`` (see _memo).
    """
    match = _NAME_ADDR_RE.fullmatch(text)
    if match is not None:
        quoted, tokens, uri_text, params_text = match.groups()
        if quoted is not None:
            display: str | None = unquote(quoted)
        elif tokens:
            display = " ".join(tokens.split())
        else:
            display = None
        params = parse_params(params_text, header) if params_text is not None else ()
        return NameAddr(parse_uri(uri_text), display, params)
    text = text.strip(" \t")
    if text.startswith('"'):
        quoted_match = abnf.QUOTED_STRING_RE.match(text)
        if quoted_match is None:
            raise RemoteProtocolError(f"Unterminated quoted string in {header}")
        rest = text[quoted_match.end() :].lstrip(" \t")
        if not rest.startswith("<"):
            raise RemoteProtocolError(f"Missing '<' after display name in {header}")
        return _parse_bracketed(rest, unquote(quoted_match.group(0)), header)
    angle = text.find("<")
    if angle >= 0:
        return _parse_bracketed(text[angle:], _parse_display_name(text[:angle], header), header)
    # addr-spec: RFC 3261 20.10, a URI holding ',', '?' or ';' must be in brackets,
    # so the first ';' starts the header parameters.
    uri_text, semicolon, params_text = text.partition(";")
    uri_text = uri_text.rstrip(" \t")
    if "?" in uri_text or "," in uri_text or " " in uri_text:
        raise RemoteProtocolError(f"URI with '?', ',' or space must be in <> in {header}")
    uri = parse_uri(uri_text)
    params = parse_params(params_text, header) if semicolon else ()
    return NameAddr(uri, None, params)


def _parse_bracketed(text: str, display: str | None, header: str) -> NameAddr:
    close = text.find(">")
    if close < 0:
        raise RemoteProtocolError(f"Missing '>' in {header}")
    uri = parse_uri(text[1:close])
    rest = text[close + 1 :].lstrip(" \t")
    params: Params = ()
    if rest:
        if rest[0] != ";":
            raise RemoteProtocolError(f"Unexpected text after '>' in {header}")
        params = parse_params(rest[1:], header)
    return NameAddr(uri, display, params)


parse_name_addr: Callable[[str, str], NameAddr] = memoized(_parse_name_addr)


# ----------------------------------------------------------------------- Contact


class Contact(NamedTuple):
    """One Contact value (RFC 3261 20.10): a name-addr with q and expires, or "*"."""

    address: NameAddr | None
    """The contact address; None for the "*" wildcard of a REGISTER."""

    def __str__(self) -> str:
        return "*" if self.address is None else str(self.address)

    @property
    def is_star(self) -> bool:
        """Whether this is the "*" wildcard (RFC 3261 10.2.2)."""
        return self.address is None

    @property
    def uri(self) -> URI:
        """The contact URI; raises RemoteProtocolError for "*"."""
        if self.address is None:
            raise RemoteProtocolError("Contact '*' has no URI")
        return self.address.uri

    def param(self, name: str) -> str | None:
        """Return contact parameter ``name`` unquoted, or None."""
        return None if self.address is None else self.address.param(name)

    @property
    def q(self) -> float | None:
        """The q parameter as a number (RFC 3261 20.10), or None."""
        value = self.param("q")
        return float(value) if value else None

    @property
    def expires(self) -> int | None:
        """The expires parameter in seconds, capped at 2**32-1, or None."""
        value = self.param("expires")
        return min(int(value), 2**32 - 1) if value else None


def parse_contact(text: str) -> Contact:
    """Parse one contact value ("*" or name-addr/addr-spec with contact-params).

    contact-params = c-p-q / c-p-expires / contact-extension
    c-p-q = "q" EQUAL qvalue ; c-p-expires = "expires" EQUAL delta-seconds
    Raises RemoteProtocolError (400).
    """
    if text.strip(" \t") == "*":
        return Contact(None)
    address = parse_name_addr(text, "Contact")
    for name, value in address.params:
        key = name.lower()
        if key == "q" and (value is None or abnf.QVALUE_RE.fullmatch(value) is None):
            raise RemoteProtocolError(f"Malformed q in Contact {text.strip()!r}")
        if key == "expires" and (value is None or abnf.DIGITS_RE.fullmatch(value) is None):
            raise RemoteProtocolError(f"Malformed expires in Contact {text.strip()!r}")
    return Contact(address)


# -------------------------------------------------------------------------- CSeq


class CSeq(NamedTuple):
    """The CSeq value (RFC 3261 20.16): a sequence number and a method."""

    number: int
    """The sequence number, below 2**31 (RFC 3261 8.1.1.5)."""
    method: str
    """The method, case-sensitive."""

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


def _parse_cseq(text: str) -> CSeq:
    """Parse ``1*DIGIT LWS Method``; raises RemoteProtocolError (400)."""
    match = abnf.CSEQ_RE.fullmatch(text)
    if match is None:
        raise RemoteProtocolError(f"Malformed CSeq {text!r}")
    number = int(match.group(1))
    # RFC 3261 8.1.1.5: the sequence number MUST be expressible as a 32-bit unsigned
    # integer and less than 2**31 (RFC 4475 3.1.2.4).
    if number >= 2**31:
        raise RemoteProtocolError("CSeq number out of range")
    return CSeq(number, match.group(2))


# Memoized (see _memo): the values of a dialog recur ("1 INVITE", "2 BYE"), and
# every response carries its request's CSeq (RFC 3261 8.2.6.2).
parse_cseq: Callable[[str], CSeq] = memoized(_parse_cseq)
