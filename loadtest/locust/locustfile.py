"""Locust load test for sipcluster: SIP users over UDP (default) or TCP.

Run it with Locust (README.md in this folder has the commands); never import it
from the server or from pytest: Locust's gevent monkey-patches sockets.

User classes (Locust spreads ``-u`` over them by weight, or name some on the
command line):

* ``Registrar``: registers one address-of-record with digest authentication
  (401, then the authenticated REGISTER, RFC 3261 10.2 and 22.2) and refreshes the
  binding every ``--sip-register-interval`` seconds.
* ``Caller``: a caller and its callee.  The callee registers its own socket's
  address as Contact and answers every INVITE with 180 and 200; the caller sends
  INVITE (answering the proxy's 407, RFC 3261 22.3), ACKs the 200, holds the call
  for ``--sip-hold`` seconds and sends BYE, both along the route set the
  Record-Route of the 200 gives (RFC 3261 12.1.2, 12.2.1.1).
* ``Messenger``: a MESSAGE sender (RFC 3428) and the registered user it writes
  to, which answers 200.

Every transaction is one Locust request of type ``SIP`` named after its method
(``REGISTER``, ``INVITE``, ``BYE``, ``MESSAGE``), timed from the first send to the
final response.  A transaction answered by a digest challenge is reported as
``REGISTER 401`` or ``INVITE 407``/``MESSAGE 407`` (expected, so a success) and
sent again with credentials; any other non-2xx final response, or none within
``--sip-timeout`` seconds, is a failure named after the SIP status.

SIP users are ``<--sip-user-prefix><number>@<--sip-domain>`` with the password
``--sip-password``; each Locust process uses the numbers
``worker_index * --sip-users`` .. ``+ --sip-users - 1`` (a standalone run: 0 ..
``--sip-users - 1``), one per Registrar, two per Caller or Messenger.  Create them
with ``python -m loadtest.locust.users``.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
from gevent.event import AsyncResult
from locust import User, events, task
from locust.exception import StopUser

from sipcore import (
    Challenge,
    MessageFramed,
    Request,
    Response,
    StreamFramer,
    build_credentials,
    make_ack,
    make_response,
    parse_challenge,
    parse_message,
)

log = logging.getLogger("sipcluster.locust")

T1 = 0.5
"""RFC 3261 17.1.1.1: the RTT estimate, the first retransmission interval."""
T2 = 4.0
"""RFC 3261 17.1.2.2: the longest retransmission interval of non-INVITE requests."""

_ANSWERED_KEPT = 256
"""Responses a user agent server keeps to answer retransmitted requests."""


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("sipcluster SIP users")
    group.add_argument(
        "--sip-transport",
        choices=["udp", "tcp"],
        default="udp",
        env_var="LOCUST_SIP_TRANSPORT",
        help="SIP transport (udp)",
    )
    group.add_argument(
        "--sip-domain",
        default="",
        env_var="LOCUST_SIP_DOMAIN",
        help="the users' domain (default: the host of --host)",
    )
    group.add_argument(
        "--sip-user-prefix", default="user", env_var="LOCUST_SIP_USER_PREFIX", help="(user)"
    )
    group.add_argument(
        "--sip-users",
        type=int,
        default=100,
        env_var="LOCUST_SIP_USERS",
        help="SIP users per Locust process (100)",
    )
    group.add_argument(
        "--sip-password", default="secret", env_var="LOCUST_SIP_PASSWORD", help="(secret)"
    )
    group.add_argument(
        "--sip-hold", type=float, default=1.0, env_var="LOCUST_SIP_HOLD", help="call hold, s (1)"
    )
    group.add_argument(
        "--sip-pause",
        type=float,
        default=1.0,
        env_var="LOCUST_SIP_PAUSE",
        help="pause between a Caller's calls and a Messenger's messages, s (1)",
    )
    group.add_argument(
        "--sip-register-interval",
        type=float,
        default=5.0,
        env_var="LOCUST_SIP_REGISTER_INTERVAL",
        help="a Registrar's refresh interval, s (5)",
    )
    group.add_argument(
        "--sip-expires",
        type=int,
        default=300,
        env_var="LOCUST_SIP_EXPIRES",
        help="Expires of every REGISTER, s (300)",
    )
    group.add_argument(
        "--sip-timeout",
        type=float,
        default=5.0,
        env_var="LOCUST_SIP_TIMEOUT",
        help="how long a transaction waits for its final response, s (5)",
    )


class SipError(Exception):
    """A failed transaction; Locust groups failures by this text."""


def _report(environment, method: str, started: float, response: Response | None, timeout: float):
    """One Locust request for a transaction: a success for a 2xx (and for an
    expected challenge, whose name then carries the status), else a failure
    naming the SIP status."""
    if response is None:
        error: str | None = f"no final response in {timeout:g} s"
    elif 200 <= response.status < 300 or method.endswith((" 401", " 407")):
        error = None
    else:
        error = f"{response.status} {response.reason}"
    environment.events.request.fire(
        request_type="SIP",
        name=method,
        response_time=(time.perf_counter() - started) * 1000.0,
        response_length=0 if response is None else len(response.body),
        response=None,
        context={},
        exception=None if error is None else SipError(error),
    )


def _target(host: str | None) -> tuple[str, int]:
    """The proxy's address from Locust's --host: sip:HOST:PORT, HOST:PORT, [v6]:PORT,
    or HOST (port 5060)."""
    text = (host or "127.0.0.1:5060").strip()
    for scheme in ("sip:", "sips:", "udp://", "tcp://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
    text = text.split(";", 1)[0].rstrip("/")
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
        return address, int(port) if port else 5060
    if text.count(":") == 1:
        address, _, port = text.partition(":")
        return address, int(port)
    return text, 5060


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Pool:
    """The SIP user numbers of this Locust process, each held by one Locust user."""

    def __init__(self) -> None:
        self.free: list[int] | None = None

    def take(self, environment) -> int:
        options = environment.parsed_options
        if self.free is None:
            worker_index = getattr(environment.runner, "worker_index", 0) or 0
            first = worker_index * options.sip_users
            self.free = list(range(first + options.sip_users - 1, first - 1, -1))
        if not self.free:
            log.error("all %d SIP users are taken: raise --sip-users", options.sip_users)
            raise StopUser
        return self.free.pop()

    def give_back(self, number: int) -> None:
        if self.free is not None:
            self.free.append(number)


_POOL = _Pool()


@dataclass
class _Nonce:
    """A realm's latest challenge and how many requests used its nonce (nc)."""

    challenge: Challenge
    count: int = 0


