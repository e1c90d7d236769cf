"""core.reconciler: plan_cluster closes the gap between desired and actual, and then stays quiet."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from core_strategies import (
    MEDIUM,
    existing_replicas_strategy,
    gpu_request_strategy,
    nodes_strategy,
    nodes_that_fit,
    runtimes_strategy,
    spec,
)
from hypothesis import given
from hypothesis import strategies as st
from reconcile_sim import Loop, apply_plan, check_well_formed, confirm_stops

from vectorlay.core.model import (
    ClusterSpec,
    Gpu,
    GpuRequest,
    Node,
    NodeState,
    Replica,
    ReplicaState,
    UpdateStrategy,
    template_revision,
)
from vectorlay.core.reconciler import ClusterPlan, Stop, plan_cluster

NOW = 1000.0
ONE_GPU = GpuRequest(("RTX 4090",), 1)


def fleet(count: int, gpus_each: int = 1, **states: NodeState) -> dict[str, Node]:
    """Nodes n0..n{count-1} with `gpus_each` RTX 4090s; `states` overrides a node's state by id."""
    return {
        f"n{i}": Node(f"n{i}", f"node-{i}",
                      tuple(Gpu(f"n{i}-g{j}", "RTX 4090", 24.0, j) for j in range(gpus_each)),
                      f"10.0.0.{i}", states.get(f"n{i}", NodeState.READY))
        for i in range(count)
    }  # fmt: skip


def web(replicas: int, **changes: Any) -> ClusterSpec:
    return spec("web", replicas, ONE_GPU, **changes)


def replica(rid: str, node: str | None, the_spec: ClusterSpec, state: ReplicaState = ReplicaState.READY,
            generation: int = 1, gpu: int = 0, **changes: Any) -> Replica:
    gpus = (f"{node}-g{gpu}",) if node is not None else ()
    return replace(Replica(rid, "web", node, gpus, state, generation=generation,
                           revision=template_revision(the_spec)), **changes)


def plan(the_spec: ClusterSpec | None, replicas: list[Replica], nodes: dict[str, Node], now: float = NOW,
         down_since: dict[str, float] | None = None, may_replace: bool = True,
         others: list[Replica] | None = None) -> ClusterPlan:
    result = plan_cluster(the_spec, "web", replicas, nodes, down_since or {}, replicas + (others or []), now,
                          may_replace)
    check_well_formed(replicas, result)
    return result


def stopped(result: ClusterPlan) -> list[str]:
    return [s.replica_id for s in result.stop]


# --- steady state, scale up, scale down ----------------------------------------------------------


def test_nothing_to_do_when_desired_equals_actual() -> None:
    s = web(2)
    assert plan(s, [replica("a", "n0", s), replica("b", "n1", s)], fleet(2)).empty


def test_scale_up_places_new_replicas_on_distinct_nodes() -> None:
    s = web(3)
    result = plan(s, [], fleet(3))
    assert len(result.create) == 3 and result.create_unplaced == 0
    assert sorted(p.node_id for p in result.create) == ["n0", "n1", "n2"]
    assert all(p.cluster == "web" and len(p.gpus) == 1 for p in result.create)
    assert result.stop == () and result.forget == () and result.assign == ()


def test_scale_up_beyond_capacity_leaves_the_rest_waiting_with_a_reason() -> None:
    s = web(3)
    result = plan(s, [replica("a", "n0", s)], fleet(2))
    assert [p.node_id for p in result.create] == ["n1"]
    assert result.create_unplaced == 1
    assert "fully used" in result.unplaced_reason or "not enough free GPUs" in result.unplaced_reason


def test_waiting_replicas_are_assigned_when_capacity_appears() -> None:
    s = web(2)
    waiting = replica("w", None, s, ReplicaState.PENDING)
    result = plan(s, [replica("a", "n0", s), waiting], fleet(2))
    assert [(rid, p.node_id) for rid, p in result.assign] == [("w", "n1")]
    assert result.create == () and result.create_unplaced == 0


