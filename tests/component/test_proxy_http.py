"""The proxy's request path in-process: in-memory client and replica streams on the autojump clock.

These pin down the timing rules exactly (deadlines, ejection backoff, Retry-After, drain) without
waiting for real time; tests/integration/test_proxy_*.py check the same behaviour over real sockets.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import pytest
import trio
import trio.testing

from vectorlay.core.model import RateLimit
from vectorlay.core.protocol import Endpoint, Route, RouteSnapshot, RouteUpdate
from vectorlay.proxy.codec import HttpParser
from vectorlay.proxy.http import Proxy
from vectorlay.proxy.limits import ProxyLimits
from vectorlay.proxy.routing import RouteTable
from vectorlay.proxy.upstream import UpstreamPool


@dataclass
class FakeReplica:
    """Answers each request with `status` after `delay_s` (its name as the body, the target in
    X-Target); counts what it saw and keeps each request's method, target and body."""

    name: str
    status: int = 200
    delay_s: float = 0.0
    refuse: bool = False  # connections fail as if refused
    chunked: bool = False  # answer with a chunked body, in two chunks, instead of a Content-Length
    requests: int = 0
    seen: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)

    async def serve(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        head: h11.Request | None = None
        received = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(bytes(data))
                    if not data and conn.their_state is h11.IDLE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    head, received = event, b""
                elif isinstance(event, h11.Data):
                    received += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    self.requests += 1
                    self.seen.append((head.method, head.target, received))
                    await trio.sleep(self.delay_s)
                    body = self.name.encode()
                    framing = [] if self.chunked else [(b"content-length", str(len(body)).encode())]
                    out = conn.send(h11.Response(status_code=self.status,
                                                 headers=[*framing, (b"x-target", head.target)]))
                    if head.method != b"HEAD":
                        out = (out or b"") + (conn.send(h11.Data(data=body[:1] if self.chunked else body)) or b"")
                    if self.chunked:  # the rest once everyone waits: the proxy relays it while watching its client
                        await stream.send_all(out)
                        await trio.testing.wait_all_tasks_blocked()
                        out = conn.send(h11.Data(data=body[1:]))
                    out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
                    await stream.send_all(out)
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return


@dataclass
class Harness:
    proxy: Proxy
    replicas: dict[str, FakeReplica]
    nursery: trio.Nursery
    clients: list[trio.abc.Stream] = field(default_factory=list)

    def connect_client(self) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.proxy.handle_connection, theirs, "192.0.2.7")
        self.clients.append(ours)
        return ours


async def request(stream: trio.abc.Stream, target: bytes = b"/", headers: list[tuple[bytes, bytes]] | None = None,
                  host: bytes = b"echo.localhost") -> tuple[int, dict[bytes, bytes], bytes]:
    """One request on a (kept-alive) client stream; (status, headers, body)."""
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(conn.send(h11.Request(method=b"GET", target=target,
                                                headers=[(b"host", host), *(headers or [])])) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    return await read_response(conn, stream)


async def read_response(conn: h11.Connection, stream: trio.abc.ReceiveStream) -> tuple[int, dict[bytes, bytes], bytes]:
    """The next response on `stream`, read through `conn`; (status, headers, body)."""
    response: h11.Response | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response.status_code, dict(response.headers), body
        else:
            raise AssertionError(f"unexpected {event!r}")


async def read_responses(stream: trio.abc.Stream, methods: list[bytes]) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """The responses to requests sent raw with these methods, in order; (status, headers, body) each."""
    conn = h11.Connection(h11.CLIENT)
    out = []
    for method in methods:
        conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))  # so h11 expects a response
        conn.send(h11.EndOfMessage())
        out.append(await read_response(conn, stream))
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
    return out


@pytest.fixture(params=list(HttpParser), ids=[p.value for p in HttpParser])
def parser(request: pytest.FixtureRequest) -> HttpParser:
    """Every test here runs with both codecs."""
    return HttpParser(request.param)


