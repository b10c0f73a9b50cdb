"""SIP messages: lazy parsing, byte-exact forwarding, and the message builders.

A message is a start line, an ordered list of header fields and a body
(RFC 3261 7).  Parsing only splits the header section into fields; a field's
value is decoded on first access, and a typed value (Via, CSeq, name-addr ...)
is parsed on first access of its accessor and cached.  Each field keeps the bytes
it arrived with: serializing a message writes untouched fields byte for byte, so
a proxy that adds a Via, removes a Route and decrements Max-Forwards changes
exactly those bytes (RFC 3261 16.6).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from . import _abnf as abnf
from ._digest import Challenge, Credentials, parse_challenge, parse_credentials
from ._errors import LocalProtocolError, MessageError, RemoteProtocolError
from ._headers import LIST_HEADERS, SINGLE_HEADERS, canonical_name, display_name
from ._status import reason_phrase
from ._uri import URI, SipURI, parse_uri
from ._values import (
    Contact,
    CSeq,
    NameAddr,
    Via,
    parse_contact,
    parse_cseq,
    parse_name_addr,
    parse_token_list,
    parse_via,
    split_list,
)

__all__ = [
    "HeaderField",
    "Message",
    "Request",
    "Response",
    "error_response",
    "make_ack",
    "make_cancel",
    "make_response",
    "parse_message",
    "readable_top_via",
]

T = TypeVar("T")

# The methods of RFC 3261 and the extensions a registrar and proxy deal with.
# RFC 4475 3.1.2.18: a request of an unknown method whose CSeq names another method
# is answered 501 rather than 400.
KNOWN_METHODS = frozenset(
    {
        "ACK",
        "BYE",
        "CANCEL",
        "INFO",
        "INVITE",
        "MESSAGE",
        "NOTIFY",
        "OPTIONS",
        "PRACK",
        "PUBLISH",
        "REFER",
        "REGISTER",
        "SUBSCRIBE",
        "UPDATE",
    }
)

# The headers RFC 3261 8.1.1 requires in every request; responses copy them
# (RFC 3261 8.2.6.2).  Max-Forwards is left out: RFC 2543 elements omit it and
# a proxy adds it (RFC 3261 16.6 step 3, RFC 4475 3.4.1).
MANDATORY_HEADERS = ("via", "from", "to", "call-id", "cseq")
_MANDATORY_SET = frozenset(MANDATORY_HEADERS)
_SINGLE_ORDER = tuple(sorted(SINGLE_HEADERS))  # a stable order for the error message

_SURROGATE = "surrogateescape"
_CRLF = b"\r\n"
_TOKEN_BYTES_RE = re.compile(rb"[A-Za-z0-9\-.!%*_+`'~]+")
_NAME_FROM_BYTES: dict[bytes, str] = {}


def _name_from_bytes(raw_name: bytes) -> str | None:
    """Map a header name as received (spaces before the colon included) to its
    canonical name; None when it is not a token (RFC 3261 7.3.1)."""
    canonical = _NAME_FROM_BYTES.get(raw_name)
    if canonical is None:
        name = raw_name.rstrip(b" \t")
        if _TOKEN_BYTES_RE.fullmatch(name) is None:
            return None
        canonical = canonical_name(name.decode("ascii"))
        if len(_NAME_FROM_BYTES) < 4096:  # bounded: names come from the network
            _NAME_FROM_BYTES[raw_name] = canonical
    return canonical


class HeaderField:
    """A view of one header field: its canonical name, its value, and the bytes it
    arrived as (None for a field the core wrote, which goes out as ``Name: value``).
    """

    __slots__ = ("name", "raw", "value")

    def __init__(self, name: str, value: str, raw: bytes | None = None) -> None:
        self.name = name
        self.value = value
        self.raw = raw

    def __repr__(self) -> str:
        return f"HeaderField({self.name!r}, {self.value!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeaderField):
            return NotImplemented
        return self.name == other.name and self.value == other.value

    __hash__ = None  # type: ignore[assignment]


def _checked_value(value: object) -> str:
    """A caller's header value as text; raises LocalProtocolError on CR or LF (a
    line break in a value would inject headers)."""
    text = str(value)
    if "\r" in text or "\n" in text:
        raise LocalProtocolError(f"header value with CR or LF: {text!r}")
    return text


class Message:
    """What requests and responses share: header fields and a body.

    Fields are held in parallel lists (canonical names, wire bytes, decoded
    values) so that finding a header is a C-level ``list.index`` and nothing is
    decoded before it is asked for.  ``fields`` gives them as HeaderField views.
    """

    __slots__ = ("_names", "_parsed", "_raws", "_values", "body")

    _names: list[str]
    _raws: list[bytes | None]
    _values: list[str | None]
    _parsed: dict[str, Any]
    body: bytes

    # ------------------------------------------------------------- generic access

    @property
    def fields(self) -> tuple[HeaderField, ...]:
        """The header fields in order (a snapshot; change them with set/add/...)."""
        return tuple(
            HeaderField(name, self._value_at(index), self._raws[index])
            for index, name in enumerate(self._names)
        )

    def _value_at(self, index: int) -> str:
        value = self._values[index]
        if value is None:
            raw = self._raws[index]
            assert raw is not None
            value = raw.decode("utf-8", _SURROGATE).partition(":")[2]
            if "\r\n" in value:
                value = abnf.FOLD_RE.sub(" ", value)
            value = value.strip(" \t")
            self._values[index] = value
        return value

    def _index(self, key: str, start: int = 0) -> int:
        names = self._names
        # A membership test first: list.index raising ValueError costs far more.
        if key in (names if start == 0 else names[start:]):
            return names.index(key, start)
        return -1

    def _texts(self, key: str) -> list[str]:
        """The values of every field named ``key`` (canonical), in order."""
        names = self._names
        count = names.count(key)
        if count == 0:
            return []
        if count == 1:
            return [self._value_at(names.index(key))]
        return [self._value_at(index) for index, name in enumerate(names) if name == key]

    def get(self, name: str) -> str | None:
        """Return the value of the first field named ``name`` (any spelling), or None."""
        index = self._index(canonical_name(name))
        return None if index < 0 else self._value_at(index)

    def get_all(self, name: str) -> list[str]:
        """Return the values of every field named ``name``, unsplit, in order."""
        return self._texts(canonical_name(name))

    def values(self, name: str) -> list[str]:
        """Return every element of a list header across its fields (RFC 3261 7.3.1).

        For a header that is not a comma-separated list (including the
        authentication headers and unknown headers) this is ``get_all``.
        Raises MessageError when the list is malformed.
        """
        key = canonical_name(name)
        texts = self._texts(key)
        if key not in LIST_HEADERS:
            return texts
        if len(texts) == 1 and "," not in texts[0]:
            return texts if texts[0] else self._split(key, texts[0])
        result: list[str] = []
        for text in texts:
            result.extend(self._split(key, text))
        return result

    def _split(self, key: str, text: str) -> list[str]:
        try:
            return split_list(text, key)
        except RemoteProtocolError:
            raise self._error(f"Malformed {display_name(key)} header") from None

    def has(self, name: str) -> bool:
        """Return whether a field named ``name`` is present."""
        return canonical_name(name) in self._names

    def count(self, name: str) -> int:
        """Return the number of fields named ``name``."""
        return self._names.count(canonical_name(name))

    # -------------------------------------------------------------------- changes

    def _insert(self, index: int, key: str, value: str) -> None:
        self._names.insert(index, key)
        self._raws.insert(index, None)
        self._values.insert(index, value)

    def _delete(self, index: int) -> None:
        del self._names[index]
        del self._raws[index]
        del self._values[index]

    def _replace(self, index: int, value: str) -> None:
        self._raws[index] = None
        self._values[index] = value

    def _forget(self, key: str) -> None:
        """Drop the parsed values of header ``key`` after a change."""
        parsed = self._parsed
        parsed.pop(key, None)
        if key == "via":
            parsed.pop("top-via", None)

    def copy(self) -> Message:
        """A copy whose header fields can be changed without touching this message
        (values already parsed are shared: they are immutable)."""
        clone = self.__class__.__new__(self.__class__)
        self._copy_into(clone)
        return clone

    def _copy_into(self, clone: Message) -> None:
        clone._names = list(self._names)
        clone._raws = list(self._raws)
        clone._values = list(self._values)
        clone._parsed = dict(self._parsed)
        clone.body = self.body

    def set(self, name: str, value: object) -> None:
        """Set header ``name`` to ``value``: the first field is replaced in place,
        any other field of that name removed; appended when absent."""
        key = canonical_name(name)
        text = _checked_value(value)
        index = self._index(key)
        if index < 0:
            self._insert(len(self._names), key, text)
        else:
            self._replace(index, text)
            later = self._index(key, index + 1)
            while later >= 0:
                self._delete(later)
                later = self._index(key, later)
        self._forget(key)

    def add(self, name: str, value: object) -> None:
        """Append a field ``name: value`` after every other field."""
        key = canonical_name(name)
        self._insert(len(self._names), key, _checked_value(value))
        self._forget(key)

    def prepend(self, name: str, value: object) -> None:
        """Add ``value`` as the topmost value of header ``name``.

        The new field goes just above the first field of that name, or at the top of
        the header section when there is none (a new Via, Record-Route or Route:
        RFC 3261 16.6 steps 4 and 8).
        """
        key = canonical_name(name)
        self._insert(max(self._index(key), 0), key, _checked_value(value))
        self._forget(key)

    def remove(self, name: str) -> None:
        """Remove every field named ``name``."""
        key = canonical_name(name)
        index = self._index(key)
        while index >= 0:
            self._delete(index)
            index = self._index(key, index)
        self._forget(key)

    def pop_first(self, name: str) -> str | None:
        """Remove and return the topmost value of list header ``name``, or None.

        When the first field holds several comma-separated values only the first
        one is removed and the field is rewritten with the others.
        """
        key = canonical_name(name)
        index = self._index(key)
        if index < 0:
            return None
        elements = self._split(key, self._value_at(index))
        if len(elements) == 1:
            self._delete(index)
        else:
            self._replace(index, ", ".join(elements[1:]))
        self._forget(key)
        return elements[0]

    def replace_first(self, name: str, value: object) -> None:
        """Replace the topmost value of list header ``name`` (e.g. the top Via)."""
        key = canonical_name(name)
        index = self._index(key)
        if index < 0:
            raise LocalProtocolError(f"no {display_name(key)} header to replace")
        elements = self._split(key, self._value_at(index))
        elements[0] = _checked_value(value)
        self._replace(index, ", ".join(elements))
        self._forget(key)

    def set_body(self, body: bytes, content_type: str | None = None) -> None:
        """Replace the body and set Content-Length (and Content-Type when given)."""
        self.body = body
        self.set("content-length", len(body))
        if content_type is not None:
            self.set("content-type", content_type)

    # ------------------------------------------------------------- typed accessors

    def _error(self, reason: str) -> MessageError:
        raise NotImplementedError

    def _single(self, key: str) -> str:
        index = self._index(key)
        if index < 0:
            raise self._error(f"Missing {display_name(key)} header")
        return self._value_at(index)

    @property
    def call_id(self) -> str:
        """The Call-ID, case-sensitive (RFC 3261 20.8).  Raises MessageError."""
        parsed = self._parsed.get("call-id")
        if parsed is None:
            parsed = self._single("call-id")
            # callid = word [ "@" word ]: no whitespace inside.
            if not parsed or " " in parsed or "\t" in parsed:
                raise self._error("Malformed Call-ID header")
            self._parsed["call-id"] = parsed
        return parsed

    @property
    def cseq(self) -> CSeq:
        """The CSeq (RFC 3261 20.16).  Raises MessageError."""
        parsed = self._parsed.get("cseq")
        if parsed is None:
            try:
                parsed = parse_cseq(self._single("cseq"))
            except RemoteProtocolError as error:
                raise self._error(error.reason) from None
            self._parsed["cseq"] = parsed
        return parsed

    def _name_addr(self, key: str) -> NameAddr:
        parsed = self._parsed.get(key)
        if parsed is None:
            try:
                parsed = parse_name_addr(self._single(key), key)
            except RemoteProtocolError as error:
                raise self._error(error.reason) from None
            self._parsed[key] = parsed
        return parsed

    @property
    def from_(self) -> NameAddr:
        """The From header (RFC 3261 20.20).  Raises MessageError."""
        return self._name_addr("from")

    @property
    def to(self) -> NameAddr:
        """The To header (RFC 3261 20.39).  Raises MessageError."""
        return self._name_addr("to")

    @property
    def vias(self) -> list[Via]:
        """Every Via value, topmost first (RFC 3261 20.42).  Raises MessageError."""
        parsed = self._parsed.get("via")
        if parsed is None:
            try:
                parsed = [parse_via(text) for text in self.values("via")]
            except RemoteProtocolError as error:
                raise self._error(error.reason) from None
            if not parsed:
                raise self._error("Missing Via header")
            self._parsed["via"] = parsed
        return parsed

    @property
    def via(self) -> Via:
        """The topmost Via.  Raises MessageError."""
        parsed = self._parsed.get("via")
        if parsed is not None:
            return parsed[0]  # type: ignore[no-any-return]
        top = self._parsed.get("top-via")
        if top is None:
            text = self._single("via")
            if "," in text:
                text = self._split("via", text)[0]
            try:
                top = parse_via(text)
            except RemoteProtocolError as error:
                raise self._error(error.reason) from None
            self._parsed["top-via"] = top
        return top

    def _name_addr_list(self, key: str) -> list[NameAddr]:
        parsed = self._parsed.get(key)
        if parsed is None:
            try:
                parsed = [parse_name_addr(text, key) for text in self.values(key)]
            except RemoteProtocolError as error:
                raise self._error(error.reason) from None
            self._parsed[key] = parsed
        return parsed

    @property
    def routes(self) -> list[NameAddr]:
        """The Route set, topmost first (RFC 3261 20.34).  Raises MessageError."""
        return self._name_addr_list("route")

    @property
    def record_routes(self) -> list[NameAddr]:
        """The Record-Route values, topmost first (RFC 3261 20.30)."""
        return self._name_addr_list("record-route")

    @property
    def contacts(self) -> list[Contact]:
        """The Contact values (RFC 3261 20.10); "*" is a Contact with no address.

        Raises MessageError when a value is malformed or "*" is not alone.
        """
        parsed = self._parsed.get("contact")
        if parsed is None:
            try:
                parsed = [parse_contact(text) for text in self.values("contact")]
            except RemoteProtocolError as error:
                raise self._error(error.reason) from None
            if len(parsed) > 1 and any(contact.is_star for contact in parsed):
                raise self._error("Contact '*' must be the only contact")
            self._parsed["contact"] = parsed
        return parsed

    def _integer(self, key: str, limit: int | None, clamp: bool) -> int | None:
        parsed = self._parsed.get(key)
        if parsed is None:
            index = self._index(key)
            if index < 0:
                return None
            text = self._value_at(index)
            if not text.isdigit() or not text.isascii():
                raise self._error(f"Malformed {display_name(key)} header")
            parsed = int(text)
            if limit is not None and parsed > limit:
                if not clamp:
                    raise self._error(f"{display_name(key)} out of range")
                parsed = limit
            self._parsed[key] = parsed
        return parsed

    @property
    def max_forwards(self) -> int | None:
        """Max-Forwards (0 to 255, RFC 3261 20.22), or None when absent."""
        return self._integer("max-forwards", 255, clamp=False)

    @property
    def content_length(self) -> int | None:
        """Content-Length (RFC 3261 20.14), or None when absent."""
        return self._integer("content-length", None, clamp=False)

    @property
    def expires(self) -> int | None:
        """Expires in seconds, or None when absent.

        RFC 3261 20.19 limits the value to 2**32-1; a larger one is read as that
        maximum (RFC 4475 3.1.2.4).
        """
        return self._integer("expires", 2**32 - 1, clamp=True)

    @property
    def min_expires(self) -> int | None:
        """Min-Expires in seconds (RFC 3261 20.23), or None."""
        return self._integer("min-expires", 2**32 - 1, clamp=True)

    def _tokens(self, key: str) -> tuple[str, ...]:
        parsed = self._parsed.get(key)
        if parsed is None:
            tokens: list[str] = []
            try:
                for text in self._texts(key):
                    tokens.extend(parse_token_list(text, key))
            except RemoteProtocolError as error:
                raise self._error(error.reason) from None
            parsed = tuple(tokens)
            self._parsed[key] = parsed
        return parsed

    @property
    def require(self) -> tuple[str, ...]:
        """The option tags of Require (RFC 3261 20.32)."""
        return self._tokens("require")

    @property
    def proxy_require(self) -> tuple[str, ...]:
        """The option tags of Proxy-Require (RFC 3261 20.29)."""
        return self._tokens("proxy-require")

    @property
    def supported(self) -> tuple[str, ...]:
        """The option tags of Supported (RFC 3261 20.37)."""
        return self._tokens("supported")

    @property
    def unsupported(self) -> tuple[str, ...]:
        """The option tags of Unsupported (RFC 3261 20.40)."""
        return self._tokens("unsupported")

    @property
    def allow(self) -> tuple[str, ...]:
        """The methods of Allow (RFC 3261 20.5)."""
        return self._tokens("allow")

    @property
    def content_type(self) -> str | None:
        """The media type of Content-Type as "type/subtype" in lower case, or None."""
        parsed = self._parsed.get("content-type")
        if parsed is None:
            index = self._index("content-type")
            if index < 0:
                return None
            match = abnf.MEDIA_TYPE_RE.fullmatch(self._value_at(index))
            if match is None:
                raise self._error("Malformed Content-Type header")
            parsed = f"{match.group(1)}/{match.group(2)}".lower()
            self._parsed["content-type"] = parsed
        return parsed

    def _auth(self, key: str, parser: Callable[[str], T]) -> list[T]:
        parsed = self._parsed.get(key)
        if parsed is None:
            try:
                parsed = [parser(text) for text in self._texts(key)]
            except RemoteProtocolError as error:
                raise self._error(error.reason) from None
            self._parsed[key] = parsed
        return parsed

    @property
    def authorization(self) -> list[Credentials]:
        """The Authorization credentials (RFC 3261 20.7), one per field."""
        return self._auth("authorization", parse_credentials)

    @property
    def proxy_authorization(self) -> list[Credentials]:
        """The Proxy-Authorization credentials (RFC 3261 20.28)."""
        return self._auth("proxy-authorization", parse_credentials)

    @property
    def www_authenticate(self) -> list[Challenge]:
        """The WWW-Authenticate challenges (RFC 3261 20.44)."""
        return self._auth("www-authenticate", parse_challenge)

    @property
    def proxy_authenticate(self) -> list[Challenge]:
        """The Proxy-Authenticate challenges (RFC 3261 20.27)."""
        return self._auth("proxy-authenticate", parse_challenge)

    # ---------------------------------------------------------------- validation

    def _validate_common(self) -> None:
        names = self._names
        present = set(names)
        if not present >= _MANDATORY_SET:
            for name in MANDATORY_HEADERS:
                if name not in present:
                    # RFC 3261 8.1.1: every request carries these; RFC 4475 3.3.1.
                    raise self._error(f"Missing {display_name(name)} header")
        if len(names) != len(present):
            # Some name repeats (a second Via or Record-Route is the common case).
            for name in _SINGLE_ORDER:
                if name in present and names.count(name) > 1:
                    # RFC 4475 3.3.8 and 3.3.9: a repeated single-valued header is a 400.
                    raise self._error(f"More than one {display_name(name)} header")
        # The top Via is what every element reads (transaction matching, RFC 3261
        # 17.2.3; the response's route, 18.2.2); the others are parsed when read
        # (a proxy's loop detection, a UA's response processing).
        self.via  # noqa: B018 - parsing is the check
        self.from_  # noqa: B018
        self.to  # noqa: B018
        self.call_id  # noqa: B018
        self.cseq  # noqa: B018
        self.max_forwards  # noqa: B018
        self.content_length  # noqa: B018

    def parse_all(self) -> None:
        """Parse every header the core understands; raise MessageError on the first
        malformed one.  Unknown headers are opaque and never fail."""
        self.validate()
        self.vias  # noqa: B018
        self.contacts  # noqa: B018
        self.routes  # noqa: B018
        self.record_routes  # noqa: B018
        self.expires  # noqa: B018
        self.min_expires  # noqa: B018
        self.require  # noqa: B018
        self.proxy_require  # noqa: B018
        self.supported  # noqa: B018
        self.unsupported  # noqa: B018
        self.allow  # noqa: B018
        self.content_type  # noqa: B018
        self.authorization  # noqa: B018
        self.proxy_authorization  # noqa: B018
        self.www_authenticate  # noqa: B018
        self.proxy_authenticate  # noqa: B018
        for name in LIST_HEADERS:
            self.values(name)

    def validate(self) -> None:
        """Check what every element checks before processing (RFC 3261 8.2, 16.3 step 1).

        Raises MessageError with the status hint to answer with.
        """
        raise NotImplementedError

    # -------------------------------------------------------------- serializing

    def _start_line(self) -> bytes:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Serialize the message; untouched fields are written as received."""
        raws: list[bytes | None] | list[bytes] = self._raws
        if None in raws:
            names = self._names
            values = self._values
            raws = [
                raw
                if raw is not None
                else f"{display_name(names[index])}: {values[index]}".encode("utf-8", _SURROGATE)
                for index, raw in enumerate(raws)
            ]
        return _CRLF.join([self._start_line(), *raws, b"", self.body])

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def _init_fields(
        self, headers: Iterable[tuple[str, object]], body: bytes, content_length: bool
    ) -> None:
        self._names = []
        self._raws = []
        self._values = []
        self._parsed = {}
        self.body = body
        for name, value in headers:
            self._insert(len(self._names), canonical_name(name), _checked_value(value))
        if content_length and "content-length" not in self._names:
            self._insert(len(self._names), "content-length", str(len(body)))