def test_scale_down_stops_the_least_valuable_first() -> None:
    s = web(5)
    nodes = fleet(4, n1=NodeState.SUSPECT)  # no free GPU: the unplaced replica stays unplaced
    replicas = [
        replica("ready-old", "n0", s, generation=1),
        replica("on-suspect-node", "n1", s, generation=2),
        replica("starting", "n2", s, ReplicaState.STARTING, generation=3),
        replica("ready-new", "n3", s, generation=4),
        replica("unplaced", None, s, ReplicaState.PENDING, generation=0),
    ]
    assert plan(s, replicas, nodes).empty
    # One less each time: the order of removal is unplaced, unhealthy node, not ready, newest.
    expected = ["unplaced", "on-suspect-node", "starting", "ready-new", "ready-old"]
    for keep in range(4, -1, -1):
        result = plan(replace(s, replicas=keep), replicas, nodes)
        removed = list(result.forget) + stopped(result)
        assert sorted(removed) == sorted(expected[: 5 - keep]), f"keeping {keep}"
        assert result.forget == ("unplaced",)  # an unplaced replica is forgotten, not stopped
        assert all(st.reason == "scaled down" for st in result.stop)
        assert result.create == () and result.create_unplaced == 0


def test_scale_down_among_equals_stops_the_newest() -> None:
    s = web(1)
    replicas = [replica("gen1", "n0", s, generation=1), replica("gen7", "n1", s, generation=7),
                replica("gen3", "n2", s, generation=3)]
    assert stopped(plan(s, replicas, fleet(3))) in (["gen7", "gen3"], ["gen3", "gen7"])


def test_stops_in_flight_do_not_count_and_are_not_repeated() -> None:
    s = web(1)
    replicas = [replica("a", "n0", s), replica("b", "n1", s, stopping=True)]
    assert plan(s, replicas, fleet(2)).empty


def test_a_stopped_replica_does_not_count_toward_the_desired_total() -> None:
    # model.ACTIVE_REPLICA_STATES: "States in which a replica holds its GPUs and counts toward the
    # cluster's desired total" - STOPPED is not one of them, and its GPUs are already free.
    s = web(1)
    result = plan(s, [replica("a", "n0", s, ReplicaState.STOPPED)], fleet(2))
    assert len(result.create) + len(result.assign) == 1


# --- deletion -----------------------------------------------------------------------------------


def test_cluster_deleted_stops_everything_placed_and_forgets_the_rest() -> None:
    s = web(3)
    nodes = fleet(3)
    replicas = [
        replica("running", "n0", s),
        replica("failed", "n1", s, ReplicaState.FAILED),
        replica("waiting", None, s, ReplicaState.PENDING),
        replica("stopping", "n2", s, stopping=True),
        replica("stopping-on-gone-node", "n9", s, stopping=True),
    ]
    result = plan(None, replicas, nodes)
    assert sorted(stopped(result)) == ["failed", "running"]
    assert all(st.reason == "cluster deleted" for st in result.stop)
    assert sorted(result.forget) == ["stopping-on-gone-node", "waiting"]
    assert result.create == () and result.assign == () and result.create_unplaced == 0


def test_cluster_deleted_with_nothing_left_is_empty() -> None:
    assert plan(None, [], fleet(1)).empty


def test_cluster_deleted_converges_to_no_replicas() -> None:
    s = web(3)
    loop = Loop(None, "web", fleet(3), [replica(f"r{i}", f"n{i}", s) for i in range(3)])
    loop.run(max_rounds=3)
    assert loop.replicas == []


# --- failures and lost nodes ------------------------------------------------------------------------


def test_failed_replica_is_stopped_and_replaced_elsewhere() -> None:
    s = web(1)
    failed = replica("f", "n0", s, ReplicaState.FAILED, reason="exit code 1")
    result = plan(s, [failed], fleet(2))
    assert result.stop == (Stop("f", "exit code 1"),)
    # n0's GPU is still held by the failed replica until its node confirms the stop.
    assert [p.node_id for p in result.create] == ["n1"]


def test_failed_replica_without_a_reason() -> None:
    s = web(1)
    result = plan(s, [replica("f", "n0", s, ReplicaState.FAILED)], fleet(1))
    assert result.stop == (Stop("f", "failed"),)
    assert result.create == () and result.create_unplaced == 1  # its GPU is not free yet


def test_failed_replica_that_was_never_placed_is_forgotten_not_stopped() -> None:
    # A stop goes to a node; the server asserts the replica has one. With no node, there is nothing
    # to stop: the row should be forgotten, as for unplaced replicas elsewhere in plan_cluster.
    s = web(1)
    result = plan(s, [replica("f", None, s, ReplicaState.FAILED)], fleet(1))
    assert "f" not in stopped(result)


