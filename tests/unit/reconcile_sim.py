"""A tiny in-memory stand-in for the server's control loop, for testing `core.reconciler`.

`apply_plan` does what the server does with a ClusterPlan once it is committed, and the nodes'
side is reduced to two steps: `confirm_stops` (the node reports the replica stopped, the row goes)
and `settle` (a replica placed on a ready node starts and passes its health check).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from vectorlay.core.model import ClusterSpec, Node, NodeState, Replica, ReplicaState, template_revision
from vectorlay.core.reconciler import ClusterPlan, plan_cluster


def check_well_formed(replicas: Sequence[Replica], plan: ClusterPlan) -> None:
    """A plan only names replicas that exist, and never gives one replica two instructions."""
    by_id = {r.id: r for r in replicas}
    stop_ids = [s.replica_id for s in plan.stop]
    assign_ids = [replica_id for replica_id, _ in plan.assign]
    named = stop_ids + list(plan.forget) + assign_ids
    assert len(named) == len(set(named)), f"a replica got two instructions: {plan}"
    assert set(named) <= set(by_id), f"the plan names unknown replicas: {plan}"
    for replica_id in stop_ids:
        assert by_id[replica_id].node_id is not None, "only a placed replica can be stopped"
        assert not by_id[replica_id].stopping, "a replica already stopping is stopped again"
    for replica_id in assign_ids:
        assert by_id[replica_id].node_id is None, "only an unplaced replica can be assigned"
    assert plan.create_unplaced >= 0
    assert all(s.reason for s in plan.stop)


def apply_plan(
    replicas: Sequence[Replica], plan: ClusterPlan, spec: ClusterSpec | None, cluster: str, ids: Iterator[int]
) -> list[Replica]:
    """The server's side: stops are marked (the row stays until the node confirms), forgotten rows go,
    placements become replicas that are immediately READY, and waiting replicas are new unplaced rows."""
    stops = {s.replica_id for s in plan.stop}
    forget = set(plan.forget)
    assign = dict(plan.assign)
    revision = template_revision(spec) if spec is not None else ""
    result: list[Replica] = []
    for replica in replicas:
        if replica.id in forget:
            continue
        if replica.id in stops:
            replica = replace(replica, stopping=True)
        elif replica.id in assign:
            placement = assign[replica.id]
            replica = replace(replica, node_id=placement.node_id, gpus=placement.gpus, state=ReplicaState.READY,
                              generation=next(ids))
        result.append(replica)
    for placement in plan.create:
        n = next(ids)
        result.append(Replica(f"new-{n}", cluster, placement.node_id, placement.gpus, ReplicaState.READY,
                              generation=n, revision=revision))
    for _ in range(plan.create_unplaced):
        n = next(ids)
        result.append(Replica(f"new-{n}", cluster, None, (), ReplicaState.PENDING, generation=n, revision=revision))
    return result


def confirm_stops(replicas: Sequence[Replica]) -> list[Replica]:
    """Every node reports its stopping replicas stopped; the server deletes their rows."""
    return [r for r in replicas if not r.stopping]


def settle(replicas: Sequence[Replica], nodes: Mapping[str, Node]) -> list[Replica]:
    """Replicas on ready nodes start and pass their health checks; elsewhere nothing changes."""
    waking = {ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.UNREADY}
    result = []
    for replica in replicas:
        node = nodes.get(replica.node_id) if replica.node_id is not None else None
        if node is not None and node.state is NodeState.READY and not replica.stopping and replica.state in waking:
            replica = replace(replica, state=ReplicaState.READY)
        result.append(replica)
    return result


@dataclass
class Loop:
    """Runs plan -> apply -> (confirm) -> settle until the plan is empty and no stop is in flight."""

    spec: ClusterSpec | None
    cluster: str
    nodes: dict[str, Node]
    replicas: list[Replica]
    others: list[Replica] = field(default_factory=list)  # other clusters' replicas: they hold GPUs
    down_since: dict[str, float] = field(default_factory=dict)
    now: float = 1000.0
    confirm_at_once: bool = True
    plans: list[ClusterPlan] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(10_000))

    def plan(self) -> ClusterPlan:
        plan = plan_cluster(self.spec, self.cluster, self.replicas, self.nodes, self.down_since,
                            self.replicas + self.others, self.now)
        check_well_formed(self.replicas, plan)
        return plan

    def step(self) -> bool:
        """One round; False once there is nothing left to do."""
        plan = self.plan()
        if plan.empty:
            if not any(r.stopping for r in self.replicas):
                return False
            self.replicas = confirm_stops(self.replicas)
            return True
        self.plans.append(plan)
        self.replicas = apply_plan(self.replicas, plan, self.spec, self.cluster, self._ids)
        if self.confirm_at_once:
            self.replicas = confirm_stops(self.replicas)
        self.replicas = settle(self.replicas, self.nodes)
        return True

    def run(self, max_rounds: int) -> int:
        """Rounds taken to converge; fails if it takes more than `max_rounds`."""
        for rounds in range(max_rounds + 1):
            if not self.step():
                return rounds
        raise AssertionError(f"no convergence in {max_rounds} rounds; last plans: {self.plans[-3:]}")