class Request(Message):
    """A SIP request (RFC 3261 7.1)."""

    __slots__ = ("_start", "_uri", "_uri_text", "method", "version")

    method: str
    version: str
    _uri_text: str
    _uri: URI | None
    _start: bytes | None

    def __init__(
        self,
        method: str,
        uri: URI | str,
        headers: Iterable[tuple[str, object]] = (),
        body: bytes = b"",
        *,
        content_length: bool = True,
    ) -> None:
        """Build a request.  Content-Length is added unless ``content_length`` is
        false or ``headers`` has one (RFC 3261 18: stream transports need it)."""
        if abnf.METHOD_RE.fullmatch(method) is None:
            raise LocalProtocolError(f"not a method: {method!r}")
        self.method = method
        self.version = "SIP/2.0"
        self._uri = None if isinstance(uri, str) else uri
        self._uri_text = str(uri)
        self._start = None
        self._init_fields(headers, body, content_length)

    def _copy_into(self, clone: Message) -> None:
        super()._copy_into(clone)
        assert isinstance(clone, Request)
        clone.method = self.method
        clone.version = self.version
        clone._uri_text = self._uri_text
        clone._uri = self._uri
        clone._start = self._start

    def copy(self) -> Request:
        """A copy whose header fields and Request-URI can be changed freely."""
        clone = Request.__new__(Request)
        self._copy_into(clone)
        return clone

    @property
    def uri(self) -> URI:
        """The Request-URI.  Raises MessageError (400) when it is malformed."""
        uri = self._uri
        if uri is None:
            try:
                uri = parse_uri(self._uri_text)
            except RemoteProtocolError as error:
                raise self._error(error.reason) from None
            self._uri = uri
        return uri

    @uri.setter
    def uri(self, value: URI) -> None:
        self._uri = value
        self._uri_text = str(value)
        self._start = None

    @property
    def uri_text(self) -> str:
        """The Request-URI as received."""
        return self._uri_text

    def _error(self, reason: str) -> MessageError:
        return MessageError(reason, 400, message=self)

    def validate(self) -> None:
        """Check the request before processing it (RFC 3261 8.2, 16.3 step 1).

        Raises MessageError: 400 for syntax, 501 for an unknown method whose CSeq
        names another method (RFC 4475 3.1.2.18).  The Request-URI scheme, the
        Require and Proxy-Require headers and Max-Forwards 0 are the caller's to
        judge: their answers depend on the role (RFC 3261 8.2.2, 16.3).
        """
        self._validate_common()
        uri = self.uri
        if isinstance(uri, SipURI) and uri.headers:
            # RFC 3261 19.1.1 (table 1): a headers component is not allowed in a
            # Request-URI (RFC 4475 3.1.2.11).
            raise self._error("Request-URI must not have a headers component")
        cseq = self.cseq
        if cseq.method != self.method:
            # RFC 3261 8.1.1.5: the CSeq method MUST match the request method.
            if self.method not in KNOWN_METHODS:
                raise MessageError("Not Implemented", 501, message=self)
            raise self._error("CSeq method does not match the request method")

    def _start_line(self) -> bytes:
        start = self._start
        if start is None:
            start = f"{self.method} {self._uri_text} {self.version}".encode("utf-8", _SURROGATE)
            self._start = start
        return start

    def __repr__(self) -> str:
        return f"<Request {self.method} {self._uri_text}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return (
            self.method == other.method
            and self._uri_text == other._uri_text
            and self._names == other._names
            and self.fields == other.fields
            and self.body == other.body
        )

    __hash__ = None  # type: ignore[assignment]