def test_may_replace_false_stops_failed_but_does_not_replace() -> None:
    s = web(2)
    result = plan(s, [replica("f", "n0", s, ReplicaState.FAILED), replica("ok", "n1", s)], fleet(3),
                  may_replace=False)
    assert stopped(result) == ["f"]
    assert result.create == () and result.create_unplaced == 0


def test_may_replace_false_still_stops_surplus() -> None:
    s = web(1)
    result = plan(s, [replica("a", "n0", s, generation=1), replica("b", "n1", s, generation=2)], fleet(2),
                  may_replace=False)
    assert stopped(result) == ["b"]


@pytest.mark.parametrize("grace", [0.0, 30.0, 120.0])
def test_replica_on_a_down_node_is_replaced_only_after_the_grace(grace: float) -> None:
    s = web(1, reschedule_after_s=grace)
    nodes = fleet(2, n0=NodeState.DOWN)
    replicas = [replica("a", "n0", s)]
    down_since = {"n0": NOW}
    if grace > 0:
        assert plan(s, replicas, nodes, now=NOW + grace - 0.001, down_since=down_since).empty
    result = plan(s, replicas, nodes, now=NOW + grace, down_since=down_since)
    assert result.stop == (Stop("a", "its node is down; replaced elsewhere"),)
    assert [p.node_id for p in result.create] == ["n1"]


def test_replica_on_a_suspect_node_is_never_replaced() -> None:
    s = web(1, reschedule_after_s=0.0)
    nodes = fleet(2, n0=NodeState.SUSPECT)
    assert plan(s, [replica("a", "n0", s)], nodes, now=NOW + 10**6, down_since={"n0": 0.0}).empty


def test_replica_on_a_removed_node_is_replaced_at_once() -> None:
    s = web(1)
    result = plan(s, [replica("a", "gone", s)], fleet(1))
    assert stopped(result) == ["a"]
    assert [p.node_id for p in result.create] == ["n0"]


# --- rolling replacement ------------------------------------------------------------------------


def test_scaling_fields_do_not_change_the_revision() -> None:
    s = web(2)
    assert template_revision(s) == template_revision(replace(s, replicas=5, reschedule_after_s=1.0))
    assert template_revision(s) != template_revision(replace(s, command=("other",)))
    assert template_revision(s) != template_revision(replace(s, env={"A": "1"}))


def test_rolling_replacement_new_first_then_old_as_new_become_ready() -> None:
    v1 = web(2)
    v2 = replace(v1, env={"MODEL": "v2"})
    nodes = fleet(2, gpus_each=2)
    old = [replica("old-a", "n0", v1, generation=1), replica("old-b", "n1", v1, generation=2)]

    # 1. New ones first, nothing stops yet.
    first = plan(v2, old, nodes)
    assert first.stop == () and len(first.create) == 2 and first.create_unplaced == 0
    assert sorted(p.node_id for p in first.create) == ["n0", "n1"]
    new = [replica("new-a", "n0", v2, ReplicaState.STARTING, generation=3, gpu=1),
           replica("new-b", "n1", v2, ReplicaState.STARTING, generation=4, gpu=1)]

    # 2. While the new ones start, the old ones keep serving.
    assert plan(v2, old + new, nodes).empty

    # 3. One new ready: exactly one old stops.
    new[0] = replace(new[0], state=ReplicaState.READY)
    third = plan(v2, old + new, nodes)
    assert len(third.stop) == 1 and third.stop[0].reason == "replaced by a newer revision"
    assert third.create == () and third.assign == ()
    old = [replace(r, stopping=True) if r.id == third.stop[0].replica_id else r for r in old]

    # 4. Both ready: the other old one stops too.
    new[1] = replace(new[1], state=ReplicaState.READY)
    fourth = plan(v2, old + new, nodes)
    assert len(fourth.stop) == 1 and fourth.stop[0].replica_id != third.stop[0].replica_id

    # 5. Once the stops are confirmed, nothing more.
    assert plan(v2, new, nodes).empty


def test_outdated_replicas_that_never_got_a_node_are_forgotten() -> None:
    v1 = web(1)
    v2 = replace(v1, command=("v2",))
    result = plan(v2, [replica("old-waiting", None, v1, ReplicaState.PENDING)], fleet(1))
    assert result.forget == ("old-waiting",)
    assert len(result.create) == 1


