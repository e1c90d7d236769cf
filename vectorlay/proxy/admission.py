"""Which client connections the proxy takes, so that one client cannot crowd out the others.

Two rules, decided when a connection is accepted:

- **Per client address**: at most `max_connections_per_client` at once; more from that address
  get a short 503. One machine (or one attacker) cannot hold more than its share however many
  sockets it opens; a NAT in front of many users still fits under the default.
- **At the global cap**, a new connection does not get 503 while some connection is only waiting
  for its next request: the one that has waited longest (the idlest kept-alive connection) is
  closed to make room. A client that opened thousands of idle connections loses them first, and
  new clients keep being served. Only when every connection is busy with a request is a new one
  refused.

A connection closed for room is closed between requests (as the idle timeout would close it), so
a client sees a kept-alive connection end, which HTTP clients expect and retry on.
"""

from __future__ import annotations

import enum
from typing import Protocol


class Evictable(Protocol):
    def evict(self) -> None:
        """Close this connection now: it is idle between requests (see `ConnectionAdmission.idle`)."""


class Admitted(enum.Enum):
    YES = "yes"
    CLIENT_FULL = "client full"  # that address holds its share already
    FULL = "full"  # the cap is reached and no connection is idle


class ConnectionAdmission:
    def __init__(self, max_connections: int, max_per_client: int) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.open = 0  # accepted and not yet finished (counting those being closed for room)
        self.closing = 0  # closed for room, not yet finished
        self.per_client: dict[str, int] = {}
        # Connections waiting for their next request, the longest-waiting first (a dict keeps
        # insertion order: a connection is added when it starts waiting and removed when it stops).
        self.idle: dict[Evictable, None] = {}
        self.evicted = 0  # in total, for the metrics

    def admit(self, peer: str) -> Admitted:
        """Decide on a new connection from `peer`; on YES it is counted (call `finished` at its end)."""
        if self.per_client.get(peer, 0) >= self.max_per_client:
            return Admitted.CLIENT_FULL
        if self.open - self.closing >= self.max_connections:
            if not self.idle:
                return Admitted.FULL
            idlest = next(iter(self.idle))
            del self.idle[idlest]
            self.closing += 1
            self.evicted += 1
            idlest.evict()
        self.open += 1
        self.per_client[peer] = self.per_client.get(peer, 0) + 1
        return Admitted.YES

    def finished(self, peer: str, evicted: bool) -> None:
        self.open -= 1
        if evicted:
            self.closing -= 1
        left = self.per_client[peer] - 1
        if left:
            self.per_client[peer] = left
        else:
            del self.per_client[peer]

    def waiting(self, connection: Evictable) -> None:
        """`connection` waits for its next request (its first byte) from now on."""
        self.idle[connection] = None

    def busy(self, connection: Evictable) -> None:
        """`connection` stopped waiting (a request began, or it is closing)."""
        self.idle.pop(connection, None)
