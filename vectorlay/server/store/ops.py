"""Changes to persist, as values. The server decides a list of these, then the store applies them
in one transaction, so a decision is either fully stored or not at all."""

from __future__ import annotations

from dataclasses import dataclass

from vectorlay.core.model import ClusterSpec, Gpu, NodeState, Replica, ReplicaState
from vectorlay.server.records import (
    ApiKeyRecord,
    AuditRecord,
    ClusterHealthRecord,
    ClusterRecord,
    CommandRecord,
    EventRecord,
    NodeRecord,
    SecretRecord,
    TokenRecord,
)


@dataclass(frozen=True)
class PutToken:
    token: TokenRecord


@dataclass(frozen=True)
class PutNode:
    node: NodeRecord


@dataclass(frozen=True)
class SetNodeLiveness:
    """What the server holding a node's session saw of it (columns of its own: several servers
    write node rows, each only what it owns)."""

    node_id: str
    state: NodeState
    last_seen_at: float | None
    session_server: str
    unless_held_by: tuple[str, ...] = ()  # skip the write if one of these (live) servers holds it now


@dataclass(frozen=True)
class SetNodeFacts:
    """What a node said about itself in its hello."""

    node_id: str
    gpus: tuple[Gpu, ...]
    address: str
    runtimes: tuple[str, ...]
    isolation: tuple[str, ...]
    data_plane: str


@dataclass(frozen=True)
class SetNodeStatus:
    """What a node's heartbeats said that every server must know, when it changed."""

    node_id: str
    unhealthy_gpus: tuple[tuple[str, str], ...]
    tunnels: int | None


@dataclass(frozen=True)
class SetNodeFlags:
    node_id: str
    schedulable: bool
    draining: bool


@dataclass(frozen=True)
class SetNodeSeq:
    """The leader's: the next command sequence number and the fencing generation."""

    node_id: str
    next_seq: int
    generation: int


@dataclass(frozen=True)
class DeleteNode:
    node_id: str


@dataclass(frozen=True)
class PutCluster:
    cluster: ClusterRecord


@dataclass(frozen=True)
class DeleteCluster:
    """The cluster's row and its revisions."""

    name: str


@dataclass(frozen=True)
class AddRevision:
    """A new revision of a cluster's spec, numbered by the store one past its newest in the same
    transaction (several servers may apply); only the newest `keep` of the cluster are kept."""

    cluster: str
    at: float
    actor: str
    spec: ClusterSpec
    change: str
    keep: int


@dataclass(frozen=True)
class PutReplica:
    replica: Replica
    created_at: float


@dataclass(frozen=True)
class ObserveReplica:
    """A node's report: its state columns, only while the row is still that generation (a
    leader's newer assignment is never overwritten by news of an older one)."""

    replica_id: str
    generation: int
    state: ReplicaState
    reason: str
    address: str | None
    image_digest: str | None


@dataclass(frozen=True)
class DeleteReplica:
    replica_id: str


@dataclass(frozen=True)
class PutCommand:
    command: CommandRecord


@dataclass(frozen=True)
class AckCommands:
    """Commands up to `through_seq` were applied by the node (or superseded by a full sync)."""

    node_id: str
    through_seq: int


@dataclass(frozen=True)
class PutApiKey:
    key: ApiKeyRecord


@dataclass(frozen=True)
class AddEvent:
    event: EventRecord


@dataclass(frozen=True)
class AddAudit:
    record: AuditRecord


@dataclass(frozen=True)
class PutSecret:
    secret: SecretRecord


@dataclass(frozen=True)
class DeleteSecret:
    project: str
    name: str


@dataclass(frozen=True)
class SetMeta:
    key: str
    value: str


@dataclass(frozen=True)
class PutClusterHealth:
    record: ClusterHealthRecord


@dataclass(frozen=True)
class DeleteClusterHealth:
    cluster: str


@dataclass(frozen=True)
class Fence:
    """First in a leader's transaction: it commits only while `holder` leads with `epoch` and
    its lease has not run out, on the database's clock (StoreFenced otherwise)."""

    holder: str
    epoch: int


Op = (
    PutToken | PutNode | SetNodeLiveness | SetNodeFacts | SetNodeStatus | SetNodeFlags | SetNodeSeq | DeleteNode
    | PutCluster | DeleteCluster | AddRevision | PutReplica | ObserveReplica | DeleteReplica
    | PutCommand | AckCommands | SetMeta | PutApiKey | AddEvent | AddAudit | PutSecret | DeleteSecret
    | PutClusterHealth | DeleteClusterHealth | Fence
)
