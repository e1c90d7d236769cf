"""What `vectorlay get` and `describe` show: the API's views (core/api_views.py) of the fleet."""

from __future__ import annotations

import trio

from vectorlay.core import cluster_health, readiness
from vectorlay.core.api_views import (
    AuditView,
    ClusterView,
    DatabaseView,
    EventView,
    FleetSummary,
    GpuView,
    HealthView,
    KeyView,
    NodeDescription,
    NodeView,
    ReplicaDescription,
    ReplicaView,
    RevisionView,
    TokenView,
)
from vectorlay.core.cluster_health import HEALTHY, ClusterHealth
from vectorlay.core.health import Liveness
from vectorlay.core.model import ACTIVE_REPLICA_STATES, Gpu, GpuStatus, NodeState, Replica, ReplicaState, split_key
from vectorlay.core.readiness import ClusterReadiness
from vectorlay.core.replica_history import failure_count, restart_count
from vectorlay.server.fleet import Fleet
from vectorlay.server.records import ApiKeyRecord, AuditRecord, EventRecord, RevisionRecord, TokenRecord
from vectorlay.server.write_behind import DatabaseStatus

UNKNOWN = "unknown"  # a replica whose node is not ready: what it does now is not known
RECONNECTING = "reconnecting"  # a node not heard from since the server restarted
# Reasons a replica waits for a node that no change of load can end: the nodes there cannot run
# it. (With no ready node at all, waiting is what a fleet being set up expects.)
CANNOT_PLACE_PREFIXES = ("no ready node offers", "no ready node has")


def replica_state(fleet: Fleet, replica: Replica) -> str:
    """The state to show: `unknown` when its node is not ready (its last word may be stale:
    never shown ready), else what its node last reported."""
    if (replica.node_id is not None and replica.state in ACTIVE_REPLICA_STATES
            and replica.state is not ReplicaState.PENDING
            and fleet.node_state(replica.node_id) is not NodeState.READY):
        return UNKNOWN
    return replica.state.value


def _node_trouble(fleet: Fleet, replica: Replica) -> str:
    node = fleet.nodes.get(replica.node_id or "")
    return f"its node {node.name if node else replica.node_id} is {fleet.node_state(replica.node_id or '').value}"


def node_state(live: Liveness | None, state: NodeState, now: float) -> str:
    """`reconnecting` for a node the server has not heard from since it restarted (still in its
    grace, not judged yet): its last-seen time is old, and it is not known to be ready."""
    if live is not None and not live.connected and live.state is NodeState.READY and live.grace_until > now:
        return RECONNECTING
    return state.value


def cluster_readiness(fleet: Fleet, name: str) -> ClusterReadiness:
    record = fleet.clusters.get(name)
    return readiness.cluster_readiness(record.spec.replicas if record else 0, record.revision if record else "",
                                       fleet.replicas_of_cluster(name), fleet.node_state)


def cluster_view(fleet: Fleet, name: str, endpoint: str | None, now: float) -> ClusterView:
    """`now` is the server's monotonic clock (for "next try in 40s")."""
    record = fleet.clusters.get(name)
    replicas = [r for r in fleet.replicas_of_cluster(name) if not r.stopping]
    counts = cluster_readiness(fleet, name)
    shown = {r.id: replica_state(fleet, r) for r in replicas}
    states: dict[str, int] = {}
    for replica in replicas:
        states[shown[replica.id]] = states.get(shown[replica.id], 0) + 1
    reasons = sorted({(_node_trouble(fleet, r) if shown[r.id] == UNKNOWN else r.reason) for r in replicas
                      if shown[r.id] != ReplicaState.READY.value and (r.reason or shown[r.id] == UNKNOWN)})
    short, project = split_key(name)
    return ClusterView(
        name=short,
        project=project,
        key=name,
        replicas=counts.desired,
        ready=counts.serving,
        up_to_date=counts.up_to_date,
        endpoint=endpoint,
        states=states,
        stopping=sum(1 for r in fleet.replicas_of_cluster(name) if r.stopping),
        reasons=tuple(reasons),
        runtime=record.spec.runtime if record else None,
        gpu=record.spec.gpu if record else None,
        created_at=record.created_at if record else None,
        health=health_view(fleet.health.get(name, HEALTHY), now),
        serving=sum(1 for r in replicas if readiness.serves(r, fleet.node_state)),
    )


