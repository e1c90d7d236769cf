"""Fleet benchmark: one real `vectorlay server` and N simulated nodes on the real protocol.

The nodes are real agents with a fake runtime (testsupport/fleet_sim.py), spread over a few
client processes, all over real WebSockets on loopback. It measures, at heartbeat interval H:

- rss_mb, cpu_share:  the server's resident memory and share of one core at steady state
- apply_ready_s:      from `apply` (R replicas, one GPU each) returning to all R routed as ready
- detect_s:           from one node going silent (its link blackholed) to the server calling it suspect
- reconnect_s:        from restarting the server (kill -9) to all N nodes connected and ready again
- rescheduled:        replicas that got a new id because of the restart (target 0); down_during_restart
                      counts nodes the server marked down meanwhile (target 0)

    python bench/fleet.py --nodes 1000 --heartbeat 5 --replicas 1000 [--db postgresql+psycopg://...]

The last line is for scripts:
fleet: nodes=N heartbeat_s=H rss_mb=X cpu_share=Y apply_ready_s=Z detect_s=W reconnect_s=V rescheduled=K

With `--servers K` (PostgreSQL only) K servers share the database and the nodes spread over them;
instead of one server's restart it kills the leader (kill -9) and measures:

- per server: rss_mb and cpu_share at steady state (the largest of the K is printed)
- leader_s:           from the kill to another server leading (polled through `get servers`)
- placement_s:        from the kill to a cluster applied right after it having its replica placed
- reconnect_s:        from the kill to every node connected and ready again (the dead server's
                      nodes move to the others)
- rescheduled:        replicas of the big cluster that got a new id because of the failover (target 0)

    python bench/fleet.py --servers 3 --nodes 15000 --heartbeat 5 --replicas 1000 --db postgresql+psycopg://...

fleet-servers: servers=K nodes=N ... rss_mb_max=X cpu_share_max=Y apply_ready_s=Z leader_s=L placement_s=P
               reconnect_s=V rescheduled=K
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TypeVar

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testsupport.fleet_sim import SimProcess  # noqa: E402
from testsupport.processes import Stack, wait_for  # noqa: E402
from vectorlay.client.api import open_api  # noqa: E402
from vectorlay.core.api import Apply, GetFleetSummary, GetNodes, GetReplicas, GetServers, Request  # noqa: E402
from vectorlay.core.api_views import FleetSummary, ServerView  # noqa: E402
from vectorlay.errors import VectorlayError  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
R = TypeVar("R")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def api_call(stack: Stack, request: Request[R]) -> R:
    async with open_api(stack.server_urls, stack.admin_token) as client:  # any server of the control plane
        return await client.call(request)


def call(stack: Stack, request: Request[R]) -> R:
    return trio.run(api_call, stack, request)


def summary(stack: Stack) -> FleetSummary:
    return call(stack, GetFleetSummary())


def node_state(stack: Stack, name: str) -> str:
    return call(stack, GetNodes(name)).nodes[0].state


def replica_ids(stack: Stack) -> set[str]:
    return {r.id for r in call(stack, GetReplicas()).replicas}


MANIFEST = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {{name: big}}
spec:
  replicas: {replicas}
  gpu: {{type: "RTX 4090", count: 1}}
  runtime: process
  command: ["serve", "--port", "${{PORT}}"]
  health: {{path: /healthz, interval: 2s, timeout: 1s}}
  reschedule_after: 30s
"""


