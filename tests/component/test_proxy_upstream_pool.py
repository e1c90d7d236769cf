"""The upstream pool over real loopback sockets: when a kept-alive connection the replica closed is
noticed before reuse, and what happens when it is not."""

from __future__ import annotations

import random
from functools import partial

import pytest
import trio
import trio.testing

from vectorlay.core.protocol import Endpoint, Route, RouteSnapshot
from vectorlay.proxy import upstream
from vectorlay.proxy.codec import END
from vectorlay.proxy.http import Proxy
from vectorlay.proxy.limits import ProxyLimits
from vectorlay.proxy.routing import RouteTable
from vectorlay.proxy.upstream import UpstreamPool

# Says keep-alive, then the replica closes the connection anyway (as one restarting would).
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
FRESH_S = 0.2


class ClosingReplica:
    """Answers one request per connection, then closes it; counts the connections it accepted."""

    def __init__(self) -> None:
        self.connections = 0

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        received = b""
        while b"\r\n\r\n" not in received:
            data = await stream.receive_some(65536)
            if not data:
                return
            received += data
        await stream.send_all(ANSWER)
        await stream.aclose()


async def start_replica(nursery: trio.Nursery) -> tuple[ClosingReplica, str]:
    replica = ClosingReplica()
    listeners = await nursery.start(partial(trio.serve_tcp, replica.serve, 0, host="127.0.0.1"))
    return replica, f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def exchange(pool: UpstreamPool, address: str) -> upstream.UpstreamConnection:
    """One GET through the pool; the connection it used, already released."""
    connection = await pool.acquire(address)
    connection.request(b"GET", b"/", [(b"host", b"r")])
    connection.end()
    await connection.flush()
    while await connection.next_event() is not END:
        pass
    await pool.release(connection)
    return connection


@pytest.fixture(autouse=True)
def short_fresh_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "FRESH_IDLE_S", FRESH_S)


async def test_a_connection_idle_past_the_fresh_window_is_checked_and_a_closed_one_replaced() -> None:
    async with trio.open_nursery() as nursery:
        replica, address = await start_replica(nursery)
        pool = UpstreamPool()
        first = await exchange(pool, address)
        await trio.sleep(FRESH_S * 2)  # the replica's close has arrived and the window has passed
        second = await pool.acquire(address)
        assert second is not first and not second.reused
        assert isinstance(first.stream, trio.SocketStream)
        assert first.stream.socket.fileno() == -1  # the stale one was closed, not leaked
        await second.aclose()
        nursery.cancel_scope.cancel()


async def test_a_connection_back_in_the_pool_a_moment_ago_is_reused_without_a_check() -> None:
    async with trio.open_nursery() as nursery:
        _, address = await start_replica(nursery)
        pool = UpstreamPool()
        first = await exchange(pool, address)
        await trio.sleep(0.02)  # the close has arrived, but the connection is fresh: no system call
        again = await pool.acquire(address)
        assert again is first and again.reused
        await again.aclose()
        nursery.cancel_scope.cancel()


async def test_a_fresh_connection_the_replica_closed_costs_the_client_nothing() -> None:
    """The trade-off the fresh window makes is covered by the stale-connection retry."""
    async with trio.open_nursery() as nursery:
        replica, address = await start_replica(nursery)
        limits = ProxyLimits()
        table = RouteTable(random.Random(7), limits=limits)
        table.load_snapshot(RouteSnapshot(1, (Route("echo", (Endpoint("r1", address, "n"),)),)))
        proxy = Proxy(table, "localhost", limits)
        client, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(proxy.handle_connection, theirs, "192.0.2.7")
        answers = []
        for _ in range(3):  # back to back: each reuses the connection the replica just closed
            await client.send_all(b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
            answer = b""
            while not answer.endswith(b"ok\n"):
                answer += await client.receive_some(65536)
            answers.append(answer.split(b"\r\n", 1)[0])
        assert answers == [b"HTTP/1.1 200 OK"] * 3
        assert replica.connections == 3
        assert proxy.metrics.clusters["echo"].retries == 0  # a stale connection is not a replica failure
        nursery.cancel_scope.cancel()