def test_tight_roll_converges_replacing_one_at_a_time() -> None:
    # Every GPU is taken by the old revision: old ones must be freed for new ones to fit.
    v1 = web(2)
    v2 = replace(v1, command=("v2",))
    loop = Loop(v2, "web", fleet(2), [replica("old-a", "n0", v1), replica("old-b", "n1", v1, generation=2)])
    loop.run(max_rounds=10)
    assert sorted(r.revision for r in loop.replicas) == [template_revision(v2)] * 2
    assert all(r.node_id is not None and r.state is ReplicaState.READY for r in loop.replicas)
    assert all(len(p.stop) <= 1 for p in loop.plans), "the roll stopped more than one old replica at a time"


def test_tight_roll_waits_for_the_new_replica_before_stopping_the_next_old_one() -> None:
    v1 = web(2)
    v2 = replace(v1, command=("v2",))
    nodes = fleet(2)
    replicas = [replica("old-a", "n0", v1, generation=1), replica("old-b", "n1", v1, generation=2)]
    ids = iter(range(100, 200))
    first = plan(v2, replicas, nodes)
    assert first.stop == () and first.create_unplaced == 2  # no room: the new ones wait
    replicas = apply_plan(replicas, first, v2, "web", ids)
    second = plan(v2, replicas, nodes)
    assert len(second.stop) == 1  # free one old replica's GPUs
    replicas = confirm_stops(apply_plan(replicas, second, v2, "web", ids))
    third = plan(v2, replicas, nodes)
    assert len(third.assign) == 1  # the first new replica takes the freed GPU
    # ...and is only starting: the last old replica must keep serving until it is ready,
    # or the cluster has no ready replica at all for a whole start-up.
    assert third.stop == ()


def test_roll_to_a_revision_no_node_can_run_keeps_the_old_replicas() -> None:
    # Stopping old replicas only helps when their GPUs would let a new one fit. Here no node has
    # an H100 at all; stopping the old ones just takes the service down.
    v1 = web(2)
    v2 = replace(v1, gpu=GpuRequest(("H100",), 1))
    loop = Loop(v2, "web", fleet(2), [replica("old-a", "n0", v1), replica("old-b", "n1", v1, generation=2)])
    loop.run(max_rounds=10)
    assert "no ready node has" in loop.plans[0].unplaced_reason
    assert sorted(r.id for r in loop.replicas if r.node_id is not None) == ["old-a", "old-b"]


# --- draining and pacing ------------------------------------------------------------------------


def test_replicas_on_a_draining_node_move_new_copies_first() -> None:
    s = web(2)
    nodes = fleet(4)
    nodes["n0"] = replace(nodes["n0"], draining=True, schedulable=False)
    replicas = [replica("a", "n0", s), replica("b", "n1", s)]
    first = plan(s, replicas, nodes)
    assert first.stop == ()  # nothing stops before its replacement is ready
    assert len(first.create) == 1 and first.create[0].node_id in {"n2", "n3"}
    new = replica("c", first.create[0].node_id, s, generation=5)
    second = plan(s, [*replicas, new], nodes)
    assert second.stop == (Stop("a", "its node is draining"),)
    assert plan(s, [replicas[1], new], nodes).empty


def test_lost_budget_paces_giving_up_on_down_nodes() -> None:
    s = web(3, reschedule_after_s=10.0)
    nodes = fleet(6, n0=NodeState.DOWN, n1=NodeState.DOWN, n2=NodeState.DOWN)
    down_since = {"n0": NOW - 100, "n1": NOW - 50, "n2": NOW - 20}
    replicas = [replica("a", "n0", s), replica("b", "n1", s), replica("c", "n2", s)]
    paced = plan_cluster(s, "web", replicas, nodes, down_since, replicas, NOW, lost_budget=1)
    assert stopped(paced) == ["a"]  # down longest goes first
    assert paced.lost_replaced == 1 and len(paced.create) == 1  # the others still count as live
    unpaced = plan_cluster(s, "web", replicas, nodes, down_since, replicas, NOW)
    assert sorted(stopped(unpaced)) == ["a", "b", "c"]
    assert unpaced.lost_replaced == 3 and len(unpaced.create) == 3
    assert plan_cluster(s, "web", replicas, nodes, down_since, replicas, NOW, lost_budget=0).empty


# --- convergence property ------------------------------------------------------------------------


