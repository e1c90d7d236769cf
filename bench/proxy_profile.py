"""Where the proxy's CPU time goes, by function, under saturating load; and the codec alone in a warm loop.

py-spy samples wall time: on a 2-core machine it charges the proxy for the time it sits preempted
inside a loopback write while the woken peer runs. This samples CPU time instead: a SIGPROF timer
(ITIMER_PROF counts the process's user + system time) records the Python stack each time the proxy
has used another 0.5 ms of CPU. Time in a system call is charged to the Python line that made it.

The proxy runs in this process (as `vectorlay proxy` does: `serve_until_signalled`, with its
garbage-collector tuning) in front of one nginx `return 200` upstream, routes from the scripted
control plane, under wrk -c50 as in bench/proxy.py. Printed: the functions with the largest share
of samples, by their own lines and including what they call, and the µs of one request/response
exchange through both httptools codecs and the header rewriting, timed in a tight loop.

    python bench/proxy_profile.py [--seconds 10] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import proxy as bench  # noqa: E402  (bench/proxy.py)
from proxy_floor import forward_request, forward_response  # noqa: E402

from testsupport.route_server import StaticRouteServer  # noqa: E402
from vectorlay.core.protocol import Endpoint, Route  # noqa: E402
from vectorlay.proxy.app import ProxyConfig, serve_until_signalled  # noqa: E402
from vectorlay.proxy.codec import DEFAULT_PARSER, END, Request, Response, client_codec, server_codec  # noqa: E402

SAMPLE_CPU_S = 0.0005
REQUEST = b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n"  # what wrk sends
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 15:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")


class CpuSampler:
    """Python stacks sampled every SAMPLE_CPU_S of the process's CPU time, while `recording`."""

    def __init__(self) -> None:
        self.stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.recording = False

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        if not self.recording:
            return
        names = []
        while frame is not None:
            code = frame.f_code
            names.append(f"{code.co_qualname} ({Path(code.co_filename).name})")
            frame = frame.f_back
        self.stacks[tuple(reversed(names))] += 1

    def start(self) -> None:
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, SAMPLE_CPU_S, SAMPLE_CPU_S)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)

    def report(self, top: int) -> None:
        total = sum(self.stacks.values())
        own: collections.Counter[str] = collections.Counter()
        within: collections.Counter[str] = collections.Counter()
        for stack, count in self.stacks.items():
            own[stack[-1]] += count
            for name in set(stack):
                within[name] += count
        print(f"{total} samples of {SAMPLE_CPU_S * 1e3:g} ms CPU")
        for title, counter in (("own lines", own), ("including callees", within)):
            print(f"-- share of the proxy's CPU, {title}:")
            for name, count in counter.most_common(top):
                print(f"{100 * count / total:5.1f}%  {name}")


def codec_exchange_us(rounds: int = 100_000) -> float:
    """One exchange through both codecs and the header rewriting, in a warm loop."""
    server, replica = server_codec(DEFAULT_PARSER, 16 * 1024), client_codec(DEFAULT_PARSER, 64 * 1024)
    started = time.perf_counter()
    for _ in range(rounds):
        server.receive_data(REQUEST)
        request = server.next_event()
        assert isinstance(request, Request) and server.next_event() is END
        _, rid = forward_request(request, replica)
        replica.receive_data(RESPONSE)
        response = replica.next_event()
        assert isinstance(response, Response)
        forward_response(response, rid, server, replica)
    return (time.perf_counter() - started) / rounds * 1e6


def drive(port: int, seconds: float, sampler: CpuSampler) -> None:
    """wrk against the proxy (from a thread: the proxy runs in the main one)."""
    bench.wait_listening(port)
    bench.wrk(port, 10, 1)  # warm up
    load = subprocess.Popen(["wrk", "-t1", "-c50", f"-d{seconds + 2:g}s", "--latency", "-H", f"Host: {bench.HOST}",
                             f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    sampler.recording = True
    time.sleep(seconds)
    sampler.recording = False
    out = load.communicate()[0]
    print(f"wrk -c50: {bench.parse_wrk(out).rps:.0f} req/s")
    os.kill(os.getpid(), signal.SIGINT)  # stops the proxy as Ctrl-C would


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(f"codec exchange in a warm loop: {codec_exchange_us():.1f} µs")
    root = Path(tempfile.mkdtemp(prefix="vl-proxy-profile-"))
    upstream_port, port = bench.free_port(), bench.free_port()
    upstream = bench.nginx_static(root, upstream_port)
    sampler = CpuSampler()
    try:
        bench.wait_listening(upstream_port)
        route = Route("bench", (Endpoint("r1", f"127.0.0.1:{upstream_port}", "n1"),))
        with StaticRouteServer([route]) as routes:
            threading.Thread(target=drive, args=(port, args.seconds, sampler), daemon=True).start()
            sampler.start()
            try:
                trio.run(serve_until_signalled, ProxyConfig(routes.url, "scripted", port=port,
                                                            http_parser=DEFAULT_PARSER))
            except KeyboardInterrupt:
                pass
            finally:
                sampler.stop()
    finally:
        upstream.stop()
    sampler.report(args.top)


if __name__ == "__main__":
    main()
