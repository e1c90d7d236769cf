"""Rate limits of one cluster's endpoint: a token bucket for the cluster and one per client.

A client is its API key when the endpoint uses keys, else its address. Buckets live in memory per
proxy; the per-client table is bounded so that a flood of addresses cannot exhaust memory (the least
recently seen client is forgotten, which at worst hands it a fresh, full bucket).
"""

from __future__ import annotations

import math

from vectorlay.core.model import RateLimit
from vectorlay.core.token_bucket import TokenBucket

MAX_CLIENTS = 100_000


class ClusterLimiter:
    def __init__(self, limit: RateLimit | None, per_client: RateLimit | None, max_clients: int = MAX_CLIENTS) -> None:
        self.limit = limit
        self.per_client = per_client
        self.max_clients = max_clients
        self._bucket: TokenBucket | None = None
        self._clients: dict[str, TokenBucket] = {}

    def same_config(self, limit: RateLimit | None, per_client: RateLimit | None) -> bool:
        return self.limit == limit and self.per_client == per_client

    def admit(self, client: str, now: float) -> float | None:
        """None if the request may go; else the seconds after which it could (for Retry-After).

        A request takes a token from both buckets or from neither, so one refused by the
        cluster's limit does not also use up its client's share.
        """
        if self.limit is None and self.per_client is None:
            return None  # no limits set: the common case, decided without touching a bucket
        cluster = mine = None
        wait = 0.0
        if self.limit is not None:
            cluster = (self._bucket or TokenBucket.full(self.limit.requests_per_second, self.limit.burst, now))
            wait = cluster.retry_after(now)
        if self.per_client is not None:
            mine = self._clients.pop(client, None) or TokenBucket.full(
                self.per_client.requests_per_second, self.per_client.burst, now)
            wait = max(wait, mine.retry_after(now))
        if wait <= 0:
            cluster = cluster.take(now)[1] if cluster is not None else None
            mine = mine.take(now)[1] if mine is not None else None
        if cluster is not None:
            self._bucket = cluster.refill(now)
        if mine is not None:
            self._clients[client] = mine.refill(now)  # re-inserted last: the dict's order is recency
            if len(self._clients) > self.max_clients:
                del self._clients[next(iter(self._clients))]
        if wait <= 0:
            return None
        return wait if math.isfinite(wait) else 3600.0
