"""The tunnel library: HTTP/2 byte streams between two in-memory ends, on the autojump clock.

The proxy end is the HTTP/2 client (it opens streams), the node end the server (it accepts them).
Abusive peers are played with raw frames (hyperframe), since a well-behaved h2 will not send them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import h2.connection
import h2.events
import pytest
import trio
import trio.testing
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from vectorlay.errors import TunnelError
from vectorlay.tunnel import IncomingStream, StreamRefused, TunnelConnection, TunnelLimits, TunnelStream

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
Handler = Callable[[IncomingStream], Awaitable[None]]


async def echo(incoming: IncomingStream) -> None:
    """Answer every stream; send back what arrives, upper-cased, then end."""
    stream = incoming.accept()
    while data := await stream.receive_some(65536):
        await stream.send_all(data.upper())
    await stream.send_eof()


@asynccontextmanager
async def tunnel(handler: Handler = echo, limits: TunnelLimits = TunnelLimits(),
                 ping: bool = False) -> AsyncIterator[tuple[TunnelConnection, TunnelConnection]]:
    """(proxy end, node end), both running, over an in-memory link."""
    proxy_side, node_side = trio.testing.memory_stream_pair()
    proxy = TunnelConnection(proxy_side, client_side=True, limits=limits, peer="node n-1")
    node = TunnelConnection(node_side, client_side=False, limits=limits, handler=handler, peer="proxy p-1",
                            ping=ping)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.run)
        await nursery.start(proxy.run)
        yield proxy, node
        nursery.cancel_scope.cancel()


async def read_all(stream: TunnelStream) -> bytes:
    parts = []
    while data := await stream.receive_some(65536):
        parts.append(data)
    return b"".join(parts)


async def test_a_stream_carries_bytes_both_ways_and_half_closes() -> None:
    async with tunnel() as (proxy, node):
        stream = await proxy.open_stream("echo-abcde")
        await stream.send_all(b"hello ")
        await stream.send_all(b"tunnel")
        await stream.send_eof()
        assert await read_all(stream) == b"HELLO TUNNEL"
        await stream.aclose()
        assert proxy.bytes_sent == node.bytes_received == 12
        assert node.bytes_sent == proxy.bytes_received == 12
        await trio.testing.wait_all_tasks_blocked()
        assert proxy.open_streams == node.open_streams == 0


async def test_large_bodies_and_many_streams_at_once() -> None:
    body = bytes(range(256)) * 4096 * 10  # 10 MiB, more than any window
    async with tunnel() as (proxy, _):
        async def one(index: int, results: dict[int, bytes]) -> None:
            stream = await proxy.open_stream(f"echo-{index}")
            payload = body if index == 0 else f"stream {index}".encode() * 100

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                results[index] = await read_all(stream)
            await stream.aclose()

        results: dict[int, bytes] = {}
        async with trio.open_nursery() as nursery:
            for index in range(200):
                nursery.start_soon(one, index, results)
        assert results[0] == body.upper()
        assert all(results[i] == f"STREAM {i}".encode() * 100 for i in range(1, 200))
        assert proxy.streams_opened == 200  # the control stream is not counted


async def test_a_reader_that_stops_reading_bounds_the_senders_buffering(autojump_clock: trio.testing.MockClock) -> None:
    limits = TunnelLimits(stream_window=64 * 1024)
    produced = 0
    blocked = trio.Event()

    async def endless(incoming: IncomingStream) -> None:
        nonlocal produced
        stream = incoming.accept()
        chunk = b"x" * 16384
        while True:
            with trio.move_on_after(1) as scope:
                await stream.send_all(chunk)
            if scope.cancelled_caught:
                blocked.set()  # the window is spent: the sender waits instead of buffering
                await stream.wait_send_all_might_not_block()
                continue
            produced += len(chunk)

    async with tunnel(endless, limits) as (proxy, node):
        stream = await proxy.open_stream("firehose")
        await blocked.wait()
        buffered = sum(len(c) for c in proxy.streams[stream.stream_id].chunks)
        assert produced <= limits.stream_window + 16384
        assert buffered <= limits.stream_window
        before = produced
        # Reading hands the window back: the sender goes on, and stops again at the next window.
        got = 0
        while got < 256 * 1024:
            got += len(await stream.receive_some(65536))
        await trio.sleep(2)
        assert produced > before
        assert produced - got <= limits.stream_window + 16384


async def test_a_stream_the_proxy_closes_is_reset_at_the_node() -> None:
    seen: list[str] = []
    done = trio.Event()

    async def waiting(incoming: IncomingStream) -> None:
        stream = incoming.accept()
        try:
            await stream.receive_some(100)
        except trio.BrokenResourceError as error:
            seen.append(str(error))
        done.set()

    async with tunnel(waiting) as (proxy, node):
        stream = await proxy.open_stream("slow-1")
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()  # the client left: the node must learn it at once
        await done.wait()
        assert seen == ["reset by the peer (CANCEL)"]
        await trio.testing.wait_all_tasks_blocked()
        assert node.open_streams == 0


async def test_a_stream_the_node_abandons_breaks_the_proxys_reads() -> None:
    async def abandon(incoming: IncomingStream) -> None:
        stream = incoming.accept()
        await stream.send_all(b"partial")
        await stream.aclose()

    async with tunnel(abandon) as (proxy, _):
        stream = await proxy.open_stream("crash-1")
        assert await stream.receive_some(100) == b"partial"
        with pytest.raises(trio.BrokenResourceError, match="reset by the peer"):
            await stream.receive_some(100)
        assert not stream.reusable()


async def test_refused_streams_say_why() -> None:
    async def refuse(incoming: IncomingStream) -> None:
        incoming.refuse(404)

    async with tunnel(refuse) as (proxy, _):
        with pytest.raises(StreamRefused, match="status 404"):
            await proxy.open_stream("not-here")
        assert proxy.open_streams == 0


async def test_a_handler_that_fails_costs_only_its_stream(caplog: pytest.LogCaptureFixture) -> None:
    async def flaky(incoming: IncomingStream) -> None:
        if incoming.authority == "bad":
            raise RuntimeError("bug")
        await echo(incoming)

    async with tunnel(flaky) as (proxy, _):
        with pytest.raises(StreamRefused, match="status 502"):
            await proxy.open_stream("bad")
        stream = await proxy.open_stream("good")
        await stream.send_all(b"still here")
        await stream.send_eof()
        assert await read_all(stream) == b"STILL HERE"
    assert "internal error while serving stream" in caplog.text


async def test_drain_tells_the_proxy_and_waits_for_streams_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    messages: list[str] = []
    async with tunnel() as (proxy, node):
        proxy.on_control = messages.append
        stream = await proxy.open_stream("busy")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.drain, "drain restart", 30.0)
            await trio.sleep(1)
            assert messages == ["drain restart"] and proxy.draining and not stream.reusable()
            assert not node.closing  # the stream in flight is still served
            await stream.send_all(b"last")
            await stream.send_eof()
            assert await read_all(stream) == b"LAST"
            await stream.aclose()
        await proxy.closed.wait()
        assert node.close_reason == "drained"


class Blackhole(trio.abc.Stream):
    """Passes bytes through until `drop` is set, then silently discards what is sent (a dead path)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.drop = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.drop:
            await trio.lowlevel.checkpoint()
            return
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_silent_peer_is_noticed_by_pings(autojump_clock: trio.testing.MockClock) -> None:
    limits = TunnelLimits(ping_interval_s=5, ping_timeout_s=3)
    proxy_side, node_side = trio.testing.memory_stream_pair()
    path = Blackhole(node_side)
    proxy = TunnelConnection(proxy_side, client_side=True, limits=limits)
    node = TunnelConnection(path, client_side=False, limits=limits, handler=echo, ping=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.run)
        await nursery.start(proxy.run)
        await trio.sleep(60)
        assert not node.closing  # a live peer answers every ping
        path.drop = True  # the path dies: no FIN, no reset, nothing
        await node.closed.wait()
        assert node.close_reason == "no answer to a ping within 3s"
        nursery.cancel_scope.cancel()


