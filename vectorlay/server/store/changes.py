"""Which rows a transaction changed, as a compact notification for the other servers.

With several servers on one PostgreSQL, each keeps the fleet in memory; a transaction that
changes rows also sends (with `pg_notify`, delivered only if it commits) the keys of what it
changed, and every other server reloads those rows. A payload too large for a notification
(PostgreSQL takes under 8000 bytes) says `full`: reload everything. A server that missed
notifications (its listening connection dropped) reloads everything too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from vectorlay.server.store import ops

CHANNEL = "vectorlay"
MAX_PAYLOAD_BYTES = 7900


@dataclass
class ChangeKeys:
    replicas: set[str] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)
    clusters: set[str] = field(default_factory=set)
    commands: set[str] = field(default_factory=set)  # node ids with new commands
    acks: dict[str, int] = field(default_factory=dict)  # node id -> applied through seq
    api_keys: set[str] = field(default_factory=set)
    secrets: set[tuple[str, str]] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)
    meta: set[str] = field(default_factory=set)
    full: bool = False

    def __bool__(self) -> bool:
        return self.full or any((self.replicas, self.nodes, self.clusters, self.commands, self.acks, self.api_keys,
                                 self.secrets, self.tokens, self.meta))

    def merge(self, other: ChangeKeys) -> None:
        self.replicas |= other.replicas
        self.nodes |= other.nodes
        self.clusters |= other.clusters
        self.commands |= other.commands
        for node_id, seq in other.acks.items():
            self.acks[node_id] = max(seq, self.acks.get(node_id, seq))
        self.api_keys |= other.api_keys
        self.secrets |= other.secrets
        self.tokens |= other.tokens
        self.meta |= other.meta
        self.full |= other.full


def keys_of(changes: Sequence[ops.Op]) -> ChangeKeys:
    keys = ChangeKeys()
    for change in changes:
        if isinstance(change, ops.PutReplica):
            keys.replicas.add(change.replica.id)
        elif isinstance(change, ops.ObserveReplica | ops.DeleteReplica):
            keys.replicas.add(change.replica_id)
        elif isinstance(change, ops.PutNode):
            keys.nodes.add(change.node.id)
        elif isinstance(change, ops.SetNodeLiveness | ops.SetNodeFacts | ops.SetNodeStatus | ops.SetNodeFlags
                        | ops.SetNodeSeq | ops.DeleteNode):
            keys.nodes.add(change.node_id)
        elif isinstance(change, ops.PutCluster):
            keys.clusters.add(change.cluster.spec.key)
        elif isinstance(change, ops.DeleteCluster):
            keys.clusters.add(change.name)
        elif isinstance(change, ops.PutClusterHealth):
            keys.clusters.add(change.record.cluster)
        elif isinstance(change, ops.DeleteClusterHealth):
            keys.clusters.add(change.cluster)
        elif isinstance(change, ops.PutCommand):
            keys.commands.add(change.command.node_id)
        elif isinstance(change, ops.AckCommands):
            keys.acks[change.node_id] = max(change.through_seq, keys.acks.get(change.node_id, 0))
        elif isinstance(change, ops.PutApiKey):
            keys.api_keys.add(change.key.id)
        elif isinstance(change, ops.PutSecret):
            keys.secrets.add((change.secret.project, change.secret.name))
        elif isinstance(change, ops.DeleteSecret):
            keys.secrets.add((change.project, change.name))
        elif isinstance(change, ops.PutToken):
            keys.tokens.add(change.token.id)
        elif isinstance(change, ops.SetMeta):
            keys.meta.add(change.key)
    return keys


def encode(sender: str, keys: ChangeKeys) -> str:
    body = {"from": sender, "r": sorted(keys.replicas), "n": sorted(keys.nodes), "c": sorted(keys.clusters),
            "o": sorted(keys.commands), "a": keys.acks, "k": sorted(keys.api_keys),
            "s": sorted([p, n] for p, n in keys.secrets), "t": sorted(keys.tokens), "m": sorted(keys.meta)}
    text = json.dumps({k: v for k, v in body.items() if v}, separators=(",", ":"))
    if len(text.encode()) > MAX_PAYLOAD_BYTES or keys.full:
        return json.dumps({"from": sender, "full": True})
    return text


def decode(text: str) -> tuple[str, ChangeKeys]:
    """The sender and its keys; anything unreadable means: reload everything."""
    try:
        body = json.loads(text)
        keys = ChangeKeys(
            replicas=set(body.get("r", [])), nodes=set(body.get("n", [])), clusters=set(body.get("c", [])),
            commands=set(body.get("o", [])), acks={str(k): int(v) for k, v in body.get("a", {}).items()},
            api_keys=set(body.get("k", [])), secrets={(str(p), str(n)) for p, n in body.get("s", [])},
            tokens=set(body.get("t", [])), meta=set(body.get("m", [])), full=bool(body.get("full", False)))
        return str(body.get("from", "")), keys
    except (ValueError, TypeError, AttributeError):
        return "", ChangeKeys(full=True)
