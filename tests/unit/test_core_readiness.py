"""core.readiness: a replica serves only when ready, not stopping, addressed and on a ready node;
a cluster is ready when every desired replica of its current revision serves and nothing else runs."""

from __future__ import annotations

from dataclasses import replace

import pytest
from core_strategies import CHEAP
from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core.model import NodeState, Replica, ReplicaState
from vectorlay.core.readiness import cluster_readiness, serves

NODES = {"n1": NodeState.READY, "n2": NodeState.SUSPECT, "n3": NodeState.DOWN}
SERVING = Replica("r1", "web", "n1", state=ReplicaState.READY, address="10.0.0.1:9000", revision="v2")


def node_state(node_id: str) -> NodeState:
    return NODES[node_id]


def test_a_ready_addressed_replica_on_a_ready_node_serves() -> None:
    assert serves(SERVING, node_state)


@pytest.mark.parametrize("change", [
    {"state": ReplicaState.STARTING}, {"state": ReplicaState.UNREADY}, {"stopping": True}, {"address": None},
    {"address": ""}, {"node_id": None}, {"node_id": "n2"}, {"node_id": "n3"},
], ids=str)
def test_anything_less_does_not_serve(change: dict[str, object]) -> None:
    assert not serves(replace(SERVING, **change), node_state)  # type: ignore[arg-type]


replicas = st.lists(st.builds(
    Replica, id=st.text(max_size=4), cluster=st.just("web"), node_id=st.sampled_from([None, *NODES]),
    state=st.sampled_from(list(ReplicaState)), address=st.sampled_from([None, "10.0.0.1:9000"]),
    stopping=st.booleans(), revision=st.sampled_from(["v1", "v2"])), max_size=6)


@CHEAP
@given(replicas=replicas, desired=st.integers(min_value=0, max_value=4))
def test_a_cluster_is_ready_when_exactly_its_desired_current_replicas_serve(replicas: list[Replica],
                                                                           desired: int) -> None:
    counts = cluster_readiness(desired, "v2", replicas, node_state)
    live = [r for r in replicas if not r.stopping]
    current = [r for r in live if r.revision == "v2"]
    assert counts.serving == sum(1 for r in current if serves(r, node_state))
    assert counts.ready == (len(live) == desired and all(serves(r, node_state) for r in live)
                            and all(r.revision == "v2" for r in live))
