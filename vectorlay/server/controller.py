"""The controller: every change to the fleet goes through here, under one lock.

Each change is decided on the in-memory fleet (pure core functions), written to the store in one
transaction, then applied to memory, then announced: commands to the nodes' sessions, route
changes to the proxies' feed, a wake-up to watchers. A crash between the write and the sends
loses nothing: commands wait in the outbox and are redelivered when the node reconnects.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import os
import secrets
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import trio

from vectorlay.core import health
from vectorlay.core.health import Liveness, LivenessPolicy
from vectorlay.core.model import (
    Assignment,
    ClusterSpec,
    GpuStatus,
    Node,
    NodeState,
    Replica,
    ReplicaState,
    split_key,
    template_revision,
)
from vectorlay.core.protocol import Command, Message, ReplicaReport, Sync
from vectorlay.core.reconciler import ClusterPlan, plan_cluster
from vectorlay.core.token_bucket import TokenBucket
from vectorlay.errors import ConflictError, NotFoundError, UserError
from vectorlay.server.fleet import Fleet
from vectorlay.server.ids import new_replica_id, random_id
from vectorlay.server.records import (
    ApiKeyRecord,
    AuditRecord,
    ClusterRecord,
    CommandRecord,
    EventRecord,
    NodeRecord,
    SecretRecord,
)
from vectorlay.server.secrets_box import SecretBox
from vectorlay.server.store import Store, ops
from vectorlay.wire import CLOSE_POLICY

log = logging.getLogger("vectorlay.server")

REPLACE_BACKOFF_MAX_S = 60.0
# When this share of the fleet (and at least this many nodes) is down at once, the likelier cause is
# our own link or a regional outage, not the nodes: replace lost replicas at a paced rate (a tenth
# of the fleet per minute) instead of moving everything at once and again when they come back.
MASS_FAILURE_FRACTION = 0.3
MASS_FAILURE_MIN_NODES = 3
EVENTS_KEPT_PER_CLUSTER = 500
REPORT_QUEUE = 10_000  # replica reports waiting to be stored; node readers wait when it is full
REPORT_BATCH = 1_000  # at most this many reports per transaction
EVENT_TRIM_INTERVAL_S = 300.0


class NodeSession(Protocol):
    """What the controller needs from a connected node's session."""

    def send_nowait(self, message: Message) -> None: ...

    def close_soon(self, reason: str, code: int = ...) -> None: ...


@dataclass(frozen=True)
class ClusterChange:
    cluster: str
    action: str  # "created" | "updated" | "unchanged" | "deleted"
    detail: str = ""


