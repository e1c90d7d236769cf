"""core.codec: strict dataclass <-> JSON conversion; errors name the offending path."""

from __future__ import annotations

import json
from typing import Any

import pytest
from core_strategies import PER_TYPE, dataclass_strategy
from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core.codec import CodecError, dump, load
from vectorlay.core.model import (
    Assignment,
    ClusterSpec,
    Gpu,
    GpuRequest,
    HealthCheck,
    Node,
    NodeState,
    Replica,
    ReplicaState,
    Runtime,
)

MODEL_TYPES = [Gpu, GpuRequest, HealthCheck, ClusterSpec, Node, Replica, Assignment]


@pytest.mark.parametrize("cls", MODEL_TYPES, ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_dump_then_load_round_trips_through_json(cls: type[Any], data: st.DataObject) -> None:
    value = data.draw(dataclass_strategy(cls))
    dumped = dump(value)
    wire = json.loads(json.dumps(dumped, allow_nan=False))
    assert load(cls, wire) == value


def test_dump_produces_plain_json_values() -> None:
    spec = ClusterSpec(
        "web", 2, GpuRequest(("RTX 4090",), 1, 20.0), Runtime.CONTAINER, "img:1", ("a", "b"), {"K": "v"}, 9000, None
    )
    assert dump(spec) == {
        "name": "web",
        "replicas": 2,
        "gpu": {"types": ["RTX 4090"], "count": 1, "min_memory_gb": 20.0},
        "runtime": "container",
        "image": "img:1",
        "command": ["a", "b"],
        "env": {"K": "v"},
        "port": 9000,
        "health": None,
        "workdir": None,
        "reschedule_after_s": 30.0,
        "isolation": "container",
        "image_pull": "if-not-present",
        "resources": {"cpus": None, "memory_mb": None},
        "endpoint": {"auth": "none", "rate_limit": None, "per_client_rate_limit": None},
        "project": "default",
        "env_from_secret": {},
        "update": {"max_surge": None, "max_unavailable": None},
    }


def test_missing_optional_fields_take_their_defaults() -> None:
    assert load(Replica, {"id": "r1", "cluster": "web", "node_id": None}) == Replica("r1", "web", None)
    assert load(ClusterSpec, {"name": "web", "replicas": 1}).health == HealthCheck()


def test_an_int_is_accepted_where_a_float_is_expected() -> None:
    gpu = load(Gpu, {"uuid": "u", "name": "RTX 4090", "memory_gb": 24})
    assert gpu.memory_gb == 24.0 and isinstance(gpu.memory_gb, float)


def _node(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "n1",
        "name": "box",
        "gpus": [{"uuid": "u0", "name": "RTX 4090", "memory_gb": 24.0, "index": 0}],
        "address": "10.0.0.1",
        "state": "ready",
        "schedulable": True,
    }
    data.update(changes)
    return data


def _assignment(**spec_changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "web", "replicas": 1, "command": ["run"]}
    spec.update(spec_changes)
    return {"replica_id": "r1", "cluster": "web", "generation": 3, "spec": spec, "gpus": ["u0"]}


def test_valid_fixtures_load() -> None:
    # The rejections below each change one thing in these.
    assert load(Node, _node()).state is NodeState.READY
    assert load(Assignment, _assignment()).spec.command == ("run",)


@pytest.mark.parametrize(
    ("cls", "data", "path", "words"),
    [
        # unknown field: the path is the object holding it; the message names the field
        (Node, _node(colour="red"), "", "colour"),
        (Assignment, _assignment(colour="red"), "spec", "colour"),
        # wrong type
        (Node, _node(name=7), "name", "string"),
        (Node, _node(gpus="u0"), "gpus", "list"),
        (Node, _node(gpus=[{"uuid": "u0", "name": "RTX 4090", "memory_gb": "lots"}]), "gpus[0].memory_gb", "number"),
        (Node, _node(state="sideways"), "state", "sideways"),
        (Assignment, _assignment(env={"A": 1}), "spec.env.A", "string"),
        (Assignment, _assignment(health="yes"), "spec.health", "object"),
        (Assignment, _assignment(replicas=1.0), "spec.replicas", "integer"),
        (Gpu, ["u0"], "", "object"),
        # bool is not an int, nor a float
        (Gpu, {"uuid": "u", "name": "g", "index": True}, "index", "integer"),
        (Gpu, {"uuid": "u", "name": "g", "memory_gb": False}, "memory_gb", "number"),
        (Assignment, _assignment(replicas=True), "spec.replicas", "integer"),
        # and an int or string is not a bool
        (Node, _node(schedulable=1), "schedulable", "true or false"),
        (Node, _node(schedulable="true"), "schedulable", "true or false"),
        # null only where the annotation allows it
        (Gpu, {"uuid": None, "name": "g"}, "uuid", "string"),
        (Node, _node(state=None), "state", ""),
        # missing required field: the path is the missing field's
        (Gpu, {"name": "g"}, "uuid", "missing"),
        (Replica, {"cluster": "web", "node_id": None}, "id", "missing"),
        (Replica, {"id": "r", "cluster": "web"}, "node_id", "missing"),
        (Assignment, {"replica_id": "r", "cluster": "c", "generation": 1, "spec": {"replicas": 1}}, "spec.name",
         "missing"),
    ],
)
def test_strict_rejections_name_the_path(cls: type[Any], data: Any, path: str, words: str) -> None:
    with pytest.raises(CodecError) as caught:
        load(cls, data)
    assert caught.value.path == path
    assert words in str(caught.value)
    if path:
        assert str(caught.value).startswith(f"{path}:")


def test_codec_error_is_a_value_error() -> None:
    assert issubclass(CodecError, ValueError)


def test_load_accepts_an_explicit_null_for_an_optional_field() -> None:
    replica = load(Replica, {"id": "r", "cluster": "c", "node_id": None, "address": None, "state": "failed"})
    assert replica.address is None and replica.state is ReplicaState.FAILED


def test_unwrap_group_reports_a_broken_link_once() -> None:
    """Several tasks failing on one broken link surface as one catchable PeerError."""
    from vectorlay.errors import PeerError, ProtocolError, unwrap_group

    with pytest.raises(PeerError, match="first"):
        with unwrap_group():
            raise ExceptionGroup("tasks", [PeerError("first"), ExceptionGroup("inner", [ProtocolError("second")])])
    with pytest.raises(ExceptionGroup):
        with unwrap_group():
            raise ExceptionGroup("tasks", [PeerError("link"), ValueError("a bug must stay visible")])
