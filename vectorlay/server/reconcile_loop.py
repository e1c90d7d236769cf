"""The reconcile loop: turn each dirty cluster's gap between desired and actual into a plan, and
commit it; wake again at the timers the plans ask for (a replica's grace on a down node, a
crash-loop backoff, the mass-failure budget refilling, a cluster becoming stable).

Each cluster is reconciled on its own: an exception while reconciling one is logged with the
cluster's name, the cluster is marked degraded with the reason and retried with backoff, and
every other cluster is served as usual (blast radius: one cluster's failure is that cluster's).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping
from dataclasses import replace

import trio

from vectorlay.core import cluster_health, mass_failure
from vectorlay.core.model import Assignment, ClusterSpec, Node, Replica, ReplicaState, template_revision
from vectorlay.core.reconciler import ClusterPlan, plan_cluster
from vectorlay.errors import StoreUnavailable
from vectorlay.server.fleet import Fleet
from vectorlay.server.ids import new_replica_id
from vectorlay.server.signals import Signals
from vectorlay.server.writer import Batch, Writer

log = logging.getLogger("vectorlay.server")

IDLE_WAKE_S = 3600.0  # nothing scheduled: look again in an hour anyway
MAX_STEPS = 20  # plans in a row for one cluster with no outside event; more is a bug in the rules


class ReconcileLoop:
    def __init__(self, writer: Writer, signals: Signals) -> None:
        self.writer = writer
        self.fleet: Fleet = writer.fleet
        self.signals = signals
        self._timers: list[tuple[float, str]] = []
        self._timer_set: set[tuple[float, str]] = set()
        self._budget = mass_failure.Budget()
        self._steps: dict[str, int] = {}  # consecutive non-empty plans per cluster

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reconcile every cluster once (level-triggered: whatever happened before the start),
        then each dirty cluster, until cancelled."""
        for name in self.fleet.all_cluster_names():
            self.signals.mark_dirty(name)
        task_status.started()
        while True:
            now = trio.current_time()
            while self._timers and self._timers[0][0] <= now:
                timer = heapq.heappop(self._timers)
                self._timer_set.discard(timer)
                self.signals.mark_dirty(timer[1])
            dirty = self.signals.take_dirty()
            if dirty:
                async with self.writer.lock:
                    for cluster in sorted(dirty):
                        await self._reconcile_isolated(cluster)
                continue
            await self.signals.wait_dirty(self._timers[0][0] if self._timers else now + IDLE_WAKE_S)

    def wake_at(self, when: float, cluster: str) -> None:
        if (when, cluster) in self._timer_set:
            return
        self._timer_set.add((when, cluster))
        heapq.heappush(self._timers, (when, cluster))
        self.signals.wake()

    async def _reconcile_isolated(self, cluster: str) -> None:
        if not self.writer.available:
            return  # decisions wait for the database; the writer marks every cluster dirty when it is back
        fault = f"reconcile-raise:{cluster}"
        try:
            if fault in self.writer.crash_points:
                raise RuntimeError(f"fault injected ({fault})")
            await self._reconcile(cluster)
        except StoreUnavailable:
            return  # weather: the same, noticed mid-way
        except Exception as error:  # noqa: BLE001 - one cluster must not stop the others being served
            log.exception("reconciling cluster %s failed; it is marked degraded and retried", cluster)
            now = trio.current_time()
            health = cluster_health.on_reconcile_error(self.fleet.health.get(cluster, cluster_health.HEALTHY),
                                                       now, f"{type(error).__name__}: {error}")
            batch = self.writer.batch()
            batch.set_health(cluster, health)
            try:
                await self.writer.commit(batch)
            except StoreUnavailable:
                self.fleet.health[cluster] = health  # shown now, stored with its next reconcile
            self.wake_at(health.not_before, cluster)

    async def _reconcile(self, cluster: str) -> None:
        fleet = self.fleet
        record = fleet.clusters.get(cluster)
        spec = record.spec if record else None
        now = trio.current_time()
        health = cluster_health.on_reconciled(cluster_health.settle(fleet.health.get(cluster, cluster_health.HEALTHY),
                                                                    now))
        nodes = fleet.node_views()
        down_since = fleet.down_since()
        self._assess_budget(nodes, now)
        available = self._budget.available(now)
        may_replace = cluster_health.may_replace(health, now)
        plan = plan_cluster(spec, cluster, fleet.replicas_of_cluster(cluster), nodes, down_since,
                            list(fleet.replicas.values()), now, may_replace, available,
                            quarantined=bool(health.quarantined),
                            avoid_nodes=frozenset(fleet.avoid.get(cluster, ())))
        if self._rolling(cluster):
            fleet.rolling.add(cluster)
        else:
            fleet.rolling.discard(cluster)
        if self._budget.active:
            self._budget = mass_failure.spend(self._budget, now, plan.lost_replaced)
            if self._budget.available(now) == 0:
                self.wake_at(now + self._budget.retry_after(now), cluster)
        if not may_replace:
            self.wake_at(health.not_before, cluster)
        settles = cluster_health.settles_at(health)
        if settles is not None:
            self.wake_at(settles, cluster)
        if spec is not None:
            self._schedule_loss_check(spec, cluster, down_since, now)
        batch = self.writer.batch()
        if health.failures == 0 and not health.quarantined:
            fleet.avoid.pop(cluster, None)  # it runs fine again: every node is welcome
        batch.set_health(cluster, health if spec is not None else cluster_health.HEALTHY)
        if plan.empty:
            self._refresh_unplaced_reason(batch, cluster, plan, health, now)
            self._steps.pop(cluster, None)
        else:
            self._plan_to_batch(batch, cluster, spec, plan)
            # Level-triggered: look again at once, on the state this plan leaves (a roll that
            # just created copies it could not place frees room for them next). Planning on its
            # own result ends in an empty plan; MAX_STEPS stops a rule bug from spinning.
            steps = self._steps.get(cluster, 0) + 1
            self._steps[cluster] = steps
            if steps <= MAX_STEPS:
                batch.reconcile(cluster)
            else:
                log.warning("cluster %s changed %d times in a row with nothing else happening; waiting for the "
                            "next event before planning it again", cluster, steps)
        await self.writer.commit(batch)
        if plan.forget:
            for waiting in self.fleet.clusters_waiting():
                self.signals.mark_dirty(waiting)

    def _assess_budget(self, nodes: Mapping[str, Node], now: float) -> None:
        before = self._budget
        self._budget = mass_failure.assess(before, nodes, now)
        if before.active and not self._budget.active:
            log.info("mass failure over (%d of %d nodes down): replacing lost replicas normally",
                     self._budget.down, self._budget.total)
        elif self._budget.active and not before.active:
            log.warning("%d of %d nodes are down at once: pacing replacements to %g per minute",
                        self._budget.down, self._budget.total, mass_failure.per_minute(self._budget.total))

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

    def _schedule_loss_check(self, spec: ClusterSpec, cluster: str, down_since: Mapping[str, float],
                             now: float) -> None:
        """Come back when a replica on a down node has waited out the cluster's grace."""
        for replica in self.fleet.replicas_of_cluster(cluster):
            if replica.node_id is not None and replica.node_id in down_since and not replica.stopping:
                due = down_since[replica.node_id] + spec.reschedule_after_s
                if due > now:
                    self.wake_at(due, cluster)

    def _refresh_unplaced_reason(self, batch: Batch, cluster: str, plan: ClusterPlan,
                                 health: cluster_health.ClusterHealth, now: float) -> None:
        """Replicas waiting for a node say why: no room, or the cluster's own trouble."""
        reason = cluster_health.describe(health, now) if health.quarantined else plan.unplaced_reason
        if not reason:
            return
        for replica in self.fleet.replicas_of_cluster(cluster):
            if replica.node_id is None and not replica.stopping and replica.reason != reason:
                batch.put_replica(replace(replica, reason=reason))

    def _plan_to_batch(self, batch: Batch, cluster: str, spec: ClusterSpec | None, plan: ClusterPlan) -> None:
        fleet = self.fleet
        for stop in plan.stop:
            replica = fleet.replicas[stop.replica_id]
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
            batch.command(new.node_id or "", "start", new.id, _assignment(new, cluster, spec))
        # A replacement for a failed replica says why it exists, so `get replicas` and `get
        # clusters` keep showing the failure (a bad image, say) after the failed copy is gone.
        failed = [fleet.replicas[s.replica_id] for s in plan.stop
                  if fleet.replicas[s.replica_id].state is ReplicaState.FAILED]
        for index, placement in enumerate(plan.create):
            assert spec is not None
            reason = f"starting on {fleet.nodes[placement.node_id].name}"
            if index < len(failed):
                reason += f" (replacing {failed[index].id}, which failed: {failed[index].reason or 'no reason given'})"
            new = Replica(self._new_replica_id(spec.name, batch), cluster, placement.node_id, placement.gpus,
                          ReplicaState.PENDING, reason, None, batch.next_generation(), False, revision)
            batch.put_replica(new)
            batch.command(placement.node_id, "start", new.id, _assignment(new, cluster, spec))
        for _ in range(plan.create_unplaced):
            assert spec is not None
            batch.put_replica(Replica(self._new_replica_id(spec.name, batch), cluster, None, (), ReplicaState.PENDING,
                                      plan.unplaced_reason, None, 0, False, revision))

    def _new_replica_id(self, name: str, batch: Batch) -> str:
        """`<cluster name>-<5 random>`: short, readable, and checked unique across projects."""
        while (candidate := new_replica_id(name)) in self.fleet.replicas or candidate in batch.replicas:
            pass
        return candidate


def _assignment(replica: Replica, cluster: str, spec: ClusterSpec) -> Assignment:
    return Assignment(replica.id, cluster, replica.generation, spec, replica.gpus)