def run(args: argparse.Namespace, root: Path) -> dict[str, float]:
    stack = Stack(root, db_url=args.db, heartbeat=f"{args.heartbeat:g}s")
    sims: list[SimProcess] = []
    try:
        server = stack.start_server()
        token = stack.token("node", "--uses", str(args.nodes), "--ttl", "2h")
        per_proc = [args.nodes // args.procs + (1 if i < args.nodes % args.procs else 0) for i in range(args.procs)]
        started = time.monotonic()
        sims = [SimProcess(stack.server_url, token, count, f"sim-{chr(97 + i)}-", stack.root / f"sim{i}",
                           stack.root / f"sim{i}.log") for i, count in enumerate(per_proc) if count]
        wait_for(lambda: all(s.connected >= s.count for s in sims), 1200, 0.5, "all simulated nodes to connect")
        print(f"{args.nodes} nodes joined and connected in {time.monotonic() - started:.1f}s", flush=True)

        time.sleep(max(5.0, 2 * args.heartbeat))  # settle
        pid = server.popen.pid
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.window)
        cpu_share = (cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)
        rss = rss_mb(pid)
        print(f"steady state: rss_mb={rss:.0f} cpu_share={cpu_share:.3f} over {args.window:g}s", flush=True)

        stack.cli("apply", "-", "--no-wait", input_text=MANIFEST.format(replicas=args.replicas))
        applied = time.monotonic()
        wait_for(lambda: summary(stack).replicas.get("ready", 0) >= args.replicas, 300, 0.1,
                 f"{args.replicas} replicas to be ready")
        apply_ready = time.monotonic() - applied
        print(f"apply: {args.replicas} replicas ready {apply_ready:.2f}s after apply returned", flush=True)

        victim = "sim-a-0"
        sims[0].command("freeze")
        frozen = time.monotonic()
        wait_for(lambda: node_state(stack, victim) != "ready", 120, 0.05,
                 "the silent node to be detected")
        detect = time.monotonic() - frozen
        print(f"detect: {victim} suspect {detect:.2f}s after going silent", flush=True)
        sims[0].command("thaw")
        wait_for(lambda: node_state(stack, victim) == "ready", 120, 0.2,
                 "the node to come back")

        before = replica_ids(stack)
        server.kill()
        restarted = time.monotonic()
        stack.start_server()
        max_down = 0

        def all_back() -> bool:
            nonlocal max_down
            s = summary(stack)
            max_down = max(max_down, s.nodes.get("down", 0))
            return bool(s.connected >= args.nodes and s.nodes.get("ready", 0) >= args.nodes)

        wait_for(all_back, 600, 0.2, "all nodes to reconnect")
        reconnect = time.monotonic() - restarted
        time.sleep(2)
        after = replica_ids(stack)
        rescheduled = len(before - after)
        print(f"restart: all {args.nodes} nodes back {reconnect:.1f}s after the restart; rescheduled={rescheduled}; "
              f"down_during_restart={max_down}", flush=True)
        return {"rss_mb": rss, "cpu_share": cpu_share, "apply_ready_s": apply_ready, "detect_s": detect,
                "reconnect_s": reconnect, "rescheduled": rescheduled, "down": max_down}
    finally:
        for sim in sims:
            sim.stop()
        stack.close()


PROBE = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {name: probe}
spec:
  replicas: 1
  gpu: {type: "RTX 4090", count: 1}
  runtime: process
  command: ["serve", "--port", "${PORT}"]