class Response(Message):
    """A SIP response (RFC 3261 7.2)."""

    __slots__ = ("_start", "reason", "status", "version")

    status: int
    reason: str
    version: str
    _start: bytes | None

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: Iterable[tuple[str, object]] = (),
        body: bytes = b"",
        *,
        content_length: bool = True,
    ) -> None:
        """Build a response; ``reason`` defaults to the code's phrase."""
        if not 100 <= status <= 699:
            raise LocalProtocolError(f"status code out of range: {status}")
        self.status = status
        self.reason = reason_phrase(status) if reason is None else reason
        if "\r" in self.reason or "\n" in self.reason:
            raise LocalProtocolError(f"reason phrase with CR or LF: {self.reason!r}")
        self.version = "SIP/2.0"
        self._start = None
        self._init_fields(headers, body, content_length)

    def _copy_into(self, clone: Message) -> None:
        super()._copy_into(clone)
        assert isinstance(clone, Response)
        clone.status = self.status
        clone.reason = self.reason
        clone.version = self.version
        clone._start = self._start

    def copy(self) -> Response:
        """A copy whose header fields can be changed freely."""
        clone = Response.__new__(Response)
        self._copy_into(clone)
        return clone

    def _error(self, reason: str) -> MessageError:
        # RFC 3261 17.1.3 / 18.1.2: a malformed response is discarded, never answered.
        return MessageError(reason, None, message=self)

    def validate(self) -> None:
        """Check the response before processing it; raises MessageError (hint None:
        drop it)."""
        self._validate_common()

    def _start_line(self) -> bytes:
        start = self._start
        if start is None:
            start = f"{self.version} {self.status} {self.reason}".encode("utf-8", _SURROGATE)
            self._start = start
        return start

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Response):
            return NotImplemented
        return (
            self.status == other.status
            and self.reason == other.reason
            and self._names == other._names
            and self.fields == other.fields
            and self.body == other.body
        )

    __hash__ = None  # type: ignore[assignment]


