"""Hypothesis strategies and small reference helpers shared by the unit tests of `vectorlay.core`.

Kept out of conftest.py so test modules can import them by name; the module name is chosen not to
clash with helpers elsewhere in the repository (test directories have no __init__.py).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import settings
from hypothesis import strategies as st

from vectorlay.core.model import (
    ACTIVE_REPLICA_STATES,
    ClusterSpec,
    Gpu,
    GpuRequest,
    Node,
    NodeState,
    Replica,
    ReplicaState,
    Runtime,
)

# One settings profile per cost class, applied per test (not globally, so other suites are unaffected).
# database=None: nothing is written outside tests/unit; deadline=None: no flaky timing failures.
CHEAP = settings(max_examples=200, deadline=None, database=None)
# For tests parametrized over many types: the examples add up across the parameters.
PER_TYPE = settings(max_examples=25, deadline=None, database=None)
MEDIUM = settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HypothesisHealthCheck.too_slow]
)
# For properties over generated fleets, which cost the most to draw.
FLEET = settings(MEDIUM, max_examples=60)

# --- generic strategies for the model's dataclasses, driven by their annotations --------------

json_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def strategy_for(annotation: Any) -> st.SearchStrategy[Any]:
    """A strategy producing valid values of `annotation`, for the annotations `core.codec` supports."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return dataclass_strategy(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        return st.one_of([strategy_for(option) for option in args])
    if origin is tuple:
        return st.lists(strategy_for(args[0]), max_size=3).map(tuple)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), strategy_for(args[1]), max_size=3)
    if annotation is Any:
        return json_values
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return st.sampled_from(list(annotation))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(min_value=-(2**63), max_value=2**63)
    if annotation is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if annotation is str:
        return st.text(max_size=12)
    if annotation is type(None):
        return st.none()
    raise TypeError(f"no strategy for {annotation!r}")


def dataclass_strategy(cls: type[Any], **overrides: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: overrides.get(f.name, strategy_for(hints[f.name])) for f in dataclasses.fields(cls) if f.init
    }
    return st.builds(cls, **fields)


# --- fleets for the scheduler and the reconciler -----------------------------------------------

GPU_NAMES = ("NVIDIA GeForce RTX 4090", "RTX 4090", "rtx 4080", "NVIDIA A100-SXM4-80GB", "Tesla T4", "A100")
REQUEST_TYPES = ("RTX 4090", "RTX 4080", "A100", "T4", "nvidia geforce rtx 4090")
MEMORY_SIZES = (None, 8.0, 16.0, 24.0, 80.0)
CLUSTER_NAMES = ("alpha", "beta", "gamma", "delta")
RUNTIME_SETS = (("process",), ("process",), ("process", "container"), ("container",))


def offers(node: Node, spec: ClusterSpec) -> bool:
    """Written apart from the scheduler's: the runtime, and for containers the isolation level."""
    if spec.runtime.value not in node.runtimes:
        return False
    return spec.runtime is not Runtime.CONTAINER or spec.isolation.value in node.isolation


@st.composite
def nodes_strategy(draw: st.DrawFn, max_nodes: int = 6, min_nodes: int = 0) -> list[Node]:
    count = draw(st.integers(min_value=min_nodes, max_value=max_nodes))
    nodes = []
    for i in range(count):
        gpu_count = draw(st.integers(min_value=0, max_value=4))
        gpus = tuple(
            Gpu(f"n{i}-gpu{j}", draw(st.sampled_from(GPU_NAMES)), draw(st.sampled_from(MEMORY_SIZES)), j)
            for j in range(gpu_count)
        )
        state = draw(st.sampled_from([NodeState.READY] * 4 + [NodeState.SUSPECT, NodeState.DOWN]))
        schedulable = draw(st.sampled_from([True, True, True, True, False]))
        runtimes = draw(st.sampled_from(RUNTIME_SETS))
        draining = not schedulable and draw(st.booleans())  # draining nodes are cordoned, as the API does
        # A container-capable node offers plain container isolation, sometimes gVisor too.
        isolation = (("container", "sandbox") if draw(st.booleans()) else ("container",)) if "container" in runtimes else ()
        nodes.append(Node(f"n{i}", f"node-{i}", gpus, f"10.0.0.{i}", state, schedulable, runtimes, draining,
                          isolation))
    return nodes


