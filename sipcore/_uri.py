"""URIs: SIP and SIPS (RFC 3261 19.1), tel (RFC 3966) and any other absolute URI.

Components are kept as they appear on the wire (escaped), so that a URI written
back is the URI that was read.  Comparisons follow RFC 3261 19.1.4: the scheme,
the host and parameter names are case-insensitive; the user part and the password
are case-sensitive and compared after unescaping.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import NamedTuple, TypeAlias

from . import _abnf as abnf
from ._errors import RemoteProtocolError
from ._memo import memoized

__all__ = [
    "URI",
    "AbsoluteURI",
    "SipURI",
    "TelURI",
    "check_host",
    "format_host",
    "parse_host",
    "parse_uri",
    "unescape",
]

Params: TypeAlias = tuple[tuple[str, str | None], ...]

_ESCAPE_RE = re.compile(r"%([0-9A-Fa-f]{2})")


def unescape(text: str) -> str:
    """Decode the %HH escapes of ``text`` once (RFC 3261 19.1.2, RFC 4475 3.1.1.3).

    Decoding is done once and never recursively: "%2541" becomes "%41".  The
    decoded octets are read as UTF-8 with surrogate escapes, so no input fails.
    """
    if "%" not in text:
        return text
    raw = _ESCAPE_RE.sub(lambda match: chr(int(match.group(1), 16)), text)
    # Non-ASCII octets were written as code points 0x80-0xFF: turn them back into
    # bytes and decode those as UTF-8 so "%C3%A9" reads as one character.
    try:
        return raw.encode("latin-1").decode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # text already held non-Latin-1 characters
        return raw


def parse_host(text: str) -> tuple[str, bool]:
    """Validate a host (RFC 3261 25.1 ``host``) and return it with an IPv6 flag.

    host = hostname / IPv4address / IPv6reference.  Raises RemoteProtocolError (400)
    when ``text`` is none of them.
    """
    if abnf.HOSTNAME_OR_ADDRESS_RE.fullmatch(text) is None or not check_host(text):
        raise RemoteProtocolError(f"Malformed host {text!r}")
    return text, text[0] == "["


def format_host(host: str) -> str:
    """Return ``host`` as it is written in a URI or Via: IPv6 inside brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def _parse_params(text: str, what: str) -> Params:
    """Parse ``;name[=value]`` URI parameters (``text`` starts after the first ';')."""
    params: list[tuple[str, str | None]] = []
    for item in text.split(";"):
        name, equals, value = item.partition("=")
        if abnf.PARAMCHARS_RE.fullmatch(name) is None:
            raise RemoteProtocolError(f"Malformed {what} parameter {item!r}")
        if equals:
            if abnf.PARAMCHARS_RE.fullmatch(value) is None:
                raise RemoteProtocolError(f"Malformed {what} parameter {item!r}")
            params.append((name, value))
        else:
            params.append((name, None))
    return tuple(params)


def _find_param(params: Params, name: str) -> tuple[bool, str | None]:
    lowered = name.lower()
    for key, value in params:
        if key.lower() == lowered or ("%" in key and unescape(key).lower() == lowered):
            return True, value
    return False, None


def _format_params(params: Params) -> str:
    return "".join(f";{name}" if value is None else f";{name}={value}" for name, value in params)


