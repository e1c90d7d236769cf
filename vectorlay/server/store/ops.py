"""Changes to persist, as values. The server decides a list of these, then the store applies them
in one transaction, so a decision is either fully stored or not at all."""

from __future__ import annotations

from dataclasses import dataclass

from vectorlay.core.model import Replica
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
class DeleteNode:
    node_id: str


@dataclass(frozen=True)
class PutCluster:
    cluster: ClusterRecord


@dataclass(frozen=True)
class DeleteCluster:
    name: str


@dataclass(frozen=True)
class PutReplica:
    replica: Replica
    created_at: float


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


Op = (
    PutToken | PutNode | DeleteNode | PutCluster | DeleteCluster | PutReplica | DeleteReplica
    | PutCommand | AckCommands | SetMeta | PutApiKey | AddEvent | AddAudit | PutSecret | DeleteSecret
    | PutClusterHealth | DeleteClusterHealth
)