@st.composite
def gpu_request_strategy(draw: st.DrawFn, max_count: int = 3) -> GpuRequest:
    # Biased toward requests most fleets can satisfy, so placements (and contention) are common.
    kinds = draw(st.just([]) | st.lists(st.sampled_from(REQUEST_TYPES), min_size=1, max_size=2, unique=True))
    count = draw(st.sampled_from([1, 1, 0, *range(2, max_count + 1)]))
    memory = draw(st.sampled_from((None, None, 8.0, 24.0, 40.0)))
    return GpuRequest(tuple(kinds), count, memory)


def spec(name: str, replicas: int = 1, gpu: GpuRequest = GpuRequest(), **changes: Any) -> ClusterSpec:
    """A valid spec (process runtime unless `changes` say otherwise); `changes` override any field."""
    fields: dict[str, Any] = {"command": ("python", "serve.py")}
    if changes.get("runtime") is Runtime.CONTAINER:
        fields = {"image": "example/serve:1"}
    fields.update(changes)
    return ClusterSpec(name=name, replicas=replicas, gpu=gpu, **fields)


runtimes_strategy: st.SearchStrategy[Runtime] = st.sampled_from([Runtime.PROCESS, Runtime.PROCESS, Runtime.CONTAINER])


@st.composite
def existing_replicas_strategy(
    draw: st.DrawFn,
    nodes: Sequence[Node],
    clusters: Sequence[str] = CLUSTER_NAMES,
    max_replicas: int = 8,
) -> list[Replica]:
    """Replicas in any state on random nodes (or unplaced, or on a node no longer known), holding
    random subsets of their node's GPUs (two replicas may claim the same GPU, as a corrupt state would)."""
    count = draw(st.integers(min_value=0, max_value=max_replicas))
    replicas = []
    for i in range(count):
        node_id: str | None
        gpus: tuple[str, ...]
        where = draw(st.integers(min_value=-2, max_value=len(nodes) - 1))
        if where == -2:
            node_id, gpus = None, ()
        elif where == -1:
            node_id, gpus = "gone", ("gone-gpu0",)
        else:
            node = nodes[where]
            node_id = node.id
            uuids = [g.uuid for g in node.gpus]
            gpus = tuple(draw(st.lists(st.sampled_from(uuids), min_size=1, unique=True))) if uuids else ()
        replicas.append(
            Replica(
                id=f"existing-{i}",
                cluster=draw(st.sampled_from(clusters)),
                node_id=node_id,
                gpus=gpus,
                state=draw(st.sampled_from([*sorted(ACTIVE_REPLICA_STATES), *ReplicaState])),
                generation=i + 1,
                stopping=draw(st.booleans()),
            )
        )
    return replicas


# --- an independent reference for GPU matching and free capacity --------------------------------


def reference_normalize(name: str) -> str:
    words = [w for w in name.lower().split() if w not in {"nvidia", "geforce", "tesla"}]
    return " ".join(words)


def reference_matches(gpu: Gpu, request: GpuRequest) -> bool:
    if request.types and reference_normalize(gpu.name) not in {reference_normalize(t) for t in request.types}:
        return False
    if request.min_memory_gb is not None:
        return gpu.memory_gb is not None and gpu.memory_gb >= request.min_memory_gb
    return True


def is_eligible(node: Node) -> bool:
    return node.state is NodeState.READY and node.schedulable


def held_gpus(replicas: Iterable[Replica]) -> set[tuple[str, str]]:
    """(node id, GPU uuid) pairs that replicas hold right now."""
    return {(r.node_id, uuid) for r in replicas if r.node_id is not None and r.holds_resources for uuid in r.gpus}


def free_matching(node: Node, held: set[tuple[str, str]], request: GpuRequest) -> int:
    return sum(1 for g in node.gpus if (node.id, g.uuid) not in held and reference_matches(g, request))


def nodes_that_fit(nodes: Iterable[Node], replicas: Iterable[Replica], the_spec: ClusterSpec) -> list[Node]:
    """Eligible nodes that could take one more replica of `the_spec` given what `replicas` hold."""
    held = held_gpus(replicas)
    request = the_spec.gpu
    return [
        n for n in nodes
        if is_eligible(n) and offers(n, the_spec) and free_matching(n, held, request) >= request.count
    ]