# ------------------------------------------------------------------------ parsing


def _split_fields(lines: list[bytes]) -> tuple[list[str], list[bytes], str | None]:
    """Split header lines into fields, joining folded lines (RFC 3261 7.3.1).

    Returns the canonical names, the raw bytes of each field and the first problem
    found, if any: a malformed line is skipped so that the fields before and after
    it can still answer the request.
    """
    get = _NAME_FROM_BYTES.get
    names = [get(line[: line.find(b":")]) for line in lines]
    if None not in names:
        # The common case: no folding, every name seen before.
        return names, lines, None  # type: ignore[return-value]
    names = []
    raws: list[bytes] = []
    problem = None
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            # LWS = [*WSP CRLF] 1*WSP: the line continues the previous field.
            if raws:
                raws[-1] = raws[-1] + _CRLF + line
            elif problem is None:
                problem = "Continuation line before the first header"
            continue
        colon = line.find(b":")
        name = _name_from_bytes(line[:colon]) if colon > 0 else None
        if name is None:
            if problem is None:
                problem = "Malformed header line"
            continue
        names.append(name)
        raws.append(line)
    return names, raws, problem  # type: ignore[return-value]


def _fill(message: Message, names: list[str], raws: list[bytes]) -> None:
    message._names = names
    message._raws = raws  # type: ignore[assignment]
    message._values = [None] * len(names)
    message._parsed = {}
    message.body = b""