async def test_the_handshake_has_a_deadline(autojump_clock: trio.testing.MockClock) -> None:
    node_side, _silent = trio.testing.memory_stream_pair()
    node = TunnelConnection(node_side, client_side=False, handler=echo, limits=TunnelLimits(handshake_timeout_s=4))
    with pytest.raises(TunnelError, match="no HTTP/2 settings within 4s"):
        await node.run()


# ---- abuse: each closes that connection, in one log line, never more -----------------------


def settings() -> bytes:
    return SettingsFrame(0).serialize()


async def attack(frames: bytes, client_side_victim: bool = False, limits: TunnelLimits = TunnelLimits(),
                 preface: bool = True) -> tuple[TunnelConnection, list[h2.events.Event]]:
    """Send `frames` (after the preface and a SETTINGS frame) to a fresh victim; return the victim
    once it closed, and what it said back."""
    ours, theirs = trio.testing.memory_stream_pair()
    victim = TunnelConnection(theirs, client_side=client_side_victim, limits=limits, handler=echo, peer="attacker")
    observer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=not client_side_victim))
    observer.initiate_connection()
    observer.data_to_send()
    heard: list[h2.events.Event] = []
    async with trio.open_nursery() as nursery:
        async def run_victim() -> None:
            try:
                await victim.run()
            except TunnelError:
                pass

        async def listen() -> None:
            while data := await ours.receive_some(65536):
                try:
                    heard.extend(observer.receive_data(data))
                except h2.exceptions.ProtocolError:
                    pass

        nursery.start_soon(run_victim)
        nursery.start_soon(listen)
        opening = (PREFACE if preface and not client_side_victim else b"") + settings()
        await ours.send_all(opening + frames)
        with trio.fail_after(5):
            await victim.closed.wait()
        nursery.cancel_scope.cancel()
    return victim, heard


