"""core.scheduler: place() never oversubscribes a GPU, matches requests, and spreads before packing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import pytest
from core_strategies import (
    CLUSTER_NAMES,
    FLEET,
    MEDIUM,
    existing_replicas_strategy,
    free_matching,
    gpu_request_strategy,
    held_gpus,
    is_eligible,
    nodes_strategy,
    nodes_that_fit,
    reference_matches,
    runtimes_strategy,
    spec,
)
from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core.model import ClusterSpec, Gpu, GpuRequest, Node, NodeState, Replica, ReplicaState, Runtime
from vectorlay.core.scheduler import Placement, Plan, gpu_matches, normalize_gpu_type, place

Demand = list[tuple[ClusterSpec, int]]


@st.composite
def scenarios(draw: st.DrawFn, max_demands: int = 3) -> tuple[list[Node], list[Replica], Demand]:
    nodes = draw(nodes_strategy())
    replicas = draw(existing_replicas_strategy(nodes))
    names = draw(st.lists(st.sampled_from(CLUSTER_NAMES), min_size=1, max_size=max_demands, unique=True))
    demand = [(spec(name, gpu=draw(gpu_request_strategy()), runtime=draw(runtimes_strategy)),
               draw(st.integers(min_value=-1, max_value=6)))
              for name in names]
    return nodes, replicas, demand


def placements_of(plan: Plan, cluster: str) -> list[Placement]:
    return [p for p in plan.placements if p.cluster == cluster]


# --- properties ---------------------------------------------------------------------------------


@MEDIUM
@given(scenarios())
def test_no_gpu_is_ever_given_twice(scenario: tuple[list[Node], list[Replica], Demand]) -> None:
    nodes, replicas, demand = scenario
    plan = place(nodes, replicas, demand)
    taken = held_gpus(replicas)  # GPUs that existing replicas hold (running, pending or stopping)
    for placement in plan.placements:
        assert len(set(placement.gpus)) == len(placement.gpus)
        for uuid in placement.gpus:
            assert (placement.node_id, uuid) not in taken, f"{uuid} on {placement.node_id} is already held"
            taken.add((placement.node_id, uuid))


@FLEET
@given(scenarios())
def test_placements_only_on_eligible_nodes_with_matching_gpus(
    scenario: tuple[list[Node], list[Replica], Demand],
) -> None:
    nodes, replicas, demand = scenario
    by_id = {n.id: n for n in nodes}
    specs = {s.name: s for s, _ in demand}
    for placement in place(nodes, replicas, demand).placements:
        node = by_id[placement.node_id]
        assert node.state is NodeState.READY and node.schedulable
        assert specs[placement.cluster].runtime.value in node.runtimes
        request = specs[placement.cluster].gpu
        assert len(placement.gpus) == request.count
        gpus = {g.uuid: g for g in node.gpus}
        for uuid in placement.gpus:
            assert uuid in gpus, "a placement names a GPU its node does not have"
            assert reference_matches(gpus[uuid], request)


@FLEET
@given(scenarios())
def test_placed_plus_unplaced_is_what_was_asked(scenario: tuple[list[Node], list[Replica], Demand]) -> None:
    nodes, replicas, demand = scenario
    plan = place(nodes, replicas, demand)
    asked = {s.name: count for s, count in demand}
    for name, count in asked.items():
        placed = len(placements_of(plan, name))
        unplaced = sum(u.count for u in plan.unplaced if u.cluster == name)
        assert placed + unplaced == max(count, 0)
        assert all(u.count > 0 and u.reason for u in plan.unplaced if u.cluster == name)
    assert {p.cluster for p in plan.placements} | {u.cluster for u in plan.unplaced} <= set(asked)


@FLEET
@given(scenarios())
def test_nothing_is_left_unplaced_while_a_node_could_still_take_it(
    scenario: tuple[list[Node], list[Replica], Demand],
) -> None:
    nodes, replicas, demand = scenario
    plan = place(nodes, replicas, demand)
    new = [Replica(f"new-{i}", p.cluster, p.node_id, p.gpus) for i, p in enumerate(plan.placements)]
    after = replicas + new
    for unplaced in plan.unplaced:
        the_spec = next(s for s, _ in demand if s.name == unplaced.cluster)
        assert nodes_that_fit(nodes, after, the_spec) == []


@MEDIUM
@given(data=st.data())
def test_spread_a_single_demand_over_distinct_nodes(data: st.DataObject) -> None:
    # One demand only: with several, an earlier demand may use up GPUs that made a node "fit".
    nodes = data.draw(nodes_strategy(max_nodes=8, min_nodes=2))
    replicas = data.draw(existing_replicas_strategy(nodes))
    cluster = data.draw(st.sampled_from(CLUSTER_NAMES))
    the_spec = spec(cluster, gpu=data.draw(gpu_request_strategy(max_count=2)), runtime=data.draw(runtimes_strategy))
    count = data.draw(st.integers(min_value=1, max_value=8))
    plan = place(nodes, replicas, [(the_spec, count)])
    placed = placements_of(plan, cluster)
    # Nodes that could each fit one replica on their own and hold no live replica of this cluster
    # yet (a stopping replica is on its way out and does not count).
    occupied = {r.node_id for r in replicas if r.cluster == cluster and r.holds_resources and not r.stopping}
    empty_fitting = [n for n in nodes_that_fit(nodes, replicas, the_spec) if n.id not in occupied]
    if len(placed) <= len(empty_fitting):
        assert len({p.node_id for p in placed}) == len(placed), "replicas share a node while others were free"
        assert not {p.node_id for p in placed} & occupied
    # And in general: no node takes a second new replica while another fitting node took none.
    per_node = Counter(p.node_id for p in placed)
    if per_node and max(per_node.values()) > 1:
        assert all(n.id in per_node or n.id in occupied for n in empty_fitting)


@MEDIUM
@given(data=st.data())
def test_spread_with_no_existing_replicas(data: st.DataObject) -> None:
    # The plain statement: if the cluster got k placements and at least k eligible nodes could each
    # fit one replica, the k placements are on k distinct nodes.
    # At least two nodes and two replicas: with fewer, spreading is not in question.
    nodes = data.draw(nodes_strategy(max_nodes=8, min_nodes=2))
    others = data.draw(existing_replicas_strategy(nodes, clusters=("other",)))
    the_spec = spec("web", gpu=data.draw(gpu_request_strategy(max_count=2)), runtime=data.draw(runtimes_strategy))
    count = data.draw(st.integers(min_value=2, max_value=8))
    placed = place(nodes, others, [(the_spec, count)]).placements
    if len(placed) <= len(nodes_that_fit(nodes, others, the_spec)):
        assert len({p.node_id for p in placed}) == len(placed)


@FLEET
@given(scenarios())
def test_place_does_not_depend_on_the_order_of_existing_replicas(
    scenario: tuple[list[Node], list[Replica], Demand],
) -> None:
    nodes, replicas, demand = scenario
    assert place(nodes, replicas, demand) == place(nodes, list(reversed(replicas)), demand)


# --- examples -------------------------------------------------------------------------------------


def node(node_id: str, *gpus: tuple[str, float | None], state: NodeState = NodeState.READY,
         schedulable: bool = True) -> Node:
    return Node(
        node_id,
        f"name-{node_id}",
        tuple(Gpu(f"{node_id}-g{i}", name, memory, i) for i, (name, memory) in enumerate(gpus)),
        "127.0.0.1",
        state,
        schedulable,
    )


def one(nodes: Sequence[Node], request: GpuRequest, count: int = 1, replicas: Sequence[Replica] = ()) -> Plan:
    return place(nodes, replicas, [(spec("web", gpu=request), count)])


@pytest.mark.parametrize(
    ("gpu_name", "wanted", "matches"),
    [
        ("NVIDIA GeForce RTX 4090", "RTX 4090", True),
        ("NVIDIA GeForce RTX 4090", "rtx 4090", True),
        ("RTX 4090", "NVIDIA GeForce RTX 4090", True),
        ("Tesla T4", "T4", True),
        ("NVIDIA A100", "a100", True),
        ("RTX 4090", "RTX 4080", False),
        ("NVIDIA GeForce RTX 4090", "RTX 4080", False),
        ("RTX 4090", "RTX 409", False),
        ("RTX 4090 Ti", "RTX 4090", False),
    ],
)
def test_gpu_type_normalisation(gpu_name: str, wanted: str, matches: bool) -> None:
    gpu = Gpu("u", gpu_name, 24.0)
    assert gpu_matches(gpu, GpuRequest((wanted,), 1)) is matches
    plan = one([node("a", (gpu_name, 24.0))], GpuRequest((wanted,), 1))
    assert len(plan.placements) == (1 if matches else 0)


def test_normalize_gpu_type() -> None:
    assert normalize_gpu_type("NVIDIA GeForce RTX 4090") == "rtx 4090"
    assert normalize_gpu_type("  Tesla   V100  ") == "v100"


def test_any_of_several_types() -> None:
    nodes = [node("a", ("RTX 4080", 16.0)), node("b", ("NVIDIA A100", 80.0)), node("c", ("Tesla T4", 16.0))]
    plan = one(nodes, GpuRequest(("RTX 4090", "A100", "T4"), 1), count=3)
    assert sorted(p.node_id for p in plan.placements) == ["b", "c"]
    assert plan.unplaced[0].count == 1


def test_min_memory() -> None:
    nodes = [node("a", ("RTX 4090", 24.0)), node("b", ("RTX 4090", 12.0)), node("c", ("RTX 4090", None))]
    plan = one(nodes, GpuRequest((), 1, min_memory_gb=16), count=3)
    assert [p.node_id for p in plan.placements] == ["a"]  # unknown memory does not count as enough


def test_gpu_count_must_fit_on_one_node() -> None:
    nodes = [node("a", ("RTX 4090", 24.0)), node("b", ("RTX 4090", 24.0), ("RTX 4090", 24.0))]
    plan = one(nodes, GpuRequest(("RTX 4090",), 2))
    assert plan.placements == (Placement("web", "b", ("b-g0", "b-g1")),)


def test_gpus_held_by_replicas_are_not_reused_but_freed_ones_are() -> None:
    n = node("a", ("RTX 4090", 24.0), ("RTX 4090", 24.0), ("RTX 4090", 24.0), ("RTX 4090", 24.0))
    replicas = [
        Replica("r1", "other", "a", ("a-g0",), ReplicaState.READY),
        Replica("r2", "other", "a", ("a-g1",), ReplicaState.FAILED, stopping=True),  # still being stopped
        Replica("r3", "other", "a", ("a-g2",), ReplicaState.FAILED),  # dead and not holding
    ]
    plan = one([n], GpuRequest((), 1), count=3, replicas=replicas)
    assert sorted(g for p in plan.placements for g in p.gpus) == ["a-g2", "a-g3"]


def test_spreads_before_packing() -> None:
    nodes = [node("a", *[("RTX 4090", 24.0)] * 4), node("b", *[("RTX 4090", 24.0)] * 4)]
    plan = one(nodes, GpuRequest((), 1), count=4)
    assert Counter(p.node_id for p in plan.placements) == {"a": 2, "b": 2}


def test_packs_onto_the_node_with_fewest_matching_free_gpus() -> None:
    # Spread first, then pack: the small node is used first so the big one stays free for big asks.
    nodes = [node("big", *[("RTX 4090", 24.0)] * 4), node("small", ("RTX 4090", 24.0))]
    plan = one(nodes, GpuRequest((), 1), count=1)
    assert plan.placements[0].node_id == "small"


def test_existing_replicas_of_the_cluster_steer_the_spread() -> None:
    nodes = [node("a", *[("RTX 4090", 24.0)] * 2), node("b", *[("RTX 4090", 24.0)] * 2)]
    existing = [Replica("r1", "web", "a", ("a-g0",), ReplicaState.READY)]
    plan = one(nodes, GpuRequest((), 1), count=1, replicas=existing)
    assert plan.placements[0].node_id == "b"


def test_only_ready_schedulable_nodes() -> None:
    nodes = [
        node("suspect", ("RTX 4090", 24.0), state=NodeState.SUSPECT),
        node("down", ("RTX 4090", 24.0), state=NodeState.DOWN),
        node("cordoned", ("RTX 4090", 24.0), schedulable=False),
        node("ok", ("RTX 4090", 24.0)),
    ]
    plan = one(nodes, GpuRequest((), 1), count=4)
    assert [p.node_id for p in plan.placements] == ["ok"]
    assert plan.unplaced[0].count == 3


def test_only_nodes_offering_the_runtime() -> None:
    nodes = [node("proc", ("RTX 4090", 24.0)),
             replace(node("both", ("RTX 4090", 24.0)), runtimes=("process", "container"), isolation=("container",))]
    container = spec("web", gpu=GpuRequest((), 1), runtime=Runtime.CONTAINER)
    plan = place(nodes, [], [(container, 2)])
    assert [p.node_id for p in plan.placements] == ["both"]
    assert plan.unplaced[0].count == 1


def test_reason_no_node_offers_the_runtime() -> None:
    container = spec("web", gpu=GpuRequest(), runtime=Runtime.CONTAINER)
    plan = place([node("a"), node("b")], [], [(container, 1)])
    assert plan.unplaced[0].reason == "no ready node offers the container runtime"


def test_cpu_only_requests_need_no_gpu_and_stack_on_nodes() -> None:
    nodes = [node("a"), node("b", ("RTX 4090", 24.0))]
    plan = one(nodes, GpuRequest(("RTX 4090",), 0), count=5)  # count 0: the type is irrelevant
    assert len(plan.placements) == 5 and plan.unplaced == ()
    assert all(p.gpus == () for p in plan.placements)
    assert Counter(p.node_id for p in plan.placements) in ({"a": 3, "b": 2}, {"a": 2, "b": 3})


def test_cpu_only_request_with_no_ready_node() -> None:
    plan = one([node("a", state=NodeState.DOWN)], GpuRequest(), count=2)
    assert plan.placements == ()
    assert plan.unplaced[0].count == 2 and plan.unplaced[0].reason == "no ready node to run it"


def test_zero_or_negative_count_places_nothing() -> None:
    assert place([node("a")], [], [(spec("web"), 0), (spec("api"), -3)]) == Plan((), ())


def test_several_demands_share_the_fleet() -> None:
    nodes = [node("a", ("RTX 4090", 24.0), ("RTX 4090", 24.0))]
    plan = place(nodes, [], [(spec("web", gpu=GpuRequest((), 1)), 1), (spec("api", gpu=GpuRequest((), 2)), 1)])
    assert [p.cluster for p in plan.placements] == ["web"]
    assert plan.unplaced[0].cluster == "api"


# --- unplaced reasons ------------------------------------------------------------------------------


def test_reason_no_ready_node() -> None:
    plan = one([node("a", ("RTX 4090", 24.0), state=NodeState.SUSPECT)], GpuRequest((), 1))
    assert plan.unplaced[0].reason == "no ready node to run it"


def test_reason_no_node_has_the_gpu() -> None:
    plan = one([node("a", ("RTX 4080", 16.0))], GpuRequest(("RTX 4090",), 1, min_memory_gb=20))
    assert plan.unplaced[0].reason == "no ready node has 1 GPU(s) of 'RTX 4090' with at least 20 GB"


def test_reason_no_node_has_enough_of_any_type() -> None:
    plan = one([node("a", ("RTX 4080", 16.0))], GpuRequest((), 2))
    assert plan.unplaced[0].reason == "no ready node has 2 GPU(s) of any type"


def test_reason_all_capable_nodes_are_used() -> None:
    nodes = [node("a", ("RTX 4090", 24.0)), node("b", ("RTX 4090", 24.0))]
    busy = [Replica("x", "other", "a", ("a-g0",), ReplicaState.READY),
            Replica("y", "other", "b", ("b-g0",), ReplicaState.STARTING)]
    plan = one(nodes, GpuRequest(("RTX 4090", "A100"), 1), replicas=busy)
    assert plan.unplaced[0].reason == "all 2 node(s) with 1 GPU(s) of 'RTX 4090' or 'A100' are fully used"


def test_reason_when_some_were_placed() -> None:
    plan = one([node("a", ("RTX 4090", 24.0))], GpuRequest((), 1), count=3)
    assert len(plan.placements) == 1
    assert plan.unplaced[0].count == 2
    assert plan.unplaced[0].reason == "not enough free GPUs: placed what fits, the rest wait for 1 GPU(s) of any type"


def test_free_matching_reference_agrees_on_a_simple_case() -> None:
    # Guard for the reference helper the properties rely on.
    n = node("a", ("NVIDIA GeForce RTX 4090", 24.0), ("RTX 4080", 16.0))
    assert is_eligible(n)
    assert free_matching(n, set(), GpuRequest(("rtx 4090",), 1)) == 1
    assert free_matching(n, {("a", "a-g0")}, GpuRequest(("rtx 4090",), 1)) == 0


def test_avoided_nodes_come_last_even_before_spread() -> None:
    """A node where the cluster failed for a node-bound reason (its image missing there) is used
    only when no other node fits, even if that means two replicas share a node."""
    gpu = GpuRequest((), 0)
    nodes = [Node(f"n{i}", f"n{i}", (), "10.0.0.1", runtimes=("process",)) for i in range(2)]
    the_spec = spec("web", gpu=gpu)
    running = [Replica("web-1", "web", "n1", (), ReplicaState.READY)]
    plan = place(nodes, running, [(the_spec, 1)], {"web": frozenset({"n0"})})
    assert [p.node_id for p in plan.placements] == ["n1"]
    plan = place(nodes, running, [(the_spec, 1)])
    assert [p.node_id for p in plan.placements] == ["n0"]
