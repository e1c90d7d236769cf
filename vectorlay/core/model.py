"""The values the whole system talks about: nodes, GPUs, clusters, replicas.

Frozen dataclasses and enums only; converting them to and from JSON is `core.codec`'s job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum

DEFAULT_PROJECT = "default"


def split_key(key: str) -> tuple[str, str]:
    """The inverse of `cluster_key`: (name, project)."""
    name, _, project = key.partition(".")
    return name, project or DEFAULT_PROJECT


def cluster_key(name: str, project: str) -> str:
    """`echo` in the default project, `echo.acme` in project `acme`: also its endpoint's host,
    `<key>.<domain>`."""
    return name if project in (DEFAULT_PROJECT, "") else f"{name}.{project}"


class NodeState(StrEnum):
    READY = "ready"
    SUSPECT = "suspect"  # missed heartbeats or lost its link: out of routing, replicas kept
    DOWN = "down"  # gone long enough that its replicas count as lost after their grace


class ReplicaState(StrEnum):
    PENDING = "pending"  # not placed yet, or placed and not yet started by the node
    STARTING = "starting"  # the node started it; health check not yet passing
    READY = "ready"  # passing its health check: receives traffic
    UNREADY = "unready"  # was ready, now failing its health check
    FAILED = "failed"  # could not start, or keeps failing; replaced elsewhere
    STOPPED = "stopped"  # stopped on purpose (cluster deleted or scaled down)


# States in which a replica holds its GPUs and counts toward the cluster's desired total.
ACTIVE_REPLICA_STATES = frozenset(
    {ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNREADY}
)


class Role(StrEnum):
    ADMIN = "admin"
    DEPLOYER = "deployer"  # manages the clusters, keys and secrets of one project
    NODE = "node"  # a join token: may register one node per use
    PROXY = "proxy"


class Runtime(StrEnum):
    PROCESS = "process"
    CONTAINER = "container"


class Isolation(StrEnum):
    """How strongly a container replica is kept apart from the host it runs on."""

    CONTAINER = "container"  # runc or crun: namespaces and cgroups
    SANDBOX = "sandbox"  # gVisor (runsc): a user-space kernel between the workload and the host
    MICROVM = "microvm"  # Kata Containers: a lightweight VM per replica (needs KVM)


class PullPolicy(StrEnum):
    ALWAYS = "always"
    IF_NOT_PRESENT = "if-not-present"
    NEVER = "never"


@dataclass(frozen=True)
class Gpu:
    """One GPU on a node. `uuid` is unique on its node; NVML reports it, declared GPUs get one."""

    uuid: str
    name: str
    memory_gb: float | None = None
    index: int = 0


@dataclass(frozen=True)
class GpuStatus:
    """What NVML says about one GPU right now; None for what it cannot read."""

    uuid: str
    utilization_pct: float | None = None
    temperature_c: float | None = None
    memory_used_gb: float | None = None
    healthy: bool = True
    reason: str = ""  # why it is unhealthy (e.g. an XID error)


@dataclass(frozen=True)
class GpuRequest:
    """What a replica needs: `count` GPUs of any of `types` (empty means any type)."""

    types: tuple[str, ...] = ()
    count: int = 0
    min_memory_gb: float | None = None


@dataclass(frozen=True)
class HealthCheck:
    path: str = "/healthz"
    interval_s: float = 2.0
    timeout_s: float = 1.0
    failure_threshold: int = 3  # consecutive failures before a ready replica turns unready
    startup_timeout_s: float = 600.0  # never ready within this after launch: failed, replaced
    unready_timeout_s: float = 60.0  # unready for this long after having been ready: failed


@dataclass(frozen=True)
class Resources:
    """Container limits; None means no limit."""

    cpus: float | None = None
    memory_mb: int | None = None


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: `requests_per_second` on average, up to `burst` at once."""

    requests_per_second: float
    burst: int


@dataclass(frozen=True)
class EndpointConfig:
    """How the proxy guards a cluster's endpoint."""

    auth: str = "none"  # "none" | "api-key"
    rate_limit: RateLimit | None = None  # for the whole cluster
    per_client_rate_limit: RateLimit | None = None  # for each API key (else client address)


