"""Edge proxy benchmark: vectorlay's proxy and nginx side by side, same upstreams, same wrk load.

Both proxies run one worker; nginx (Debian's package) is configured as the equivalent keep-alive
reverse proxy (HTTP/1.1 upstream keep-alive, no buffering so streams pass through, X-Forwarded-For,
X-Forwarded-Proto and X-Request-Id set, failover to the next upstream on errors and 502/503/504).
vectorlay's proxy gets its routes from a scripted control plane pointing at the same upstreams.
It runs with its default HTTP parser (httptools) and, for figures 1, 2 and 5, also with h11, the
alternative; `--baseline DIR` adds the proxy of another checkout (say the previous commit, from
`git worktree add`) to those figures, for a before/after in the same run. Every figure compares
them within one run; repeated runs give medians:

1. throughput: small responses from an nginx upstream (`return 200`), wrk -c50; each vectorlay
   variant's requests/s as a ratio of nginx's.
2. added latency: p50/p99 over calling the upstream directly, at half the saturation of the slowest
   vectorlay variant (wrk paced by a per-connection delay, so that all get the same rate).
3. heterogeneous replicas: three upstreams, one five times slower (10 ms and 50 ms); client p99
   with vectorlay's balancer against nginx's round robin.
4. one of three replicas killed (kill -9) under load: client-visible errors.
5. 1,000 concurrent slow streaming responses (one event a second) held open: memory per stream
   (growth of the proxy's resident memory, divided by the streams).

Needs `nginx` and `wrk` (apt-get install -y nginx wrk):

    python bench/proxy.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testsupport.processes import REPO_ROOT, Proc  # noqa: E402
from testsupport.route_server import StaticRouteServer  # noqa: E402
from vectorlay.core.protocol import Endpoint, Route  # noqa: E402
from vectorlay.lifecycle import setup_logging  # noqa: E402
from vectorlay.proxy.app import ProxyConfig, serve_until_signalled  # noqa: E402
from vectorlay.proxy.codec import DEFAULT_PARSER, HttpParser  # noqa: E402

HOST = "bench.localhost"
PACE_MS = 10  # each wrk connection waits this long between requests when a fixed rate is wanted
VECTORLAY = "vectorlay"  # the default parser's variant; others are named vectorlay_<parser>, baseline


@dataclass(frozen=True)
class Variant:
    """A vectorlay proxy to measure: this checkout with `parser`, or the `vectorlay proxy` of `tree`."""

    name: str
    parser: HttpParser | None = None
    tree: Path | None = None


@dataclass
class Wrk:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors plus non-2xx/3xx responses
    requests: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class Nginx:
    """One nginx master with one worker, from a config written under `root`."""

    def __init__(self, root: Path, name: str, http_block: str) -> None:
        self.root = root / name
        self.root.mkdir(parents=True)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.root / sub).mkdir()
        conf = f"""
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {self.root}/nginx.pid;
error_log {self.root}/error.log error;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {self.root}/body; proxy_temp_path {self.root}/proxy;
  fastcgi_temp_path {self.root}/fastcgi; uwsgi_temp_path {self.root}/uwsgi; scgi_temp_path {self.root}/scgi;
  {http_block}
}}
"""
        (self.root / "nginx.conf").write_text(conf)
        self.popen = subprocess.Popen(["nginx", "-p", str(self.root), "-c", str(self.root / "nginx.conf"),
                                       "-e", str(self.root / "error.log")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def worker(self) -> int:
        for _ in range(100):
            found = children(self.popen.pid)
            if found:
                return found[0]
            time.sleep(0.05)
        raise RuntimeError("nginx started no worker")

    def stop(self) -> None:
        self.popen.send_signal(signal.SIGQUIT)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def nginx_static(root: Path, port: int) -> Nginx:
    block = f'server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok\\n"; }} }}'
    return Nginx(root, f"upstream-{port}", block)


def nginx_proxy(root: Path, port: int, upstreams: Sequence[int]) -> Nginx:
    servers = " ".join(f"server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in upstreams)
    block = f"""
  upstream backend {{ {servers} keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Request-Id $request_id;
      proxy_buffering off;
      proxy_next_upstream error timeout http_502 http_503 http_504;
      proxy_read_timeout 300s;
    }}
  }}"""
    return Nginx(root, f"proxy-{port}", block)


def upstream_process(port: int, delay_ms: float, name: str) -> subprocess.Popen[bytes]:
    popen = subprocess.Popen([sys.executable, "-m", "testsupport.upstreams", "--port", str(port),
                              "--delay-ms", str(delay_ms), "--name", name],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT,
                             start_new_session=True)
    wait_listening(port)
    return popen


def wrk(port: int, connections: int, seconds: float, paced: bool = False, path: str = "/", host: str = HOST,
        cpus: str | None = None) -> Wrk:
    """wrk against 127.0.0.1:port; `cpus` (taskset's list) keeps it off the proxy's core."""
    args = ["taskset", "-c", cpus] if cpus else []
    args += ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-H", f"Host: {host}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f"function delay() return {PACE_MS} end\n" if paced else "")
    args += ["-s", script.name, f"http://127.0.0.1:{port}{path}"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        os.unlink(script.name)
    return parse_wrk(out)


def parse_wrk(out: str) -> Wrk:
    def ms(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if match is None:
            raise RuntimeError(f"no {label}% in wrk output:\n{out}")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    return Wrk(rps, ms("50"), ms("99"), errors, requests)


def spawn_vectorlay(root: Path, server_url: str, variant: Variant) -> tuple[Proc, int]:
    """Start a vectorlay proxy process; (process, its HTTP port, from its log)."""
    log_path = root / f"{variant.name}-{free_port()}.log"
    if variant.tree is None:
        # `vectorlay proxy` as the CLI runs it, with the parser chosen (this script's --serve-proxy).
        argv = [sys.executable, __file__, "--serve-proxy", server_url, "--http-parser", str(variant.parser)]
        cwd, env = Path(__file__).resolve().parents[1], dict(os.environ)
    else:
        argv = [sys.executable, "-m", "vectorlay", "proxy", "--server", server_url, "--token", "scripted",
                "--listen", "127.0.0.1:0"]
        cwd, env = variant.tree, {**os.environ, "PYTHONPATH": str(variant.tree)}
    with log_path.open("ab") as handle:
        popen = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd,
                                 env={**env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    proc = Proc(variant.name, argv, log_path, popen)
    return proc, int(proc.wait_log(r"proxy listening on https?://127\.0\.0\.1:(\d+)").group(1))


def serve_proxy(server_url: str, parser: HttpParser) -> None:
    """What `vectorlay proxy --server URL --listen 127.0.0.1:0` does, with `parser`."""
    setup_logging()
    try:
        trio.run(serve_until_signalled, ProxyConfig(server_url, "scripted", port=0, http_parser=parser))
    except KeyboardInterrupt:
        pass


@contextmanager
def proxies(root: Path, upstreams: Sequence[int], variants: Sequence[Variant]) -> Iterator[dict[str, tuple[int, int]]]:
    """nginx and the vectorlay `variants` in front of `upstreams`: {name: (port, pid of the worker)}."""
    port = free_port()
    ngx = nginx_proxy(root, port, upstreams)
    route = Route("bench", tuple(Endpoint(f"r{p}", f"127.0.0.1:{p}", f"n{p}") for p in upstreams))
    started: list[Proc] = []
    try:
        wait_listening(port)
        out = {"nginx": (port, ngx.worker())}
        with StaticRouteServer([route]) as routes:
            try:
                for variant in variants:
                    proc, vl_port = spawn_vectorlay(root, routes.url, variant)
                    started.append(proc)
                    out[variant.name] = (vl_port, proc.popen.pid)
                yield out
            finally:
                for proc in started:
                    proc.stop()
    finally:
        ngx.stop()


def throughput_and_latency(root: Path, seconds: float, variants: Sequence[Variant]) -> dict[str, float]:
    up_port = free_port()
    upstream = nginx_static(root, up_port)
    names = [v.name for v in variants]
    try:
        wait_listening(up_port)
        with proxies(root, [up_port], variants) as running:
            for port, _ in running.values():
                wrk(port, 10, 1)  # warm up: pools filled, code paths hot
            sat = {name: wrk(port, 50, seconds) for name, (port, _) in running.items()}
            rate = min(sat[name].rps for name in names) / 2
            connections = max(1, round(rate * PACE_MS / 1000))
            paced = {"direct": wrk(up_port, connections, seconds, paced=True)}
            paced.update({name: wrk(port, connections, seconds, paced=True) for name, (port, _) in running.items()})
    finally:
        upstream.stop()
    out = {"nginx_rps": sat["nginx"].rps}
    for name in names:
        out[f"{name}_rps"] = sat[name].rps
        out[f"{name}_ratio"] = sat[name].rps / sat["nginx"].rps
    out["paced_rps"] = paced[VECTORLAY].rps
    for name in ["nginx", *names]:
        out[f"{name}_added_p50_ms"] = paced[name].p50_ms - paced["direct"].p50_ms
        out[f"{name}_added_p99_ms"] = paced[name].p99_ms - paced["direct"].p99_ms
    return out


def heterogeneous(root: Path, seconds: float) -> dict[str, float]:
    ports = [free_port() for _ in range(3)]
    procs = [upstream_process(p, d, f"u{i}") for i, (p, d) in enumerate(zip(ports, (10, 10, 50), strict=True))]
    try:
        with proxies(root, ports, [Variant(VECTORLAY, DEFAULT_PARSER)]) as running:
            for port, _ in running.values():
                wrk(port, 4, 2, paced=True)  # warm up: vectorlay measures each replica's latency
            result = {name: wrk(port, 4, seconds, paced=True) for name, (port, _) in running.items()}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return {
        "nginx_p50_ms": result["nginx"].p50_ms, "nginx_p99_ms": result["nginx"].p99_ms,
        "vectorlay_p50_ms": result["vectorlay"].p50_ms, "vectorlay_p99_ms": result["vectorlay"].p99_ms,
        "p99_ratio": result["vectorlay"].p99_ms / result["nginx"].p99_ms,
    }


def kill_one(root: Path, seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in ("nginx", "vectorlay"):
        ports = [free_port() for _ in range(3)]
        procs = [upstream_process(p, 10, f"u{i}") for i, p in enumerate(ports)]
        try:
            with proxies(root, ports, [Variant(VECTORLAY, DEFAULT_PARSER)]) as running:
                port, _ = running[name]
                wrk(port, 8, 1)
                victim = procs[0]
                timer = threading.Timer(seconds / 3, victim.kill)
                timer.start()
                result = wrk(port, 8, seconds)
                timer.join()
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        out[f"{name}_errors"] = result.errors
        out[f"{name}_requests"] = result.requests
    return out


def streams(root: Path, count: int, hold_s: float, variants: Sequence[Variant]) -> dict[str, float]:
    port = free_port()
    upstream = upstream_process(port, 0, "streams")
    out: dict[str, float] = {}
    try:
        with proxies(root, [port], variants) as running:
            for name, (proxy_port, pid) in running.items():
                before = rss_kib(pid)
                opened = open_streams(proxy_port, count)
                try:
                    time.sleep(hold_s)  # the streams tick along (one event a second) meanwhile
                    during = rss_kib(pid)
                    alive = sum(1 for sock in opened if still_flowing(sock))
                finally:
                    for sock in opened:
                        sock.close()
                out[f"{name}_kib_per_stream"] = (during - before) / count
                out[f"{name}_streams_alive"] = alive
    finally:
        upstream.kill()
        upstream.wait()
    return out


def open_streams(port: int, count: int) -> list[socket.socket]:
    """Open `count` streams and wait for each one's first event."""
    request = (f"GET /stream?n=100000&interval_ms=1000 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").encode()
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(request)
        socks.append(sock)
    for sock in socks:
        received = b""
        while b"data: token 0" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"a stream closed before its first event: {received[:200]!r}")
            received += chunk
        sock.setblocking(False)
    return socks