def _new_request(
    method: str, uri_text: str, version: str, start: bytes, names: list[str], raws: list[bytes]
) -> Request:
    request = Request.__new__(Request)
    request.method = method
    request.version = version
    request._uri_text = uri_text
    request._uri = None
    request._start = start
    _fill(request, names, raws)
    return request


def _new_response(
    status: int, reason: str, version: str, start: bytes, names: list[str], raws: list[bytes]
) -> Response:
    response = Response.__new__(Response)
    response.status = status
    response.reason = reason
    response.version = version
    response._start = start
    _fill(response, names, raws)
    return response


def _parse_request_line(line: bytes) -> tuple[str, str, str, str | None, int]:
    """Return (method, uri, version, problem, status) for a Request-Line.

    Request-Line = Method SP Request-URI SP SIP-Version CRLF: exactly one SP between
    the elements (RFC 4475 3.1.2.8 to 3.1.2.10 reject any other whitespace).
    """
    if line[-8:] == b" SIP/2.0":
        # The common case, checked without regular expressions.
        method_bytes, space, uri_bytes = line[:-8].partition(b" ")
        if space and uri_bytes and b" " not in uri_bytes and b"\t" not in uri_bytes:
            method = method_bytes.decode("utf-8", _SURROGATE)
            if method in KNOWN_METHODS or abnf.METHOD_RE.fullmatch(method) is not None:
                return method, uri_bytes.decode("utf-8", _SURROGATE), "SIP/2.0", None, 0
    text = line.decode("utf-8", _SURROGATE)
    parts = text.split(" ")
    if len(parts) != 3 or not all(parts):
        method = parts[0] if parts and abnf.METHOD_RE.fullmatch(parts[0]) else "UNKNOWN"
        return method, "", "SIP/2.0", "Malformed Request-Line", 400
    method, uri_text, version = parts
    if abnf.METHOD_RE.fullmatch(method) is None:
        return "UNKNOWN", uri_text, "SIP/2.0", "Malformed method", 400
    if "\t" in uri_text:
        return method, uri_text, "SIP/2.0", "Malformed Request-URI", 400
    match = abnf.SIP_VERSION_RE.fullmatch(version)
    if match is None:
        return method, uri_text, "SIP/2.0", "Malformed SIP-Version", 400
    if match.groups() != ("2", "0"):
        # RFC 3261 8.2.2 / 21.5.20: another version is answered 505 (RFC 4475 3.1.2.16).
        return method, uri_text, version, "Version Not Supported", 505
    return method, uri_text, "SIP/2.0", None, 0


