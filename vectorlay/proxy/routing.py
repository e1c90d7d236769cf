"""The proxy's route table, fed by the server, and the choice of replica for each request."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio

from vectorlay.core import balancer
from vectorlay.core.protocol import Endpoint, Route, RouteSnapshot, RouteUpdate


@dataclass
class EndpointStats:
    """What this proxy observes of one replica (kept across route updates)."""

    endpoint: Endpoint
    outstanding: int = 0
    latency_s: float | None = None
    ejected_until: float = 0.0
    failures: int = 0
    # Requests waiting for this replica's response head; cancelled if it leaves routing, so they
    # can be retried elsewhere instead of hanging on a node the server has given up on.
    awaiting_head: set[trio.CancelScope] = field(default_factory=set)
    routed: bool = True

    def leave_routing(self) -> None:
        self.routed = False
        for scope in self.awaiting_head:
            scope.cancel()


@dataclass
class ClusterRoute:
    name: str
    endpoints: dict[str, EndpointStats] = field(default_factory=dict)


def cluster_from_host(host: str, domain: str) -> str | None:
    """`echo.localhost:8080` -> `echo` for domain `localhost`; None if the host is not ours."""
    name = host.strip().lower()
    if name.startswith("["):
        return None  # an IPv6 literal is never a cluster name
    name = name.rsplit(":", 1)[0] if ":" in name else name
    name = name.rstrip(".")
    suffix = "." + domain.lower().strip(".")
    if not name.endswith(suffix):
        return None
    label = name[: -len(suffix)]
    return label if label and "." not in label else None


class RouteTable:
    def __init__(self, rng: random.Random | None = None) -> None:
        self.clusters: dict[str, ClusterRoute] = {}
        self.version = -1
        self.rng = rng or random.Random()

    def load_snapshot(self, snapshot: RouteSnapshot) -> None:
        names = {route.cluster for route in snapshot.routes}
        for name in list(self.clusters):
            if name not in names:
                del self.clusters[name]
        for route in snapshot.routes:
            self._set(route)
        self.version = snapshot.version

    def apply(self, update: RouteUpdate) -> None:
        if update.removed:
            gone = self.clusters.pop(update.route.cluster, None)
            for stats in gone.endpoints.values() if gone else ():
                stats.leave_routing()
        else:
            self._set(update.route)
        self.version = update.version

    def _set(self, route: Route) -> None:
        cluster = self.clusters.setdefault(route.cluster, ClusterRoute(route.cluster))
        fresh = {e.replica_id: e for e in route.endpoints}
        for replica_id in list(cluster.endpoints):
            if replica_id not in fresh:
                cluster.endpoints.pop(replica_id).leave_routing()
        for replica_id, endpoint in fresh.items():
            stats = cluster.endpoints.get(replica_id)
            if stats is None or stats.endpoint != endpoint:
                cluster.endpoints[replica_id] = EndpointStats(endpoint)

    def choose(self, cluster: ClusterRoute, now: float, exclude: set[str]) -> EndpointStats | None:
        """Pick among endpoints not tried yet; ejected ones only when nothing else is left."""
        available = [s for k, s in cluster.endpoints.items() if k not in exclude]
        healthy = [s for s in available if s.ejected_until <= now] or available
        candidates = [balancer.Candidate(s.endpoint.replica_id, s.outstanding, s.latency_s) for s in healthy]
        picked = balancer.pick(candidates, self.rng)
        return cluster.endpoints[picked.key] if picked else None
