"""Sample messages for the benchmarks: what a softphone sends, byte for byte."""

from __future__ import annotations

_SDP = (
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 192.0.2.101\r\n"
    b"s=-\r\n"
    b"c=IN IP4 192.0.2.101\r\n"
    b"t=0 0\r\n"
    b"m=audio 49172 RTP/AVP 0 8 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=sendrecv\r\n"
)

# A typical INVITE as a softphone sends it to its proxy: about 800 bytes.
INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.101:5060;branch=z9hG4bK776asdhds;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"Route: <sip:proxy.example.com;lr>\r\n"
    b"To: Bob <sip:bob@example.com>\r\n"
    b'From: "Alice" <sip:alice@example.com>;tag=1928301774\r\n'
    b"Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@192.0.2.101:5060;transport=udp>\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, NOTIFY, REFER, INFO\r\n"
    b"Supported: replaces, timer, outbound\r\n"
    b"User-Agent: ExamplePhone/5.1.2\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: " + str(len(_SDP)).encode() + b"\r\n"
    b"\r\n" + _SDP
)

REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.101:5060;branch=z9hG4bKnashds7;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: <sip:alice@example.com>\r\n"
    b"From: <sip:alice@example.com>;tag=456248\r\n"
    b"Call-ID: 843817637684230@998sdasdh09\r\n"
    b"CSeq: 1826 REGISTER\r\n"
    b"Contact: <sip:alice@192.0.2.101:5060>\r\n"
    b"Expires: 3600\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def distinct_invites(count: int, users: int = 1000) -> list[bytes]:
    """``count`` INVITEs like INVITE, each with its own Call-ID, branch and From tag,
    between callers and callees drawn from ``users`` accounts: the values a worker
    sees once per call are new each time, those of the user base recur."""
    messages = []
    for index in range(count):
        caller = f"user{index % users:04d}".encode()
        callee = f"user{(index * 7 + 3) % users:04d}".encode()
        message = (
            INVITE.replace(b"a84b4c76e66710", b"%014x" % (0xA84B4C76E66710 + index))
            .replace(b"z9hG4bK776asdhds", b"z9hG4bK%09x" % index)
            .replace(b"tag=1928301774", b"tag=%010d" % (1928301774 + index))
            .replace(b"sip:alice@", b"sip:" + caller + b"@")
            .replace(b"sip:bob@", b"sip:" + callee + b"@")
            .replace(b"<sip:alice@", b"<sip:" + caller + b"@")
        )
        messages.append(message)
    return messages