class SipURI(NamedTuple):
    """A sip: or sips: URI (RFC 3261 19.1.1), components as on the wire.

    Value types are named tuples: immutable, hashable, and cheap to build, which
    matters on the message path.
    """

    host: str
    """The host: a name, an IPv4 address or an IPv6 reference in brackets."""
    user: str | None = None
    """The user part, escaped as on the wire; None when the URI has none."""
    password: str | None = None
    """The password of the userinfo, escaped; None when absent."""
    port: int | None = None
    """The port; None when the URI names none."""
    params: Params = ()
    """The uri-parameters in order, names and values as on the wire."""
    headers: tuple[tuple[str, str], ...] = ()
    """The headers component (``?name=value&...``), escaped."""
    scheme: str = "sip"
    """"sip" or "sips", in lower case."""

    def __str__(self) -> str:
        parts = [self.scheme, ":"]
        if self.user is not None:
            parts.append(self.user)
            if self.password is not None:
                parts.append(":" + self.password)
            parts.append("@")
        parts.append(format_host(self.host))
        if self.port is not None:
            parts.append(f":{self.port}")
        parts.append(_format_params(self.params))
        if self.headers:
            parts.append("?" + "&".join(f"{name}={value}" for name, value in self.headers))
        return "".join(parts)

    @property
    def host_key(self) -> str:
        """The host in lower case, for comparisons (RFC 3261 19.1.4)."""
        return self.host.lower()

    @property
    def secure(self) -> bool:
        """True for a sips: URI."""
        return self.scheme == "sips"

    def param(self, name: str) -> str | None:
        """Return the unescaped value of uri-parameter ``name`` (case-insensitive).

        A parameter present without a value returns "" ; an absent one None.
        """
        found, value = _find_param(self.params, name)
        if not found:
            return None
        return "" if value is None else unescape(value)

    def has_param(self, name: str) -> bool:
        """Return whether uri-parameter ``name`` is present (case-insensitive)."""
        return _find_param(self.params, name)[0]

    @property
    def transport(self) -> str | None:
        """The transport uri-parameter in lower case, or None (RFC 3261 19.1.1)."""
        value = self.param("transport")
        return value.lower() if value else None

    @property
    def loose_route(self) -> bool:
        """Whether the URI carries the ``lr`` parameter (RFC 3261 19.1.1, 16.12)."""
        return self.has_param("lr")

    @property
    def maddr(self) -> str | None:
        """The maddr uri-parameter, or None."""
        return self.param("maddr")

    def with_params(self, **changes: str | None) -> SipURI:
        """Return a copy with the named parameters set (None: present, no value)."""
        params = [(name, value) for name, value in self.params if name.lower() not in changes]
        params.extend(changes.items())
        return self._replace(params=tuple(params))

    def without_params(self, *names: str) -> SipURI:
        """Return a copy without the named parameters (case-insensitive)."""
        lowered = {name.lower() for name in names}
        params = tuple((n, v) for n, v in self.params if n.lower() not in lowered)
        return self._replace(params=params)

    def without_headers(self) -> SipURI:
        """Return a copy without the headers component."""
        return self._replace(headers=())

    def compare_key(self) -> tuple[object, ...]:
        """A key under which equal URIs (RFC 3261 19.1.4) are equal.

        Parameters that RFC 3261 19.1.4 says must match when present in either
        URI (user, ttl, method, maddr, transport) take part; other parameters are
        compared only when present in both, which no single key can express, so
        they are left out.
        """
        significant = tuple(
            (name, self.param(name)) for name in ("user", "ttl", "method", "maddr", "transport")
        )
        return (
            self.scheme,
            None if self.user is None else unescape(self.user),
            None if self.password is None else unescape(self.password),
            self.host.lower(),
            self.port,
            tuple((name, None if value is None else value.lower()) for name, value in significant),
        )


class TelURI(NamedTuple):
    """A tel: URI (RFC 3966): a telephone number and its parameters."""

    number: str
    """The telephone-subscriber number, visual separators included."""
    params: Params = ()
    """The parameters in order, as on the wire."""

    def __str__(self) -> str:
        return f"tel:{self.number}{_format_params(self.params)}"

    @property
    def scheme(self) -> str:
        """Always "tel"."""
        return "tel"

    @property
    def is_global(self) -> bool:
        """Whether the number is global ("+" and a country code, RFC 3966 5.1.4)."""
        return self.number.startswith("+")

    def param(self, name: str) -> str | None:
        """Return the unescaped value of parameter ``name``, or None."""
        found, value = _find_param(self.params, name)
        if not found:
            return None
        return "" if value is None else unescape(value)


class AbsoluteURI(NamedTuple):
    """Any other URI (RFC 3261 25.1 ``absoluteURI``), kept opaque."""

    scheme: str
    """The scheme in lower case."""
    rest: str
    """Everything after the ':' as on the wire."""

    def __str__(self) -> str:
        return f"{self.scheme}:{self.rest}"


URI: TypeAlias = SipURI | TelURI | AbsoluteURI

