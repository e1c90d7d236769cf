"""Placement: which node (and which of its GPUs) gets each new replica.

Rules, in order: only ready, schedulable nodes; GPU type, count and memory must match; a GPU is
never given twice; replicas of one cluster go to the nodes holding the fewest of its replicas
(spread) and, among those, to the node with the fewest matching free GPUs left (pack), so big
nodes stay free for big replicas. A heap keeps this O((nodes + replicas) log nodes) per demand.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from vectorlay.core.model import ClusterSpec, Gpu, GpuRequest, Node, NodeState, Replica, Runtime

_NOISE = re.compile(r"\b(nvidia|geforce|tesla)\b")


def normalize_gpu_type(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' and 'rtx 4090' name the same card."""
    return " ".join(_NOISE.sub(" ", name.lower()).split())


def gpu_matches(gpu: Gpu, request: GpuRequest) -> bool:
    if request.types and normalize_gpu_type(gpu.name) not in {normalize_gpu_type(t) for t in request.types}:
        return False
    if request.min_memory_gb is not None and (gpu.memory_gb is None or gpu.memory_gb < request.min_memory_gb):
        return False
    return True


def describe_request(request: GpuRequest) -> str:
    if request.count == 0:
        return "no GPU"
    kinds = " or ".join(repr(t) for t in request.types) if request.types else "any type"
    memory = f" with at least {request.min_memory_gb:g} GB" if request.min_memory_gb else ""
    return f"{request.count} GPU(s) of {kinds}{memory}"


@dataclass(frozen=True)
class Placement:
    cluster: str
    node_id: str
    gpus: tuple[str, ...]


@dataclass(frozen=True)
class Unplaced:
    cluster: str
    count: int
    reason: str


@dataclass(frozen=True)
class Plan:
    placements: tuple[Placement, ...]
    unplaced: tuple[Unplaced, ...]


def eligible(node: Node) -> bool:
    return node.state is NodeState.READY and node.schedulable and node.gpus_healthy


def offers(node: Node, spec: ClusterSpec) -> bool:
    """Whether the node can run this kind of replica at all: its runtime and, for containers,
    the isolation level it asks for (gVisor for `sandbox`, Kata for `microvm`)."""
    if spec.runtime.value not in node.runtimes:
        return False
    return spec.runtime is not Runtime.CONTAINER or spec.isolation.value in node.isolation


def free_gpus(nodes: Iterable[Node], replicas: Iterable[Replica]) -> dict[str, list[Gpu]]:
    """Per eligible node, its GPUs that no replica holds, in index order."""
    used: set[tuple[str, str]] = {
        (r.node_id, uuid) for r in replicas if r.node_id is not None and r.holds_resources for uuid in r.gpus
    }
    return {
        node.id: sorted((g for g in node.gpus if (node.id, g.uuid) not in used), key=lambda g: g.index)
        for node in nodes
        if eligible(node)
    }


def place(
    nodes: Sequence[Node],
    replicas: Iterable[Replica],
    demand: Sequence[tuple[ClusterSpec, int]],
    avoid: Mapping[str, frozenset[str]] | None = None,
) -> Plan:
    """Place `count` new replicas for each (spec, count) in `demand`, given what already runs.

    `avoid` maps a cluster to nodes where its replicas failed for a reason tied to the node (an
    image missing there, say): those are used only when no other node fits."""
    replicas = list(replicas)
    by_id = {node.id: node for node in nodes}
    free = free_gpus(nodes, replicas)
    per_cluster: dict[str, Counter[str]] = {}
    for replica in replicas:
        if replica.node_id is not None and replica.holds_resources and not replica.stopping:
            per_cluster.setdefault(replica.cluster, Counter())[replica.node_id] += 1
    placements: list[Placement] = []
    unplaced: list[Unplaced] = []
    for spec, count in demand:
        if count <= 0:
            continue
        spread = per_cluster.setdefault(spec.key, Counter())
        placed = _place_one_cluster(spec, count, by_id, free, spread, (avoid or {}).get(spec.key, frozenset()))
        placements.extend(placed)
        if len(placed) < count:
            reason = _why_unplaced(spec, nodes, bool(placed))
            unplaced.append(Unplaced(spec.key, count - len(placed), reason))
    return Plan(tuple(placements), tuple(unplaced))


def _place_one_cluster(
    spec: ClusterSpec,
    count: int,
    nodes: Mapping[str, Node],
    free: dict[str, list[Gpu]],
    spread: Counter[str],
    avoid: frozenset[str] = frozenset(),
) -> list[Placement]:
    request = spec.gpu
    heap: list[tuple[bool, int, int, str, str]] = []
    for node_id, gpus in free.items():
        if not offers(nodes[node_id], spec):
            continue
        fitting = sum(1 for g in gpus if gpu_matches(g, request))
        if fitting >= request.count:
            heap.append((node_id in avoid, spread[node_id], fitting, nodes[node_id].name, node_id))
    heapq.heapify(heap)
    placements: list[Placement] = []
    while heap and len(placements) < count:
        avoided, on_node, fitting, name, node_id = heapq.heappop(heap)
        taken = [g for g in free[node_id] if gpu_matches(g, request)][: request.count]
        taken_ids = {g.uuid for g in taken}
        free[node_id] = [g for g in free[node_id] if g.uuid not in taken_ids]
        spread[node_id] += 1
        placements.append(Placement(spec.key, node_id, tuple(g.uuid for g in taken)))
        left = fitting - request.count
        # A CPU-only request (count 0) always fits again; a GPU request only while GPUs remain.
        if left >= request.count:
            heapq.heappush(heap, (avoided, on_node + 1, left, name, node_id))
    return placements


def _why_unplaced(spec: ClusterSpec, nodes: Sequence[Node], some: bool) -> str:
    request = spec.gpu
    wanted = describe_request(request)
    ready = [n for n in nodes if eligible(n)]
    if not ready:
        return "no ready node to run it"
    ready = [n for n in ready if spec.runtime.value in n.runtimes]
    if not ready:
        return f"no ready node offers the {spec.runtime.value} runtime"
    ready = [n for n in ready if offers(n, spec)]
    if not ready:
        return f"no ready node offers {spec.isolation.value} isolation"
    capable = [n for n in ready if sum(1 for g in n.gpus if gpu_matches(g, request)) >= request.count]
    if not capable:
        return f"no ready node has {wanted}"
    if some:
        return f"not enough free GPUs: placed what fits, the rest wait for {wanted}"
    return f"all {len(capable)} node(s) with {wanted} are fully used"
