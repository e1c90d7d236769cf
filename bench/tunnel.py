"""Tunnel benchmark: the same replica through the same proxy, direct and through a node's tunnel.

One vectorlay proxy process (one worker) gets two routes from a scripted control plane
(`testsupport/route_server.py`, which also certifies the proxy with a tunnel CA made for the
run): `direct.localhost` dials the replica, `tunnel.localhost` reaches the same replica through the
tunnel a node process (`NodeTunnels`, the agent's own code) opened to the proxy. Everything shares
the machine's cores. Figures, side by side in each run:

1. throughput: small responses from an nginx `return 200` replica, wrk -c50 keep-alive; the
   tunnel's requests/s as a ratio of direct's, and the proxy's CPU time per request each way (on a
   shared machine, 1 / CPU per request is the throughput of a worker with a core to itself).
2. added latency at half saturation (half the tunnel's requests/s, wrk paced by a per-connection
   delay): p50/p99 of the tunnel over direct, and of both over calling the replica itself.
3. SSE event delay: events the replica stamps with the monotonic clock when it writes them
   (`/clock-stream` of `testsupport.upstreams`); p50/p99 of their arrival at a client,
   through the tunnel and direct.
4. idle tunnels: a fresh proxy, then N simulated nodes (default 5,000, each its own key,
   certificate and tunnel, pinging as real nodes do) dial it; the proxy's resident memory growth
   per tunnel, and its CPU while they idle.

Needs `nginx` and `wrk` (apt-get install -y nginx wrk):

    python bench/tunnel.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy import (  # noqa: E402
    PACE_MS,
    free_port,
    nginx_static,
    rss_kib,
    upstream_process,
    wait_listening,
    wrk,
)

from testsupport.processes import Proc  # noqa: E402
from testsupport.route_server import StaticRouteServer, spawn_proxy  # noqa: E402
from vectorlay.core.protocol import TUNNEL, Endpoint, Route, TunnelCredential, TunnelProxies, TunnelProxy  # noqa: E402
from vectorlay.lifecycle import setup_logging  # noqa: E402
from vectorlay.node.tunnels import NodeTunnels  # noqa: E402
from vectorlay.server.tunnel_ca import NODE_CERT_VALID_S, TunnelCa  # noqa: E402
from vectorlay.tunnel import TunnelLimits  # noqa: E402

BENCH_NODE = "n-bench"
SIM_PREFIX = "n-sim"
SWARM_BATCH = 250  # simulated nodes dialling at once: TLS handshakes share the two cores with the proxy
PROXY_CPU = "0"
OTHER_CPUS = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)) if c != 0) or "0"
PIN = True  # --no-pin clears it


def pin(pid: int, cpus: str) -> None:
    """Every thread of `pid` on `cpus` (taskset's list syntax)."""
    if PIN:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True, check=True)


def load(port: int, connections: int, seconds: float, host: str, paced: bool = False) -> Any:
    return wrk(port, connections, seconds, paced=paced, host=host, cpus=OTHER_CPUS if PIN else None)


# ---- node processes (this script, re-run with --serve-node / --swarm) --------------------------


class Ports:
    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports

    def local_address(self, replica_id: str) -> tuple[str, int] | None:
        port = self.ports.get(replica_id)
        return ("127.0.0.1", port) if port is not None else None


def node_credential(ca: TunnelCa, tunnels: NodeTunnels) -> TunnelCredential:
    now = time.time()
    certificate = ca.issue_node(ca.requested_key(tunnels.csr), tunnels.node_id, now)
    return TunnelCredential(certificate, ca.pem, now + NODE_CERT_VALID_S)


async def serve_node(config: dict[str, Any]) -> None:
    """One node's tunnels (the agent's code) to the proxy, for the given replica ports."""
    ca = TunnelCa.in_state_dir(Path(config["ca_dir"]))
    tunnels = NodeTunnels(BENCH_NODE, Ports(config["replicas"]))
    tunnels.set_credential(node_credential(ca, tunnels))
    tunnels.set_proxies(TunnelProxies((TunnelProxy(config["proxy_id"], config["proxy_address"]),)))
    await tunnels.run()