# SIP-URI  = "sip:" [ userinfo ] hostport uri-parameters [ headers ]
# userinfo = ( user / telephone-subscriber ) [ ":" password ] "@"
# hostport = host [ ":" port ]
# One pattern checks the whole URI, so that a URI is validated in a single pass;
# the host is checked further by _check_host (IPv4 ranges, IPv6 syntax).
# Character classes include "%" so that each part is one run of a class (fast in
# the re module); _BAD_ESCAPE_RE then checks that every "%" starts an escape
# (escaped = "%" HEXDIG HEXDIG).
_PARAMCHAR = rf"[{abnf.UNRESERVED}\[\]/:&+$%]"
_HNVCHAR = rf"[{abnf.UNRESERVED}\[\]/?:+$%]"
_SIP_URI_RE = re.compile(
    r"(?P<scheme>[Ss][Ii][Pp][Ss]?):"
    rf"(?:(?P<user>[{abnf.UNRESERVED}&=+$,;?/%]+)"
    rf"(?::(?P<password>[{abnf.UNRESERVED}&=+$,%]*))?@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*\.?)"
    r"(?::(?P<port>[0-9]{1,5}))?"
    rf"(?P<params>(?:;{_PARAMCHAR}+(?:={_PARAMCHAR}+)?)*)"
    rf"(?:\?(?P<headers>{_HNVCHAR}+={_HNVCHAR}*(?:&{_HNVCHAR}+={_HNVCHAR}*)*))?"
)
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def check_host(host: str) -> bool:
    """Check what the URI pattern leaves open: IPv4 octets, IPv6 syntax, and that a
    name whose last label is numeric is an IPv4 address (RFC 3261 25.1 toplabel)."""
    if host[0] == "[":
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    if host[-1].isdigit() and host.rstrip(".").rpartition(".")[2].isdigit():
        return abnf.IPV4_ADDRESS_RE.fullmatch(host) is not None
    if "-" in host:
        # domainlabel: a hyphen never starts or ends a label.
        return not (host[0] == "-" or "-." in host or ".-" in host or host[-1] == "-")
    return True


def _split_uri_params(text: str) -> Params:
    """Split ``;name=value;name`` (already validated) into pairs."""
    params: list[tuple[str, str | None]] = []
    for item in text[1:].split(";"):
        name, equals, value = item.partition("=")
        params.append((name, value if equals else None))
    return tuple(params)


def _parse_sip_uri(text: str) -> SipURI:
    match = _SIP_URI_RE.fullmatch(text)
    if match is None:
        raise RemoteProtocolError(f"Malformed SIP URI {text!r}")
    scheme, user, password, host, port_text, params_text, headers_text = match.groups()
    if "%" in text and _BAD_ESCAPE_RE.search(text) is not None:
        raise RemoteProtocolError(f"Malformed escape in URI {text!r}")
    if not check_host(host):
        raise RemoteProtocolError(f"Malformed host in URI {text!r}")
    port = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise RemoteProtocolError(f"Malformed port in URI {text!r}")
    headers: tuple[tuple[str, str], ...] = ()
    if headers_text is not None:
        headers = tuple(
            (name, value)
            for name, _, value in (item.partition("=") for item in headers_text.split("&"))
        )
    return SipURI(
        host,
        user,
        password,
        port,
        _split_uri_params(params_text) if params_text else (),
        headers,
        scheme if scheme == "sip" else scheme.lower(),
    )


def _parse_tel_uri(text: str) -> TelURI:
    number, _, params_text = text[4:].partition(";")
    if abnf.TEL_NUMBER_RE.fullmatch(number) is None:
        raise RemoteProtocolError(f"Malformed tel URI {text!r}")
    params = _parse_params(params_text, "tel URI") if params_text else ()
    return TelURI(number, params)


def _parse_uri(text: str) -> URI:
    """Parse a URI: sip, sips, tel, or any other scheme as an opaque absoluteURI.

    Raises RemoteProtocolError (400) when ``text`` is not a URI.  A URI of an
    unknown scheme is not an error here: whether it is acceptable depends on where
    it appears (RFC 3261 8.2.2.1 answers 416 for a Request-URI).
    """
    head = text[:5].lower()
    if head[:4] == "sip:" or head == "sips:":
        return _parse_sip_uri(text)
    scheme, colon, rest = text.partition(":")
    if not colon or abnf.SCHEME_RE.fullmatch(scheme) is None:
        raise RemoteProtocolError(f"Malformed URI {text!r}")
    lowered = scheme.lower()
    if lowered == "tel":
        return _parse_tel_uri(text)
    if abnf.OPAQUE_RE.fullmatch(rest) is None:
        raise RemoteProtocolError(f"Malformed URI {text!r}")
    return AbsoluteURI(lowered, rest)


parse_uri: Callable[[str], URI] = memoized(_parse_uri)