def goaway(heard: list[h2.events.Event]) -> h2.events.ConnectionTerminated:
    [terminated] = [e for e in heard if isinstance(e, h2.events.ConnectionTerminated)]  # one, not two
    return terminated


async def test_garbage_instead_of_http2_closes_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "vectorlay.tunnel")
    victim, heard = await attack(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3, preface=False)
    assert "protocol error" in victim.close_reason
    assert len([r for r in caplog.records if r.name == "vectorlay.tunnel"]) == 1


async def test_a_settings_flood_closes_the_connection() -> None:
    victim, heard = await attack(settings() * 3000)
    assert "flood of control frames (last SETTINGS)" in victim.close_reason
    assert goaway(heard).error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_a_ping_flood_closes_the_connection() -> None:
    victim, heard = await attack(b"".join(PingFrame(0, b"12345678").serialize() for _ in range(3000)))
    assert "flood of control frames (last PING)" in victim.close_reason
    assert goaway(heard).error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def connect_headers(stream_id: int, authority: bytes = b"r") -> bytes:
    encoder = h2.connection.H2Connection().encoder
    frame = HeadersFrame(stream_id, encoder.encode([(b":method", b"CONNECT"), (b":authority", authority)]))
    frame.flags.add("END_HEADERS")
    return frame.serialize()


async def test_endless_streams_close_the_connection() -> None:
    limits = TunnelLimits(max_streams=8)
    victim, heard = await attack(b"".join(connect_headers(2 * i + 1) for i in range(50)), limits=limits)
    assert "protocol error" in victim.close_reason
    assert goaway(heard).error_code != h2.errors.ErrorCodes.NO_ERROR


async def test_rapid_reset_closes_the_connection() -> None:
    frames = b"".join(connect_headers(2 * i + 1) + RstStreamFrame(2 * i + 1, error_code=8).serialize()
                      for i in range(3000))
    victim, heard = await attack(frames)
    assert "flood of control frames (last RST_STREAM)" in victim.close_reason