@dataclass
class _Pending:
    """A client transaction waiting for its final response."""

    provisional: bool = False
    final: AsyncResult = field(default_factory=AsyncResult)


class SipAgent:
    """One SIP user agent: a socket towards the proxy, digest credentials, a user
    agent client that retransmits over UDP (RFC 3261 17.1) and a user agent server
    that answers INVITE (180, 200), BYE, MESSAGE, OPTIONS and CANCEL."""

    def __init__(self, environment, number: int) -> None:
        options = environment.parsed_options
        self.environment = environment
        self.proxy = _target(environment.host)
        self.transport = options.sip_transport
        self.timeout = options.sip_timeout
        self.password = options.sip_password
        self.user = f"{options.sip_user_prefix}{number:04d}"
        self.domain = (options.sip_domain or self.proxy[0]).lower()
        self.number = number
        family = socket.AF_INET6 if ":" in self.proxy[0] else socket.AF_INET
        if self.transport == "udp":
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        else:
            self.sock = socket.create_connection(self.proxy, timeout=self.timeout)
            self.sock.settimeout(None)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host, self.port = self.sock.getsockname()[:2]
        self.tag = secrets.token_hex(4)
        self.cseq = 0
        self.closed = False
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._nonces: dict[str, _Nonce] = {}  # by the header that answers it
        self._answered: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._unacked: dict[str, gevent.Greenlet] = {}  # Call-ID -> 2xx retransmitter
        self._acks: OrderedDict[str, bytes] = OrderedDict()  # Call-ID -> ACK of a 2xx
        self._reader = gevent.spawn(self._read)

    # ---------------------------------------------------------------- transport

    @property
    def aor(self) -> str:
        return f"{self.user}@{self.domain}"

    @property
    def contact(self) -> str:
        suffix = ";transport=tcp" if self.transport == "tcp" else ""
        return f"<sip:{self.user}@{_uri_host(self.host)}:{self.port}{suffix}>"

    def send(self, data: bytes, destination: tuple[str, int] | None = None) -> None:
        """Send to ``destination`` (UDP; default: the proxy) or over our connection."""
        if self.closed:
            return
        try:
            if self.transport == "udp":
                self.sock.sendto(data, destination or self.proxy)
            else:
                self.sock.sendall(data)
        except OSError as error:
            log.debug("%s: send failed: %s", self.aor, error)

    def close(self) -> None:
        self.closed = True
        for greenlet in list(self._unacked.values()):
            greenlet.kill(block=False)
        self._reader.kill(block=False)
        self.sock.close()
        for pending in list(self._pending.values()):
            if not pending.final.ready():
                pending.final.set(None)

    def _read(self) -> None:
        framer = StreamFramer()
        while not self.closed:
            try:
                if self.transport == "udp":
                    data, source = self.sock.recvfrom(65536)
                    self._received(data, source[:2])
                    continue
                data = self.sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            framer.receive_data(data)
            while (event := framer.next_event()) is not None:
                if isinstance(event, MessageFramed):
                    self._received(event.data, None)
        self.closed = True
        for pending in list(self._pending.values()):
            if not pending.final.ready():
                pending.final.set(None)

    def _received(self, data: bytes, source: tuple[str, int] | None) -> None:
        if not data.strip(b"\r\n"):
            return  # a keepalive (RFC 5626 4.4.1)
        try:
            message = parse_message(data, datagram=self.transport == "udp")
            if isinstance(message, Response):
                self._response(message)
            else:
                self._request(message, source)
        except Exception as error:
            log.warning("%s: dropped a message: %s", self.aor, error)

    # ---------------------------------------------------------------- client side

    def new_request(
        self,
        method: str,
        uri: str,
        *,
        to: str,
        call_id: str,
        cseq: int | None = None,
        to_tag: str | None = None,
        routes: list[str] | None = None,
        headers: list[tuple[str, object]] | None = None,
        body: bytes = b"",
    ) -> Request:
        """A request from this user (RFC 3261 8.1.1), with a new branch."""
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        branch = "z9hG4bK" + secrets.token_hex(8)
        fields: list[tuple[str, object]] = [
            (
                "Via",
                f"SIP/2.0/{self.transport.upper()} {_uri_host(self.host)}:{self.port}"
                f";branch={branch};rport",
            ),
            ("Max-Forwards", 70),
            ("From", f"<sip:{self.aor}>;tag={self.tag}"),
            ("To", f"<{to}>" + (f";tag={to_tag}" if to_tag else "")),
            ("Call-ID", call_id),
            ("CSeq", f"{cseq} {method}"),
            *(("Route", route) for route in routes or ()),
            *(headers or []),
        ]
        return Request(method, uri, fields, body)

    def transact(self, request: Request) -> Response | None:
        """Send ``request`` and return its final response (None: no final response
        within the timeout, or the connection closed).  Over UDP the request is
        retransmitted: INVITE until a provisional response (Timer A, 17.1.1.2),
        others until the final one, at most every T2 (Timer E, 17.1.2.2)."""
        branch = request.via.branch or ""
        key = (branch, request.method)
        pending = _Pending()
        self._pending[key] = pending
        data = request.to_bytes()
        deadline = time.monotonic() + self.timeout
        interval = T1
        try:
            self.send(data)
            while not pending.final.ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    return None
                wait = remaining if self.transport == "tcp" else min(interval, remaining)
                if pending.final.wait(wait) is not None or pending.final.ready():
                    break
                if self.transport == "udp":
                    if request.method != "INVITE":
                        self.send(data)
                        interval = T2 if pending.provisional else min(interval * 2, T2)
                    elif not pending.provisional:
                        self.send(data)
                        interval *= 2
                    else:
                        interval = remaining
            result: Response | None = pending.final.get()
            if result is not None and request.method == "INVITE" and result.status >= 300:
                # 17.1.1.3: the client transaction ACKs a non-2xx final response.
                self.send(make_ack(request, result).to_bytes())
            return result
        finally:
            del self._pending[key]

    def _response(self, response: Response) -> None:
        key = (response.via.branch or "", response.cseq.method)
        pending = self._pending.get(key)
        if pending is None:
            # A retransmitted 2xx to an INVITE: the UAC sends its ACK again
            # (RFC 3261 13.2.2.4).
            if response.cseq.method == "INVITE" and 200 <= response.status < 300:
                ack = self._acks.get(response.call_id)
                if ack is not None:
                    self.send(ack)
            return
        if response.status < 200:
            pending.provisional = True
        elif not pending.final.ready():
            pending.final.set(response)

    def _authorize(self, request: Request) -> None:
        """Credentials for the realms that challenged us before (RFC 3261 22.2, 22.3:
        a UA may send them preemptively; nc counts the uses of a nonce)."""
        for header, nonce in self._nonces.items():
            nonce.count += 1
            credentials = build_credentials(
                nonce.challenge,
                username=self.user,
                password=self.password,
                method=request.method,
                uri=request.uri_text,
                cnonce=secrets.token_hex(8),
                nc=nonce.count,
            )
            request.add(header, str(credentials))

    def authenticated(
        self, name: str, build: Callable[[], Request]
    ) -> tuple[Request, Response | None]:
        """Send the request ``build`` makes, with credentials when a realm challenged
        us before; on a 401/407, learn the challenge and send a new one once
        (RFC 3261 22.2: a new CSeq, same Call-ID).  Reports every transaction."""
        request = build()
        self._authorize(request)
        started = time.perf_counter()
        response = self.transact(request)
        if response is not None and response.status in (401, 407):
            header = "WWW-Authenticate" if response.status == 401 else "Proxy-Authenticate"
            values = response.get_all(header)
            if values:
                _report(self.environment, f"{name} {response.status}", started, response, 0)
                answer = "Authorization" if response.status == 401 else "Proxy-Authorization"
                self._nonces[answer] = _Nonce(parse_challenge(values[0]))
                request = build()
                self._authorize(request)
                started = time.perf_counter()
                response = self.transact(request)
        _report(self.environment, name, started, response, self.timeout)
        return request, response

    def register(self, expires: int, contact: str | None = None) -> bool:
        """REGISTER our Contact (or ``contact``, e.g. ``*`` with Expires 0 to clear
        every binding, RFC 3261 10.2.2); whether a 2xx came back."""
        call_id = f"reg-{self.user}-{self.tag}@locust"  # one Call-ID per UA (10.2)

        def build() -> Request:
            return self.new_request(
                "REGISTER",
                f"sip:{_uri_host(self.domain)}",
                to=f"sip:{self.aor}",
                call_id=call_id,
                headers=[("Contact", contact or self.contact), ("Expires", expires)],
            )

        _, response = self.authenticated("REGISTER", build)
        return response is not None and 200 <= response.status < 300

    # ---------------------------------------------------------------- server side

    def _request(self, request: Request, source: tuple[str, int] | None) -> None:
        key = (request.via.branch or "", request.method)
        if request.method == "ACK":
            # The ACK of our 2xx ends its retransmissions (RFC 3261 13.3.1.4).
            greenlet = self._unacked.pop(request.call_id, None)
            if greenlet is not None:
                greenlet.kill(block=False)
            return
        answered = self._answered.get(key)
        if answered is not None:
            self.send(answered, source)  # a retransmission (17.2.1, 17.2.2)
            return
        if request.method == "INVITE":
            # 12.1.1: the UAS copies Record-Route into its 2xx and puts a Contact.
            record_route = [("Record-Route", value) for value in request.get_all("Record-Route")]
            self._answer(request, source, 180, record_route)
            ok = self._answer(request, source, 200, [*record_route, ("Contact", self.contact)])
            if self.transport == "udp":
                self._unacked[request.call_id] = gevent.spawn(
                    self._retransmit_2xx, ok, request, source
                )
        elif request.method in ("BYE", "CANCEL"):
            greenlet = self._unacked.pop(request.call_id, None)
            if greenlet is not None:
                greenlet.kill(block=False)
            self._answer(request, source, 200)
        elif request.method in ("MESSAGE", "OPTIONS"):
            self._answer(request, source, 200)
        else:
            self._answer(request, source, 501)

    def _answer(
        self,
        request: Request,
        source: tuple[str, int] | None,
        status: int,
        headers: list[tuple[str, object]] | None = None,
    ) -> bytes:
        """Answer ``request``; over UDP to where it came from: the proxy, whose Via
        is the top one (RFC 3261 18.2.2; RFC 3581, symmetric response routing)."""
        response = make_response(request, status, to_tag=self.tag, headers=headers or [])
        data = response.to_bytes()
        if status >= 200:
            self._answered[(request.via.branch or "", request.method)] = data
            while len(self._answered) > _ANSWERED_KEPT:
                self._answered.popitem(last=False)
        self.send(data, source)
        return data

    def _retransmit_2xx(
        self, data: bytes, request: Request, source: tuple[str, int] | None
    ) -> None:
        """RFC 3261 13.3.1.4: the 2xx goes again at T1, 2*T1 ... at most T2 apart
        until the ACK comes, for 64*T1 at most."""
        interval, waited = T1, 0.0
        while waited < 64 * T1 and not self.closed:
            gevent.sleep(interval)
            waited += interval
            if request.call_id not in self._unacked:
                return
            self.send(data, source)
            interval = min(interval * 2, T2)
        self._unacked.pop(request.call_id, None)

    # ---------------------------------------------------------------- dialogs

    def call(self, callee: str, hold: float) -> None:
        """INVITE ``callee``, ACK its 200, hold, BYE; reports INVITE and BYE."""
        call_id = f"{secrets.token_hex(8)}@locust"
        target = f"sip:{callee}"
        offer = _sdp(self.host, self.port)

        def build() -> Request:
            return self.new_request(
                "INVITE",
                target,
                to=target,
                call_id=call_id,
                headers=[("Contact", self.contact), ("Content-Type", "application/sdp")],
                body=offer,
            )

        invite, response = self.authenticated("INVITE", build)
        if response is None or not 200 <= response.status < 300:
            return
        # 12.1.2: the route set is the Record-Route of the 2xx, reversed; the remote
        # target its Contact; the remote tag its To tag.
        routes = list(reversed(response.values("Record-Route")))
        contacts = response.contacts
        remote_target = str(contacts[0].uri) if contacts else target
        remote_tag = response.to.tag
        # 13.2.2.4: the ACK of a 2xx has the INVITE's CSeq number and is built like
        # a request within the dialog (12.2.1.1: loose routing, Route = route set).
        ack = self.new_request(
            "ACK",
            remote_target,
            to=target,
            call_id=call_id,
            cseq=invite.cseq.number,
            to_tag=remote_tag,
            routes=routes,
        )
        ack_data = ack.to_bytes()
        self._acks[call_id] = ack_data
        while len(self._acks) > 64:
            self._acks.popitem(last=False)
        self.send(ack_data)
        gevent.sleep(hold)
        bye = self.new_request(
            "BYE", remote_target, to=target, call_id=call_id, to_tag=remote_tag, routes=routes
        )
        started = time.perf_counter()
        answer = self.transact(bye)
        self._acks.pop(call_id, None)
        _report(self.environment, "BYE", started, answer, self.timeout)

    def message(self, recipient: str, text: str) -> None:
        """Send a MESSAGE (RFC 3428) to ``recipient``; reports it."""
        call_id = f"{secrets.token_hex(8)}@locust"  # 3428 section 4: a new Call-ID
        target = f"sip:{recipient}"

        def build() -> Request:
            return self.new_request(
                "MESSAGE",
                target,
                to=target,
                call_id=call_id,
                headers=[("Content-Type", "text/plain")],
                body=text.encode(),
            )

        self.authenticated("MESSAGE", build)


