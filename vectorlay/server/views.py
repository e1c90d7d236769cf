"""What `vectorlay get` and `describe` show: JSON-ready views of the fleet."""

from __future__ import annotations

from typing import Any

import trio

from vectorlay.core import cluster_health
from vectorlay.core.cluster_health import HEALTHY, ClusterHealth
from vectorlay.core.codec import dump
from vectorlay.core.health import Liveness
from vectorlay.core.model import ACTIVE_REPLICA_STATES, GpuStatus, NodeState, Replica, ReplicaState, split_key
from vectorlay.server.fleet import Fleet
from vectorlay.server.records import ApiKeyRecord, AuditRecord, EventRecord, TokenRecord
from vectorlay.server.write_behind import DatabaseStatus

UNKNOWN = "unknown"  # a replica whose node is not ready: what it does now is not known
RECONNECTING = "reconnecting"  # a node not heard from since the server restarted


def replica_state(fleet: Fleet, replica: Replica) -> str:
    """The state to show: `unknown` when its node is not ready (its last word may be stale:
    never shown ready), else what its node last reported."""
    if replica.node_id is not None and replica.state in ACTIVE_REPLICA_STATES and replica.state is not \
            ReplicaState.PENDING and fleet.node_state(replica.node_id) is not NodeState.READY:
        return UNKNOWN
    return replica.state.value


def _node_trouble(fleet: Fleet, replica: Replica) -> str:
    node = fleet.nodes.get(replica.node_id or "")
    return f"its node {node.name if node else replica.node_id} is {fleet.node_state(replica.node_id or '').value}"


def cluster_view(fleet: Fleet, name: str, endpoint: str | None, now: float) -> dict[str, Any]:
    """`now` is the server's monotonic clock (for "next try in 40s")."""
    record = fleet.clusters.get(name)
    replicas = [r for r in fleet.replicas_of_cluster(name) if not r.stopping]
    revision = record.revision if record else ""
    shown = {r.id: replica_state(fleet, r) for r in replicas}
    current = [r for r in replicas if r.revision == revision]
    ready = sum(1 for r in current if shown[r.id] == ReplicaState.READY.value)
    desired = record.spec.replicas if record else 0
    states: dict[str, int] = {}
    for replica in replicas:
        states[shown[replica.id]] = states.get(shown[replica.id], 0) + 1
    reasons = sorted({(_node_trouble(fleet, r) if shown[r.id] == UNKNOWN else r.reason) for r in replicas
                      if shown[r.id] != ReplicaState.READY.value and (r.reason or shown[r.id] == UNKNOWN)})
    short, project = split_key(name)
    return {
        "name": short,
        "project": project,
        "key": name,
        "replicas": desired,
        "ready": ready,
        "serving": sum(1 for state in shown.values() if state == ReplicaState.READY.value),
        "up_to_date": len(current),
        "endpoint": endpoint,
        "states": states,
        "stopping": sum(1 for r in fleet.replicas_of_cluster(name) if r.stopping),
        "reasons": reasons,
        "runtime": record.spec.runtime.value if record else None,
        "gpu": dump(record.spec.gpu) if record else None,
        "created_at": record.created_at if record else None,
        "health": health_view(fleet.health.get(name, HEALTHY), now),
    }


def health_view(health: ClusterHealth, now: float) -> dict[str, Any]:
    """Whether the cluster is in trouble of its own: crash-looping, quarantined or degraded."""
    if health.quarantined:
        status = "quarantined"
    elif health.degraded:
        status = "degraded"
    elif health.crash_looping:
        status = "crash-looping"
    else:
        status = "ok"
    return {"status": status, "message": cluster_health.describe(health, now), "failures": health.failures,
            "next_try_in_s": round(max(0.0, health.not_before - now), 1) if health.failures else None}


# Reasons a replica waits for a node that no change of load can end: no ready node could run it.
CANNOT_PLACE_PREFIX = "no ready node"


def blocked_reason(view: dict[str, Any]) -> str | None:
    """Why waiting for the cluster to be ready is pointless now (it will not get there by
    itself), or None: quarantined, crash-looping, or no ready node can run its replicas."""
    health = view.get("health") or {}
    if health.get("status") in ("quarantined", "crash-looping"):
        return str(health["message"])
    if view["ready"] < view["replicas"]:
        for reason in view["reasons"]:
            if reason.startswith(CANNOT_PLACE_PREFIX):
                return f"cannot be placed: {reason}"
    return None


def is_cluster_ready(view: dict[str, Any]) -> bool:
    """All desired replicas of the current revision ready, and nothing old still around."""
    total_live = sum(view["states"].values())
    return bool(view["ready"] >= view["replicas"] and total_live == view["replicas"])