def parse_message(data: bytes, *, datagram: bool = True) -> Request | Response:
    """Parse one SIP message.

    ``datagram`` says ``data`` is a whole UDP datagram: Content-Length may be absent
    (the body is the rest of the datagram) and octets past Content-Length are
    discarded (RFC 3261 18.3).  For a stream transport the framer has cut ``data``
    to exactly one message.

    Only the start line, the header split and Content-Length are checked here;
    headers are parsed lazily (call ``validate()`` before processing).  Raises
    MessageError: for a request the status hint is the answer (400, 505 ...) and
    ``message`` is the partial request when its headers could be split; for a
    response the hint is None (drop it).
    """
    start = 0
    if data[:2] == _CRLF:
        # RFC 3261 7.5: CRLFs before the start line are ignored.
        while data.startswith(_CRLF, start):
            start += 2
    end = data.find(b"\r\n\r\n", start)
    terminated = end >= 0
    if not terminated:
        end = len(data) - 2 if data.endswith(_CRLF) else len(data)
    lines = data[start:end].split(_CRLF)
    first = lines[0]
    if not first:
        raise MessageError("Empty message", None)
    is_response = first[:4].upper() == b"SIP/"
    names, raws, problem = _split_fields(lines[1:])
    status_hint: int | None = 400
    message: Request | Response
    if is_response:
        text = first.decode("utf-8", _SURROGATE)
        match = abnf.STATUS_LINE_RE.fullmatch(text)
        if match is None:
            match = abnf.STATUS_LINE_RE.fullmatch(text + " ")  # no SP before CRLF
        status = int(match.group(2)) if match is not None else 0
        version = match.group(1).upper() if match is not None else ""
        if match is None or not 100 <= status <= 699 or version != "SIP/2.0":
            # RFC 4475 3.1.2.19: a response that cannot be understood is dropped.
            raise MessageError("Malformed Status-Line", None)
        message = _new_response(status, match.group(3), version, first, names, raws)
        status_hint = None
    else:
        method, uri_text, version, start_problem, start_status = _parse_request_line(first)
        message = _new_request(method, uri_text, version, first, names, raws)
        if start_problem is not None:
            raise MessageError(start_problem, start_status, message=message)
    if problem is not None:
        raise MessageError(problem, status_hint, message=message)
    if not terminated:
        # RFC 3261 7: the header section ends with an empty line (RFC 4475 3.1.2.15).
        raise MessageError("Header section not terminated", status_hint, message=message)
    body_start = end + 4
    if "content-length" in names:
        lengths = message._texts("content-length")
        if len(lengths) > 1 and len(set(lengths)) > 1:
            # RFC 4475 3.3.9: conflicting Content-Lengths invalidate the framing.
            raise MessageError(
                "Conflicting Content-Length headers",
                status_hint,
                message=message,
                close_connection=True,
            )
        length_text = lengths[0]
        if not length_text.isdigit() or not length_text.isascii():
            # RFC 4475 3.1.2.3: a negative or non-numeric length.
            raise MessageError(
                "Malformed Content-Length", status_hint, message=message, close_connection=True
            )
        length = int(length_text)
        if length > len(data) - body_start:
            # RFC 3261 18.3 / RFC 4475 3.1.2.2: the datagram is shorter than announced.
            raise MessageError(
                "Content-Length larger than the message", status_hint, message=message
            )
        message.body = data[body_start : body_start + length]
    elif datagram:
        # RFC 3261 18.3: over UDP a missing Content-Length means "to the end".
        message.body = data[body_start:]
    else:
        # RFC 3261 18.3 / 20.14: stream transports must carry Content-Length.
        raise MessageError(
            "Missing Content-Length", status_hint, message=message, close_connection=True
        )
    return message


