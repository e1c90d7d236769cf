"""What the CLI's API shows of the fleet: the views `get`, `describe` and `apply` print.

Frozen values the server builds (`server/views.py`) and the client decodes; `codec.dump` of each
is exactly the JSON `-o json` prints, so field names and order here are a contract with users and
their scripts: add fields, never rename or drop one.
"""

from __future__ import annotations

from dataclasses import dataclass

from vectorlay.core.model import ClusterSpec, GpuRequest, Role, Runtime


@dataclass(frozen=True)
class HealthView:
    """Whether a cluster is in trouble of its own (`core/cluster_health.py`)."""

    status: str  # "ok" | "crash-looping" | "quarantined" | "degraded"
    message: str  # one line; "" when ok
    failures: int
    next_try_in_s: float | None  # while failures back off: when the next replacement may start


@dataclass(frozen=True)
class ClusterView:
    name: str
    project: str
    key: str  # the cluster's key across projects, as `apply` and `wait_ready` name it
    replicas: int  # desired
    ready: int  # replicas of the current revision that serve (see core/readiness.py)
    up_to_date: int
    endpoint: str | None  # the public URL, once a proxy serves it
    states: dict[str, int]  # live (not stopping) replicas per state
    stopping: int
    reasons: tuple[str, ...]  # why live replicas are not ready, one line each
    runtime: Runtime | None
    gpu: GpuRequest | None
    created_at: float | None
    health: HealthView
    serving: int = 0  # replicas of any revision that serve now (during a roll, old ones too)


@dataclass(frozen=True)
class GpuView:
    uuid: str
    name: str
    memory_gb: float | None
    index: int
    in_use: bool
    # From the node's heartbeats; None until one reported this GPU (or where NVML cannot tell).
    healthy: bool | None = None
    health_reason: str | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    memory_used_gb: float | None = None


@dataclass(frozen=True)
class NodeView:
    id: str
    name: str
    state: str  # a NodeState, or "reconnecting": not heard from since the server restarted
    connected: bool
    address: str
    gpus: tuple[GpuView, ...]
    gpus_healthy: bool
    runtimes: tuple[str, ...]
    isolation: tuple[str, ...]
    replicas: int
    last_seen_s: float | None
    joined_at: float
    schedulable: bool
    data_plane: str = "direct"  # "tunnel": the node dials the proxies; "direct": proxies dial its address
    tunnels: int | None = None  # proxies a tunnel node has a tunnel to now (from its heartbeats)


@dataclass(frozen=True)
class ReplicaView:
    id: str
    cluster: str
    project: str
    node: str | None  # the node's name
    node_id: str | None
    state: str  # a ReplicaState, or "unknown": its node is not ready, so its last word may be stale
    reason: str
    address: str | None
    gpus: tuple[str, ...]
    generation: int
    revision: str
    image_digest: str | None
    stopping: bool
    created_at: float | None


@dataclass(frozen=True)
class EventView:
    at: float
    replica: str | None
    message: str


@dataclass(frozen=True)
class DescribedReplica(ReplicaView):
    events: tuple[EventView, ...]  # its last few


@dataclass(frozen=True)
class KeyView:
    """An endpoint API key, without the key (only its hash is stored)."""

    id: str
    cluster: str
    name: str
    created_at: float
    revoked_at: float | None
    state: str  # "active" | "revoked"


@dataclass(frozen=True)
class TokenView:
    """Everything about a token but its secret (which is not stored anyway)."""

    id: str
    role: Role
    project: str | None
    created_at: float
    expires_at: float | None
    uses_left: int | None
    revoked: bool
    description: str


@dataclass(frozen=True)
class AuditView:
    at: float
    actor: str
    action: str
    target: str
    project: str | None
    detail: str


@dataclass(frozen=True)
class SecretView:
    project: str
    name: str
    updated_at: float


@dataclass(frozen=True)
class FleetSummary:
    """Counts only: cheap at any fleet size (for `get` headers and monitoring)."""

    nodes: dict[str, int]  # per state
    nodes_total: int
    connected: int
    replicas: dict[str, int]  # per state, "stopping" apart
    replicas_total: int
    clusters: int


@dataclass(frozen=True)
class DatabaseView:
    """The server's database as the server sees it (`vectorlay status`)."""

    available: bool
    since: float | None  # wall clock of the last change of `available`
    reason: str | None  # why it is unavailable
    failures_total: int
    outages_total: int
    pending_writes: int  # observations kept in memory until the database takes them


@dataclass(frozen=True)
class ServerView:
    """One server of the control plane (`vectorlay get servers`)."""

    id: str
    address: str
    leader: bool
    epoch: int | None  # the leader's; None for the others
    nodes: int
    proxies: int
    clients: int
    seen_s_ago: float
    this: bool  # the server answering


@dataclass(frozen=True)
class ClusterDescription:
    cluster: ClusterView
    spec: ClusterSpec | None
    replicas: tuple[DescribedReplica, ...]
    events: tuple[EventView, ...]


@dataclass(frozen=True)
class NodeDescription:
    """`vectorlay describe node`: the node as `get nodes` shows it, with what runs on it."""

    node: NodeView  # its GPUs with health, data plane, tunnels, state, last heartbeat
    draining: bool
    last_seen_at: float | None  # wall clock of the last heartbeat stored (any server's)
    session_server: str | None  # the server holding its session (several servers), if any
    replicas: tuple[ReplicaView, ...]  # on it now, stopping ones included
    events: tuple[EventView, ...]  # its replicas' recent events, oldest first
    changes: tuple[AuditView, ...]  # who joined, cordoned, drained it, oldest first


@dataclass(frozen=True)
class ReplicaDescription:
    """`vectorlay describe replica`: one replica, where it runs and what happened to it."""

    replica: ReplicaView
    port: int | None  # the port the workload listens on (the cluster's spec.port)
    restarts: int  # the latest restart count its node reported (from its reasons)
    failures: int  # times its events say it failed
    events: tuple[EventView, ...]  # its recent events, oldest first


@dataclass(frozen=True)
class RevisionView:
    """One stored revision of a cluster's spec (`vectorlay rollout history`)."""

    cluster: str
    project: str
    revision: int  # grows by one with every apply that changes the spec
    at: float  # wall clock
    actor: str
    change: str  # what the apply changed, one line per field joined with "; "
    current: bool  # its spec is what the cluster runs now
    spec: ClusterSpec
