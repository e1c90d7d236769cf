"""The pure scheduler alone: placements per second over a large fleet.

No I/O, no server: `vectorlay.core.scheduler.place` on N nodes (one GPU each, half of them already
holding a replica of another cluster) placing R replicas of one cluster, timed over several runs.

    python bench/scheduler.py --nodes 5000 --replicas 1000 --runs 7

The last line is for scripts:
scheduler: nodes=N replicas=R median_s=X placements_per_s=Y
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vectorlay.core.model import ClusterSpec, Gpu, GpuRequest, Node, Replica, ReplicaState  # noqa: E402
from vectorlay.core.scheduler import place  # noqa: E402


def fleet(nodes: int) -> tuple[list[Node], list[Replica]]:
    fleet_nodes = [Node(f"n-{i}", f"node-{i}", tuple(Gpu(f"GPU-{i}-{g}", "RTX 4090", 24.0, g) for g in range(2)),
                        "127.0.0.1") for i in range(nodes)]
    busy = [Replica(f"other-{i}", "other", node.id, (node.gpus[0].uuid,), ReplicaState.READY)
            for i, node in enumerate(fleet_nodes[::2])]
    return fleet_nodes, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    nodes, busy = fleet(args.nodes)
    spec = ClusterSpec(name="bench", replicas=args.replicas, gpu=GpuRequest(("RTX 4090",), 1),
                       command=("python3", "-m", "server"))
    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        plan = place(nodes, busy, [(spec, args.replicas)])
        times.append(time.perf_counter() - started)
        if len(plan.placements) != args.replicas or plan.unplaced:
            raise SystemExit(f"placed {len(plan.placements)} of {args.replicas}: {plan.unplaced}")
        if len({p.node_id for p in plan.placements}) != args.replicas:
            raise SystemExit("spread broken: two replicas on one node")
    median = statistics.median(times)
    print(f"scheduler: nodes={args.nodes} replicas={args.replicas} median_s={median:.4f} "
          f"placements_per_s={args.replicas / median:.0f}")


if __name__ == "__main__":
    main()