@asynccontextmanager
async def harness(*replicas: FakeReplica, parser: HttpParser, limits: ProxyLimits | None = None,
                  route_extra: Callable[[Route], Route] | None = None) -> AsyncIterator[Harness]:
    by_address = {f"10.0.0.{i}:80": r for i, r in enumerate(replicas, 1)}
    limits = limits or ProxyLimits()
    async with trio.open_nursery() as nursery:

        async def connect(host: str, port: int) -> trio.abc.Stream:
            replica = by_address[f"{host}:{port}"]
            if replica.refuse:
                raise ConnectionRefusedError(111, "Connection refused")
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(replica.serve, theirs)
            return ours

        table = RouteTable(random.Random(7), limits=limits)  # seeded: the same choices every run
        route = Route("echo", tuple(Endpoint(r.name, address, "n") for address, r in by_address.items()))
        table.load_snapshot(RouteSnapshot(1, (route_extra(route) if route_extra else route,)))
        proxy = Proxy(table, "localhost", limits, pool=UpstreamPool(connect=connect, parser=parser), parser=parser)
        yield Harness(proxy, {r.name: r for r in replicas}, nursery)
        nursery.cancel_scope.cancel()


async def test_a_slowloris_gets_408_after_the_header_timeout_however_often_it_sends(
        autojump_clock: trio.testing.MockClock, parser: HttpParser) -> None:
    async with harness(FakeReplica("a"), limits=ProxyLimits(header_timeout_s=10, idle_timeout_s=60), parser=parser) as h:
        client = h.connect_client()
        start = trio.current_time()
        await client.send_all(b"GET / HTTP/1.1\r\n")
        answer = b""
        with trio.fail_after(30):
            while not answer:
                with trio.move_on_after(1):
                    answer = bytes(await client.receive_some(65536))
                if not answer:
                    await client.send_all(b"X-Drip: 1\r\n")  # a byte every second keeps no deadline alive
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert trio.current_time() - start == pytest.approx(10, abs=1.01)


async def test_an_idle_connection_is_closed_quietly_after_the_idle_timeout(
        autojump_clock: trio.testing.MockClock, parser: HttpParser) -> None:
    async with harness(FakeReplica("a"), limits=ProxyLimits(idle_timeout_s=60), parser=parser) as h:
        client = h.connect_client()
        assert (await request(client))[0] == 200
        start = trio.current_time()
        with trio.fail_after(120):
            assert await client.receive_some(65536) == b""
        assert trio.current_time() - start == pytest.approx(60, abs=0.1)


async def test_ejection_backs_off_while_a_replica_keeps_failing_and_resets_when_it_recovers(
        autojump_clock: trio.testing.MockClock, parser: HttpParser) -> None:
    bad, good = FakeReplica("bad", status=503), FakeReplica("good")
    async with harness(bad, good, limits=ProxyLimits(eject_s=5, max_eject_s=60), parser=parser) as h:
        client = h.connect_client()

        async def traffic_until(end: float) -> set[bytes]:
            bodies = set()
            while trio.current_time() < end:
                status, _, body = await request(client)
                assert status == 200  # a 503 is retried on the good replica
                bodies.add(body)
                await trio.sleep(0.1)
            return bodies

        while bad.requests == 0:
            await traffic_until(trio.current_time() + 0.1)
        first_failure = trio.current_time()
        assert await traffic_until(first_failure + 4.9) == {b"good"}  # ejected for 5 s
        assert bad.requests == 1
        while bad.requests == 1:  # back in the rotation after 5 s: fails again
            await traffic_until(trio.current_time() + 0.1)
        second_failure = trio.current_time()
        assert second_failure - first_failure == pytest.approx(5.0, abs=1.0)
        await traffic_until(second_failure + 9.9)  # now out for 10 s
        assert bad.requests == 2
        bad.status = 200
        assert b"bad" in await traffic_until(second_failure + 12)  # readmitted, and it answers
        assert h.proxy.routes.clusters["echo"].endpoints["bad"].failures == 0  # a success resets the backoff