class Controller:
    def __init__(
        self,
        fleet: Fleet,
        store: Store,
        policy: LivenessPolicy,
        wall_clock: Callable[[], float],
        crash_points: frozenset[str] = frozenset(),
        secret_box: SecretBox | None = None,
    ) -> None:
        self.fleet = fleet
        self.secret_box = secret_box or SecretBox(SecretBox.new_key())
        self.store = store
        self.policy = policy
        self.wall_clock = wall_clock
        self.crash_points = crash_points
        self.lock = trio.Lock()
        self.restart_grace_s = policy.down_after_s  # how long a restarting agent keeps its routes
        self.sessions: dict[str, NodeSession] = {}
        self._dirty: set[str] = set()
        self._wake = trio.Event()
        self._timers: list[tuple[float, str]] = []
        self._timer_set: set[tuple[float, str]] = set()
        self._replace_backoff: dict[str, tuple[int, float]] = {}  # cluster -> (failures, not before)
        self._mass_bucket: TokenBucket | None = None
        self._reports_in, self._reports_out = trio.open_memory_channel[tuple[str, ReplicaReport]](REPORT_QUEUE)
        self._acks_in, self._acks_out = trio.open_memory_channel[tuple[str, int]](REPORT_QUEUE)
        self._states_to_persist: set[str] = set()
        self.routes_dirty: set[str] = set()
        self.routes_changed = trio.Event()
        self.changed = trio.Event()

    # --- notification -----------------------------------------------------------------------

    def _crash_point(self, name: str) -> None:
        """Die here as if by kill -9, when a fault-injection test asks for it (VECTORLAY_FAULTS)."""
        if name in self.crash_points:
            log.warning("crash point %r reached: killing the server", name)
            os.kill(os.getpid(), signal.SIGKILL)

    def mark_dirty(self, cluster: str) -> None:
        self._dirty.add(cluster)
        self._wake.set()

    def mark_route(self, cluster: str) -> None:
        self.routes_dirty.add(cluster)
        self.routes_changed.set()

    def _announce(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_changed(self) -> None:
        await self.changed.wait()

    def _deliver(self, commands: Sequence[CommandRecord]) -> None:
        for command in commands:
            session = self.sessions.get(command.node_id)
            if session is not None:
                session.send_nowait(self.outgoing(command))

    # --- the loop ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reconcile dirty clusters and step node liveness until cancelled."""
        for name in self.fleet.all_cluster_names():
            self.mark_dirty(name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._liveness_loop)
            nursery.start_soon(self._trim_events)
            nursery.start_soon(self._apply_reports)
            nursery.start_soon(self._apply_acks)
            task_status.started()
            while True:
                now = trio.current_time()
                while self._timers and self._timers[0][0] <= now:
                    timer = heapq.heappop(self._timers)
                    self._timer_set.discard(timer)
                    self._dirty.add(timer[1])
                if self._dirty:
                    dirty, self._dirty = self._dirty, set()
                    async with self.lock:
                        for cluster in sorted(dirty):
                            await self._reconcile(cluster)
                    continue
                self._wake = trio.Event()
                deadline = self._timers[0][0] if self._timers else now + 3600
                with trio.move_on_at(deadline):
                    await self._wake.wait()

    async def _trim_events(self) -> None:
        while True:
            await trio.sleep(EVENT_TRIM_INTERVAL_S)
            await self.store.trim_events(EVENTS_KEPT_PER_CLUSTER)

    def _wake_at(self, when: float, cluster: str) -> None:
        if (when, cluster) in self._timer_set:
            return
        self._timer_set.add((when, cluster))
        heapq.heappush(self._timers, (when, cluster))
        self._wake.set()

    async def _reconcile(self, cluster: str) -> None:
        fleet = self.fleet
        record = fleet.clusters.get(cluster)
        spec = record.spec if record else None
        now = trio.current_time()
        failures, not_before = self._replace_backoff.get(cluster, (0, 0.0))
        may_replace = now >= not_before or self._is_initial(cluster)
        nodes = fleet.node_views()
        down_since = fleet.down_since()
        budget = self._lost_budget(nodes, now)
        plan = plan_cluster(spec, cluster, fleet.replicas_of_cluster(cluster), nodes, down_since,
                            list(fleet.replicas.values()), now, may_replace, budget)
        if self._rolling(cluster):
            fleet.rolling.add(cluster)
        else:
            fleet.rolling.discard(cluster)
        if budget is not None and self._mass_bucket is not None:
            if plan.lost_replaced:
                _, self._mass_bucket = self._mass_bucket.take(now, plan.lost_replaced)
            if budget == 0:
                self._wake_at(now + self._mass_bucket.retry_after(now), cluster)
        if not may_replace:
            self._wake_at(not_before, cluster)
        if spec is not None:
            self._schedule_loss_check(spec, cluster, down_since, now)
        if plan.empty:
            await self._refresh_unplaced_reason(cluster, plan)
            return
        await self._commit_plan(cluster, spec, plan)

    def _new_replica_id(self, name: str) -> str:
        """`<cluster name>-<5 random>`: short, readable, and checked unique across projects."""
        while (candidate := new_replica_id(name)) in self.fleet.replicas:
            pass
        return candidate

    def _rolling(self, cluster: str) -> bool:
        """Whether some live replica of the cluster runs an older template revision."""
        record = self.fleet.clusters.get(cluster)
        if record is None:
            return False
        revision = record.revision
        return any(
            not r.stopping and (r.revision != revision or self._on_draining_node(r))
            for r in self.fleet.replicas_of_cluster(cluster)
        )

    def _on_draining_node(self, replica: Replica) -> bool:
        node = self.fleet.nodes.get(replica.node_id) if replica.node_id else None
        return node is not None and node.draining

    def _lost_budget(self, nodes: Mapping[str, Node], now: float) -> int | None:
        """None normally; during a mass failure, how many lost replicas may be replaced now."""
        down = sum(1 for node in nodes.values() if node.state is NodeState.DOWN)
        if len(nodes) < MASS_FAILURE_MIN_NODES or down < MASS_FAILURE_FRACTION * len(nodes):
            if self._mass_bucket is not None:
                log.info("mass failure over (%d of %d nodes down): replacing lost replicas normally", down, len(nodes))
            self._mass_bucket = None
            return None
        if self._mass_bucket is None:
            per_minute = max(1.0, len(nodes) / 10)
            self._mass_bucket = TokenBucket.full(per_minute / 60, per_minute, now)
            log.warning("%d of %d nodes are down at once: pacing replacements to %g per minute",
                        down, len(nodes), per_minute)
        return self._mass_bucket.available(now)

    def _is_initial(self, cluster: str) -> bool:
        return not self.fleet.by_cluster.get(cluster)

    def _schedule_loss_check(self, spec: ClusterSpec, cluster: str, down_since: Mapping[str, float],
                             now: float) -> None:
        """Come back when a replica on a down node has waited out the cluster's grace."""
        for replica in self.fleet.replicas_of_cluster(cluster):
            if replica.node_id is not None and replica.node_id in down_since and not replica.stopping:
                due = down_since[replica.node_id] + spec.reschedule_after_s
                if due > now:
                    self._wake_at(due, cluster)

    async def _refresh_unplaced_reason(self, cluster: str, plan: ClusterPlan) -> None:
        if not plan.unplaced_reason:
            return
        changes: list[ops.Op] = []
        updated = []
        for replica in self.fleet.replicas_of_cluster(cluster):
            if replica.node_id is None and not replica.stopping and replica.reason != plan.unplaced_reason:
                new = replace(replica, reason=plan.unplaced_reason)
                changes.append(ops.PutReplica(new, self.fleet.replica_created[replica.id]))
                updated.append(new)
        if changes:
            await self.store.apply(changes)
            for replica in updated:
                self.fleet.put_replica(replica, 0)
            self._announce()

    async def _commit_plan(self, cluster: str, spec: ClusterSpec | None, plan: ClusterPlan) -> None:
        fleet = self.fleet
        wall = self.wall_clock()
        batch = _Batch(fleet, wall)
        for stop in plan.stop:
            replica = fleet.replicas[stop.replica_id]
            if replica.state is ReplicaState.FAILED:
                self._note_failure(cluster)
            batch.put_replica(replace(replica, stopping=True, reason=stop.reason))
            assert replica.node_id is not None
            batch.command(replica.node_id, "stop", replica.id, None)
        for replica_id in plan.forget:
            batch.forget(replica_id)
        revision = template_revision(spec) if spec else ""
        for replica_id, placement in plan.assign:
            replica = fleet.replicas[replica_id]
            assert spec is not None
            new = replace(replica, node_id=placement.node_id, gpus=placement.gpus, state=ReplicaState.PENDING,
                          reason=f"starting on {fleet.nodes[placement.node_id].name}",
                          generation=batch.next_generation())
            batch.put_replica(new)
            batch.command(new.node_id or "", "start", new.id,
                          Assignment(new.id, cluster, new.generation, spec, new.gpus))
        # A replacement for a failed replica says why it exists, so `get replicas` and `get
        # clusters` keep showing the failure (a bad image, say) after the failed copy is gone.
        failed = [fleet.replicas[s.replica_id] for s in plan.stop
                  if fleet.replicas[s.replica_id].state is ReplicaState.FAILED]
        for index, placement in enumerate(plan.create):
            assert spec is not None
            reason = f"starting on {fleet.nodes[placement.node_id].name}"
            if index < len(failed):
                reason += f" (replacing {failed[index].id}, which failed: {failed[index].reason or 'no reason given'})"
            new = Replica(self._new_replica_id(spec.name), cluster, placement.node_id, placement.gpus,
                          ReplicaState.PENDING, reason, None, batch.next_generation(), False, revision)
            batch.put_replica(new)
            batch.command(placement.node_id, "start", new.id,
                          Assignment(new.id, cluster, new.generation, spec, new.gpus))
        for _ in range(plan.create_unplaced):
            assert spec is not None
            batch.put_replica(Replica(self._new_replica_id(spec.name), cluster, None, (), ReplicaState.PENDING,
                                      plan.unplaced_reason, None, 0, False, revision))
        await self._commit(batch)
        if plan.forget:
            self._capacity_freed()

    def _note_failure(self, cluster: str) -> None:
        failures, _ = self._replace_backoff.get(cluster, (0, 0.0))
        failures += 1
        delay = min(REPLACE_BACKOFF_MAX_S, 2.0 ** (failures - 1)) if failures > 1 else 0.0
        self._replace_backoff[cluster] = (failures, trio.current_time() + delay)

    async def _commit(self, batch: _Batch) -> None:
        """Store first, then memory, then tell the world."""
        batch.finish()
        if not batch.changes:
            return
        await self.store.apply(batch.changes)
        if batch.commands:
            self._crash_point("after-commit")
        batch.apply_to_memory()
        for cluster in batch.touched_clusters:
            self.mark_route(cluster)
        self._deliver(batch.commands)
        self._announce()

    def _capacity_freed(self) -> None:
        """GPUs came free: clusters waiting for capacity get another try."""
        for cluster in {self.fleet.replicas[i].cluster for i in self.fleet.unplaced}:
            self.mark_dirty(cluster)

    # --- clusters (from the API) ------------------------------------------------------------

    def diff(self, specs: Sequence[ClusterSpec]) -> list[ClusterChange]:
        changes = []
        for spec in specs:
            old = self.fleet.clusters.get(spec.key)
            if old is None:
                changes.append(ClusterChange(spec.key, "created", f"{spec.replicas} replica(s)"))
            elif old.spec == spec:
                changes.append(ClusterChange(spec.key, "unchanged"))
            else:
                changes.append(ClusterChange(spec.key, "updated", describe_update(old.spec, spec)))
        return changes

    async def apply(self, specs: Sequence[ClusterSpec], dry_run: bool, actor: str = "") -> list[ClusterChange]:
        async with self.lock:
            for spec in specs:
                for env, secret in spec.env_from_secret.items():
                    if (spec.project, secret) not in self.fleet.secrets:
                        raise UserError(
                            f"cluster {spec.name!r}: {env} needs secret {secret!r}, which project {spec.project!r} "
                            f"does not have (create it: vectorlay secret set {spec.project} {secret})")
            changes = self.diff(specs)
            if dry_run:
                return changes
            wall = self.wall_clock()
            writes: list[ops.Op] = []
            records = []
            for spec, change in zip(specs, changes, strict=True):
                if change.action == "unchanged":
                    continue
                old = self.fleet.clusters.get(spec.key)
                record = ClusterRecord(spec, old.created_at if old else wall, wall)
                writes.append(ops.PutCluster(record))
                writes.append(self.audit(actor, f"cluster.{change.action}", spec.key, spec.project, change.detail))
                records.append(record)
            await self.store.apply(writes)
            for record in records:
                self.fleet.clusters[record.spec.key] = record
                self._replace_backoff.pop(record.spec.key, None)
                self.mark_dirty(record.spec.key)
            self._announce()
            return changes

    async def delete(self, name: str, actor: str = "") -> bool:
        async with self.lock:
            record = self.fleet.clusters.get(name)
            if record is None:
                return False
            await self.store.apply([ops.DeleteCluster(name),
                                    self.audit(actor, "cluster.delete", name, record.spec.project)])
            del self.fleet.clusters[name]
            self._replace_backoff.pop(name, None)
            self.mark_dirty(name)
            self.mark_route(name)
            self._announce()
            return True

    # --- endpoint API keys ------------------------------------------------------------------

    async def create_api_key(self, cluster: str, name: str, actor: str = "") -> tuple[ApiKeyRecord, str]:
        """A new key for the cluster's endpoint; the key itself is returned once, never stored."""
        owner = self.fleet.clusters.get(cluster)
        if owner is None:
            raise NotFoundError(f"cluster {cluster!r} not found")
        key_id = f"vk-{random_id(8)}"
        key = f"{key_id}.{secrets.token_urlsafe(32)}"
        record = ApiKeyRecord(key_id, cluster, name or key_id, hash_api_key(key), self.wall_clock())
        async with self.lock:
            await self.store.apply([ops.PutApiKey(record), ops.AddEvent(EventRecord(
                cluster, None, record.created_at, f"API key {record.id} ({record.name}) created")),
                self.audit(actor, "key.create", f"{cluster}/{record.id}", owner.spec.project, record.name)])
            self.fleet.api_keys[record.id] = record
            self.mark_route(cluster)
        return record, key

    async def revoke_api_key(self, cluster: str, key_id: str, actor: str = "") -> ApiKeyRecord:
        async with self.lock:
            record = self.fleet.api_keys.get(key_id)
            if record is None or record.cluster != cluster:
                raise NotFoundError(f"no API key {key_id!r} for cluster {cluster!r}")
            if record.revoked_at is None:
                record = replace(record, revoked_at=self.wall_clock())
                project = split_key(cluster)[1]
                await self.store.apply([ops.PutApiKey(record), ops.AddEvent(EventRecord(
                    cluster, None, record.revoked_at or 0.0, f"API key {record.id} ({record.name}) revoked")),
                    self.audit(actor, "key.revoke", f"{cluster}/{record.id}", project)])
                self.fleet.api_keys[record.id] = record
                self.mark_route(cluster)  # proxies drop the key within one push
            return record

    # --- secrets ----------------------------------------------------------------------------

    async def set_secret(self, project: str, name: str, value: str, actor: str = "") -> bool:
        """Store (encrypted) or replace a project's secret; True if it existed before. Replicas
        using it get the new value when they next start."""
        record = SecretRecord(project, name, self.secret_box.encrypt(value), self.wall_clock())
        async with self.lock:
            existed = (project, name) in self.fleet.secrets
            await self.store.apply([ops.PutSecret(record), self.audit(
                actor, "secret.update" if existed else "secret.create", f"{project}/{name}", project)])
            self.fleet.secrets[(project, name)] = record
            return existed

    async def delete_secret(self, project: str, name: str, actor: str = "") -> None:
        async with self.lock:
            if (project, name) not in self.fleet.secrets:
                raise NotFoundError(f"secret {name!r} not found in project {project!r}")
            users = sorted(r.spec.name for r in self.fleet.clusters.values()
                           if r.spec.project == project and name in r.spec.env_from_secret.values())
            if users:
                raise ConflictError(f"secret {name!r} is used by cluster(s) {', '.join(users)}")
            await self.store.apply([ops.DeleteSecret(project, name),
                                    self.audit(actor, "secret.delete", f"{project}/{name}", project)])
            del self.fleet.secrets[(project, name)]

    def _secret_env(self, assignment: Assignment) -> Assignment:
        """The assignment with its secrets decrypted: only ever on the way to its own node."""
        spec = assignment.spec
        if not spec.env_from_secret:
            return assignment
        values = {}
        for env, secret in spec.env_from_secret.items():
            record = self.fleet.secrets.get((spec.project, secret))
            if record is not None:
                values[env] = self.secret_box.decrypt(record.ciphertext)
        return replace(assignment, secret_env=values)

    def outgoing(self, command: CommandRecord) -> Command:
        message = to_message(command)
        if message.assignment is not None:
            message = replace(message, assignment=self._secret_env(message.assignment))
        return message

    def audit(self, actor: str, action: str, target: str, project: str = "", detail: str = "") -> ops.AddAudit:
        return ops.AddAudit(AuditRecord(self.wall_clock(), actor or "server", action, target, project, detail))

    # --- nodes (from the API) ---------------------------------------------------------------

    def node_by_name(self, name: str) -> NodeRecord:
        node_id = self.fleet.node_ids_by_name.get(name)
        if node_id is None:
            raise NotFoundError(f"node {name!r} not found")
        return self.fleet.nodes[node_id]

    async def set_node_flags(self, name: str, schedulable: bool, draining: bool, actor: str = "") -> NodeRecord:
        """Cordon (no new replicas), drain (also move the ones it has) or undo both."""
        async with self.lock:
            record = replace(self.node_by_name(name), schedulable=schedulable, draining=draining)
            action = "node.drain" if draining else ("node.uncordon" if schedulable else "node.cordon")
            await self.store.apply([ops.PutNode(record), self.audit(actor, action, name)])
            self.fleet.put_node(record)
            for cluster in self.fleet.clusters_on_node(record.id):
                self.mark_dirty(cluster)
            if schedulable:
                self._capacity_freed()
            self._announce()
            return record

    async def remove_node(self, name: str, actor: str = "") -> int:
        """Forget a node: its replicas count as lost at once and are replaced elsewhere."""
        async with self.lock:
            record = self.node_by_name(name)
            replicas = self.fleet.replicas_on_node(record.id)
            await self.store.apply([*(ops.DeleteReplica(r.id) for r in replicas), ops.DeleteNode(record.id),
                                    self.audit(actor, "node.rm", name, detail=f"{len(replicas)} replica(s) lost")])
            for replica in replicas:
                self.fleet.remove_replica(replica.id)
                self.mark_dirty(replica.cluster)
                self.mark_route(replica.cluster)
            self.fleet.remove_node(record.id)
            session = self.sessions.pop(record.id, None)
            if session is not None:
                session.close_soon("this node was removed from the fleet", CLOSE_POLICY)
            self._capacity_freed()
            self._announce()
            return len(replicas)

    # --- nodes (from their sessions) --------------------------------------------------------

    async def add_node(self, record: NodeRecord, actor: str = "") -> None:
        async with self.lock:
            gpus = ", ".join(g.name for g in record.gpus) or "no GPU"
            await self.store.apply([ops.PutNode(record), self.audit(actor, "node.join", record.name, detail=gpus)])
            self.fleet.put_node(record)
            self._announce()

    async def node_connected(self, record: NodeRecord, session: NodeSession, welcome: Message,
                             reports: Sequence[ReplicaReport], generation_seen: int) -> None:
        """A node said hello: adopt its facts and reports, then queue its redelivery and full state.

        Queued under the lock so no newer command can overtake the redelivered ones.
        """
        fleet = self.fleet
        async with self.lock:
            old_session = self.sessions.get(record.id)
            self.sessions[record.id] = session
            if old_session is not None:
                old_session.close_soon("replaced by a newer connection from the same node")
            now = trio.current_time()
            was = fleet.node_state(record.id)
            fleet.liveness[record.id] = health.on_connect(now)
            batch = _Batch(fleet, self.wall_clock())
            known = fleet.nodes[record.id]
            if (record.gpus, record.address, record.runtimes, record.isolation, record.data_plane) != (
                    known.gpus, known.address, known.runtimes, known.isolation, known.data_plane):
                batch.put_node(replace(record, state=NodeState.READY, last_seen_at=self.wall_clock()))
            # Otherwise nothing to write now: the state change is persisted with the next batch,
            # which keeps a reconnect storm of thousands of nodes from being thousands of commits.
            self._adopt_reports(batch, record.id, reports)
            await self._commit(batch)
            if was is not NodeState.READY:
                self._node_state_changed(record.id)  # back in routing and in scheduling
            node = fleet.nodes[record.id]
            session.send_nowait(welcome)
            for command in fleet.outbox.get(record.id, []):
                session.send_nowait(self.outgoing(command))
            session.send_nowait(Sync(max(node.generation, generation_seen), node.next_seq - 1,
                                     tuple(self._secret_env(a) for a in fleet.desired_on_node(record.id))))

    def _adopt_reports(self, batch: _Batch, node_id: str, reports: Sequence[ReplicaReport]) -> None:
        """What a (re)connecting node really runs, against what we think it runs."""
        reported = {report.replica_id: report for report in reports}
        for replica in self.fleet.replicas_on_node(node_id):
            report = reported.get(replica.id)
            if replica.stopping:
                if report is None or report.state is ReplicaState.STOPPED:
                    batch.forget(replica.id)  # it is not running there any more
                continue
            if report is None:
                if replica.state is not ReplicaState.PENDING:
                    batch.put_replica(replace(replica, state=ReplicaState.PENDING,
                                              reason="node restarted without it; starting again", address=None))
                continue
            if report.generation == replica.generation and _with_report(replica, report) != replica:
                batch.put_replica(_with_report(replica, report))

    async def node_disconnected(self, node_id: str, session: NodeSession) -> None:
        if self.sessions.get(node_id) is not session:
            return  # a newer session took over
        del self.sessions[node_id]
        live = self.fleet.liveness.get(node_id)
        if live is not None:
            self.fleet.liveness[node_id] = health.on_disconnect(live, trio.current_time())
            self._node_state_changed(node_id)

    def gpu_status(self, node_id: str, statuses: Sequence[GpuStatus]) -> None:
        """Latest GPU readings from a heartbeat; a GPU turning unhealthy (or healthy again)
        changes whether new replicas may land on this node."""
        known = {g.uuid for g in self.fleet.nodes[node_id].gpus} if node_id in self.fleet.nodes else set()
        statuses = tuple(s for s in statuses if s.uuid in known)  # never trust uuids it does not own
        was_healthy = self.fleet.gpus_healthy(node_id)
        self.fleet.gpu_status[node_id] = statuses
        if self.fleet.gpus_healthy(node_id) != was_healthy:
            name = self.fleet.nodes[node_id].name
            if was_healthy:
                bad = ", ".join(f"{s.uuid} ({s.reason or 'unhealthy'})" for s in statuses if not s.healthy)
                log.warning("node %s has an unhealthy GPU: %s; no new replicas there", name, bad)
            else:
                log.info("node %s GPUs are healthy again", name)
            self._capacity_freed()
            self._announce()

    def goodbye(self, node_id: str) -> None:
        live = self.fleet.liveness.get(node_id)
        if live is not None:
            self.fleet.liveness[node_id] = health.on_goodbye(live, trio.current_time(), self.restart_grace_s)

    def heartbeat(self, node_id: str) -> None:
        live = self.fleet.liveness.get(node_id)
        now = trio.current_time()
        if live is None:
            return
        updated = health.on_heartbeat(live, now)
        self.fleet.liveness[node_id] = updated
        if updated.state is not live.state:
            self._node_state_changed(node_id)

    def _node_state_changed(self, node_id: str) -> None:
        self._states_to_persist.add(node_id)
        for cluster in self.fleet.clusters_on_node(node_id):
            self.mark_route(cluster)
            self.mark_dirty(cluster)
        if self.fleet.node_state(node_id) is NodeState.READY:
            self._capacity_freed()
        self._announce()

    async def _liveness_loop(self) -> None:
        tick = max(0.05, min(1.0, self.policy.heartbeat_interval_s / 5))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for node_id, live in list(self.fleet.liveness.items()):
                stepped = health.on_tick(live, now, self.policy)
                if stepped is not live:
                    self.fleet.liveness[node_id] = stepped
                    if stepped.state is not live.state:
                        name = self.fleet.nodes[node_id].name if node_id in self.fleet.nodes else node_id
                        log.info("node %s is %s (silent for %.1fs)", name, stepped.state, now - stepped.last_seen)
                        self._node_state_changed(node_id)
            if self._states_to_persist:
                await self._persist_node_states()

    async def _persist_node_states(self) -> None:
        """Write node state changes in one batch (not per heartbeat): they survive a restart."""
        async with self.lock:
            ids, self._states_to_persist = self._states_to_persist, set()
            wall = self.wall_clock()
            records = [replace(self.fleet.nodes[i], state=self.fleet.node_state(i), last_seen_at=wall)
                       for i in ids if i in self.fleet.nodes]
            await self.store.apply([ops.PutNode(r) for r in records])
            for record in records:
                self.fleet.put_node(record)

    async def replica_status(self, node_id: str, report: ReplicaReport) -> None:
        """Queue a node's report; `_apply_reports` stores reports in batches, one transaction for
        however many arrived meanwhile, so a thousand replicas turning ready is not a thousand
        commits. Reports keep their arrival order."""
        await self._reports_in.send((node_id, report))

    async def _apply_reports(self) -> None:
        async for first in self._reports_out:
            items = [first]
            while len(items) < REPORT_BATCH:
                try:
                    items.append(self._reports_out.receive_nowait())
                except trio.WouldBlock:
                    break
            async with self.lock:
                batch = _Batch(self.fleet, self.wall_clock())
                dirty: set[str] = set()
                freed = False
                for node_id, report in items:
                    freed |= self._fold_report(batch, node_id, report, dirty)
                await self._commit(batch)
                if freed:
                    self._capacity_freed()
                for cluster in dirty:
                    self.mark_dirty(cluster)

    def _fold_report(self, batch: _Batch, node_id: str, report: ReplicaReport, dirty: set[str]) -> bool:
        """Add one report to `batch`; return whether it freed GPUs. Clusters needing a
        reconcile are added to `dirty`."""
        if report.replica_id in batch.forgotten:
            return False
        replica = batch.replicas.get(report.replica_id) or self.fleet.replicas.get(report.replica_id)
        if replica is not None and replica.node_id != node_id:
            # Replica ids are never moved between nodes: this node reports on one it was never
            # given. A bug or a hostile agent either way; drop the link, change nothing.
            session = self.sessions.get(node_id)
            if session is not None:
                log.warning("node %s reported on replica %s of another node; disconnecting it", node_id, replica.id)
                session.close_soon(f"reported on replica {replica.id}, which is not this node's", CLOSE_POLICY)
            return False
        if replica is None or report.generation != replica.generation:
            return False  # stale: fencing drops it
        if replica.stopping:
            if report.state is ReplicaState.STOPPED:
                batch.forget(replica.id)
                dirty.add(replica.cluster)
                return True
            return False  # anything else about a replica being stopped is stale: ignore it
        updated = _with_report(replica, report)
        if updated == replica:
            return False
        batch.put_replica(updated)
        if updated.state is ReplicaState.FAILED or (
            updated.state is ReplicaState.READY and replica.cluster in self.fleet.rolling
        ):
            dirty.add(replica.cluster)  # replace it, or let the roll take its next step
        if updated.state is ReplicaState.READY:
            self._replace_backoff.pop(replica.cluster, None)  # it works now
        return False

    async def ack(self, node_id: str, seq: int) -> None:
        """Queue a node's ack; `_apply_acks` stores them in batches like reports. An ack stored
        late only means a command may be delivered again, which nodes already expect."""
        await self._acks_in.send((node_id, seq))

    async def _apply_acks(self) -> None:
        async for first in self._acks_out:
            through = {first[0]: first[1]}
            while len(through) < REPORT_BATCH:
                try:
                    node_id, seq = self._acks_out.receive_nowait()
                except trio.WouldBlock:
                    break
                through[node_id] = max(seq, through.get(node_id, seq))
            async with self.lock:
                acked = {node_id: seq for node_id, seq in through.items()
                         if (queue := self.fleet.outbox.get(node_id)) and queue[0].seq <= seq}
                if not acked:
                    continue
                self._crash_point("before-ack-stored")
                await self.store.apply([ops.AckCommands(node_id, seq) for node_id, seq in acked.items()])
                for node_id, seq in acked.items():
                    self.fleet.outbox[node_id] = [c for c in self.fleet.outbox.get(node_id, []) if c.seq > seq]

    async def restore_liveness(self, grace_s: float) -> None:
        """After a server restart, give every known node `grace_s` to reconnect before judging it."""
        now = trio.current_time()
        for node_id, record in self.fleet.nodes.items():
            if record.state is NodeState.DOWN:
                # How long it has been down is unknown (the old monotonic clock is gone): count
                # its replicas' grace from now, which errs on the side of less churn.
                self.fleet.liveness[node_id] = Liveness(NodeState.DOWN, False, now - self.policy.down_after_s, now)
            else:
                self.fleet.liveness[node_id] = health.in_grace(now, grace_s)


def _with_report(replica: Replica, report: ReplicaReport) -> Replica:
    return replace(replica, state=report.state, reason=report.reason,
                   address=report.address if report.address else replica.address,
                   image_digest=report.image_digest or replica.image_digest)


class _Batch:
    """Collects one decision's changes: store ops, then the same changes for memory."""

    def __init__(self, fleet: Fleet, wall: float) -> None:
        self.fleet = fleet
        self.wall = wall
        self.changes: list[ops.Op] = []
        self.replicas: dict[str, Replica] = {}
        self.forgotten: list[str] = []
        self.nodes: dict[str, NodeRecord] = {}
        self.commands: list[CommandRecord] = []
        self.events: list[EventRecord] = []
        self.touched_clusters: set[str] = set()
        self._generation = fleet.generation

    def next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def node(self, node_id: str) -> NodeRecord:
        return self.nodes.get(node_id) or self.fleet.nodes[node_id]

    def put_node(self, record: NodeRecord) -> None:
        self.nodes[record.id] = record

    def put_replica(self, replica: Replica) -> None:
        old = self.replicas.get(replica.id) or self.fleet.replicas.get(replica.id)
        if old is None or old.state is not replica.state or old.stopping != replica.stopping:
            change = _describe_change(old, replica, self)
            self.events.append(EventRecord(replica.cluster, replica.id, self.wall, change))
        self.replicas[replica.id] = replica
        self.touched_clusters.add(replica.cluster)

    def forget(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)
        self.forgotten.append(replica_id)
        replica = self.fleet.replicas.get(replica_id)
        if replica is not None:
            self.touched_clusters.add(replica.cluster)
            self.events.append(EventRecord(replica.cluster, replica_id, self.wall, "removed"))

    def command(self, node_id: str, op: str, replica_id: str, assignment: Assignment | None) -> None:
        node = self.node(node_id)
        generation = assignment.generation if assignment else self.next_generation()
        record = CommandRecord(node_id, node.next_seq, op, replica_id, generation, assignment, self.wall)
        self.commands.append(record)
        self.nodes[node_id] = replace(node, next_seq=node.next_seq + 1, generation=max(node.generation, generation))

    def finish(self) -> None:
        self.changes = [
            *(ops.PutReplica(r, self.fleet.replica_created.get(r.id, self.wall)) for r in self.replicas.values()),
            *(ops.DeleteReplica(i) for i in self.forgotten),
            *(ops.PutNode(n) for n in self.nodes.values()),
            *(ops.PutCommand(c) for c in self.commands),
            *(ops.AddEvent(e) for e in self.events),
        ]
        if self._generation != self.fleet.generation:
            self.changes.append(ops.SetMeta("generation", str(self._generation)))

    def apply_to_memory(self) -> None:
        for replica in self.replicas.values():
            self.fleet.put_replica(replica, self.wall)
        for replica_id in self.forgotten:
            self.fleet.remove_replica(replica_id)
        for record in self.nodes.values():
            self.fleet.put_node(record)
        for command in self.commands:
            self.fleet.outbox[command.node_id].append(command)
        self.fleet.generation = self._generation


def _describe_change(old: Replica | None, new: Replica, batch: _Batch) -> str:
    """One line for `describe`: what happened to the replica, with its reason."""
    node = batch.node(new.node_id).name if new.node_id and new.node_id in batch.fleet.nodes else None
    if new.stopping and (old is None or not old.stopping):
        text = "stopping"
    elif old is None or (old.node_id is None and new.node_id is not None):
        if node:
            return f"placed on {node}"
        text = "pending"
    else:
        text = new.state.value
    return f"{text}: {new.reason}" if new.reason else text


def to_message(command: CommandRecord) -> Command:
    return Command(command.seq, command.op, command.generation, command.replica_id, command.assignment)


def hash_api_key(key: str) -> str:
    """What proxies compare: the SHA-256 of the whole key (keys are long random secrets)."""
    return hashlib.sha256(key.encode()).hexdigest()


def describe_update(old: ClusterSpec, new: ClusterSpec) -> str:
    parts = []
    if old.replicas != new.replicas:
        parts.append(f"replicas {old.replicas} -> {new.replicas}")
    changed = [name for name in ("gpu", "runtime", "image", "command", "env", "port", "health", "workdir")
               if getattr(old, name) != getattr(new, name)]
    if changed:
        parts.append(f"{', '.join(changed)} changed: rolling replacement")
    if old.reschedule_after_s != new.reschedule_after_s:
        parts.append("reschedule_after changed")
    return "; ".join(parts)
