"""Close the gap between a cluster's desired replica count and what exists, as a plan.

`plan_cluster` looks at one cluster's spec and replicas plus the fleet, and decides which replicas
to stop, which rows to forget, and how many to place (via the scheduler). It does no I/O; the
server commits the plan and then tells the nodes. Calling it again on its own result changes
nothing more: that is what makes the loop converge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from vectorlay.core.model import ClusterSpec, Node, NodeState, Replica, ReplicaState, template_revision
from vectorlay.core.scheduler import Placement, place


@dataclass(frozen=True)
class Stop:
    replica_id: str
    reason: str


@dataclass(frozen=True)
class ClusterPlan:
    stop: tuple[Stop, ...] = ()
    forget: tuple[str, ...] = ()  # rows to delete: nothing runs for them anywhere
    assign: tuple[tuple[str, Placement], ...] = ()  # existing unplaced replica -> placement
    create: tuple[Placement, ...] = ()  # new replicas with a node
    create_unplaced: int = 0  # new replicas that must wait (see `unplaced_reason`)
    unplaced_reason: str = ""
    lost_replaced: int = 0  # how many replicas on down nodes this plan gives up on

    @property
    def empty(self) -> bool:
        return not (self.stop or self.forget or self.assign or self.create or self.create_unplaced)


def is_lost(replica: Replica, nodes: Mapping[str, Node], down_since: Mapping[str, float],
            grace_s: float, now: float) -> bool:
    """A replica whose node is gone (removed, or down for longer than the cluster's grace)."""
    if replica.node_id is None:
        return False
    node = nodes.get(replica.node_id)
    if node is None:
        return True
    return node.state is NodeState.DOWN and now - down_since.get(node.id, now) >= grace_s


def _lost_within_budget(spec: ClusterSpec | None, replicas: Sequence[Replica], nodes: Mapping[str, Node],
                        down_since: Mapping[str, float], now: float, budget: int | None) -> set[str]:
    """Ids of the lost replicas to give up on now: those down longest first, at most `budget`."""
    if spec is None:
        return set()
    lost = [r for r in replicas
            if not r.stopping and r.state is not ReplicaState.FAILED
            and is_lost(r, nodes, down_since, spec.reschedule_after_s, now)]
    lost.sort(key=lambda r: (down_since.get(r.node_id or "", now), r.id))
    return {r.id for r in (lost if budget is None else lost[:max(0, budget)])}


def _freeing_makes_room(spec: ClusterSpec, candidate: Replica, nodes: Mapping[str, Node],
                        all_replicas: Sequence[Replica]) -> bool:
    """Whether one new replica fits only once `candidate` has given back its GPUs."""
    fleet = list(nodes.values())
    if place(fleet, all_replicas, [(spec, 1)]).placements:
        return False  # it fits already: nothing needs to stop early
    others = [r for r in all_replicas if r.id != candidate.id]
    return bool(place(fleet, others, [(spec, 1)]).placements)


def _packed_too_tight(spec: ClusterSpec, current: Sequence[Replica], nodes: Mapping[str, Node],
                      all_replicas: Sequence[Replica]) -> Replica | None:
    """A ready copy to move when the cluster is packed tighter than the fleet requires: some
    node holds two or more of its copies while a node that could take one holds none. Only
    when every copy is placed and ready (one move at a time, nothing else in flight)."""
    if len(current) < 2 or any(r.node_id is None or r.state is not ReplicaState.READY for r in current):
        return None
    per_node: dict[str, list[Replica]] = {}
    for replica in current:
        assert replica.node_id is not None
        per_node.setdefault(replica.node_id, []).append(replica)
    crowded = max(per_node.values(), key=lambda group: (len(group), group[0].node_id or ""))
    if len(crowded) < 2:
        return None
    candidate = max(crowded, key=lambda r: r.generation)  # the newest: the least settled
    others = [r for r in all_replicas if r.id != candidate.id]
    placed = place(list(nodes.values()), others, [(spec, 1)]).placements
    if not placed or placed[0].node_id in per_node:
        return None  # no empty node could take it
    return candidate


def _stop_order(replica: Replica, nodes: Mapping[str, Node],
                crowd: Mapping[str, int] | None = None) -> tuple[int, int, int, int, int]:
    """Which replica to stop first: unplaced, then on unhealthy nodes, then not ready, then on
    the node holding most copies of the cluster (`crowd`), newest first."""
    node = nodes.get(replica.node_id) if replica.node_id else None
    placed = 0 if replica.node_id is None else 1
    node_ok = 1 if node is not None and node.state is NodeState.READY else 0
    ready = 1 if replica.state is ReplicaState.READY else 0
    copies = (crowd or {}).get(replica.node_id or "", 0)
    return (placed, node_ok, ready, -copies, -replica.generation)


def _copies_per_node(replicas: Sequence[Replica]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for replica in replicas:
        if replica.node_id is not None:
            counts[replica.node_id] = counts.get(replica.node_id, 0) + 1
    return counts


def _spreading(current: Sequence[Replica], crowd: Mapping[str, int]) -> bool:
    """A copy is starting alone on a node while another node holds several: a move to spread the
    cluster is under way, and the surplus is best removed from the crowded node once it is ready."""
    return max(crowd.values(), default=0) >= 2 and any(
        r.node_id is not None and crowd.get(r.node_id) == 1 and r.state in (ReplicaState.PENDING, ReplicaState.STARTING)
        for r in current)


def plan_cluster(
    spec: ClusterSpec | None,
    cluster: str,
    replicas: Sequence[Replica],
    nodes: Mapping[str, Node],
    down_since: Mapping[str, float],
    all_replicas: Sequence[Replica],
    now: float,
    may_replace: bool = True,
    lost_budget: int | None = None,
    *,
    quarantined: bool = False,
    avoid_nodes: frozenset[str] = frozenset(),
) -> ClusterPlan:
    """One cluster's next step. `all_replicas` is the fleet's, for GPU usage and spread.

    Replicas of an older template revision are replaced by rolling: new ones are placed first and
    old ones stop only while enough new ones are ready. `may_replace` is False while the
    controller holds back replacing failed or lost replicas (a crash-looping cluster); surplus is
    still stopped. `lost_budget` caps how many replicas on down nodes are given up on in this plan
    (None: no cap); the rest keep counting as live, which paces recovery from a mass failure.
    A `quarantined` cluster is placed nowhere: its copies that never became ready are stopped (they
    are the suspects), ready ones keep serving. `avoid_nodes` are placed on only when nothing
    else fits (the cluster's replicas failed there for a reason tied to the node).
    """
    stop: list[Stop] = []
    forget: list[str] = []
    live: list[Replica] = []
    stops_in_flight = 0
    lost_ids = _lost_within_budget(spec, replicas, nodes, down_since, now, lost_budget)
    for replica in replicas:
        if replica.stopping:
            if replica.node_id is None or replica.node_id not in nodes:
                forget.append(replica.id)  # nothing can be running it any more
            else:
                stops_in_flight += 1
            continue
        if replica.state is ReplicaState.STOPPED or (replica.state is ReplicaState.FAILED and replica.node_id is None):
            forget.append(replica.id)  # its node says nothing runs: the row is all that is left
            continue
        if spec is None:
            if replica.node_id is None:
                forget.append(replica.id)
            else:
                stop.append(Stop(replica.id, "cluster deleted"))
            continue
        if replica.state is ReplicaState.FAILED:
            stop.append(Stop(replica.id, replica.reason or "failed"))
            continue
        if replica.id in lost_ids:
            stop.append(Stop(replica.id, "its node is down; replaced elsewhere"))
            continue
        if quarantined and replica.state is not ReplicaState.READY:
            if replica.node_id is None:
                forget.append(replica.id)
            else:
                stop.append(Stop(replica.id, "the cluster is quarantined"))
            continue
        live.append(replica)
    if spec is None:
        return ClusterPlan(stop=tuple(stop), forget=tuple(forget))

    revision = template_revision(spec)

    def is_current(replica: Replica) -> bool:
        node = nodes.get(replica.node_id) if replica.node_id else None
        return replica.revision == revision and not (node is not None and node.draining)

    # Replicas of an older revision, or on a draining node, are replaced the same way: by rolling.
    current = [r for r in live if is_current(r)]
    outdated = [r for r in live if not is_current(r)]
    for replica in outdated:
        if replica.node_id is None:
            forget.append(replica.id)
    outdated = [r for r in outdated if r.node_id is not None]

    surplus = len(current) - spec.replicas
    crowd = _copies_per_node(current)
    if surplus > 0 and not _spreading(current, crowd):
        for replica in sorted(current, key=lambda r: _stop_order(r, nodes, crowd))[:surplus]:
            if replica.node_id is None:
                forget.append(replica.id)
            elif crowd.get(replica.node_id, 0) >= 2:
                stop.append(Stop(replica.id, "one copy too many on its node: the cluster spreads over more nodes"))
            else:
                stop.append(Stop(replica.id, "scaled down"))
        current = [r for r in current if r.id not in {s.replica_id for s in stop} and r.id not in forget]

    # Spread again: with nothing else going on, one copy on a node holding more than its share
    # is moved (rolled) to a fitting node holding none, new copy ready before the old one stops.
    moving = None
    if not outdated and not stop and stops_in_flight == 0 and may_replace:
        moving = _packed_too_tight(spec, current, nodes, all_replicas)
        if moving is not None:
            current = [r for r in current if r.id != moving.id]
            outdated = [moving]

    # Roll: an old copy may stop while the ready new ones plus the old ones left still cover
    # `replicas - max_unavailable`. `max_unavailable` unset: 0, except when the fleet is full,
    # where one old copy's GPUs are freed at a time, once every placed new copy is ready and
    # only if that frees room a new one can use (a full GPU fleet must not wait forever).
    outdated.sort(key=lambda r: _stop_order(r, nodes))
    ready_current = sum(1 for r in current if r.state is ReplicaState.READY)
    unavailable = spec.update.max_unavailable or 0
    removable = len(outdated) + ready_current - (spec.replicas - unavailable)
    waiting = any(r.node_id is None for r in current)
    settled = all(r.state is ReplicaState.READY for r in current if r.node_id is not None)
    if (spec.update.max_unavailable is None and removable < 1 and waiting and settled and outdated
            and stops_in_flight == 0 and not stop and _freeing_makes_room(spec, outdated[0], nodes, all_replicas)):
        removable = 1
    for replica in outdated[: max(0, removable)]:
        node = nodes.get(replica.node_id) if replica.node_id else None
        if replica is moving:
            why = "moved to spread the cluster over more nodes"
        elif node is not None and node.draining:
            why = "its node is draining"
        else:
            why = "replaced by a newer revision"
        stop.append(Stop(replica.id, why))

    unplaced = [r for r in current if r.node_id is None]
    missing = max(0, spec.replicas - len(current)) if may_replace else 0
    if outdated:  # rolling: at most `max_surge` copies beyond `replicas` at once
        stopping_old = sum(1 for r in outdated if r.id in {s.replica_id for s in stop})
        room = spec.replicas + spec.update.surge(spec.replicas) - len(current) - (len(outdated) - stopping_old)
        missing = min(missing, max(0, room))
    if quarantined or (not unplaced and missing == 0):
        return ClusterPlan(stop=tuple(stop), forget=tuple(forget), lost_replaced=len(lost_ids))
    # Copies on their way out (stopping now, or of an older revision) still hold their GPUs but
    # do not count for spread: new copies spread as if the old ones were gone already.
    leaving = {s.replica_id for s in stop} | {r.id for r in outdated}
    fleet_view = [replace(r, stopping=True) if r.id in leaving else r for r in all_replicas]
    plan = place(list(nodes.values()), fleet_view, [(spec, len(unplaced) + missing)],
                 {spec.key: avoid_nodes} if avoid_nodes else None)
    placements = list(plan.placements)
    assign = tuple(zip((r.id for r in unplaced), placements, strict=False))
    create = tuple(placements[len(assign):])
    reason = plan.unplaced[0].reason if plan.unplaced else ""
    create_unplaced = max(0, missing - len(create))
    return ClusterPlan(tuple(stop), tuple(forget), assign, create, create_unplaced, reason, len(lost_ids))