async def test_a_huge_header_block_closes_the_connection() -> None:
    encoder = h2.connection.H2Connection().encoder
    block = encoder.encode([(b":method", b"CONNECT"), (b":authority", b"r"), (b"x-big", b"a" * 60_000)])
    head = HeadersFrame(1, block[:16000])
    rest = [block[i:i + 16000] for i in range(16000, len(block), 16000)]
    frames = head.serialize()
    for index, piece in enumerate(rest):
        continuation = ContinuationFrame(1, piece)
        if index == len(rest) - 1:
            continuation.flags.add("END_HEADERS")
        frames += continuation.serialize()
    victim, heard = await attack(frames)
    assert "protocol error" in victim.close_reason


async def test_a_continuation_flood_closes_the_connection() -> None:
    frames = HeadersFrame(1, b"").serialize() + b"".join(ContinuationFrame(1, b"").serialize() for _ in range(500))
    victim, _ = await attack(frames)
    assert "protocol error" in victim.close_reason


async def test_empty_data_frames_are_a_flood() -> None:
    frames = connect_headers(1) + b"".join(DataFrame(1, b"").serialize() for _ in range(3000))
    victim, _ = await attack(frames)
    assert "flood of control frames (last empty DATA)" in victim.close_reason


async def test_overrunning_the_window_closes_the_connection() -> None:
    limits = TunnelLimits(stream_window=16 * 1024)
    frames = connect_headers(1) + b"".join(DataFrame(1, b"x" * 16000).serialize() for _ in range(2))
    frames += WindowUpdateFrame(0, 1).serialize()
    victim, heard = await attack(frames, limits=limits)
    assert "protocol error" in victim.close_reason
    assert goaway(heard).error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR


async def test_a_node_may_not_open_streams_on_the_proxy() -> None:
    """The proxy end accepts no streams: a node opening one (or pushing) is closed."""
    victim, heard = await attack(connect_headers(2), client_side_victim=True)
    assert "protocol error" in victim.close_reason


async def test_one_bad_peer_leaves_the_others_working() -> None:
    async with tunnel() as (proxy, _):
        victim, _ = await attack(settings() * 3000)
        assert victim.closing
        stream = await proxy.open_stream("echo-1")
        await stream.send_all(b"fine")
        await stream.send_eof()
        assert await read_all(stream) == b"FINE"


async def test_an_overlong_frame_is_refused_before_it_is_buffered() -> None:
    # A DATA frame header announcing 16 MiB, then a trickle: h2 alone would wait for all of it.
    header = (16 * 1024 * 1024 - 1).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    victim, heard = await attack(connect_headers(1) + header + b"x" * 1000)
    assert "a frame of 16777215 bytes announced" in victim.close_reason
    assert goaway(heard).error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_a_peer_breaking_the_rules_in_its_first_read_ends_the_handshake() -> None:
    """SETTINGS and a flood in one read: the tunnel never counts as started (its opener gets
    TunnelError, not an internal error)."""
    ours, theirs = trio.testing.memory_stream_pair()
    victim = TunnelConnection(theirs, client_side=True)
    await ours.send_all(settings() * 3000)
    async with trio.open_nursery() as nursery:
        with pytest.raises(TunnelError, match="closed during the handshake: flood of control frames"):
            await nursery.start(victim.run)


async def test_a_stream_closed_with_unread_data_gives_its_window_back(autojump_clock: trio.testing.MockClock) -> None:
    """Bytes received but never read still count against the connection's window until the
    stream is released: a proxy dropping streams with unread answers must not starve the rest."""
    limits = TunnelLimits(max_streams=2, stream_window=64 * 1024)  # a 128 KiB connection window

    async def answer(incoming: IncomingStream) -> None:
        stream = incoming.accept()
        await stream.send_all(b"a" * (60 * 1024))
        await stream.send_eof()

    async with tunnel(answer, limits) as (proxy, _):
        for _ in range(10):
            stream = await proxy.open_stream("big")
            with trio.fail_after(10):
                while sum(len(c) for c in proxy.streams[stream.stream_id].chunks) < 60 * 1024:
                    await trio.sleep(0.1)
            await stream.aclose()  # nothing read
        last = await proxy.open_stream("big")
        with trio.fail_after(10):
            assert len(await read_all(last)) == 60 * 1024
