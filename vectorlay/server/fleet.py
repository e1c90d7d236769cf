"""The control plane's in-memory view of the fleet, indexed for cheap per-change work.

The store is the source of truth across restarts; this view is loaded from it at start and kept
in step by the controller, which writes to the store first and to this view second.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from vectorlay.core.cluster_health import ClusterHealth
from vectorlay.core.health import Liveness
from vectorlay.core.model import Assignment, GpuStatus, Node, NodeState, Replica
from vectorlay.server.records import ApiKeyRecord, ClusterRecord, CommandRecord, NodeRecord, SecretRecord


class Fleet:
    def __init__(self) -> None:
        self.nodes: dict[str, NodeRecord] = {}
        self.node_ids_by_name: dict[str, str] = {}
        self.liveness: dict[str, Liveness] = {}
        self.clusters: dict[str, ClusterRecord] = {}
        self.replicas: dict[str, Replica] = {}
        self.replica_created: dict[str, float] = {}
        self.by_cluster: defaultdict[str, set[str]] = defaultdict(set)
        self.by_node: defaultdict[str, set[str]] = defaultdict(set)
        self.outbox: defaultdict[str, list[CommandRecord]] = defaultdict(list)
        self.gpu_status: dict[str, tuple[GpuStatus, ...]] = {}  # latest from heartbeats, memory only
        self.api_keys: dict[str, ApiKeyRecord] = {}
        self.rolling: set[str] = set()  # clusters with replicas of an old revision or on draining nodes
        self.unplaced: set[str] = set()  # ids of replicas waiting for a node
        self.secrets: dict[tuple[str, str], SecretRecord] = {}  # (project, name) -> encrypted value
        self.generation = 0  # the fencing counter: only grows, persisted in meta
        self.health: dict[str, ClusterHealth] = {}  # clusters that failed lately (crash loop, quarantine)
        # cluster -> nodes where its replicas failed for a reason tied to the node: placed there last
        self.avoid: dict[str, set[str]] = {}
        self.delivered_at: dict[str, float] = {}  # replica id -> when its start reached its node (monotonic)

    # --- nodes ---

    def node_state(self, node_id: str) -> NodeState:
        live = self.liveness.get(node_id)
        return live.state if live else NodeState.DOWN

    def gpus_healthy(self, node_id: str) -> bool:
        record = self.nodes.get(node_id)
        return record is None or not record.unhealthy_gpus  # kept from heartbeats by node_intake

    def node_view(self, node_id: str) -> Node | None:
        record = self.nodes.get(node_id)
        return record.as_node(self.node_state(node_id), self.gpus_healthy(node_id)) if record else None

    def node_views(self) -> dict[str, Node]:
        return {node_id: record.as_node(self.node_state(node_id), self.gpus_healthy(node_id))
                for node_id, record in self.nodes.items()}

    def key_hashes(self, cluster: str) -> tuple[str, ...]:
        return tuple(sorted(k.secret_hash for k in self.api_keys.values()
                            if k.cluster == cluster and k.revoked_at is None))

    def down_since(self) -> dict[str, float]:
        return {node_id: live.since for node_id, live in self.liveness.items() if live.state is NodeState.DOWN}

    def put_node(self, record: NodeRecord) -> None:
        old = self.nodes.get(record.id)
        if old is not None and old.name != record.name:
            self.node_ids_by_name.pop(old.name, None)
        self.nodes[record.id] = record
        self.node_ids_by_name[record.name] = record.id

    def remove_node(self, node_id: str) -> None:
        record = self.nodes.pop(node_id, None)
        if record is not None:
            self.node_ids_by_name.pop(record.name, None)
        self.liveness.pop(node_id, None)
        self.outbox.pop(node_id, None)
        self.gpu_status.pop(node_id, None)

    # --- replicas ---

    def put_replica(self, replica: Replica, created_at: float) -> None:
        old = self.replicas.get(replica.id)
        if old is not None and old.node_id != replica.node_id and old.node_id is not None:
            self.by_node[old.node_id].discard(replica.id)
        self.replicas[replica.id] = replica
        self.replica_created.setdefault(replica.id, created_at)
        if replica.node_id is None and not replica.stopping:
            self.unplaced.add(replica.id)
        else:
            self.unplaced.discard(replica.id)
        self.by_cluster[replica.cluster].add(replica.id)
        if replica.node_id is not None:
            self.by_node[replica.node_id].add(replica.id)

    def remove_replica(self, replica_id: str) -> None:
        replica = self.replicas.pop(replica_id, None)
        self.replica_created.pop(replica_id, None)
        self.delivered_at.pop(replica_id, None)
        self.unplaced.discard(replica_id)
        if replica is None:
            return
        self.by_cluster[replica.cluster].discard(replica_id)
        if not self.by_cluster[replica.cluster]:
            del self.by_cluster[replica.cluster]
        if replica.node_id is not None:
            self.by_node[replica.node_id].discard(replica_id)

    def replicas_of_cluster(self, cluster: str) -> list[Replica]:
        return [self.replicas[i] for i in sorted(self.by_cluster.get(cluster, ()))]

    def replicas_on_node(self, node_id: str) -> list[Replica]:
        return [self.replicas[i] for i in sorted(self.by_node.get(node_id, ()))]

    def clusters_on_node(self, node_id: str) -> set[str]:
        return {self.replicas[i].cluster for i in self.by_node.get(node_id, ())}

    def desired_on_node(self, node_id: str) -> list[Assignment]:
        """What the node should run now: its placed replicas that are not being stopped."""
        assignments = []
        for replica in self.replicas_on_node(node_id):
            record = self.clusters.get(replica.cluster)
            if replica.stopping or record is None:
                continue
            assignments.append(Assignment(replica.id, replica.cluster, replica.generation, record.spec, replica.gpus))
        return assignments

    def clusters_waiting(self) -> set[str]:
        """Clusters with replicas waiting for a node: worth another try when capacity frees up."""
        return {self.replicas[i].cluster for i in self.unplaced}

    def clusters_to_spread(self) -> set[str]:
        """Clusters with two or more live copies on one node: worth another look when a node
        becomes available (they may spread over it)."""
        return {cluster for cluster in self.by_cluster if self.is_packed(cluster)}

    def is_packed(self, cluster: str) -> bool:
        """Whether two or more live copies of the cluster share a node."""
        seen: set[str] = set()
        for replica_id in self.by_cluster.get(cluster, ()):
            replica = self.replicas[replica_id]
            if replica.node_id is None or replica.stopping:
                continue
            if replica.node_id in seen:
                return True
            seen.add(replica.node_id)
        return False

    def all_cluster_names(self) -> Iterable[str]:
        return set(self.clusters) | set(self.by_cluster)
