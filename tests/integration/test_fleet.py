"""Fleet correctness at a size CI affords: hundreds of simulated nodes on the real protocol.

The speed and memory targets are benchmark figures (bench/fleet.py, BENCHMARKS.md); these tests
check what must hold at any size: each replica placed exactly once, spread across nodes, a
silent node detected, and a server restart storm that reschedules nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from testsupport.fleet_sim import SimProcess
from testsupport.processes import Stack, wait_for

pytestmark = pytest.mark.slow

NODES = 240
REPLICAS = 160

MANIFEST = f"""\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {{name: big}}
spec:
  replicas: {REPLICAS}
  gpu: {{type: "RTX 4090", count: 1}}
  runtime: process
  command: ["serve", "--port", "${{PORT}}"]
  health: {{path: /healthz, interval: 1s, timeout: 500ms}}
  reschedule_after: 2s
"""


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Stack, list[SimProcess]]]:
    stack = Stack(tmp_path)
    sims: list[SimProcess] = []
    try:
        stack.start_server()
        token = stack.token("node", "--uses", str(NODES))
        half = NODES // 2
        sims = [SimProcess(stack.server_url, token, half, prefix, tmp_path / prefix, tmp_path / f"{prefix}log")
                for prefix in ("sim-a-", "sim-b-")]
        wait_for(lambda: all(s.connected >= s.count for s in sims), 180, 0.5, "the simulated fleet to connect")
        yield stack, sims
    finally:
        for sim in sims:
            sim.stop()
        stack.close()


def test_fleet_placement_detection_and_restart_storm(fleet: tuple[Stack, list[SimProcess]]) -> None:
    stack, sims = fleet
    nodes = stack.cli_json("get", "nodes")
    assert len(nodes) == NODES and {n["state"] for n in nodes} == {"ready"}

    stack.cli("apply", "-", "--timeout", "120s", input_text=MANIFEST)
    replicas = stack.cli_json("get", "replicas")
    assert len(replicas) == REPLICAS and len({r["id"] for r in replicas}) == REPLICAS
    assert {r["state"] for r in replicas} == {"ready"}
    per_node = Counter(r["node"] for r in replicas)
    assert max(per_node.values()) == 1  # spread: more nodes than replicas, so never two on one node
    gpus = Counter((r["node"], g) for r in replicas for g in r["gpus"])
    assert max(gpus.values()) == 1  # no GPU given twice

    # One node goes silent (its link blackholed, nothing closed): detected from missed heartbeats.
    sims[0].command("freeze")
    wait_for(lambda: [n for n in stack.cli_json("get", "nodes") if n["name"] == "sim-a-0"][0]["state"] != "ready",
             20, 0.2, "the silent node to be detected")
    sims[0].command("thaw")
    wait_for(lambda: all(n["state"] == "ready" for n in stack.cli_json("get", "nodes")), 60, 0.5,
             "the node to return")
    wait_for(lambda: len(stack.cli_json("get", "replicas")) == REPLICAS, 30, 0.5, "the desired copies only")
    before = {r["id"]: r["node"] for r in stack.cli_json("get", "replicas")}

    # A server restart (kill -9) with the whole fleet connected: everyone reconnects, nobody is
    # marked down, nothing is rescheduled.
    assert stack.server is not None
    stack.server.kill()
    stack.start_server()
    worst_down = 0

    def all_back() -> bool:
        nonlocal worst_down
        listed = stack.cli_json("get", "nodes")
        worst_down = max(worst_down, sum(1 for n in listed if n["state"] == "down"))
        return all(n["connected"] and n["state"] == "ready" for n in listed)

    wait_for(all_back, 120, 1.0, "the fleet to reconnect")
    after = {r["id"]: r["node"] for r in stack.cli_json("get", "replicas")}
    assert after == before
    assert worst_down == 0
    assert {r["state"] for r in stack.cli_json("get", "replicas")} == {"ready"}