def health_view(health: ClusterHealth, now: float) -> HealthView:
    """Whether the cluster is in trouble of its own: crash-looping, quarantined or degraded."""
    if health.quarantined:
        status = "quarantined"
    elif health.degraded:
        status = "degraded"
    elif health.crash_looping:
        status = "crash-looping"
    else:
        status = "ok"
    return HealthView(status, cluster_health.describe(health, now), health.failures,
                      round(max(0.0, health.not_before - now), 1) if health.failures else None)


def blocked_reason(view: ClusterView) -> str | None:
    """Why waiting for the cluster to be ready is pointless now (it will not get there by
    itself), or None: quarantined, crash-looping, or the ready nodes cannot run its replicas."""
    if view.health.status in ("quarantined", "crash-looping"):
        return view.health.message
    if view.ready < view.replicas:
        for reason in view.reasons:
            if reason.startswith(CANNOT_PLACE_PREFIXES):
                return f"cannot be placed: {reason}"
    return None


def node_view(fleet: Fleet, node_id: str, now: float) -> NodeView:
    record = fleet.nodes[node_id]
    live = fleet.liveness.get(node_id)
    replicas = [r for r in fleet.replicas_on_node(node_id) if not r.stopping]
    used = {uuid for r in fleet.replicas_on_node(node_id) if r.holds_resources for uuid in r.gpus}
    statuses = {s.uuid: s for s in fleet.gpu_status.get(node_id, ())}
    # What its heartbeats said reaches every server as the record's unhealthy GPUs; the full
    # status (utilisation, temperature) only the server that holds its session has.
    unhealthy = dict(record.unhealthy_gpus)
    for uuid, reason in unhealthy.items():
        if uuid not in statuses:
            statuses[uuid] = GpuStatus(uuid, healthy=False, reason=reason)
    return NodeView(
        id=record.id,
        name=record.name,
        state=node_state(live, fleet.node_state(node_id), now),
        connected=bool(live and live.connected),
        address=record.address,
        gpus=tuple(gpu_view(g, g.uuid in used, statuses.get(g.uuid)) for g in record.gpus),
        gpus_healthy=fleet.gpus_healthy(node_id),
        runtimes=record.runtimes,
        isolation=record.isolation,
        replicas=len(replicas),
        last_seen_s=round(now - live.last_seen, 1) if live and live.last_seen <= now else None,
        joined_at=record.joined_at,
        schedulable=record.schedulable,
        data_plane=record.data_plane,
        # Proxies the node has a tunnel to now (tunnel data plane; from its heartbeats).
        tunnels=record.tunnels if record.data_plane == "tunnel" else None,
    )


def gpu_view(gpu: Gpu, in_use: bool, status: GpuStatus | None) -> GpuView:
    if status is None:
        return GpuView(gpu.uuid, gpu.name, gpu.memory_gb, gpu.index, in_use)
    return GpuView(gpu.uuid, gpu.name, gpu.memory_gb, gpu.index, in_use, status.healthy, status.reason,
                   status.utilization_pct, status.temperature_c, status.memory_used_gb)


def replica_view(fleet: Fleet, replica_id: str) -> ReplicaView:
    replica = fleet.replicas[replica_id]
    node = fleet.nodes.get(replica.node_id) if replica.node_id else None
    state = replica_state(fleet, replica)
    reason = _node_trouble(fleet, replica) if state == UNKNOWN else replica.reason
    if replica.stopping:
        reason = f"stopping: {reason}" if reason else "stopping"
    cluster, project = split_key(replica.cluster)
    return ReplicaView(
        id=replica.id,
        cluster=cluster,
        project=project,
        node=node.name if node else None,
        node_id=replica.node_id,
        state=state,
        reason=reason,
        address=replica.address,
        gpus=replica.gpus,
        generation=replica.generation,
        revision=replica.revision,
        image_digest=replica.image_digest,
        stopping=replica.stopping,
        created_at=fleet.replica_created.get(replica.id),
    )