def still_flowing(sock: socket.socket) -> bool:
    """Read what arrived; True unless the stream was closed."""
    try:
        while sock.recv(65536):
            pass
        return False  # an empty read: closed
    except BlockingIOError:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each wrk measurement")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--baseline", type=Path, help="also measure the vectorlay proxy of this checkout")
    parser.add_argument("--serve-proxy", metavar="SERVER_URL", help=argparse.SUPPRESS)  # see spawn_vectorlay
    parser.add_argument("--http-parser", type=HttpParser, default=DEFAULT_PARSER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_proxy:
        serve_proxy(args.serve_proxy, args.http_parser)
        return
    variants = [Variant(VECTORLAY, DEFAULT_PARSER)]
    variants += [Variant(f"{VECTORLAY}_{p}", p) for p in HttpParser if p is not DEFAULT_PARSER]
    if args.baseline:
        variants.append(Variant("baseline", tree=args.baseline.resolve()))
    for tool in ("nginx", "wrk"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            sys.exit(f"error: {tool} is not installed (apt-get install -y nginx wrk)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    results: dict[str, list[dict[str, float]]] = {"throughput": [], "heterogeneous": [], "kill": [], "streams": []}
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="vl-bench-proxy-") as tmp:
            root = Path(tmp)
            for name in results:
                result = (throughput_and_latency(root, args.seconds, variants) if name == "throughput"
                          else heterogeneous(root, args.seconds) if name == "heterogeneous"
                          else kill_one(root, args.seconds) if name == "kill"
                          else streams(root, args.streams, 5.0, variants))
                results[name].append(result)
                print(f"run {run + 1} {name}: " + " ".join(f"{k}={v:.2f}" for k, v in result.items()), flush=True)
    for name, runs in results.items():
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"proxy {name} (median of {len(runs)}): " + " ".join(f"{k}={v:.2f}" for k, v in median.items()))


if __name__ == "__main__":
    main()
