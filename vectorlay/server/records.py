"""Server-side records: what the control plane stores beyond the core model."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from vectorlay.core.cluster_health import ClusterHealth
from vectorlay.core.model import Assignment, ClusterSpec, Gpu, Node, NodeState, Role, template_revision


@dataclass(frozen=True)
class TokenRecord:
    id: str
    secret_hash: str
    role: Role
    created_at: float  # wall clock, seconds since the epoch
    expires_at: float | None
    uses_left: int | None  # None: unlimited
    revoked: bool = False
    description: str = ""
    project: str = ""  # the one project a deployer token may touch


@dataclass(frozen=True)
class NodeRecord:
    id: str
    name: str
    credential_hash: str
    gpus: tuple[Gpu, ...]
    address: str
    runtimes: tuple[str, ...]
    joined_at: float
    last_seen_at: float | None = None  # wall clock, for display; liveness is in memory
    state: NodeState = NodeState.DOWN  # persisted view; the live state is in memory
    schedulable: bool = True
    next_seq: int = 1  # the next command sequence number for this node
    generation: int = 0  # fencing generation of this node's desired state
    draining: bool = False  # its replicas move elsewhere (new copies ready first)
    isolation: tuple[str, ...] = ()  # isolation levels its container runtime offers
    data_plane: str = "direct"  # how proxies reach its replicas: "tunnel" or "direct"
    session_server: str = ""  # the server holding its session ("" when none does)
    # From its heartbeats, stored when they change so that every server (the leader scheduling
    # above all) knows them whichever server holds the session: GPUs reported unhealthy
    # (uuid, reason), and how many proxies a tunnel node has a tunnel to.
    unhealthy_gpus: tuple[tuple[str, str], ...] = ()
    tunnels: int | None = None

    def as_node(self, state: NodeState, gpus_healthy: bool = True) -> Node:
        return Node(self.id, self.name, self.gpus, self.address, state, self.schedulable, self.runtimes,
                    self.draining, self.isolation, gpus_healthy)


@dataclass(frozen=True)
class ClusterRecord:
    spec: ClusterSpec
    created_at: float
    updated_at: float

    @cached_property
    def revision(self) -> str:
        return template_revision(self.spec)


@dataclass(frozen=True)
class ApiKeyRecord:
    """A key for a cluster's endpoint (`vectorlay key create`): only the hash of the secret."""

    id: str
    cluster: str
    name: str
    secret_hash: str
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class EventRecord:
    """Something that happened to a cluster or replica, with its reason, for `describe`."""

    cluster: str
    replica_id: str | None
    at: float
    message: str


@dataclass(frozen=True)
class AuditRecord:
    """Who changed what, when: every change through the API or a node joining."""

    at: float
    actor: str  # "admin:<token id>", "deployer:<token id>", "node:<node id>"
    action: str  # "apply", "delete", "token.create", ...
    target: str
    project: str = ""
    detail: str = ""


@dataclass(frozen=True)
class RevisionRecord:
    """One stored revision of a cluster's spec: what an apply stored, by whom, and what changed."""

    cluster: str
    revision: int
    at: float
    actor: str
    spec: ClusterSpec
    change: str


@dataclass(frozen=True)
class SecretRecord:
    """A project's secret, encrypted with the server's key (never stored in clear)."""

    project: str
    name: str
    ciphertext: str
    updated_at: float


@dataclass(frozen=True)
class CommandRecord:
    node_id: str
    seq: int
    op: str
    replica_id: str
    generation: int
    assignment: Assignment | None
    created_at: float


@dataclass(frozen=True)
class ClusterHealthRecord:
    """A cluster's crash-loop, quarantine and degraded state as stored: `not_before` is wall
    time, since the monotonic clock it was decided on does not survive a restart."""

    cluster: str
    failures: int
    not_before_wall: float
    reason: str
    node: str
    strikes: tuple[str, ...]
    quarantined: str
    degraded: str


def health_record(cluster: str, health: ClusterHealth, now: float, wall: float) -> ClusterHealthRecord:
    return ClusterHealthRecord(cluster, health.failures, wall + max(0.0, health.not_before - now), health.reason,
                               health.node, health.strikes, health.quarantined, health.degraded)


def health_from_record(record: ClusterHealthRecord, now: float, wall: float) -> ClusterHealth:
    """Back on the monotonic clock: the time left to wait is what was left when it was stored,
    less the time since (a replica's ready time is not kept: it is seen again when it reports)."""
    return ClusterHealth(record.failures, now + max(0.0, record.not_before_wall - wall), record.reason,
                         record.node, None, record.strikes, record.quarantined, record.degraded)