def key_view(record: ApiKeyRecord) -> KeyView:
    return KeyView(record.id, record.cluster, record.name, record.created_at, record.revoked_at,
                   "revoked" if record.revoked_at else "active")


def event_view(event: EventRecord) -> EventView:
    return EventView(event.at, event.replica_id, event.message)


def fleet_summary(fleet: Fleet) -> FleetSummary:
    """Counted as the tables show them (`reconnecting` nodes, `unknown` replicas), so a summary
    line never contradicts the rows below it."""
    now = trio.current_time()
    nodes: dict[str, int] = {}
    for node_id in fleet.nodes:
        state = node_state(fleet.liveness.get(node_id), fleet.node_state(node_id), now)
        nodes[state] = nodes.get(state, 0) + 1
    replicas: dict[str, int] = {}
    for replica in fleet.replicas.values():
        key = "stopping" if replica.stopping else replica_state(fleet, replica)
        replicas[key] = replicas.get(key, 0) + 1
    connected = sum(1 for live in fleet.liveness.values() if live.connected)
    return FleetSummary(nodes, len(fleet.nodes), connected, replicas, len(fleet.replicas), len(fleet.clusters))


def token_view(record: TokenRecord) -> TokenView:
    """Everything about a token but its secret (which is not stored anyway)."""
    return TokenView(record.id, record.role, record.project or None, record.created_at, record.expires_at,
                     record.uses_left, record.revoked, record.description)


def audit_view(record: AuditRecord) -> AuditView:
    return AuditView(record.at, record.actor, record.action, record.target, record.project or None, record.detail)


def database_view(status: DatabaseStatus, pending_writes: int) -> DatabaseView:
    return DatabaseView(status.available, status.since or None, status.reason or None, status.failures,
                        status.outages, pending_writes)


def node_description(fleet: Fleet, node_id: str, now: float, events: list[EventRecord],
                     changes: list[AuditRecord]) -> NodeDescription:
    """`events`: recent events of the clusters that have replicas on the node (any order);
    only those of the replicas on it now are kept. `changes`: the node's audit records."""
    record = fleet.nodes[node_id]
    here = fleet.replicas_on_node(node_id)
    ids = {r.id for r in here}
    mine = sorted((e for e in events if e.replica_id in ids), key=lambda e: e.at)
    return NodeDescription(
        node=node_view(fleet, node_id, now),
        draining=record.draining,
        last_seen_at=record.last_seen_at,
        session_server=record.session_server or None,
        replicas=tuple(replica_view(fleet, r.id) for r in here),
        events=tuple(event_view(e) for e in mine[-20:]),
        changes=tuple(audit_view(c) for c in changes),
    )


def replica_description(fleet: Fleet, replica_id: str, events: list[EventRecord]) -> ReplicaDescription:
    """`events`: its cluster's recent events, oldest first; only the replica's own are kept."""
    replica = fleet.replicas[replica_id]
    mine = [e for e in events if e.replica_id == replica_id]
    record = fleet.clusters.get(replica.cluster)
    messages = [e.message for e in mine]
    return ReplicaDescription(
        replica=replica_view(fleet, replica_id),
        port=record.spec.port if record else None,
        restarts=restart_count(replica.reason, messages),
        failures=failure_count(messages),
        events=tuple(event_view(e) for e in mine[-20:]),
    )


def revision_views(revisions: list[RevisionRecord]) -> tuple[RevisionView, ...]:
    """Oldest first; the newest is what the cluster runs now (every change of its spec stores one)."""
    return tuple(RevisionView(*split_key(r.cluster), r.revision, r.at, r.actor, r.change, i == len(revisions) - 1,
                              r.spec) for i, r in enumerate(revisions))