def node_view(fleet: Fleet, node_id: str, now: float) -> dict[str, Any]:
    record = fleet.nodes[node_id]
    live = fleet.liveness.get(node_id)
    replicas = [r for r in fleet.replicas_on_node(node_id) if not r.stopping]
    used = {uuid for r in fleet.replicas_on_node(node_id) if r.holds_resources for uuid in r.gpus}
    statuses = {s.uuid: s for s in fleet.gpu_status.get(node_id, ())}
    return {
        "id": record.id,
        "name": record.name,
        "state": node_state(live, now) if live else fleet.node_state(node_id).value,
        "connected": bool(live and live.connected),
        "address": record.address,
        "gpus": [{**dump(g), "in_use": g.uuid in used, **_gpu_status(statuses.get(g.uuid))} for g in record.gpus],
        "gpus_healthy": fleet.gpus_healthy(node_id),
        "runtimes": list(record.runtimes),
        "isolation": list(record.isolation),
        "data_plane": record.data_plane,
        # Proxies the node has a tunnel to now (tunnel data plane; from its heartbeats).
        "tunnels": fleet.tunnels.get(node_id) if record.data_plane == "tunnel" else None,
        "replicas": len(replicas),
        "last_seen_s": round(now - live.last_seen, 1) if live and live.last_seen <= now else None,
        "joined_at": record.joined_at,
        "schedulable": record.schedulable,
    }


def node_state(live: Liveness, now: float) -> str:
    """`reconnecting` for a node the server has not heard from since it restarted (still in its
    grace, not judged yet): its last-seen time is old, and it is not known to be ready."""
    if not live.connected and live.state is NodeState.READY and live.grace_until > now:
        return RECONNECTING
    return live.state.value


def _gpu_status(status: GpuStatus | None) -> dict[str, Any]:
    if status is None:
        return {"healthy": None, "utilization_pct": None, "temperature_c": None}
    return {"healthy": status.healthy, "health_reason": status.reason, "utilization_pct": status.utilization_pct,
            "temperature_c": status.temperature_c, "memory_used_gb": status.memory_used_gb}


def replica_view(fleet: Fleet, replica_id: str) -> dict[str, Any]:
    replica = fleet.replicas[replica_id]
    node = fleet.nodes.get(replica.node_id) if replica.node_id else None
    state = replica_state(fleet, replica)
    reason = _node_trouble(fleet, replica) if state == UNKNOWN else replica.reason
    if replica.stopping:
        reason = f"stopping: {reason}" if reason else "stopping"
    cluster, project = split_key(replica.cluster)
    return {
        "id": replica.id,
        "cluster": cluster,
        "project": project,
        "node": node.name if node else None,
        "node_id": replica.node_id,
        "state": state,
        "reason": reason,
        "address": replica.address,
        "gpus": list(replica.gpus),
        "generation": replica.generation,
        "revision": replica.revision,
        "image_digest": replica.image_digest,
        "stopping": replica.stopping,
        "created_at": fleet.replica_created.get(replica.id),
    }


def key_view(record: ApiKeyRecord) -> dict[str, Any]:
    return {"id": record.id, "cluster": record.cluster, "name": record.name, "created_at": record.created_at,
            "revoked_at": record.revoked_at, "state": "revoked" if record.revoked_at else "active"}


def event_view(event: EventRecord) -> dict[str, Any]:
    return {"at": event.at, "replica": event.replica_id, "message": event.message}


def fleet_summary(fleet: Fleet) -> dict[str, Any]:
    nodes: dict[str, int] = {}
    now = trio.current_time()
    for node_id in fleet.nodes:
        live = fleet.liveness.get(node_id)
        state = node_state(live, now) if live else fleet.node_state(node_id).value
        nodes[state] = nodes.get(state, 0) + 1
    replicas: dict[str, int] = {}
    for replica in fleet.replicas.values():
        key = "stopping" if replica.stopping else replica_state(fleet, replica)
        replicas[key] = replicas.get(key, 0) + 1
    connected = sum(1 for live in fleet.liveness.values() if live.connected)
    return {"nodes": nodes, "nodes_total": len(fleet.nodes), "connected": connected, "replicas": replicas,
            "replicas_total": len(fleet.replicas), "clusters": len(fleet.clusters)}


def token_view(record: TokenRecord) -> dict[str, Any]:
    """Everything about a token but its secret (which is not stored anyway)."""
    return {"id": record.id, "role": record.role.value, "project": record.project or None,
            "created_at": record.created_at, "expires_at": record.expires_at, "uses_left": record.uses_left,
            "revoked": record.revoked, "description": record.description}


def audit_view(record: AuditRecord) -> dict[str, Any]:
    return {"at": record.at, "actor": record.actor, "action": record.action, "target": record.target,
            "project": record.project or None, "detail": record.detail}


def database_view(status: DatabaseStatus, pending_writes: int) -> dict[str, Any]:
    return {"available": status.available, "since": status.since or None, "reason": status.reason or None,
            "failures_total": status.failures, "outages_total": status.outages, "pending_writes": pending_writes}