async def swarm(config: dict[str, Any]) -> None:
    """`count` simulated nodes, each with its own tunnel to the proxy; prints progress lines."""
    ca = TunnelCa.in_state_dir(Path(config["ca_dir"]))
    proxies = TunnelProxies((TunnelProxy(config["proxy_id"], config["proxy_address"]),))
    nodes: list[NodeTunnels] = []
    # They ping the proxy as real nodes do (every 10 s), but thousands in one process on one core
    # answer late when its loop is busy: give the answers longer than a real node would, or the
    # simulation measures its own lag (and reconnects in a storm).
    limits = TunnelLimits(ping_timeout_s=25.0)
    async with trio.open_nursery() as nursery:
        for index in range(config["count"]):
            tunnels = NodeTunnels(f"{SIM_PREFIX}{index:05d}", Ports({}), limits=limits)
            tunnels.set_credential(node_credential(ca, tunnels))
            tunnels.set_proxies(proxies)
            nodes.append(tunnels)
            nursery.start_soon(tunnels.run)
            if len(nodes) % SWARM_BATCH == 0:
                with trio.move_on_after(60):
                    await all_connected(nodes)
                print(f"connected {sum(n.connected for n in nodes)}", flush=True)
        await all_connected(nodes)
        print(f"connected {len(nodes)}", flush=True)
        await trio.sleep_forever()


async def all_connected(nodes: list[NodeTunnels]) -> None:
    while sum(n.connected for n in nodes) < len(nodes):  # noqa: ASYNC110 - a count, polled, nothing to wait on
        await trio.sleep(0.1)


def run_helper(mode: str, config_path: str) -> None:
    setup_logging()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config = json.loads(Path(config_path).read_text())
    try:
        trio.run(serve_node if mode == "node" else swarm, config)
    except KeyboardInterrupt:
        pass


def spawn_helper(root: Path, mode: str, config: dict[str, Any]) -> Proc:
    path = root / f"{mode}-{free_port()}.json"
    path.write_text(json.dumps(config))
    log_path = root / f"{mode}.log"
    argv = [sys.executable, __file__, f"--{mode}", str(path)]
    with log_path.open("ab") as handle:
            popen = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    pin(popen.pid, OTHER_CPUS)
    return Proc(mode, argv, log_path, popen)


# ---- the measurements -------------------------------------------------------------------------


@contextmanager
def edge(root: Path, replica_ports: dict[str, int], admitted: list[str]) -> Iterator[tuple[Proc, int, str, str]]:
    """A scripted control plane and one proxy accepting tunnels: (proxy, its HTTP port, its tunnel
    id, its tunnel address). Routes: `<name>.localhost` for each replica, direct and tunnelled."""
    ca = TunnelCa.in_state_dir(root / "ca")
    routes = []
    for name, port in replica_ports.items():
        routes.append(Route(f"{name}-direct", (Endpoint(f"{name}-d", f"127.0.0.1:{port}", "direct"),)))
        routes.append(Route(f"{name}-tunnel", (Endpoint(name, "127.0.0.1:9", BENCH_NODE, BENCH_NODE, TUNNEL),)))
    with StaticRouteServer(routes, tunnel_ca=ca, admitted=admitted) as server:
        proxy, port = spawn_proxy(root, server.url, name=f"proxy-{free_port()}")
        pin(proxy.popen.pid, PROXY_CPU)
        try:
            proxy.wait_log("tunnel certificate received")
            [(proxy_id, address)] = server.tunnel_proxies.items()
            yield proxy, port, proxy_id, address
        finally:
            proxy.stop()