@dataclass(frozen=True)
class UpdateStrategy:
    """How a change of what replicas run is rolled out (Kubernetes' names).

    `max_surge`: new replicas that may exist beyond `replicas` while old ones still run (None:
    as many as fit, so a fleet with room rolls in one step). `max_unavailable`: how far below `replicas` serving
    copies may drop (None: 0 while the fleet has room for a new copy, 1 when it has none, so a
    roll on a full GPU fleet replaces one copy at a time instead of waiting forever)."""

    max_surge: int | None = None
    max_unavailable: int | None = None

    def surge(self, replicas: int) -> int:
        return self.max_surge if self.max_surge is not None else replicas


@dataclass(frozen=True)
class ClusterSpec:
    """A validated cluster manifest: everything needed to run and route its replicas."""

    name: str
    replicas: int
    gpu: GpuRequest = GpuRequest()
    runtime: Runtime = Runtime.PROCESS  # a manifest without `runtime` gets CONTAINER (manifest.py)
    image: str | None = None
    command: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    port: int = 8000
    health: HealthCheck | None = HealthCheck()
    workdir: str | None = None
    reschedule_after_s: float = 30.0
    isolation: Isolation = Isolation.CONTAINER
    image_pull: PullPolicy = PullPolicy.IF_NOT_PRESENT
    resources: Resources = Resources()
    endpoint: EndpointConfig = EndpointConfig()
    project: str = DEFAULT_PROJECT  # the tenant it belongs to
    env_from_secret: dict[str, str] = field(default_factory=dict)  # env var -> secret name in the project
    update: UpdateStrategy = UpdateStrategy()

    @property
    def key(self) -> str:
        """Unique across projects, and the host label(s) before the domain in its endpoint."""
        return cluster_key(self.name, self.project)


@dataclass(frozen=True)
class Node:
    """A node as the scheduler and the route table see it."""

    id: str
    name: str
    gpus: tuple[Gpu, ...]
    address: str  # host the node's replicas are reachable on
    state: NodeState = NodeState.READY
    schedulable: bool = True
    runtimes: tuple[str, ...] = ("process",)  # the replica runtimes this node offers
    draining: bool = False  # replicas here are moved elsewhere, new copies ready first
    isolation: tuple[str, ...] = ()  # isolation levels its container runtime offers
    gpus_healthy: bool = True  # False while a GPU reports a fault: no new replicas here


@dataclass(frozen=True)
class Replica:
    """One instance of a cluster. `node_id` is None until the scheduler places it."""

    id: str
    cluster: str
    node_id: str | None
    gpus: tuple[str, ...] = ()  # GPU uuids on its node, held exclusively
    state: ReplicaState = ReplicaState.PENDING
    reason: str = ""
    address: str | None = None  # host:port the proxy forwards to
    generation: int = 0  # fencing: grows with every new assignment
    stopping: bool = False  # the server wants it gone; kept until the node confirms
    revision: str = ""  # template_revision of the spec it was created from
    image_digest: str | None = None  # the image digest the node resolved and runs

    @property
    def holds_resources(self) -> bool:
        """Whether this replica's GPUs are taken (it may still be running on its node)."""
        return self.node_id is not None and (self.stopping or self.state in ACTIVE_REPLICA_STATES)


@dataclass(frozen=True)
class Assignment:
    """What the server tells a node to run: one replica with everything needed to start it."""

    replica_id: str
    cluster: str
    generation: int
    spec: ClusterSpec
    gpus: tuple[str, ...] = ()
    secret_env: dict[str, str] = field(default_factory=dict)  # filled in on the way to its node only


# Fields of a spec that say how many replicas exist, how patiently they are replaced or how the
# proxy guards them; changing any other field changes what a replica runs: a new revision.
_SCALING_FIELDS = frozenset({"replicas", "reschedule_after_s", "endpoint", "project", "update"})


def template_revision(spec: ClusterSpec) -> str:
    """A short stable hash of what a replica runs; replicas of an older revision get replaced."""
    template = {k: v for k, v in asdict(spec).items() if k not in _SCALING_FIELDS}
    encoded = json.dumps(template, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:12]
