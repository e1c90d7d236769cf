"""CPU per request of the vectorlay proxy and of nginx at saturation, and of what runs beside them.

One nginx `return 200` upstream with nginx and vectorlay (default parser) in front of it, set up as
in bench/proxy.py; wrk -c50 for 8 s against each proxy in turn, the CPU time of the proxy, the
upstream and wrk read from /proc over 5 s of it. Tells a proxy that is CPU-bound from one that
waits, and how its CPU splits between user (Python) and system (the kernel's socket work).

    python bench/proxy_cpu.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import proxy as bench  # noqa: E402  (bench/proxy.py)

from vectorlay.proxy.codec import DEFAULT_PARSER  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
WARM_S, MEASURE_S, RUN_S = 1.0, 5.0, 8


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user + system, user) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, system = int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    return user + system, user


def measure(name: str, port: int, proxy_pid: int, upstream_pid: int) -> str:
    load = subprocess.Popen(["wrk", "-t1", "-c50", f"-d{RUN_S}s", "--latency", "-H", f"Host: {bench.HOST}",
                             f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
    time.sleep(WARM_S)
    pids = (proxy_pid, upstream_pid, load.pid)
    before, started = [cpu_seconds(pid) for pid in pids], time.monotonic()
    time.sleep(MEASURE_S)
    after, elapsed = [cpu_seconds(pid) for pid in pids], time.monotonic() - started
    rps = bench.parse_wrk(load.communicate()[0]).rps
    (proxy, proxy_user), (upstream, _), (wrk, _) = [
        ((a[0] - b[0]) / elapsed, (a[1] - b[1]) / elapsed) for a, b in zip(after, before, strict=True)]
    return (f"{name}: rps={rps:.0f} proxy_cpu={proxy:.2f} proxy_user={proxy_user:.2f} upstream_cpu={upstream:.2f} "
            f"wrk_cpu={wrk:.2f} proxy_us_per_request={proxy / rps * 1e6:.0f} "
            f"proxy_user_us_per_request={proxy_user / rps * 1e6:.0f}")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="vl-proxy-cpu-"))
    upstream_port = bench.free_port()
    upstream = bench.nginx_static(root, upstream_port)
    try:
        bench.wait_listening(upstream_port)
        variants = [bench.Variant(bench.VECTORLAY, DEFAULT_PARSER)]
        with bench.proxies(root, [upstream_port], variants) as running:
            for port, _ in running.values():
                bench.wrk(port, 10, 1)  # warm up
            for name, (port, pid) in running.items():
                print(measure(name, port, pid, upstream.worker()), flush=True)
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
