"""The server's part in the tunnels: certificates, who dials whom, and who may be dialled.

- Certificates: a proxy that accepts tunnels sends a CSR in its hello and gets a certificate for
  its id; a node on the tunnel data plane sends one in its hello and gets a short-lived
  certificate for the node id of its authenticated link, renewed while it stays connected.
- The proxy set: every connected proxy's tunnel address goes to every tunnel node, after its
  welcome and again whenever a proxy comes or goes. With several servers, each publishes its own
  proxies through the server registry and adds the others' (`set_remote_proxies`), so a node
  dials every proxy of the control plane whichever server holds its session.
- Admission: proxies learn which node ids may hold a tunnel (every node the fleet knows); a node
  that is removed is withdrawn at once, and proxies drop its tunnel.

Called from small hooks in `app.py` (proxy hello) and `node_session.py` (node hello, heartbeats,
goodbye); the route feed carries the admission messages to proxies.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio
from cryptography.hazmat.primitives.asymmetric import ec

from vectorlay.core.protocol import (
    TUNNEL,
    AdmittedNodes,
    Message,
    NodeHello,
    ProxyHello,
    TunnelCredential,
    TunnelProxies,
    TunnelProxy,
)
from vectorlay.server.fleet import Fleet
from vectorlay.server.route_feed import ProxyConnection, RouteFeed
from vectorlay.server.sessions import NodeSession
from vectorlay.server.signals import Signals
from vectorlay.server.tunnel_ca import NODE_CERT_VALID_S, PROXY_CERT_VALID_S, RENEW_AT, TunnelCa
from vectorlay.wire import Link

log = logging.getLogger("vectorlay.server")


@dataclass
class _Node:
    session: NodeSession
    key: ec.EllipticCurvePublicKey


@dataclass
class _Proxy:
    proxy: TunnelProxy
    key: ec.EllipticCurvePublicKey
    link: Link


class TunnelService:
    def __init__(self, ca: TunnelCa, fleet: Fleet, signals: Signals, feed: RouteFeed,
                 wall_clock: Callable[[], float]) -> None:
        self.ca = ca
        self.fleet = fleet
        self.signals = signals
        self.feed = feed
        self.wall_clock = wall_clock
        self.nodes: dict[str, _Node] = {}  # connected nodes on the tunnel data plane
        self.proxies: dict[str, _Proxy] = {}  # connected proxies that accept tunnels, by id
        self.remote_proxies: tuple[TunnelProxy, ...] = ()  # those connected to the other servers
        self._sent: TunnelProxies | None = None  # the list nodes were last given
        self.admitted: frozenset[str] = frozenset()
        self._renewals: list[tuple[float, int, str, str, object]] = []  # (due, seq, kind, id, holder)
        self._sequence = 0
        self._wake = trio.Event()
        feed.on_proxy_connected.append(self._admission_snapshot)

    # ---- nodes ----

    def node_key(self, hello: NodeHello) -> ec.EllipticCurvePublicKey | None:
        """The key to certify for a node's hello (None on the direct data plane); ProtocolError
        for a CSR we will not sign. Checked before the node is welcomed."""
        return self.ca.requested_key(hello.tunnel_csr) if hello.data_plane == TUNNEL else None

    def node_connected(self, node_id: str, session: NodeSession, key: ec.EllipticCurvePublicKey | None,
                       data_plane_changed: bool) -> None:
        """After the welcome: the node's certificate and the proxies to dial."""
        if data_plane_changed:
            for cluster in self.fleet.clusters_on_node(node_id):
                self.signals.mark_route(cluster)  # its endpoints are reached another way now
        if key is None:
            self.nodes.pop(node_id, None)
            return
        self.nodes[node_id] = _Node(session, key)
        self._send_node_credential(node_id)
        session.send_nowait(self._proxy_list())

    def node_disconnected(self, node_id: str, session: NodeSession) -> None:
        entry = self.nodes.get(node_id)
        if entry is not None and entry.session is session:
            del self.nodes[node_id]

    def _send_node_credential(self, node_id: str) -> None:
        entry = self.nodes[node_id]
        now = self.wall_clock()
        certificate = self.ca.issue_node(entry.key, node_id, now)
        entry.session.send_nowait(TunnelCredential(certificate, self.ca.pem, now + NODE_CERT_VALID_S))
        self._schedule(NODE_CERT_VALID_S * RENEW_AT, "node", node_id, entry)

    # ---- proxies ----

    def proxy_credential(self, hello: ProxyHello) -> TunnelCredential | None:
        """The certificate for a proxy that accepts tunnels (None if it does not); ProtocolError
        for a CSR we will not sign."""
        if not hello.tunnel_id:
            return None
        key = self.ca.requested_key(hello.tunnel_csr)
        return self._proxy_certificate(key, hello.tunnel_id)

    def _proxy_certificate(self, key: ec.EllipticCurvePublicKey, proxy_id: str) -> TunnelCredential:
        now = self.wall_clock()
        return TunnelCredential(self.ca.issue_proxy(key, proxy_id, now), self.ca.pem, now + PROXY_CERT_VALID_S)

    @contextmanager
    def proxy_connected(self, hello: ProxyHello, link: Link) -> Iterator[None]:
        """While a proxy's link is up, nodes are told to keep a tunnel to it."""
        if not hello.tunnel_id:
            yield
            return
        address = reachable_address(hello.tunnel_address, link.remote)
        entry = _Proxy(TunnelProxy(hello.tunnel_id, address), self.ca.requested_key(hello.tunnel_csr), link)
        self.proxies[hello.tunnel_id] = entry
        log.info("proxy %s accepts tunnels at %s", hello.tunnel_id, address)
        self._proxies_changed()
        self._schedule(PROXY_CERT_VALID_S * RENEW_AT, "proxy", hello.tunnel_id, entry)
        try:
            yield
        finally:
            if self.proxies.get(hello.tunnel_id) is entry:
                del self.proxies[hello.tunnel_id]
                self._proxies_changed()

    def local_proxies(self) -> list[tuple[str, str]]:
        """(id, address) of the tunnel proxies connected here, for the other servers."""
        return [(entry.proxy.id, entry.proxy.address) for _, entry in sorted(self.proxies.items())]

    def set_remote_proxies(self, proxies: tuple[tuple[str, str], ...]) -> None:
        """The tunnel proxies connected to the other live servers (from the server registry)."""
        remote = tuple(TunnelProxy(i, a) for i, a in sorted(set(proxies)))
        if remote != self.remote_proxies:
            self.remote_proxies = remote
            self._proxies_changed()

    def _proxy_list(self) -> TunnelProxies:
        local = [entry.proxy for _, entry in sorted(self.proxies.items())]
        remote = [p for p in self.remote_proxies if p.id not in self.proxies]
        return TunnelProxies(tuple(sorted(local + remote, key=lambda p: p.id)))

    def _proxies_changed(self) -> None:
        message = self._proxy_list()
        if message == self._sent:
            return
        self._sent = message
        for entry in self.nodes.values():
            entry.session.send_nowait(message)

    # ---- admission ----

    def _admission_snapshot(self, proxy: ProxyConnection) -> None:
        if any(entry.link is proxy.link for entry in self.proxies.values()):
            proxy.send_nowait(AdmittedNodes(tuple(sorted(self.admitted)), snapshot=True))

    def _broadcast_to_tunnel_proxies(self, message: Message) -> None:
        links = {id(entry.link) for entry in self.proxies.values()}
        for proxy in list(self.feed.proxies):
            if id(proxy.link) in links:
                proxy.send_nowait(message)

    def _update_admission(self) -> None:
        current = frozenset(self.fleet.nodes)
        if current == self.admitted:
            return
        added, removed = current - self.admitted, self.admitted - current
        self.admitted = current
        self._broadcast_to_tunnel_proxies(AdmittedNodes(tuple(sorted(added)), tuple(sorted(removed))))

    # ---- running ----

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.admitted = frozenset(self.fleet.nodes)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_admission)
            nursery.start_soon(self._renew)
            task_status.started()

    async def _follow_admission(self) -> None:
        """Every change the writer announces may add or remove nodes (join, `node rm`)."""
        while True:
            await self.signals.wait_changed()
            self._update_admission()

    def _schedule(self, after_s: float, kind: str, ident: str, holder: object) -> None:
        self._sequence += 1
        heapq.heappush(self._renewals, (trio.current_time() + after_s, self._sequence, kind, ident, holder))
        self._wake.set()

    async def _renew(self) -> None:
        """Renew certificates at half their life, for as long as their holder stays connected."""
        while True:
            now = trio.current_time()
            while self._renewals and self._renewals[0][0] <= now:
                _, _, kind, ident, holder = heapq.heappop(self._renewals)
                if kind == "node" and self.nodes.get(ident) is holder:
                    self._send_node_credential(ident)
                elif kind == "proxy" and self.proxies.get(ident) is holder:
                    assert isinstance(holder, _Proxy)
                    self._broadcast_to_link(holder.link, self._proxy_certificate(holder.key, ident))
                    self._schedule(PROXY_CERT_VALID_S * RENEW_AT, "proxy", ident, holder)
            self._wake = trio.Event()
            deadline = self._renewals[0][0] if self._renewals else now + 3600
            with trio.move_on_at(deadline):
                await self._wake.wait()

    def _broadcast_to_link(self, link: Link, message: Message) -> None:
        for proxy in self.feed.proxies:
            if proxy.link is link:
                proxy.send_nowait(message)


def reachable_address(advertised: str, remote: str) -> str:
    """The proxy's advertised HOST:PORT, with an unspecified host (it listens on every address)
    replaced by the address its link to us comes from."""
    host, _, port = advertised.rpartition(":")
    try:
        unspecified = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        unspecified = False
    if not unspecified:
        return advertised
    remote_host = remote.rpartition(":")[0] or remote
    return f"[{remote_host}]:{port}" if ":" in remote_host else f"{remote_host}:{port}"
