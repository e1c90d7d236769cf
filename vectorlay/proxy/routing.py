"""The proxy's route table, fed by the server, and the choice of replica for each request."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from vectorlay.core import balancer
from vectorlay.core.protocol import TUNNEL, Endpoint, Route, RouteSnapshot, RouteUpdate
from vectorlay.proxy.limits import ProxyLimits
from vectorlay.proxy.ratelimit import ClusterLimiter
from vectorlay.proxy.retries import RetryBudget


@dataclass
class EndpointStats:
    """What this proxy observes of one replica (kept across route updates)."""

    endpoint: Endpoint
    outstanding: int = 0
    latency_s: float | None = None
    sampled_at: float = 0.0  # when latency_s last took a sample
    ejected_until: float = 0.0
    failures: int = 0  # consecutive; a success resets it
    # Requests waiting for this replica's response head; cancelled if it leaves routing, so they
    # can be retried elsewhere instead of hanging on a node the server has given up on.
    awaiting_head: set[trio.CancelScope] = field(default_factory=set)
    routed: bool = True
    pool_key: str = ""  # its connections in the upstream pool

    def __post_init__(self) -> None:
        self.pool_key = upstream_key(self.endpoint)

    def leave_routing(self) -> None:
        self.routed = False
        for scope in self.awaiting_head:
            scope.cancel()

    def record_latency(self, seconds: float, now: float) -> None:
        self.latency_s = balancer.update_latency(self.latency_s, seconds)
        self.sampled_at = now

    def record_success(self) -> None:
        self.failures = 0

    def eject(self, now: float, limits: ProxyLimits) -> None:
        self.failures += 1
        self.ejected_until = now + balancer.ejection_s(self.failures, limits.eject_s, limits.max_eject_s)


def upstream_key(endpoint: Endpoint) -> str:
    """Where the upstream pool keeps an endpoint's idle connections: its address, or for the
    tunnel data plane its node and replica (addresses on different nodes' loopbacks may repeat)."""
    if endpoint.data_plane == TUNNEL:
        return f"{endpoint.node_id}/{endpoint.replica_id}"
    return endpoint.address


@dataclass
class ClusterRoute:
    name: str
    route: Route
    limiter: ClusterLimiter
    budget: RetryBudget
    endpoints: dict[str, EndpointStats] = field(default_factory=dict)
    key_hashes: frozenset[str] = frozenset()


def cluster_from_host(host: str, domain: str) -> str | None:
    """`echo.localhost:8080` -> `echo`, `echo.acme.localhost` -> `echo.acme` (cluster `echo` of
    project `acme`) for domain `localhost`; None if the host is not ours."""
    name = host.strip().lower()
    if name.startswith("["):
        return None  # an IPv6 literal is never a cluster name
    name = name.rsplit(":", 1)[0] if ":" in name else name
    name = name.rstrip(".")
    suffix = "." + domain.lower().strip(".")
    if not name.endswith(suffix):
        return None
    key = name[: -len(suffix)]
    return key if key and key.count(".") <= 1 and "" not in key.split(".") else None


class RouteTable:
    def __init__(self, rng: random.Random | None = None, limits: ProxyLimits | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.clusters: dict[str, ClusterRoute] = {}
        self.version = -1
        self.rng = rng or random.Random()
        self.limits = limits or ProxyLimits()
        self.clock = clock
        self.on_endpoint_removed: list[Callable[[Endpoint], None]] = []
        self._changed = trio.Event()  # set, and replaced, whenever routes change
        # Nodes whose tunnel to this proxy is up: their tunnel endpoints are routable, others' are not.
        self.reachable: set[str] = set()
        self._tunnel_clusters: dict[str, set[str]] = {}  # node id -> clusters with its tunnel endpoints

    async def next_change(self) -> None:
        """Return after the next snapshot or update is applied."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def load_snapshot(self, snapshot: RouteSnapshot) -> None:
        names = {route.cluster for route in snapshot.routes}
        for name in list(self.clusters):
            if name not in names:
                self._drop(name)
        for route in snapshot.routes:
            self._set(route)
        self.version = snapshot.version
        self._notify()

    def apply(self, update: RouteUpdate) -> None:
        if update.removed:
            self._drop(update.route.cluster)
        else:
            self._set(update.route)
        self.version = update.version
        self._notify()

    def set_reachable(self, node_id: str, reachable: bool) -> None:
        """A node's tunnel came up or went down: its tunnel endpoints join or leave routing."""
        if reachable == (node_id in self.reachable):
            return
        if reachable:
            self.reachable.add(node_id)
        else:
            self.reachable.discard(node_id)
        for name in list(self._tunnel_clusters.get(node_id, ())):
            cluster = self.clusters.get(name)
            if cluster is not None:
                self._set(cluster.route)
        self._notify()

    def _routable(self, endpoint: Endpoint) -> bool:
        return endpoint.data_plane != TUNNEL or endpoint.node_id in self.reachable

    def _index_tunnels(self, name: str, old: Route | None, new: Route | None) -> None:
        for endpoint in old.endpoints if old else ():
            if endpoint.data_plane == TUNNEL:
                clusters = self._tunnel_clusters.get(endpoint.node_id)
                if clusters is not None:
                    clusters.discard(name)
                    if not clusters:
                        del self._tunnel_clusters[endpoint.node_id]
        for endpoint in new.endpoints if new else ():
            if endpoint.data_plane == TUNNEL:
                self._tunnel_clusters.setdefault(endpoint.node_id, set()).add(name)

    def _drop(self, name: str) -> None:
        gone = self.clusters.pop(name, None)
        if gone is not None:
            self._index_tunnels(name, gone.route, None)
        for stats in gone.endpoints.values() if gone else ():
            self._leave(stats)

    def _leave(self, stats: EndpointStats) -> None:
        stats.leave_routing()
        for callback in self.on_endpoint_removed:
            callback(stats.endpoint)

    def _set(self, route: Route) -> None:
        cluster = self.clusters.get(route.cluster)
        if cluster is None:
            limits = self.limits
            cluster = ClusterRoute(route.cluster, route,
                                   ClusterLimiter(route.rate_limit, route.per_client_rate_limit),
                                   RetryBudget(limits.retry_budget_ratio, limits.retry_budget_min_per_s, self.clock()))
            self.clusters[route.cluster] = cluster
            self._index_tunnels(route.cluster, None, route)
        elif cluster.route is not route:
            self._index_tunnels(route.cluster, cluster.route, route)
        cluster.route = route
        cluster.key_hashes = frozenset(route.key_hashes)
        if not cluster.limiter.same_config(route.rate_limit, route.per_client_rate_limit):
            cluster.limiter = ClusterLimiter(route.rate_limit, route.per_client_rate_limit)
        fresh = {e.replica_id: e for e in route.endpoints if self._routable(e)}
        for replica_id in list(cluster.endpoints):
            if replica_id not in fresh or cluster.endpoints[replica_id].endpoint != fresh[replica_id]:
                self._leave(cluster.endpoints.pop(replica_id))
        for replica_id, endpoint in fresh.items():
            if replica_id not in cluster.endpoints:
                cluster.endpoints[replica_id] = EndpointStats(endpoint)

    def choose(self, cluster: ClusterRoute, now: float, exclude: set[str]) -> EndpointStats | None:
        """Pick among endpoints not tried yet; ejected ones only when nothing else is left."""
        endpoints = cluster.endpoints
        if len(endpoints) == 1 and not exclude:
            return next(iter(endpoints.values()))  # the common small case, without building candidates
        available = [s for k, s in endpoints.items() if k not in exclude]
        measured = [s.latency_s for s in available if s.latency_s is not None]
        fastest = min(measured) if measured else None
        candidates = [
            balancer.Candidate(s.endpoint.replica_id, s.outstanding,
                               balancer.stale_latency(s.latency_s, fastest, now - s.sampled_at),
                               ejected=s.ejected_until > now)
            for s in available
        ]
        picked = balancer.pick(candidates, self.rng)
        return endpoints[picked.key] if picked else None