@st.composite
def loops(draw: st.DrawFn) -> Loop:
    nodes = {n.id: n for n in draw(nodes_strategy(max_nodes=5))}
    down_since = {nid: NOW - draw(st.sampled_from([5.0, 100.0])) for nid, n in nodes.items()
                  if n.state is NodeState.DOWN}
    the_spec: ClusterSpec | None = None
    if draw(st.integers(min_value=0, max_value=5)):
        the_spec = spec("web", draw(st.integers(min_value=0, max_value=5)), draw(gpu_request_strategy(max_count=2)),
                        runtime=draw(runtimes_strategy))
    current_rev = template_revision(the_spec) if the_spec is not None else ""
    own = []
    for i in range(draw(st.integers(min_value=0, max_value=6))):
        where = draw(st.sampled_from([None, "gone", *nodes]))
        node = nodes.get(where) if where is not None else None
        gpus = tuple(draw(st.lists(st.sampled_from([g.uuid for g in node.gpus]), unique=True, max_size=2))) \
            if node is not None and node.gpus else ()
        state = ReplicaState.PENDING if where is None else draw(st.sampled_from(
            [ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.READY, ReplicaState.READY,
             ReplicaState.UNREADY, ReplicaState.FAILED, ReplicaState.FAILED]))
        own.append(Replica(f"own-{i}", "web", where, gpus, state, generation=i + 1,
                           stopping=where is not None and draw(st.integers(0, 4)) == 0,
                           revision=draw(st.sampled_from([current_rev, "old-revision"]))))
    others = draw(existing_replicas_strategy(list(nodes.values()), clusters=("other",)))
    return Loop(the_spec, "web", nodes, own, others, down_since, NOW, confirm_at_once=draw(st.booleans()))


@MEDIUM
@given(loops())
def test_the_control_loop_converges(loop: Loop) -> None:
    wanted = loop.spec.replicas if loop.spec is not None else 0
    loop.run(max_rounds=3 * (len(loop.replicas) + wanted) + 10)
    replicas = loop.replicas
    assert not any(r.stopping for r in replicas)
    if loop.spec is None:
        assert replicas == []
        return
    revision = template_revision(loop.spec)

    def is_current(r: Replica) -> bool:
        return r.revision == revision and not (r.node_id is not None and loop.nodes[r.node_id].draining)

    current = [r for r in replicas if is_current(r)]
    outdated = [r for r in replicas if not is_current(r)]
    # Nothing failed or lost survives.
    for r in replicas:
        assert r.state is not ReplicaState.FAILED
        if r.node_id is not None:
            assert r.node_id in loop.nodes
            assert not (loop.nodes[r.node_id].state is NodeState.DOWN and loop.down_since[r.node_id] <= NOW - 30)
    # Exactly the desired number of current replicas exists (placed, or waiting for capacity) ...
    assert len(current) == loop.spec.replicas
    # ... and they wait only when no eligible node could take one more.
    if any(r.node_id is None for r in current):
        assert nodes_that_fit(loop.nodes.values(), replicas + loop.others, loop.spec) == []
    # Old revisions (and replicas on draining nodes) survive only to cover current ones not ready.
    assert all(r.node_id is not None for r in outdated)
    assert len(outdated) <= sum(1 for r in current if r.state is not ReplicaState.READY)
    # Replicas the loop created never share a GPU with anything that holds one.
    held: set[tuple[str, str]] = set()
    for r in loop.others + [r for r in replicas if r.id.startswith("own-")]:
        if r.holds_resources:
            held.update((r.node_id, g) for g in r.gpus if r.node_id is not None)
    for r in replicas:
        if r.id.startswith("new-") and r.node_id is not None:
            for g in r.gpus:
                assert (r.node_id, g) not in held
                held.add((r.node_id, g))


# --- blast radius: quarantine and nodes to avoid -------------------------------------------------


def test_a_quarantined_cluster_is_placed_nowhere_and_its_unready_copies_stop() -> None:
    s = web(3)
    replicas = [replica("a", "n0", s), replica("b", "n1", s, ReplicaState.STARTING), replica("c", None, s,
                                                                                                  ReplicaState.PENDING)]
    result = plan_cluster(s, "web", replicas, fleet(3), {}, replicas, NOW, quarantined=True)
    check_well_formed(replicas, result)
    assert stopped(result) == ["b"]  # the ready one keeps serving
    assert result.forget == ("c",)
    assert not result.create and not result.assign and result.create_unplaced == 0


