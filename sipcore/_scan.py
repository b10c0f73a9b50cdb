"""Byte-level scans for the load balancer: the few facts it routes by.

The load balancer never parses a message.  It reads the Call-ID (to pick the
worker of a request), the branch of the top Via (a response goes back to the
worker whose tag is in it) and whether the message is a response.  These scans
work on the raw datagram or framed message and touch only the header section.
"""

from __future__ import annotations

import re

__all__ = ["extract_call_id", "is_response", "top_via_branch"]

# "Call-ID" or its compact form "i" at the start of a header line (RFC 3261 20.8,
# 7.3.3), any case, optional whitespace before the colon (HCOLON).  The value ends
# at the line end unless the next line is a continuation (RFC 3261 7.3.1).
_CALL_ID_RE = re.compile(
    rb"\n(?:[Cc][Aa][Ll][Ll]-[Ii][Dd]|[Ii])[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r\n(?![ \t])"
)
_CALL_ID_FOLDED_RE = re.compile(
    rb"\n(?:[Cc][Aa][Ll][Ll]-[Ii][Dd]|[Ii])[ \t]*:((?:[^\r\n]|\r\n[ \t])*)\r\n"
)
# "Via" or "v" at the start of a header line; the top value is the text up to the
# first comma or the end of the line.
_VIA_RE = re.compile(rb"\n(?:[Vv][Ii][Aa]|[Vv])[ \t]*:((?:[^\r\n,]|\r\n[ \t])*)")
_BRANCH_RE = re.compile(rb";[ \t\r\n]*[Bb][Rr][Aa][Nn][Cc][Hh][ \t\r\n]*=[ \t\r\n]*([^;, \t\r\n]+)")


def _header_end(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end + 2


def extract_call_id(data: bytes) -> bytes | None:
    """Return the Call-ID value of a raw message, whitespace trimmed, or None.

    The long and the compact header name give the same value; a folded value is
    unfolded (each line break and its indentation read as one space).
    """
    end = _header_end(data)
    match = _CALL_ID_RE.search(data, 0, end + 2)
    if match is not None:
        return match.group(1) or None
    match = _CALL_ID_FOLDED_RE.search(data, 0, end + 2)
    if match is None:
        return None
    value = b" ".join(part.strip(b" \t") for part in match.group(1).split(b"\r\n"))
    return value.strip(b" \t") or None


def top_via_branch(data: bytes) -> bytes | None:
    """Return the branch parameter of the topmost Via of a raw message, or None."""
    end = _header_end(data)
    match = _VIA_RE.search(data, 0, end)
    if match is None:
        return None
    branch = _BRANCH_RE.search(match.group(1))
    return None if branch is None else branch.group(1)


def is_response(data: bytes) -> bool:
    """Return whether a raw message is a response (its start line is "SIP/...")."""
    return data[:4].upper() == b"SIP/"
