"""Scripted HTTP replicas for proxy tests and benchmarks: real sockets, behaviour chosen per request.

`ScriptedUpstream` serves on 127.0.0.1 from a background thread (its own trio loop), so synchronous
tests can point a real proxy at it and steer it. What it answers depends on the path:

- ``/stream?n=N&interval_ms=M``: N server-sent events, M ms apart (chunked).
- ``/gated-stream``: one event, then waits until `release` is set, then a last event. The test
  sees the first event arrive before the replica has finished, with no timing involved.
- ``/hold``: waits until `release` is set, then answers (a request in flight for as long as the
  test wants).
- ``/bytes?n=N``: a body of N bytes (a large download).
- ``/clock-stream?n=N&interval_ms=M``: N server-sent events M ms apart, each carrying the time it
  was written (CLOCK_MONOTONIC in ns, one clock for every process on the machine), to measure how
  late events arrive.
- anything else: 200 (or `status`, changeable at any time) with a JSON echo of the request: the
  replica's name, method, path, headers and body size.

Requests whose client (the proxy) goes away while held or streaming are counted in `aborted`.
Also runnable as a process for benchmarks: ``python -m testsupport.upstreams --port 0
--delay-ms 50`` prints ``listening on PORT`` (``--host`` sets the address; 127.0.0.1 by default).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from testsupport.background import BackgroundLoop

READ_SIZE = 64 * 1024


class ScriptedUpstream(BackgroundLoop):
    def __init__(self, name: str = "upstream", status: int = 200, delay_s: float = 0.0, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        super().__init__(f"upstream {name}")
        self.name = name
        self.status = status
        self.delay_s = delay_s
        self.release = threading.Event()
        self.requests = 0
        self.connections = 0
        self.aborted = 0
        self.held = 0  # requests waiting on `release` right now
        self.seen: list[dict[str, object]] = []  # the echo of every plain request
        self._wanted_port = port
        self._host = host
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("upstream is not started")
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.release.set()  # nothing held keeps the loop from ending
        super().close()

    async def _serve(self) -> None:
        listeners = await trio.open_tcp_listeners(self._wanted_port, host=self._host)
        self._port = listeners[0].socket.getsockname()[1]
        self._started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await _read_request(conn, stream)
                if request is None:
                    return
                self.requests += 1
                await self._answer(conn, stream, request, body)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    async def _answer(self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request,
                      body: int) -> None:
        if self.delay_s:
            await trio.sleep(self.delay_s)
        url = urlsplit(request.target.decode("latin-1"))
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        base = [(b"x-upstream", self.name.encode())]
        if url.path == "/stream":
            await self._stream(conn, stream, base, int(query.get("n", "10")), float(query.get("interval_ms", "20")))
        elif url.path == "/gated-stream":
            await _send(conn, stream, h11.Response(status_code=200, headers=[*base, *_SSE]))
            await _send(conn, stream, h11.Data(data=b"data: first\n\n"))
            if await self._hold(stream):
                await _send(conn, stream, h11.Data(data=b"data: last\n\n"))
                await _send(conn, stream, h11.EndOfMessage())
        elif url.path == "/clock-stream":
            await _send(conn, stream, h11.Response(status_code=200, headers=[*base, *_SSE]))
            for i in range(int(query.get("n", "10"))):
                if i:
                    await trio.sleep(float(query.get("interval_ms", "20")) / 1000)
                await _send(conn, stream, h11.Data(data=b"data: %d\n\n" % time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
            await _send(conn, stream, h11.EndOfMessage())
        elif url.path == "/bytes":
            size = int(query.get("n", "0"))
            headers = [*base, (b"content-type", b"application/octet-stream"), (b"content-length", str(size).encode())]
            await _send(conn, stream, h11.Response(status_code=200, headers=headers))
            chunk = b"v" * 65536
            for start in range(0, size, len(chunk)):
                await _send(conn, stream, h11.Data(data=chunk[:size - start]))
            await _send(conn, stream, h11.EndOfMessage())
        elif url.path == "/hold":
            if await self._hold(stream):
                await self._echo(conn, stream, base, request, url.path, body)
        else:
            await self._echo(conn, stream, base, request, url.path, body)

    async def _echo(self, conn: h11.Connection, stream: trio.SocketStream, base: list[tuple[bytes, bytes]],
                    request: h11.Request, path: str, body: int) -> None:
        echo: dict[str, object] = {
            "upstream": self.name, "method": request.method.decode(), "path": path, "body_bytes": body,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers],
        }
        self.seen.append(echo)
        payload = json.dumps(echo).encode()
        headers = [*base, (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await _send(conn, stream, h11.Response(status_code=self.status, headers=headers))
        await _send(conn, stream, h11.Data(data=payload))
        await _send(conn, stream, h11.EndOfMessage())

    async def _stream(self, conn: h11.Connection, stream: trio.SocketStream, base: list[tuple[bytes, bytes]],
                      count: int, interval_ms: float) -> None:
        await _send(conn, stream, h11.Response(status_code=200, headers=[*base, *_SSE]))
        try:
            for i in range(count):
                if i:
                    await trio.sleep(interval_ms / 1000)
                await _send(conn, stream, h11.Data(data=b"data: token %d\n\n" % i))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.aborted += 1
            raise
        await _send(conn, stream, h11.Data(data=b"data: [DONE]\n\n"))
        await _send(conn, stream, h11.EndOfMessage())

    async def _hold(self, stream: trio.SocketStream) -> bool:
        """Wait for `release`; False (counted in `aborted`) if the client goes away first."""
        gone = False
        self.held += 1
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal gone
                    try:
                        while await stream.receive_some(READ_SIZE):
                            pass
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                    gone = True
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                await trio.to_thread.run_sync(self.release.wait, abandon_on_cancel=True)
                nursery.cancel_scope.cancel()
        finally:
            self.held -= 1
        if gone:
            self.aborted += 1
        return not gone


_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> tuple[h11.Request | None, int]:
    request: h11.Request | None = None
    body = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(READ_SIZE))
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        else:
            return None, 0


async def _send(conn: h11.Connection, stream: trio.SocketStream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A scripted HTTP replica for proxy benchmarks.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    upstream = ScriptedUpstream(args.name, delay_s=args.delay_ms / 1000, port=args.port, host=args.host).start()
    print(f"listening on {upstream.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        upstream.close()


if __name__ == "__main__":
    main()