"""


def leader_of(stack: Stack) -> ServerView | None:
    """Asked in-process over the API: a CLI process per poll would add its own start-up (seconds
    on a saturated machine) to the failover figures."""
    try:
        leading = [s for s in call(stack, GetServers()).servers if s.leader]
    except VectorlayError:
        return None  # the server asked was the one killed, or is catching up
    return leading[0] if leading else None


def apply_in_process(stack: Stack, manifest: str) -> bool:
    try:
        call(stack, Apply(manifest))
    except VectorlayError:
        return False  # no server could take it yet: asked again
    return True


def run_servers(args: argparse.Namespace, root: Path) -> dict[str, float]:
    """K servers on one PostgreSQL: steady state per server, apply, then kill -9 of the leader."""
    stack = Stack(root, db_url=args.db, heartbeat=f"{args.heartbeat:g}s")
    sims: list[SimProcess] = []
    try:
        stack.start_server()
        for _ in range(args.servers - 1):
            stack.start_another_server()
        wait_for(
            lambda: len(stack.cli_json("get", "servers")) == args.servers and leader_of(stack),
            60,
            0.5,
            "every server to be up, one leading",
        )
        token = stack.token("node", "--uses", str(args.nodes), "--ttl", "2h")
        per_proc = [args.nodes // args.procs + (1 if i < args.nodes % args.procs else 0) for i in range(args.procs)]
        started = time.monotonic()
        sims = [
            SimProcess(
                stack.server_urls,
                token,
                count,
                f"sim-{chr(97 + i)}-",
                stack.root / f"sim{i}",
                stack.root / f"sim{i}.log",
            )
            for i, count in enumerate(per_proc)
            if count
        ]
        wait_for(lambda: all(s.connected >= s.count for s in sims), 1800, 0.5, "all simulated nodes to connect")
        print(f"{args.nodes} nodes joined and connected in {time.monotonic() - started:.1f}s", flush=True)
        held = {s["address"]: s["nodes"] for s in stack.cli_json("get", "servers")}
        print(f"node sessions per server: {sorted(held.values())}", flush=True)

        time.sleep(max(5.0, 2 * args.heartbeat))  # settle
        procs = [p for p in (stack.server, *(proc for proc, _ in stack.others)) if p is not None]
        cpu0, wall0 = [cpu_seconds(p.popen.pid) for p in procs], time.monotonic()
        time.sleep(args.window)
        elapsed = time.monotonic() - wall0
        cpu = [(cpu_seconds(p.popen.pid) - c0) / elapsed for p, c0 in zip(procs, cpu0, strict=True)]
        rss = [rss_mb(p.popen.pid) for p in procs]
        print(
            f"steady state per server: rss_mb={[round(r) for r in rss]} cpu_share={[round(c, 3) for c in cpu]} "
            f"over {args.window:g}s",
            flush=True,
        )

        stack.cli("apply", "-", "--no-wait", input_text=MANIFEST.format(replicas=args.replicas))
        applied = time.monotonic()
        wait_for(
            lambda: summary(stack).replicas.get("ready", 0) >= args.replicas,
            300,
            0.1,
            f"{args.replicas} replicas to be ready",
        )
        apply_ready = time.monotonic() - applied
        print(f"apply: {args.replicas} replicas ready {apply_ready:.2f}s after apply returned", flush=True)
        time.sleep(2)

        before = replica_ids(stack)
        first = leader_of(stack)
        assert first is not None
        victim = next(p for p in procs if first.address.endswith(f":{_port_of(stack, p)}"))
        victim.kill()
        killed = time.monotonic()
        wait_for(lambda: apply_in_process(stack, PROBE), 60, 0.1, "a server to take the apply")

        def new_leader() -> bool:
            found = leader_of(stack)
            return found is not None and found.id != first.id

        wait_for(new_leader, 60, 0.1, "another server to lead")
        leader_s = time.monotonic() - killed

        def probe_placed() -> bool:
            return any(r.node for r in call(stack, GetReplicas("probe")).replicas)

        wait_for(probe_placed, 60, 0.1, "the cluster applied after the kill to be placed")
        placement_s = time.monotonic() - killed
        print(f"failover: another leader {leader_s:.2f}s after kill -9, first placement {placement_s:.2f}s", flush=True)

        def all_back() -> bool:
            s = summary(stack)
            return bool(s.connected >= args.nodes and s.nodes.get("ready", 0) >= args.nodes)

        wait_for(all_back, 900, 0.5, "all nodes to reconnect")
        reconnect = time.monotonic() - killed
        time.sleep(2)
        rescheduled = len(before - replica_ids(stack))
        print(
            f"failover: all {args.nodes} nodes back {reconnect:.1f}s after the kill; rescheduled={rescheduled}",
            flush=True,
        )
        return {
            "rss_mb_max": max(rss),
            "cpu_share_max": max(cpu),
            "apply_ready_s": apply_ready,
            "leader_s": leader_s,
            "placement_s": placement_s,
            "reconnect_s": reconnect,
            "rescheduled": rescheduled,
        }
    finally:
        for sim in sims:
            sim.stop()
        stack.close()


def _port_of(stack: Stack, proc: object) -> int:
    if proc is stack.server:
        return stack.server_port
    return next(port for p, port in stack.others if p is proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds")
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--db", default=None, help="database URL (default: SQLite in a temporary state dir)")
    parser.add_argument("--procs", type=int, default=4, help="client processes hosting the simulated nodes")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of steady state to measure")
    parser.add_argument("--servers", type=int, default=1, help="servers sharing the database (needs --db PostgreSQL)")
    args = parser.parse_args()
    if args.servers > 1:
        if not (args.db or "").startswith("postgresql"):
            parser.error("--servers needs --db postgresql+psycopg://...")
        with tempfile.TemporaryDirectory(prefix="vl-fleet-") as root:
            r = run_servers(args, Path(root))
        print(
            f"fleet-servers: servers={args.servers} nodes={args.nodes} heartbeat_s={args.heartbeat:g} "
            f"rss_mb_max={r['rss_mb_max']:.0f} cpu_share_max={r['cpu_share_max']:.3f} "
            f"apply_ready_s={r['apply_ready_s']:.2f} leader_s={r['leader_s']:.2f} "
            f"placement_s={r['placement_s']:.2f} reconnect_s={r['reconnect_s']:.1f} "
            f"rescheduled={r['rescheduled']:.0f}"
        )
        return
    with tempfile.TemporaryDirectory(prefix="vl-fleet-") as root:
        r = run(args, Path(root))
    print(f"fleet: nodes={args.nodes} heartbeat_s={args.heartbeat:g} rss_mb={r['rss_mb']:.0f} "
          f"cpu_share={r['cpu_share']:.3f} apply_ready_s={r['apply_ready_s']:.2f} detect_s={r['detect_s']:.2f} "
          f"reconnect_s={r['reconnect_s']:.1f} rescheduled={r['rescheduled']:.0f}")


if __name__ == "__main__":
    main()