def _sdp(host: str, port: int) -> bytes:
    """A small audio offer (RFC 4566); nothing ever listens on its media port."""
    family = "IP6" if ":" in host else "IP4"
    return (
        f"v=0\r\no=locust 1 1 IN {family} {host}\r\ns=-\r\nc=IN {family} {host}\r\n"
        f"t=0 0\r\nm=audio {port + 1} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    ).encode()


class _SipUser(User):
    """Common to the user classes: SIP user agents over numbers from the pool."""

    abstract = True

    def on_start(self) -> None:
        self.agents: list[SipAgent] = []
        self.numbers: list[int] = []
        self.refresher: gevent.Greenlet | None = None

    def agent(self) -> SipAgent:
        number = _POOL.take(self.environment)
        self.numbers.append(number)
        agent = SipAgent(self.environment, number)
        self.agents.append(agent)
        return agent

    def registered(self, agent: SipAgent) -> None:
        """Clear the bindings earlier runs left (RFC 3261 10.2.2), then register."""
        options = self.environment.parsed_options
        agent.register(0, contact="*")
        agent.register(options.sip_expires)

    def keep_registered(self, agent: SipAgent) -> None:
        """Refresh ``agent``'s binding at half its lifetime (RFC 3261 10.2.4)."""
        expires = self.environment.parsed_options.sip_expires

        def refresh() -> None:
            while not agent.closed:
                gevent.sleep(max(expires / 2, 1.0))
                agent.register(expires)

        self.refresher = gevent.spawn(refresh)

    def on_stop(self) -> None:
        if self.refresher is not None:
            self.refresher.kill(block=False)
        for agent in self.agents:
            agent.close()
        for number in self.numbers:
            _POOL.give_back(number)
        self.agents, self.numbers = [], []


class Registrar(_SipUser):
    """Registers with digest and refreshes every ``--sip-register-interval`` s."""

    weight = 1

    def wait_time(self) -> float:
        return float(self.environment.parsed_options.sip_register_interval)

    def on_start(self) -> None:
        super().on_start()
        self.ua = self.agent()
        self.ua.register(0, contact="*")

    @task
    def register(self) -> None:
        self.ua.register(self.environment.parsed_options.sip_expires)


class Caller(_SipUser):
    """Calls its own registered callee: INVITE, 180, 200, ACK, hold, BYE."""

    weight = 1

    def wait_time(self) -> float:
        return float(self.environment.parsed_options.sip_pause)

    def on_start(self) -> None:
        super().on_start()
        self.callee = self.agent()
        self.caller = self.agent()
        self.registered(self.callee)
        self.keep_registered(self.callee)

    @task
    def call(self) -> None:
        self.caller.call(self.callee.aor, self.environment.parsed_options.sip_hold)


class Messenger(_SipUser):
    """Sends MESSAGE requests to its own registered recipient, which answers 200."""

    weight = 1

    def wait_time(self) -> float:
        return float(self.environment.parsed_options.sip_pause)

    def on_start(self) -> None:
        super().on_start()
        self.recipient = self.agent()
        self.sender = self.agent()
        self.registered(self.recipient)
        self.keep_registered(self.recipient)
        self.sequence = 0

    @task
    def message(self) -> None:
        self.sequence += 1
        self.sender.message(self.recipient.aor, f"message {self.sequence} from {self.sender.aor}")