# ----------------------------------------------------------------------- building


def readable_top_via(request: Request) -> Via | None:
    """Return the top Via of ``request`` read as far as routing a response needs.

    When the whole value parses it is returned.  Otherwise sent-protocol and
    sent-by alone are read, ignoring malformed parameters, so that a request with
    a broken Via can still be answered 400 (RFC 4475 3.1.2.1); None when even
    those cannot be read.
    """
    try:
        return request.via
    except MessageError:
        pass
    index = request._index("via")
    if index < 0:
        return None
    text = request._value_at(index)
    cut = min(
        (position for position in (text.find(","), text.find(";")) if position >= 0),
        default=len(text),
    )
    try:
        return parse_via(text[:cut].rstrip(" \t"))
    except RemoteProtocolError:
        return None


def _copy_field(source: Message, index: int, target: Message) -> None:
    """Append field ``index`` of ``source`` to ``target``, bytes and all."""
    target._names.append(source._names[index])
    target._raws.append(source._raws[index])
    target._values.append(source._values[index])


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, object]] = (),
    body: bytes = b"",
) -> Response:
    """Build a response to ``request`` (RFC 3261 8.2.6).

    Via (every value, in order), From, Call-ID and CSeq are copied field by field
    (RFC 3261 8.2.6.2); To is copied and gets ``to_tag`` when the request's To has
    no tag and the status is above 100; a 100 copies Timestamp (RFC 3261 8.2.6.1).
    ``headers`` are appended, then Content-Length.  A To that cannot be parsed is
    copied as it is.
    """
    response = Response.__new__(Response)
    if not 100 <= status <= 699:
        raise LocalProtocolError(f"status code out of range: {status}")
    if reason is None:
        reason = reason_phrase(status)
    elif "\r" in reason or "\n" in reason:
        raise LocalProtocolError(f"reason phrase with CR or LF: {reason!r}")
    response.status = status
    response.reason = reason
    response.version = "SIP/2.0"
    response._start = None
    response._parsed = {}
    response.body = body
    names: list[str] = []
    raws: list[bytes | None] = []
    values: list[str | None] = []
    source_raws, source_values = request._raws, request._values
    for index, name in enumerate(request._names):
        if name in _COPIED_TO_RESPONSES:
            if name == "to" and to_tag is not None and status > 100:
                to = _parsed_or_none(request)
                if to is not None and to.tag is None:
                    # Parameters end the value, in the name-addr and the addr-spec
                    # forms alike (RFC 3261 20.10): the tag goes last.
                    names.append("to")
                    raws.append(None)
                    values.append(f"{request._value_at(index)};tag={to_tag}")
                    continue
        elif not (name == "timestamp" and status == 100):
            continue
        names.append(name)
        raws.append(source_raws[index])
        values.append(source_values[index])
    for name, value in headers:
        names.append(canonical_name(name))
        raws.append(None)
        values.append(_checked_value(value))
    names.append("content-length")
    raws.append(None)
    values.append(str(len(body)))
    response._names = names
    response._raws = raws
    response._values = values
    return response


