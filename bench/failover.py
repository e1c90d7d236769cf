"""Failover benchmark: kill one of three nodes serving a cluster and time what users would see.

A cluster of 3 replicas runs on 3 of 4 nodes (the 4th is a spare); a client sends requests at a
fixed rate through the proxy. One node holding a replica then fails, and this prints:

- route_removed_s: from the fault to the route feed dropping the node (what the proxy acts on)
- last_served_s:   from the fault to the last response the client got from that node
- failed:          requests the client saw fail (non-200 or no response)
- replaced_s:      from the fault to a replacement being ready (3 endpoints routed again)

`--fault kill` is kill -9 of the node's agent and its replica processes (a power cut: the kernel
closes the sockets, so the server sees the link drop); `--fault stop` SIGSTOPs them (a hung
machine or a silent network: only missed heartbeats reveal it). Runs are repeated; the last line
gives medians for scripts:

    python bench/failover.py --runs 3 --fault kill
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testsupport.load import RouteWatcher, SteadyClient  # noqa: E402
from testsupport.processes import Stack, replica_pids, tinylm_manifest, wait_for  # noqa: E402


def one_run(root: Path, fault: str, rate: float, reschedule_after: str, heartbeat: str) -> dict[str, float]:
    stack = Stack(root, heartbeat=heartbeat)
    try:
        stack.start_server()
        nodes = {name: stack.join_node(name, gpus=["RTX 4090:24"]) for name in ("n1", "n2", "n3", "n4")}
        _, proxy_port = stack.start_proxy()
        stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=3, reschedule_after=reschedule_after))
        replicas = stack.cli_json("get", "replicas")
        victim = sorted({r["node"] for r in replicas})[0]
        node = nodes[victim]
        victim_pids = [pid for r in replicas if r["node"] == victim for pid in replica_pids(replica=r["id"])]

        watcher = RouteWatcher(stack.server_url, stack.admin_token).start()
        client = SteadyClient(proxy_port, "echo.localhost", rate_hz=rate).start()
        time.sleep(3.0)
        fault_at = time.monotonic()
        sig = signal.SIGKILL if fault == "kill" else signal.SIGSTOP
        node.signal(sig)
        for pid in victim_pids:
            os.killpg(pid, sig)
        removed = wait_for(lambda: watcher.first_change_after(fault_at, "echo", victim), 30,
                           message="the node to leave routing")
        replaced = wait_for(lambda: next((c for c in watcher.changes if c.at > removed.at and c.cluster == "echo"
                                          and len(c.endpoints) == 3), None), 120, message="a replacement")
        time.sleep(1.0)
        samples = client.stop()
        watcher.stop()
        if fault == "stop":
            for pid in victim_pids:
                os.killpg(pid, signal.SIGKILL)
            node.signal(signal.SIGCONT)
        served = [s.sent_at for s in samples if s.node == victim and s.status == 200]
        return {
            "route_removed_s": removed.at - fault_at,
            "last_served_s": max(0.0, max(served) - fault_at) if served else 0.0,
            "failed": float(sum(1 for s in samples if s.sent_at >= fault_at - 1 and s.status != 200)),
            "requests": float(sum(1 for s in samples if s.sent_at >= fault_at)),
            "replaced_s": replaced.at - fault_at,
        }
    finally:
        stack.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fault", choices=("kill", "stop"), default="kill")
    parser.add_argument("--rate", type=float, default=50.0, help="client requests per second")
    parser.add_argument("--reschedule-after", default="5s", help="the cluster's spec.reschedule_after")
    parser.add_argument("--heartbeat", default="1s", help="the server's --heartbeat-interval")
    args = parser.parse_args()
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="vl-failover-") as root:
            result = one_run(Path(root), args.fault, args.rate, args.reschedule_after, args.heartbeat)
        results.append(result)
        print(f"run {run + 1}: " + " ".join(f"{k}={v:.2f}" if k.endswith("_s") else f"{k}={v:.0f}"
                                          for k, v in result.items()), flush=True)
    median = {k: statistics.median(r[k] for r in results) for k in results[0]}
    print(f"failover: fault={args.fault} runs={args.runs} rate={args.rate:g} heartbeat={args.heartbeat} "
          f"reschedule_after={args.reschedule_after} route_removed_s={median['route_removed_s']:.2f} "
          f"last_served_s={median['last_served_s']:.2f} failed={median['failed']:.0f} "
          f"replaced_s={median['replaced_s']:.2f}")


if __name__ == "__main__":
    main()
