"""Keep-alive connections to replicas: h11 client connections pooled per address."""

from __future__ import annotations

import select
from collections import defaultdict
from collections.abc import Awaitable, Callable

import h11
import trio

READ_SIZE = 64 * 1024
MAX_IDLE_PER_ADDRESS = 64

Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]


class UpstreamError(Exception):
    """The replica failed before or while answering (refused, reset, timed out, bad HTTP)."""


class UpstreamConnectError(UpstreamError):
    """No connection to the replica: refused, unreachable or timed out."""


class UpstreamConnection:
    def __init__(self, stream: trio.abc.Stream, address: str, reused: bool = False) -> None:
        self.stream = stream
        self.address = address
        self.conn = h11.Connection(h11.CLIENT)
        self.reused = reused
        self.received = False  # any byte of the current response arrived
        self._pending = bytearray()

    def queue(self, event: h11.Event) -> None:
        """Serialise `event` now and send it with the next flush (one write for head and body)."""
        data = self.conn.send(event)
        if data:
            self._pending += data

    async def flush(self) -> None:
        if not self._pending:
            return
        data, self._pending = bytes(self._pending), bytearray()
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise UpstreamError(f"send to {self.address} failed: {error}") from None

    async def send(self, event: h11.Event) -> None:
        self.queue(event)
        await self.flush()

    def buffered_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event if it is already in the buffer (NEED_DATA if not): no I/O."""
        try:
            return self.conn.next_event()
        except h11.RemoteProtocolError as error:
            raise UpstreamError(f"invalid HTTP from {self.address}: {error}") from None

    async def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.buffered_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise UpstreamError(f"read from {self.address} failed: {error}") from None
            if data:
                self.received = True
            self.conn.receive_data(bytes(data))

    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def close_now(self) -> None:
        """Close without waiting (for idle connections to a replica that left routing)."""
        socket = getattr(self.stream, "socket", None)
        if socket is not None:
            socket.close()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    def still_open(self) -> bool:
        """An idle connection the replica has closed reads as EOF: detect it before reusing it."""
        socket = getattr(self.stream, "socket", None)
        if socket is None:
            return True  # not a socket (tests): a stale one fails on use and is retried
        try:
            readable, _, _ = select.select([socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable  # idle HTTP/1.1: anything readable means EOF or junk


async def open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


class UpstreamPool:
    def __init__(self, connect_timeout_s: float = 2.0, connect: Connector = open_tcp) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.connect = connect
        self._idle: defaultdict[str, list[UpstreamConnection]] = defaultdict(list)

    async def acquire(self, address: str) -> UpstreamConnection:
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()
            if connection.still_open():
                connection.reused = True
                connection.received = False
                return connection
            await connection.aclose()
        host, _, port = address.rpartition(":")
        with trio.move_on_after(self.connect_timeout_s) as scope:
            try:
                stream = await self.connect(host.strip("[]"), int(port))
            except (OSError, ValueError) as error:
                reason = getattr(error, "strerror", None) or error
                raise UpstreamConnectError(f"connect to {address} failed: {reason}") from None
        if scope.cancelled_caught:
            raise UpstreamConnectError(f"connect to {address} timed out after {self.connect_timeout_s:g}s")
        return UpstreamConnection(stream, address)

    async def release(self, connection: UpstreamConnection) -> None:
        """Keep the connection for the next request if HTTP allows it, else close it."""
        if connection.reusable():
            connection.conn.start_next_cycle()
            idle = self._idle[connection.address]
            if len(idle) < MAX_IDLE_PER_ADDRESS:
                idle.append(connection)
                return
        await connection.aclose()

    def forget(self, address: str) -> None:
        """Close the idle connections to `address` (its replica left routing) without waiting."""
        for connection in self._idle.pop(address, []):
            connection.close_now()

    async def aclose(self) -> None:
        for address in list(self._idle):
            for connection in self._idle.pop(address, []):
                await connection.aclose()