async def test_a_response_head_that_never_comes_is_a_504_not_retried(
        autojump_clock: trio.testing.MockClock, parser: HttpParser) -> None:
    slow, other = FakeReplica("slow", delay_s=1000), FakeReplica("other", delay_s=1000)
    async with harness(slow, other, limits=ProxyLimits(upstream_response_timeout_s=30), parser=parser) as h:
        client = h.connect_client()
        start = trio.current_time()
        status, _, body = await request(client)
        assert status == 504 and b"no response within 30s" in body
        assert trio.current_time() - start == pytest.approx(30, abs=0.1)
        assert slow.requests + other.requests == 1  # a timeout is not retried: it would double the wait


async def test_rate_limited_requests_get_429_with_the_wait(
        autojump_clock: trio.testing.MockClock, parser: HttpParser) -> None:
    def limited(route: Route) -> Route:
        return Route(route.cluster, route.endpoints, rate_limit=RateLimit(0.5, 2))

    async with harness(FakeReplica("a"), route_extra=limited, parser=parser) as h:
        client = h.connect_client()
        assert [(await request(client))[0] for _ in range(2)] == [200, 200]
        status, headers, _ = await request(client)
        assert status == 429 and headers[b"retry-after"] == b"2"
        await trio.sleep(2)
        assert (await request(client))[0] == 200


async def test_drain_lets_the_request_in_flight_finish_and_closes_idle_connections(
        autojump_clock: trio.testing.MockClock, parser: HttpParser) -> None:
    async with harness(FakeReplica("a", delay_s=20), parser=parser) as h:
        idle = h.connect_client()
        busy = h.connect_client()
        async with trio.open_nursery() as nursery:
            results: list[tuple[int, dict[bytes, bytes], bytes]] = []

            async def in_flight() -> None:
                results.append(await request(busy))

            nursery.start_soon(in_flight)
            await trio.sleep(5)
            h.proxy.drain()
            with trio.fail_after(1):
                assert await idle.receive_some(65536) == b""
        status, headers, _ = results[0]
        assert status == 200 and headers[b"connection"] == b"close"


async def test_drain_closes_idle_connections_even_without_an_idle_timeout(
        autojump_clock: trio.testing.MockClock, parser: HttpParser) -> None:
    async with harness(FakeReplica("a"), limits=ProxyLimits(idle_timeout_s=math.inf), parser=parser) as h:
        client = h.connect_client()
        assert (await request(client))[0] == 200
        await trio.sleep(1000)
        assert h.proxy.deadlines.armed == 0  # an infinite deadline keeps nothing in the keeper
        h.proxy.drain()
        with trio.fail_after(1):
            assert await client.receive_some(65536) == b""


