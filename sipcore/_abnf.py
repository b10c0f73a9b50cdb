"""The RFC 3261 section 25 grammar, as regular expressions.

Each pattern sits under the ABNF rule it implements.  Patterns work on ``str``
values decoded from the wire with UTF-8 and ``surrogateescape``, so that every
byte survives a round trip.  Case-insensitive literals of the ABNF ("SIP", "sip:")
use inline ``(?i:...)`` groups.
"""

from __future__ import annotations

import re

# alphanum   =  ALPHA / DIGIT
# mark       =  "-" / "_" / "." / "!" / "~" / "*" / "'" / "(" / ")"
# unreserved =  alphanum / mark
# escaped    =  "%" HEXDIG HEXDIG
UNRESERVED = r"A-Za-z0-9\-_.!~*'()"
ESCAPED = r"%[0-9A-Fa-f]{2}"

# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~" )
TOKEN_CHARS = r"A-Za-z0-9\-.!%*_+`'~"
TOKEN = rf"[{TOKEN_CHARS}]+"
TOKEN_RE = re.compile(TOKEN)

# Method = INVITEm / ACKm / ... / extension-method ; extension-method = token
METHOD_RE = re.compile(TOKEN)

# SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT   ("SIP" is case-insensitive in ABNF)
SIP_VERSION_RE = re.compile(r"(?i:SIP)/([0-9]+)\.([0-9]+)")

# Status-Code = 3DIGIT ; Reason-Phrase = *(reserved / unreserved / escaped
#               / UTF8-NONASCII / UTF8-CONT / SP / HTAB)
# The reason phrase is kept as received: we only require it to hold no CR/LF.
STATUS_LINE_RE = re.compile(r"((?i:SIP)/[0-9]+\.[0-9]+) ([0-9]{3}) ([^\r\n]*)")

# user     = 1*( unreserved / escaped / user-unreserved )
# user-unreserved = "&" / "=" / "+" / "$" / "," / ";" / "?" / "/"
USER_RE = re.compile(rf"(?:[{UNRESERVED}&=+$,;?/]|{ESCAPED})+")
# password = *( unreserved / escaped / "&" / "=" / "+" / "$" / "," )
PASSWORD_RE = re.compile(rf"(?:[{UNRESERVED}&=+$,]|{ESCAPED})*")

# hostname    = *( domainlabel "." ) toplabel [ "." ]
# domainlabel = alphanum / alphanum *( alphanum / "-" ) alphanum
# toplabel    = ALPHA / ALPHA *( alphanum / "-" ) alphanum
# Deployed SIP uses underscores and digit-led top labels in host names, so labels
# accept "_" and a leading digit; an all-numeric dotted name must be an IPv4address.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_\-]*[A-Za-z0-9_])?"
HOSTNAME_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")
# IPv4address = 1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT
IPV4_RE = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")
# ... with each octet at most 255
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_ADDRESS_RE = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
# host = hostname / IPv4address / IPv6reference, in the shape a single pass can
# check; _uri._check_host does the rest (octet ranges, IPv6 syntax).
HOSTNAME_OR_ADDRESS_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*\.?")
# IPv6reference = "[" IPv6address "]"   (the address itself is checked by ipaddress)
IPV6_REFERENCE_RE = re.compile(r"\[([0-9A-Fa-f:.]+)\]")

# uri-parameter = transport-param / user-param / method-param / ttl-param
#                 / maddr-param / lr-param / other-param
# other-param   = pname [ "=" pvalue ] ; pname = 1*paramchar ; pvalue = 1*paramchar
# paramchar     = param-unreserved / unreserved / escaped
# param-unreserved = "[" / "]" / "/" / ":" / "&" / "+" / "$"
PARAMCHARS_RE = re.compile(rf"(?:[{UNRESERVED}\[\]/:&+$]|{ESCAPED})+")
# header = hname "=" hvalue ; hname = 1*( hnv-unreserved / unreserved / escaped )
# hvalue = *( hnv-unreserved / unreserved / escaped )
# hnv-unreserved = "[" / "]" / "/" / "?" / ":" / "+" / "$"
HNAME_RE = re.compile(rf"(?:[{UNRESERVED}\[\]/?:+$]|{ESCAPED})+")
HVALUE_RE = re.compile(rf"(?:[{UNRESERVED}\[\]/?:+$]|{ESCAPED})*")

# absoluteURI = scheme ":" ( hier-part / opaque-part )
# scheme      = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
# The rest is kept opaque; it may hold any visible character.
SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
OPAQUE_RE = re.compile(r"[!-~\x80-\U0010ffff]+")

# telephone-subscriber (RFC 3966 3): global-number / local-number
# global-number-digits = "+" *phonedigit DIGIT *phonedigit
# local-number-digits  = *phonedigit-hex (HEXDIG / "*" / "#") *phonedigit-hex
# visual-separator     = "-" / "." / "(" / ")"
TEL_NUMBER_RE = re.compile(
    r"\+[0-9\-.()]*[0-9][0-9\-.()]*|[0-9A-Fa-f*#\-.()]*[0-9A-Fa-f*#][0-9A-Fa-f*#\-.()]*"
)

# quoted-string = SWS DQUOTE *(qdtext / quoted-pair ) DQUOTE
# qdtext        = LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII
# quoted-pair   = "\" (%x00-09 / %x0B-0C / %x0E-7F)
QUOTED_STRING = r'"(?:[^"\\\r\n]|\\[\x00-\x09\x0b\x0c\x0e-\x7f])*"'
QUOTED_STRING_RE = re.compile(QUOTED_STRING)
QUOTED_PAIR_RE = re.compile(r"\\([\x00-\x09\x0b\x0c\x0e-\x7f])")

# gen-value = token / host / quoted-string; and an IPv6address without brackets,
# which via-received allows (via-received = "received" EQUAL (IPv4address /
# IPv6address), RFC 3261 25.1; the value is checked where it is read).
GEN_VALUE_RE = re.compile(
    rf'{TOKEN}|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+|"(?:[^"\\\r\n]|\\[\x00-\x09\x0b\x0c\x0e-\x7f])*"'
)

# sent-protocol = protocol-name SLASH protocol-version SLASH transport
# SLASH = SWS "/" SWS ; protocol-name = "SIP" / token ; protocol-version = token
# transport = "UDP" / "TCP" / "TLS" / "SCTP" / other-transport ; other-transport = token
# via-parm = sent-protocol LWS sent-by *( SEMI via-params )
# sent-by  = host [ COLON port ]
VIA_RE = re.compile(
    rf"({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]+"
    r"(\[[0-9A-Fa-f:.]+\]|[^ \t;:\[\]]+)(?:[ \t]*:[ \t]*([0-9]+))?[ \t]*(;.*)?",
    re.DOTALL,
)

# CSeq = "CSeq" HCOLON 1*DIGIT LWS Method
CSEQ_RE = re.compile(rf"([0-9]+)[ \t]+({TOKEN})")

# delta-seconds = 1*DIGIT
DIGITS_RE = re.compile(r"[0-9]+")

# qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
QVALUE_RE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")

# m-type "/" m-subtype, each a token (RFC 3261 20.15)
MEDIA_TYPE_RE = re.compile(rf"({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]*(;.*)?", re.DOTALL)

# Header line: field-name HCOLON field-value ; HCOLON = *( SP / HTAB ) ":" SWS
HEADER_NAME_RE = re.compile(rf"{TOKEN}")

# LWS = [*WSP CRLF] 1*WSP : a folded line continues the previous one.
FOLD_RE = re.compile(r"[ \t]*\r\n[ \t]+")