def test_nodes_to_avoid_are_used_only_when_nothing_else_fits() -> None:
    s = web(1)
    result = plan_cluster(s, "web", [], fleet(2), {}, [], NOW, avoid_nodes=frozenset({"n0"}))
    assert [p.node_id for p in result.create] == ["n1"]
    only = plan_cluster(s, "web", [], fleet(1), {}, [], NOW, avoid_nodes=frozenset({"n0"}))
    assert [p.node_id for p in only.create] == ["n0"]  # preferred against, not forbidden


# --- spec.update, spread kept while rolling, spread again when room appears -----------------------


def test_max_surge_limits_new_copies_beyond_the_desired_count() -> None:
    v1 = web(3)
    v2 = replace(v1, env={"MODEL": "v2"}, update=UpdateStrategy(max_surge=1))
    old = [replica(f"old-{i}", f"n{i}", v1, generation=i + 1) for i in range(3)]
    first = plan(v2, old, fleet(3, gpus_each=2))
    assert len(first.create) == 1 and first.stop == ()


def test_max_unavailable_stops_old_copies_before_new_ones_are_ready() -> None:
    v1 = web(2)
    v2 = replace(v1, env={"MODEL": "v2"}, update=UpdateStrategy(max_surge=0, max_unavailable=1))
    old = [replica("old-a", "n0", v1, generation=1), replica("old-b", "n1", v1, generation=2)]
    first = plan(v2, old, fleet(2))
    assert len(first.stop) == 1 and first.create == ()  # one down at once, never both


def test_max_unavailable_zero_on_a_full_fleet_waits_instead_of_dropping_a_copy() -> None:
    v1 = web(2)
    v2 = replace(v1, env={"MODEL": "v2"}, update=UpdateStrategy(max_unavailable=0))
    old = [replica("old-a", "n0", v1, generation=1), replica("old-b", "n1", v1, generation=2)]
    waiting = [replica("new-a", None, v2, ReplicaState.PENDING, generation=3),
               replica("new-b", None, v2, ReplicaState.PENDING, generation=4)]
    assert plan(v2, old + waiting, fleet(2)).stop == ()  # the operator asked for no loss of capacity


def test_a_roll_keeps_copies_on_different_nodes() -> None:
    """New copies spread as if the old ones were gone already (issue: both on one node after a roll)."""
    cpu = spec("web", 2, GpuRequest((), 0))
    v2 = replace(cpu, env={"MODEL": "v2"}, update=UpdateStrategy(max_surge=1))
    old = [replace(replica("old-a", "n0", cpu, generation=1), gpus=()),
           replace(replica("old-b", "n1", cpu, generation=2), gpus=())]
    nodes = {k: replace(n, gpus=()) for k, n in fleet(2).items()}
    loop = Loop(v2, "web", nodes, old)
    loop.run(max_rounds=20)
    assert sorted(r.node_id or "" for r in loop.replicas) == ["n0", "n1"]
    assert {r.revision for r in loop.replicas} == {template_revision(v2)}


def test_a_cluster_packed_on_one_node_spreads_when_another_node_can_take_a_copy() -> None:
    s = web(2)
    packed = [replica("a", "n0", s, generation=1, gpu=0), replica("b", "n0", s, generation=2, gpu=1)]
    nodes = fleet(2, gpus_each=2)
    first = plan(s, packed, nodes)
    assert [p.node_id for p in first.create] == ["n1"] and first.stop == ()  # new copy first
    moved = [*packed, replica("c", "n1", s, ReplicaState.STARTING, generation=3)]
    assert plan(s, moved, nodes).empty  # the old copy keeps serving while the new one starts
    moved[2] = replace(moved[2], state=ReplicaState.READY)
    third = plan(s, moved, nodes)
    assert [x.replica_id for x in third.stop] == ["b"] and "spreads over more nodes" in third.stop[0].reason
    assert plan(s, [packed[0], moved[2]], nodes).empty  # spread: nothing more to do


def test_no_move_when_no_other_node_could_take_a_copy() -> None:
    s = web(2)
    packed = [replica("a", "n0", s, generation=1, gpu=0), replica("b", "n0", s, generation=2, gpu=1)]
    assert plan(s, packed, fleet(2, gpus_each=2, n1=NodeState.DOWN)).empty
    assert plan(s, packed, fleet(1, gpus_each=2)).empty