async def test_a_request_arriving_as_its_connection_is_closed_is_answered_whole_or_not_at_all(
        autojump_clock: trio.testing.MockClock, parser: HttpParser) -> None:
    """The race the connection-wide cancel scope opens: the client's bytes are in, the proxy task
    has not run yet, and drain (or a deadline) cancels the connection. It must not forward a
    request it will not answer."""
    replica = FakeReplica("a")
    async with harness(replica, parser=parser) as h:
        client = h.connect_client()
        assert (await request(client))[0] == 200
        await trio.sleep(1)  # the proxy waits for the next request
        await client.send_all(b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        h.proxy.drain()  # before the proxy task runs again
        answer = b""
        with trio.fail_after(5):
            while data := await client.receive_some(65536):
                answer += data
        assert answer == b""  # closed, as a keep-alive connection may be at any moment
        assert replica.requests == 1  # and the late request never reached the replica
        assert sum(h.proxy.metrics.clusters["echo"].requests.values()) == 1


async def test_all_replicas_refusing_is_a_502_after_trying_each(
        autojump_clock: trio.testing.MockClock, parser: HttpParser) -> None:
    replicas = [FakeReplica(name, refuse=True) for name in "xyz"]
    async with harness(*replicas, parser=parser) as h:
        status, _, body = await request(h.connect_client())
        assert status == 502 and b"connect to" in body
        metrics = h.proxy.metrics.clusters["echo"]
        assert metrics.connect_errors == 3 and metrics.retries == 2 and metrics.requests[502] == 1


# ---- HTTP/1.1 details through the whole proxy, with either codec ----

async def test_pipelined_requests_are_answered_in_order_on_one_connection(parser: HttpParser) -> None:
    async with harness(FakeReplica("a"), parser=parser) as h:
        client = h.connect_client()
        await client.send_all(b"GET /1 HTTP/1.1\r\nHost: echo.localhost\r\n\r\n"
                              b"POST /2 HTTP/1.1\r\nHost: echo.localhost\r\nContent-Length: 3\r\n\r\nabc"
                              b"GET /3 HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        with trio.fail_after(5):
            responses = await read_responses(client, [b"GET", b"POST", b"GET"])
        assert [r[1][b"x-target"] for r in responses] == [b"/1", b"/2", b"/3"]
        assert h.replicas["a"].seen[1] == (b"POST", b"/2", b"abc")


async def test_head_gets_the_head_only_and_the_connection_goes_on(parser: HttpParser) -> None:
    async with harness(FakeReplica("a"), parser=parser) as h:
        client = h.connect_client()
        await client.send_all(b"HEAD / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        with trio.fail_after(5):
            [(status, headers, body)] = await read_responses(client, [b"HEAD"])
        assert status == 200 and headers[b"content-length"] == b"1" and body == b""
        assert (await request(client))[2] == b"a"


async def test_an_http_1_0_client_gets_its_answer_and_the_connection_closes(parser: HttpParser) -> None:
    async with harness(FakeReplica("a"), parser=parser) as h:
        client = h.connect_client()
        await client.send_all(b"GET / HTTP/1.0\r\nHost: echo.localhost\r\n\r\n")
        received = b""
        with trio.fail_after(5):
            while chunk := await client.receive_some(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200 ") and b"connection: close\r\n" in received.lower()
        assert received.endswith(b"\r\n\r\na")


async def test_expect_100_continue_gets_a_go_ahead_before_the_body(parser: HttpParser) -> None:
    async with harness(FakeReplica("a"), parser=parser) as h:
        client = h.connect_client()
        await client.send_all(b"POST /up HTTP/1.1\r\nHost: echo.localhost\r\nContent-Length: 5\r\n"
                              b"Expect: 100-continue\r\n\r\n")
        with trio.fail_after(5):
            assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 100 ")
            await client.send_all(b"hello")
            [(status, _, _)] = await read_responses(client, [b"POST"])
        assert status == 200 and h.replicas["a"].seen == [(b"POST", b"/up", b"hello")]


async def test_a_chunked_upload_with_trailers_reaches_the_replica_whole(parser: HttpParser) -> None:
    async with harness(FakeReplica("a"), parser=parser) as h:
        client = h.connect_client()
        await client.send_all(b"POST /up HTTP/1.1\r\nHost: echo.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n")
        with trio.fail_after(5):
            [(status, _, _)] = await read_responses(client, [b"POST"])
        assert status == 200 and h.replicas["a"].seen == [(b"POST", b"/up", b"abcde")]


async def test_broken_requests_and_connect_get_their_status(parser: HttpParser) -> None:
    async with harness(FakeReplica("a"), parser=parser) as h:
        for data, status in ((b"GARBAGE\r\n\r\n", 400),
                             (b"GET / HTTP/1.1\r\n\r\n", 400),
                             (b"POST / HTTP/1.1\r\nHost: echo.localhost\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
                             (b"CONNECT echo.localhost:443 HTTP/1.1\r\nHost: echo.localhost\r\n\r\n", 405)):
            client = h.connect_client()
            await client.send_all(data)
            with trio.fail_after(5):
                answer = await client.receive_some(65536)
            assert answer.startswith(b"HTTP/1.1 %d " % status), (data, answer[:80])
        assert h.replicas["a"].requests == 0


async def test_route_table_wakes_waiters_on_each_snapshot_and_update() -> None:
    table = RouteTable()
    woke: list[int] = []

    async def wait_twice() -> None:
        for _ in range(2):
            await table.next_change()
            woke.append(table.version)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_twice)
        await trio.testing.wait_all_tasks_blocked()
        table.load_snapshot(RouteSnapshot(3, (Route("echo", (Endpoint("a", "127.0.0.1:1", "n1"),)),)))
        await trio.testing.wait_all_tasks_blocked()
        table.apply(RouteUpdate(4, Route("echo"), removed=True))
    assert woke == [3, 4] and "echo" not in table.clusters


def connect_closing_client(h: Harness) -> tuple[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]:
    """A client that closes its connection the instant the end of a chunked response reaches it,
    as curl does: the close reaches the proxy while its write of that end is still returning."""
    to_proxy, proxy_reads = trio.testing.memory_stream_one_way_pair()
    proxy_writes, from_proxy = trio.testing.MemorySendStream(), trio.testing.MemoryReceiveStream()

    async def deliver() -> None:
        data = proxy_writes.get_data_nowait()
        from_proxy.put_data(data)
        if data.endswith(b"0\r\n\r\n"):
            to_proxy.close()
        await trio.lowlevel.cancel_shielded_checkpoint()  # as a socket's send_all yields after its write

    proxy_writes.send_all_hook = deliver
    h.nursery.start_soon(h.proxy.handle_connection, trio.StapledStream(proxy_writes, proxy_reads), "192.0.2.7")
    return to_proxy, from_proxy


async def test_a_chunked_response_whose_client_closes_right_after_it_counts_as_delivered(
        parser: HttpParser) -> None:
    """The status in the metrics is the one the client received: a chunked 200 whose client
    closed at once is a 200, not a 499 (client gone)."""
    rounds = 40
    async with harness(FakeReplica("abc", chunked=True), parser=parser) as h:
        for _ in range(rounds):
            to_proxy, from_proxy = connect_closing_client(h)
            conn = h11.Connection(h11.CLIENT)
            await to_proxy.send_all(conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"echo.localhost")]))
                                    + conn.send(h11.EndOfMessage()))
            status, headers, body = await read_response(conn, from_proxy)
            assert (status, headers.get(b"transfer-encoding"), body) == (200, b"chunked", b"abc")
        while h.proxy.metrics.connections:
            await trio.sleep(0.01)
        assert dict(h.proxy.metrics.clusters["echo"].requests) == {200: rounds}


async def test_a_client_that_leaves_counts_as_what_it_received(
        autojump_clock: trio.testing.MockClock, parser: HttpParser) -> None:
    """Leaving mid-stream, after the 200 arrived, is a 200; leaving before any answer is a 499."""
    async with harness(FakeReplica("abc", chunked=True), parser=parser) as h:
        client = h.connect_client()
        await client.send_all(b"GET / HTTP/1.1\r\nhost: echo.localhost\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            received += await client.receive_some(65536)
        assert received.startswith(b"HTTP/1.1 200 ")
        await client.aclose()
        while h.proxy.metrics.connections:
            await trio.sleep(0.01)
        assert dict(h.proxy.metrics.clusters["echo"].requests) == {200: 1}
    async with harness(FakeReplica("slow", delay_s=5), parser=parser) as h:
        client = h.connect_client()
        await client.send_all(b"GET / HTTP/1.1\r\nhost: echo.localhost\r\n\r\n")
        await trio.sleep(1)
        await client.aclose()
        while h.proxy.metrics.connections:
            await trio.sleep(0.01)
        assert dict(h.proxy.metrics.clusters["echo"].requests) == {499: 1}