def throughput_and_latency(root: Path, seconds: float) -> dict[str, float]:
    up_port = free_port()
    upstream = nginx_static(root, up_port)
    try:
        wait_listening(up_port)
        pin(upstream.popen.pid, OTHER_CPUS)
        pin(upstream.worker(), OTHER_CPUS)
        with edge(root, {"ok": up_port}, [BENCH_NODE]) as (proxy, port, proxy_id, address):
            node = spawn_helper(root, "serve-node", {"ca_dir": str(root / "ca"), "proxy_id": proxy_id,
                                                     "proxy_address": address, "replicas": {"ok": up_port}})
            try:
                proxy.wait_log(f"tunnel from node {BENCH_NODE}")
                for host in ("ok-direct", "ok-tunnel"):
                    load(port, 10, 1, f"{host}.localhost")  # warm up: pools filled, code hot
                sat = {}
                cpu_us: dict[str, tuple[float, float]] = {}  # (proxy, node) CPU per request
                for host in ("ok-direct", "ok-tunnel"):
                    before = cpu_seconds(proxy.popen.pid), cpu_seconds(node.popen.pid)
                    sat[host] = load(port, 50, seconds, f"{host}.localhost")
                    cpu_us[host] = ((cpu_seconds(proxy.popen.pid) - before[0]) * 1e6 / sat[host].requests,
                                    (cpu_seconds(node.popen.pid) - before[1]) * 1e6 / sat[host].requests)
                rate = sat["ok-tunnel"].rps / 2
                connections = max(1, round(rate * PACE_MS / 1000))
                paced = {"replica": load(up_port, connections, seconds, "ok.localhost", paced=True)}
                for host in ("ok-direct", "ok-tunnel"):
                    paced[host] = load(port, connections, seconds, f"{host}.localhost", paced=True)
            finally:
                node.stop()
    finally:
        upstream.stop()
    direct, tunnel, replica = paced["ok-direct"], paced["ok-tunnel"], paced["replica"]
    return {
        "direct_rps": sat["ok-direct"].rps, "tunnel_rps": sat["ok-tunnel"].rps,
        "ratio": sat["ok-tunnel"].rps / sat["ok-direct"].rps,
        # The proxy's CPU per request: what bounds one worker that has its core to itself.
        "direct_proxy_cpu_us": cpu_us["ok-direct"][0], "tunnel_proxy_cpu_us": cpu_us["ok-tunnel"][0],
        "cpu_ratio": cpu_us["ok-direct"][0] / cpu_us["ok-tunnel"][0],
        "tunnel_node_cpu_us": cpu_us["ok-tunnel"][1],
        "paced_rps": tunnel.rps,
        "tunnel_added_p50_ms": tunnel.p50_ms - direct.p50_ms, "tunnel_added_p99_ms": tunnel.p99_ms - direct.p99_ms,
        "direct_over_replica_p50_ms": direct.p50_ms - replica.p50_ms,
        "direct_over_replica_p99_ms": direct.p99_ms - replica.p99_ms,
        "errors": float(sum(w.errors for w in (*sat.values(), *paced.values()))),
    }


def event_delays_ms(port: int, host: str, streams: int, events: int, interval_ms: int) -> list[float]:
    """Arrival delay of every event of `streams` clock streams, read one stream at a time."""
    delays = []
    request = f"GET /clock-stream?n={events}&interval_ms={interval_ms} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    for _ in range(streams):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request)
            buffer = b""
            seen = 0
            while seen < events:
                data = sock.recv(65536)
                arrived = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                if not data:
                    raise RuntimeError(f"stream ended after {seen} events")
                buffer += data
                while b"data: " in buffer and b"\n\n" in buffer[buffer.index(b"data: "):]:
                    start = buffer.index(b"data: ") + 6
                    end = buffer.index(b"\n\n", start)
                    delays.append((arrived - int(buffer[start:end])) / 1e6)
                    buffer = buffer[end + 2:]
                    seen += 1
    return delays


