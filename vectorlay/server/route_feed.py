"""The route feed: pushes each cluster's ready endpoints to every connected proxy.

Proxies never poll. On connect a proxy gets a snapshot; after that it gets one `RouteUpdate` per
cluster whose endpoints changed (a delta), as soon as the controller marks it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from vectorlay.core.model import EndpointConfig
from vectorlay.core.protocol import Endpoint, Message, Route, RouteSnapshot, RouteUpdate
from vectorlay.core.readiness import serves
from vectorlay.errors import ProtocolError, unwrap_group
from vectorlay.server.fleet import Fleet
from vectorlay.server.signals import Signals
from vectorlay.wire import CLOSE_GOING_AWAY, Link, LinkClosed

log = logging.getLogger("vectorlay.server")

PROXY_QUEUE = 4096
COALESCE_S = 0.01


def route_for(fleet: Fleet, cluster: str) -> Route:
    record = fleet.clusters.get(cluster)
    endpoint = record.spec.endpoint if record else EndpointConfig()
    endpoints = []
    for replica_id in fleet.by_cluster.get(cluster, ()):
        replica = fleet.replicas[replica_id]
        if serves(replica, fleet.node_state):
            assert replica.address is not None and replica.node_id is not None  # as serves() checked
            node = fleet.nodes[replica.node_id]
            endpoints.append(Endpoint(replica.id, replica.address, node.name, node.id, node.data_plane))
    keys = fleet.key_hashes(cluster) if endpoint.auth == "api-key" else ()
    endpoints.sort(key=lambda e: e.replica_id)
    return Route(cluster, tuple(endpoints), endpoint.auth, keys, endpoint.rate_limit, endpoint.per_client_rate_limit)


class ProxyConnection:
    def __init__(self, link: Link, url_template: str) -> None:
        self.link = link
        self.url_template = url_template
        self.send_channel, self.receive_channel = trio.open_memory_channel[Message](PROXY_QUEUE)
        self.scope = trio.CancelScope()
        self.close_code, self.close_reason = CLOSE_GOING_AWAY, "proxy too slow to take route updates"

    def close_soon(self, reason: str, code: int) -> None:
        self.close_code, self.close_reason = code, reason
        self.scope.cancel()

    def send_nowait(self, message: Message) -> None:
        try:
            self.send_channel.send_nowait(message)
        except trio.WouldBlock:
            self.scope.cancel()  # too slow: it reconnects and gets a fresh snapshot
        except trio.BrokenResourceError:
            pass


class RouteFeed:
    def __init__(self, fleet: Fleet, signals: Signals) -> None:
        self.signals = signals
        self.fleet = fleet
        self.version = 0
        self.routes: dict[str, Route] = {}
        self.proxies: list[ProxyConnection] = []
        # Called for each new proxy right after its snapshot is queued, in the same step (so the
        # tunnel admission snapshot reaches it before any later change).
        self.on_proxy_connected: list[Callable[[ProxyConnection], None]] = []

    def endpoint_url(self, cluster: str) -> str | None:
        """The cluster's public URL, as the most recently connected proxy serves it (route
        followers that serve nothing, such as monitors, send no template)."""
        for proxy in reversed(self.proxies):
            if proxy.url_template:
                return proxy.url_template.replace("{cluster}", cluster)
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for name in self.fleet.clusters:
            self.routes[name] = route_for(self.fleet, name)
        task_status.started()
        while True:
            # Let a burst of changes (a batch of reports, a node with many replicas) land first:
            # one update per cluster instead of one per change. Far below the 2 s routing target.
            dirty = await self.signals.next_routes(COALESCE_S)
            for cluster in sorted(dirty):
                self._update(cluster)

    def _update(self, cluster: str) -> None:
        exists = cluster in self.fleet.clusters
        route = route_for(self.fleet, cluster)
        old = self.routes.get(cluster)
        if not exists:
            if old is None:
                return
            del self.routes[cluster]
            update = RouteUpdate(self._bump(), Route(cluster), removed=True)
        else:
            if old == route:
                return
            self.routes[cluster] = route
            update = RouteUpdate(self._bump(), route)
        for proxy in list(self.proxies):
            proxy.send_nowait(update)

    def close_all(self, reason: str, code: int) -> None:
        """Ask every proxy to reconnect (this server hands its proxies to another)."""
        for proxy in list(self.proxies):
            proxy.close_soon(reason, code)

    def _bump(self) -> int:
        self.version += 1
        return self.version

    async def serve(self, link: Link, url_template: str) -> None:
        proxy = ProxyConnection(link, url_template)
        # Snapshot and registration happen with no checkpoint between them: no update is missed.
        proxy.send_nowait(RouteSnapshot(self.version, tuple(self.routes.values())))
        for hook in self.on_proxy_connected:
            hook(proxy)
        self.proxies.append(proxy)
        log.info("proxy connected from %s", link.remote)
        try:
            with proxy.scope, unwrap_group():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._drain_incoming, link, nursery.cancel_scope)
                    async for message in proxy.receive_channel:
                        await link.send(message)
        except LinkClosed:
            pass
        finally:
            self.proxies.remove(proxy)
            log.info("proxy %s disconnected", link.remote)
            if proxy.scope.cancelled_caught:
                with trio.CancelScope(shield=True):
                    await link.close(proxy.close_code, proxy.close_reason)

    @staticmethod
    async def _drain_incoming(link: Link, scope: trio.CancelScope) -> None:
        """Proxies send nothing after hello; reading notices when they go away."""
        try:
            await link.receive(())
        except ProtocolError as error:
            await link.reject(error)
        except LinkClosed:
            pass
        scope.cancel()
