"""What the server observed while its database was away, kept until it can be stored.

Observations (replica reports, hellos, node states, acks, events) must not wait for the
database: the data plane depends on them (a replica that stopped answering leaves routing now).
While the database is unavailable they change memory at once and their store operations wait
here, merged per row so the journal stays as small as the fleet: the latest write of a replica,
a node or a cluster's health wins, acks keep the highest sequence, and events (only history) are
capped, oldest dropped first. Decisions (new commands, applied manifests) never wait here: they
fail while the database is away, so command sequence numbers are never handed out unstored.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from vectorlay.server.store import ops

MAX_EVENTS = 10_000  # history written while the database was away; older ones are dropped

_Key = tuple[str, str]


class Journal:
    def __init__(self, max_events: int = MAX_EVENTS) -> None:
        self._rows: dict[_Key, ops.Op] = {}
        self._acks: dict[str, int] = {}
        self._events: deque[ops.AddEvent] = deque(maxlen=max_events)
        self.events_dropped = 0

    def __len__(self) -> int:
        return len(self._rows) + len(self._acks) + len(self._events)

    def add(self, changes: Sequence[ops.Op]) -> list[ops.Op]:
        """Keep these changes for later; return the ones that cannot wait (decisions: a bug in
        the caller, reported by it, never a reason to lose the rest)."""
        refused: list[ops.Op] = []
        for change in changes:
            if isinstance(change, ops.PutReplica):
                self._rows[("replica", change.replica.id)] = change
            elif isinstance(change, ops.ObserveReplica | ops.DeleteReplica):
                self._rows[("replica", change.replica_id)] = change
            elif isinstance(change, ops.PutNode):
                self._rows[("node", change.node.id)] = change
            elif isinstance(change, ops.SetNodeLiveness):
                self._rows[("node-liveness", change.node_id)] = change
            elif isinstance(change, ops.SetNodeFacts):
                self._rows[("node-facts", change.node_id)] = change
            elif isinstance(change, ops.SetNodeStatus):
                self._rows[("node-status", change.node_id)] = change
            elif isinstance(change, ops.SetNodeSeq):
                self._rows[("node-seq", change.node_id)] = change
            elif isinstance(change, ops.PutClusterHealth):
                self._rows[("health", change.record.cluster)] = change
            elif isinstance(change, ops.DeleteClusterHealth):
                self._rows[("health", change.cluster)] = change
            elif isinstance(change, ops.AckCommands):
                self._acks[change.node_id] = max(change.through_seq, self._acks.get(change.node_id, 0))
            elif isinstance(change, ops.AddEvent):
                if len(self._events) == self._events.maxlen:
                    self.events_dropped += 1
                self._events.append(change)
            else:
                refused.append(change)
        return refused

    def changes(self) -> list[ops.Op]:
        """Everything waiting, as one batch of store operations."""
        return [*self._rows.values(), *(ops.AckCommands(n, s) for n, s in self._acks.items()), *self._events]

    def clear(self) -> None:
        self._rows.clear()
        self._acks.clear()
        self._events.clear()


@dataclass
class DatabaseStatus:
    """Whether the database answers, since when it does not, and how often it failed."""

    available: bool = True
    since: float = 0.0  # wall clock of the last change of `available`
    reason: str = ""
    failures: int = 0  # failed attempts since the server started (a metric)
    outages: int = 0

    def failed(self, reason: str, wall: float) -> bool:
        """Note a failure; True if this begins an outage."""
        self.failures += 1
        self.reason = reason
        if not self.available:
            return False
        self.available = False
        self.since = wall
        self.outages += 1
        return True

    def recovered(self, wall: float) -> bool:
        """Note a success; True if this ends an outage."""
        if self.available:
            return False
        self.available = True
        self.since = wall
        self.reason = ""
        return True


def retry_delay(attempt: int, jitter: float, cap_s: float = 5.0) -> float:
    """Capped exponential backoff (0.25 s doubling to `cap_s`), jittered by `jitter` in [0, 1)."""
    ceiling = min(cap_s, 0.25 * 2.0 ** min(attempt, 20))
    return ceiling / 2 + (ceiling / 2) * jitter if math.isfinite(ceiling) else cap_s
