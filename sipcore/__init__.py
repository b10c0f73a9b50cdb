"""sipcore: the sans-IO SIP protocol core shared by the load balancer and the workers.

Bytes and ``now`` go in; events and ``(bytes, destination)`` pairs come out.  No
module here does I/O or reads a clock.
"""

from ._digest import (
    Challenge,
    Credentials,
    DigestAlgorithm,
    DigestServer,
    DigestVerdict,
    NonceKeyring,
    build_credentials,
    compute_ha1,
    parse_challenge,
    parse_credentials,
)
from ._errors import LocalProtocolError, MessageError, RemoteProtocolError, SipError
from ._framing import (
    FramingEvent,
    FramingFailed,
    KeepalivePingReceived,
    KeepalivePongReceived,
    MessageFramed,
    StreamFramer,
)
from ._headers import COMPACT_FORMS, canonical_name, display_name
from ._message import (
    HeaderField,
    Message,
    Request,
    Response,
    error_response,
    make_ack,
    make_cancel,
    make_response,
    parse_message,
    readable_top_via,
)
from ._scan import extract_call_id, is_response, top_via_branch
from ._status import reason_phrase
from ._uri import URI, AbsoluteURI, SipURI, TelURI, parse_uri, unescape
from ._values import MAGIC_COOKIE, Contact, CSeq, NameAddr, Via, parse_name_addr, parse_via

__all__ = [
    "COMPACT_FORMS",
    "MAGIC_COOKIE",
    "URI",
    "AbsoluteURI",
    "CSeq",
    "Challenge",
    "Contact",
    "Credentials",
    "DigestAlgorithm",
    "DigestServer",
    "DigestVerdict",
    "FramingEvent",
    "FramingFailed",
    "HeaderField",
    "KeepalivePingReceived",
    "KeepalivePongReceived",
    "LocalProtocolError",
    "Message",
    "MessageError",
    "MessageFramed",
    "NameAddr",
    "NonceKeyring",
    "RemoteProtocolError",
    "Request",
    "Response",
    "SipError",
    "SipURI",
    "StreamFramer",
    "TelURI",
    "Via",
    "build_credentials",
    "canonical_name",
    "compute_ha1",
    "display_name",
    "error_response",
    "extract_call_id",
    "is_response",
    "make_ack",
    "make_cancel",
    "make_response",
    "parse_challenge",
    "parse_credentials",
    "parse_message",
    "parse_name_addr",
    "parse_uri",
    "parse_via",
    "readable_top_via",
    "reason_phrase",
    "top_via_branch",
    "unescape",
]
