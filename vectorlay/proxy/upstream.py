"""Keep-alive connections to replicas: h11 client connections pooled per address."""

from __future__ import annotations

import select
from collections import defaultdict

import h11
import trio

READ_SIZE = 64 * 1024
MAX_IDLE_PER_ADDRESS = 64


class UpstreamError(Exception):
    """The replica failed before or while answering (refused, reset, timed out, bad HTTP)."""


class UpstreamConnection:
    def __init__(self, stream: trio.SocketStream, address: str, reused: bool = False) -> None:
        self.stream = stream
        self.address = address
        self.conn = h11.Connection(h11.CLIENT)
        self.reused = reused

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise UpstreamError(f"send to {self.address} failed: {error}") from None

    async def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as error:
                raise UpstreamError(f"invalid HTTP from {self.address}: {error}") from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise UpstreamError(f"read from {self.address} failed: {error}") from None
            self.conn.receive_data(data)

    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class UpstreamPool:
    def __init__(self, connect_timeout_s: float = 2.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._idle: defaultdict[str, list[UpstreamConnection]] = defaultdict(list)

    async def acquire(self, address: str) -> UpstreamConnection:
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()
            if _still_open(connection):
                connection.reused = True
                return connection
            await connection.aclose()
        host, _, port = address.rpartition(":")
        with trio.move_on_after(self.connect_timeout_s) as scope:
            try:
                stream = await trio.open_tcp_stream(host, int(port))
            except OSError as error:
                raise UpstreamError(f"connect to {address} failed: {error.strerror or error}") from None
        if scope.cancelled_caught:
            raise UpstreamError(f"connect to {address} timed out after {self.connect_timeout_s:g}s")
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

    async def close_address(self, address: str) -> None:
        for connection in self._idle.pop(address, []):
            await connection.aclose()

    async def aclose(self) -> None:
        for address in list(self._idle):
            await self.close_address(address)


def _still_open(connection: UpstreamConnection) -> bool:
    """An idle connection the replica has closed reads as EOF: detect it before reusing it."""
    sock = connection.stream.socket
    try:
        readable, _, _ = select.select([sock.fileno()], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable  # idle HTTP/1.1: anything readable means EOF or junk
