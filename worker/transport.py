"""Where a worker's messages come from and go to: peers behind load balancer sockets.

A worker owns no socket.  A message reaches it from a load balancer's socket (an
``Inbound`` envelope) and leaves through one (an ``Outbound`` envelope).  A
``Peer`` names the remote end and the load balancer socket in between; it is the
address type the transaction layer carries for the worker.

``SocketDirectory`` knows every load balancer socket of the cluster (from the
membership records) and picks the one a message leaves from; that socket's
advertised address is what the worker writes into Via and Record-Route.
"""

from __future__ import annotations

import ipaddress

from cluster.membership import LBRecord, LBSocket
from cluster.protocol import Peer
from sipcore import Via

__all__ = ["Peer", "SocketDirectory", "is_ip_address", "response_peer"]


def is_ip_address(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (brackets allowed)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def response_peer(request_peer: Peer, via: Via) -> Peer:
    """Where the responses to a request go (RFC 3261 18.2.2, RFC 3581 4).

    Over TCP: back over the connection the request came on.  Over UDP: to the
    address the request came from (the ``received`` address), at the port the
    request came from when the top Via has ``rport`` (RFC 3581), else at the
    sent-by port (default 5060).  The response leaves from the socket the request
    arrived on, so it passes the client's NAT binding.
    """
    if request_peer.reliable:
        return request_peer
    if via.has_rport:
        return request_peer
    port = via.port if via.port is not None else 5060
    if port == request_peer.port and request_peer.connection_id is None:
        return request_peer  # the common case: the request came from its sent-by port
    # Built directly: NamedTuple._replace costs several times more.
    lb_id, socket_id, transport, host = request_peer[:4]
    return Peer(lb_id, socket_id, transport, host, port, None)


class SocketDirectory:
    """Every load balancer socket of the cluster, for choosing where messages leave."""

    def __init__(self) -> None:
        self._lbs: dict[str, LBRecord] = {}
        self._advertised: set[tuple[str, int]] = set()
        self._hosts: set[str] = set()

    def update(self, lbs: dict[str, LBRecord]) -> None:
        """Take the load balancers from the current membership view."""
        self._lbs = dict(lbs)
        self._advertised = set()
        self._hosts = set()
        for record in self._lbs.values():
            for socket in record.sockets:
                for host, port in (
                    (socket.advertise_host, socket.advertise_port),
                    (socket.host, socket.port),
                ):
                    self._advertised.add((host.lower().strip("[]"), port))
                    self._hosts.add(host.lower().strip("[]"))

    @property
    def load_balancers(self) -> dict[str, LBRecord]:
        """The known load balancers by id."""
        return self._lbs

    def socket(self, lb_id: str, socket_id: int) -> LBSocket | None:
        """The socket ``socket_id`` of load balancer ``lb_id``, if known."""
        record = self._lbs.get(lb_id)
        if record is None or not 0 <= socket_id < len(record.sockets):
            return None
        return record.sockets[socket_id]

    def is_own_address(self, host: str, port: int | None) -> bool:
        """Whether host:port is one of the cluster's sockets (advertised or listen).

        With no port, whether the host is one of them (RFC 3261 16.4: a URI
        without a port means the default port, which a socket may well use).
        """
        host = host.lower().strip("[]")
        if port is None:
            return host in self._hosts
        return (host, port) in self._advertised

    def is_own_port(self, port: int) -> bool:
        """Whether one of the cluster's sockets uses ``port`` (advertised or listen)."""
        return any(own_port == port for _, own_port in self._advertised)

    def choose(
        self, transport: str, host: str, preferred: Peer | None = None
    ) -> tuple[str, LBSocket] | None:
        """The (load balancer id, socket) a message to ``host`` over ``transport``
        leaves from.

        The preferred peer's socket when it fits (same transport and address
        family: replies leave from the address the client used); otherwise the
        first socket of a known load balancer that fits; None when none does.
        """
        ipv6 = ":" in host
        if preferred is not None and preferred.transport == transport:
            socket = self.socket(preferred.lb_id, preferred.socket_id)
            if socket is not None and socket.ipv6 == ipv6:
                return preferred.lb_id, socket
        for lb_id in sorted(self._lbs):
            for socket in self._lbs[lb_id].sockets:
                if socket.transport == transport and socket.ipv6 == ipv6:
                    return lb_id, socket
        return None
