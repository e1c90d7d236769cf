"""Where the proxy's CPU goes, by elimination: the proxy against two stripped-down relays on the same runtime.

All four run one process each in front of one nginx `return 200` upstream and are measured as in
bench/proxy_cpu.py (wrk -c50, CPU time from /proc), one after the other:

- `nginx`: the reference reverse proxy.
- `relay_null`: trio and the proxy's socket I/O (vectorlay/proxy/sockio.py) only: each client
  connection has its own upstream connection, and bytes are copied across unparsed. The floor of
  any proxy on this runtime.
- `relay_codec`: the null relay plus what no proxy can skip: both httptools codecs and the header
  rewriting (vectorlay/proxy/headers.py) of every request and response.
- `vectorlay`: the real proxy: routing, admission (auth, rate limits, body limits), the balancer,
  pooled upstreams, retries, metrics, client-gone watching.

The gaps between them say what the runtime, the HTTP work and the proxy's own logic each cost.
The relays serve only this benchmark's plain GET traffic (no bodies, no errors).

    python bench/proxy_floor.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import proxy as bench  # noqa: E402  (bench/proxy.py)
import proxy_cpu  # noqa: E402

from vectorlay.proxy import headers as hdr  # noqa: E402
from vectorlay.proxy.codec import (  # noqa: E402
    DEFAULT_PARSER,
    END,
    NEED_DATA,
    ClientCodec,
    Data,
    Request,
    Response,
    ServerCodec,
    client_codec,
    server_codec,
)
from vectorlay.proxy.sockio import SocketChannel  # noqa: E402

READ = 64 * 1024


async def _read(channel: SocketChannel) -> bytes:
    data = channel.receive_nowait(READ)
    return await channel.receive(READ) if data is None else data


async def null_relay(client: SocketChannel, upstream: SocketChannel) -> None:
    while request := await _read(client):
        await upstream.send_all(request)
        await client.send_all(await _read(upstream))


async def codec_relay(client: SocketChannel, upstream: SocketChannel) -> None:
    server, replica = server_codec(DEFAULT_PARSER, 16 * 1024), client_codec(DEFAULT_PARSER, 64 * 1024)
    while True:
        event = server.next_event()
        while event is NEED_DATA:
            data = await _read(client)
            if not data:
                return
            server.receive_data(data)
            event = server.next_event()
        assert isinstance(event, Request) and server.next_event() is END
        to_replica, rid = forward_request(event, replica)
        await upstream.send_all(to_replica)
        response = replica.next_event()
        while response is NEED_DATA:
            replica.receive_data(await _read(upstream))
            response = replica.next_event()
        assert isinstance(response, Response)
        await client.send_all(forward_response(response, rid, server, replica))


def forward_request(request: Request, replica: ClientCodec) -> tuple[bytes, bytes]:
    """What the relay sends the replica for `request` (a GET), and the request id it gave it."""
    named = hdr.first_values(request.headers)
    rid = hdr.request_id(named)
    headers = hdr.upstream_request_headers(request.headers, b"127.0.0.1", b"http", rid, False, named)
    return replica.send_request(request.method, request.target, headers) + replica.send_end(), rid


def forward_response(response: Response, rid: bytes, server: ServerCodec, replica: ClientCodec) -> bytes:
    """What the relay sends the client: `response` and its body, already parsed by `replica`;
    both codecs are then ready for the next exchange."""
    out = [server.send_response(response.status_code, response.reason,
                                hdr.client_response_headers(response.headers, rid))]
    while (part := replica.next_event()) is not END:
        assert isinstance(part, Data)
        out.append(server.send_data(part.data))
    out.append(server.send_end())
    replica.start_next_cycle()
    server.start_next_cycle()
    return b"".join(out)


def serve_relay(kind: str, upstream_port: int, port: int) -> None:
    relay = null_relay if kind == "null" else codec_relay

    async def handle(stream: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
        try:
            await relay(SocketChannel(stream), SocketChannel(upstream))
        except OSError:
            pass  # wrk closing its connections at the end
        finally:
            await upstream.aclose()

    trio.run(partial(trio.serve_tcp, handle, port, host="127.0.0.1"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--relay", nargs=3, metavar=("KIND", "UPSTREAM_PORT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        serve_relay(args.relay[0], int(args.relay[1]), int(args.relay[2]))
        return
    root = Path(tempfile.mkdtemp(prefix="vl-proxy-floor-"))
    upstream_port = bench.free_port()
    upstream = bench.nginx_static(root, upstream_port)
    relays: list[subprocess.Popen[bytes]] = []
    try:
        bench.wait_listening(upstream_port)
        with bench.proxies(root, [upstream_port], [bench.Variant(bench.VECTORLAY, DEFAULT_PARSER)]) as running:
            for kind in ("null", "codec"):
                port = bench.free_port()
                relays.append(subprocess.Popen([sys.executable, __file__, "--relay", kind, str(upstream_port),
                                                str(port)]))
                bench.wait_listening(port)
                running[f"relay_{kind}"] = (port, relays[-1].pid)
            for port, _ in running.values():
                bench.wrk(port, 10, 1)  # warm up
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in running}
            for _ in range(args.rounds):
                for name, (port, pid) in running.items():
                    line = proxy_cpu.measure(name, port, pid, upstream.worker())
                    print(line, flush=True)
                    fields = dict(f.split("=") for f in line.split(": ", 1)[1].split())
                    results[name].append((float(fields["rps"]), float(fields["proxy_us_per_request"])))
        nginx_rps = statistics.median(r for r, _ in results["nginx"])
        for name, values in results.items():
            rps = statistics.median(r for r, _ in values)
            print(f"{name} (median of {args.rounds}): rps={rps:.0f} ratio_to_nginx={rps / nginx_rps:.2f} "
                  f"proxy_us_per_request={statistics.median(u for _, u in values):.0f}")
    finally:
        for relay in relays:
            relay.kill()
        upstream.stop()


if __name__ == "__main__":
    main()