_COPIED_TO_RESPONSES = frozenset({"via", "from", "to", "call-id", "cseq"})


def _parsed_or_none(request: Request) -> NameAddr | None:
    try:
        return request.to
    except MessageError:
        return None


def error_response(error: MessageError) -> Response | None:
    """Build the answer to a malformed request, or return None to drop it.

    A response is possible only when the error carries a status hint and the
    partial request, the request is not an ACK (RFC 3261 17: an ACK is never
    answered) and its top Via can be read (RFC 3261 18.2.2 routes the response by
    it).  The reason phrase names the problem.
    """
    request = error.message
    if error.status_hint is None or not isinstance(request, Request):
        return None
    if request.method == "ACK" or readable_top_via(request) is None:
        return None
    phrase = reason_phrase(error.status_hint)
    reason = phrase if error.reason == phrase else f"{phrase} - {error.reason}"
    return make_response(request, error.status_hint, reason[:200])


def _copy_top_via(request: Request, target: Message) -> None:
    """Append the top Via of ``request`` to ``target`` as a field of its own,
    the bytes as received when the first Via field holds just that value."""
    index = request._index("via")
    if index < 0:
        raise LocalProtocolError("the request has no Via")
    elements = request._split("via", request._value_at(index))
    if len(elements) == 1:
        _copy_field(request, index, target)
    else:
        target._insert(len(target._names), "via", elements[0])


def make_ack(invite: Request, response: Response) -> Request:
    """Build the ACK a client transaction sends for a non-2xx final response.

    RFC 3261 17.1.1.3: same Request-URI, Call-ID, From and CSeq number as the
    INVITE, method ACK; To from the response (with its tag); only the top Via of
    the INVITE; the INVITE's Route header fields.
    """
    ack = Request("ACK", invite.uri_text, content_length=False)
    _copy_top_via(invite, ack)
    for index, name in enumerate(invite._names):
        if name in ("from", "call-id", "route", "max-forwards"):
            _copy_field(invite, index, ack)
    to_index = response._index("to")
    if to_index >= 0:
        _copy_field(response, to_index, ack)
    ack._insert(len(ack._names), "cseq", f"{invite.cseq.number} ACK")
    ack._insert(len(ack._names), "content-length", "0")
    ack._uri = invite._uri
    return ack


def make_cancel(invite: Request) -> Request:
    """Build a CANCEL for ``invite`` (RFC 3261 9.1).

    Request-URI, Call-ID, To, From and the CSeq number are the INVITE's, method
    CANCEL; a single Via equal to the INVITE's top Via (so the CANCEL matches the
    same transaction downstream); the INVITE's Route header fields.
    """
    cancel = Request("CANCEL", invite.uri_text, content_length=False)
    _copy_top_via(invite, cancel)
    for index, name in enumerate(invite._names):
        if name in ("from", "to", "call-id", "route", "max-forwards"):
            _copy_field(invite, index, cancel)
    cancel._insert(len(cancel._names), "cseq", f"{invite.cseq.number} CANCEL")
    cancel._insert(len(cancel._names), "content-length", "0")
    cancel._uri = invite._uri
    return cancel