def sse_delay(root: Path, streams: int = 10, events: int = 50) -> dict[str, float]:
    up_port = free_port()
    upstream = upstream_process(up_port, 0, "clock")
    pin(upstream.pid, OTHER_CPUS)
    try:
        with edge(root, {"sse": up_port}, [BENCH_NODE]) as (proxy, port, proxy_id, address):
            node = spawn_helper(root, "serve-node", {"ca_dir": str(root / "ca"), "proxy_id": proxy_id,
                                                     "proxy_address": address, "replicas": {"sse": up_port}})
            try:
                proxy.wait_log(f"tunnel from node {BENCH_NODE}")
                out: dict[str, float] = {}
                paths = (("replica", up_port, "sse.localhost"), ("direct", port, "sse-direct.localhost"),
                         ("tunnel", port, "sse-tunnel.localhost"))
                for name, target, host in paths:
                    event_delays_ms(target, host, 1, 5, 20)  # warm up
                    delays = sorted(event_delays_ms(target, host, streams, events, 20))
                    out[f"{name}_p50_ms"] = delays[len(delays) // 2]
                    out[f"{name}_p99_ms"] = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
                return out
            finally:
                node.stop()
    finally:
        upstream.kill()
        upstream.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_tunnels(root: Path, count: int, idle_s: float) -> dict[str, float]:
    admitted = [f"{SIM_PREFIX}{i:05d}" for i in range(count)]
    with edge(root, {}, admitted) as (proxy, _, proxy_id, address):
        time.sleep(2)
        before = rss_kib(proxy.popen.pid)
        crowd = spawn_helper(root, "swarm", {"ca_dir": str(root / "ca"), "proxy_id": proxy_id,
                                             "proxy_address": address, "count": count})
        try:
            crowd.wait_log(rf"connected {count}\b", timeout_s=max(120.0, count / 20))
            time.sleep(3)  # settled: every tunnel's first ping answered
            cpu_start, wall_start = cpu_seconds(proxy.popen.pid), time.monotonic()
            time.sleep(idle_s)
            cpu = (cpu_seconds(proxy.popen.pid) - cpu_start) / (time.monotonic() - wall_start)
            after = rss_kib(proxy.popen.pid)
        finally:
            crowd.stop()
    return {"tunnels": float(count), "proxy_rss_before_mib": before / 1024, "proxy_rss_after_mib": after / 1024,
            "kib_per_tunnel": (after - before) / count, "idle_cpu_percent": cpu * 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each wrk measurement")
    parser.add_argument("--nodes", type=int, default=5000, help="simulated nodes for the idle-tunnel figure")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--no-pin", action="store_true", help="let every process run on any CPU")
    parser.add_argument("--serve-node", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--swarm", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_node or args.swarm:
        run_helper("node" if args.serve_node else "swarm", args.serve_node or args.swarm)
        return
    global PIN
    PIN = not args.no_pin and len(os.sched_getaffinity(0)) > 1
    if PIN:
        os.sched_setaffinity(0, {int(c) for c in OTHER_CPUS.split(",")})  # this script's SSE client too
    for tool in ("nginx", "wrk"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            sys.exit(f"error: {tool} is not installed (apt-get install -y nginx wrk)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results: dict[str, list[dict[str, float]]] = {"throughput": [], "sse": [], "idle": []}
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="vl-bench-tunnel-") as tmp:
            root = Path(tmp)
            for name in results:
                result = (throughput_and_latency(root, args.seconds) if name == "throughput"
                          else sse_delay(root) if name == "sse" else idle_tunnels(root, args.nodes, args.idle_seconds))
                results[name].append(result)
                print(f"run {run + 1} {name}: " + " ".join(f"{k}={v:.3f}" for k, v in result.items()), flush=True)
    for name, runs in results.items():
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"tunnel {name} (median of {len(runs)}): " + " ".join(f"{k}={v:.3f}" for k, v in median.items()))


if __name__ == "__main__":
    main()
