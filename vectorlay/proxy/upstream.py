"""Keep-alive connections to replicas: HTTP/1.1 client codecs over trio streams, pooled per address."""

from __future__ import annotations

import select
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

import trio

from vectorlay.errors import TunnelError
from vectorlay.proxy.codec import (
    DEFAULT_PARSER,
    NEED_DATA,
    Data,
    Headers,
    HttpParser,
    RemoteProtocolError,
    Response,
    Signal,
    client_codec,
)
from vectorlay.proxy.sockio import channel
from vectorlay.tunnel import TunnelStream

READ_SIZE = 64 * 1024
MAX_IDLE_PER_ADDRESS = 64
MAX_HEAD_BYTES = 64 * 1024  # a replica's response head; more is a failed request (502)
# A connection idle for less than this is reused without asking the kernel whether the replica
# closed it: servers keep idle connections open for seconds (uvicorn 5 s, gunicorn 2 s, nginx 75 s),
# and a replica that died meanwhile is caught by the stale-connection retry. Saves a system call on
# nearly every request under load.
FRESH_IDLE_S = 0.5

Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]
Dial = Callable[[], Awaitable[trio.abc.Stream]]  # a tunnel stream to one replica; bounds its own waiting


class UpstreamError(Exception):
    """The replica failed before or while answering (refused, reset, timed out, bad HTTP)."""


class UpstreamConnectError(UpstreamError):
    """No connection to the replica: refused, unreachable or timed out."""


class UpstreamConnection:
    def __init__(self, stream: trio.abc.Stream, address: str, parser: HttpParser, reused: bool = False) -> None:
        self.stream = stream
        self.channel = channel(stream)
        self.address = address
        self.codec = client_codec(parser, MAX_HEAD_BYTES)
        self.reused = reused
        self.received = False  # any byte of the current response arrived
        self.idle_since = 0.0  # time.monotonic() when it was last returned to the pool
        self._pending: list[bytes] = []

    # ---- writing: queued, then sent in one write (head and buffered body together) ----

    def request(self, method: bytes, target: bytes, headers: Headers) -> None:
        self._pending.append(self.codec.send_request(method, target, headers))

    def write(self, data: bytes) -> None:
        self._pending.append(self.codec.send_data(data))

    def end(self) -> None:
        self._pending.append(self.codec.send_end())

    async def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        try:
            await self.channel.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise UpstreamError(f"send to {self.address} failed: {error}") from None

    # ---- reading ----

    def event_nowait(self) -> Response | Data | Signal:
        """The next event if its bytes already arrived (NEED_DATA if not), without waiting."""
        try:
            event = self.codec.next_event()
            if event is NEED_DATA:
                data = self.channel.receive_nowait(READ_SIZE)
                if data is not None:
                    self._received(data)
                    event = self.codec.next_event()
            return event
        except RemoteProtocolError as error:
            raise UpstreamError(f"invalid HTTP from {self.address}: {error}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise UpstreamError(f"read from {self.address} failed: {error}") from None

    async def next_event(self) -> Response | Data | Signal:
        while True:
            event = self.event_nowait()
            if event is not NEED_DATA:
                return event
            try:
                data = await self.channel.receive(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise UpstreamError(f"read from {self.address} failed: {error}") from None
            self._received(data)

    def _received(self, data: bytes) -> None:
        if data:
            self.received = True
        self.codec.receive_data(data)

    def reusable(self) -> bool:
        """HTTP allows another exchange on it (and, for a tunnel stream, its tunnel is not draining)."""
        if isinstance(self.stream, TunnelStream) and not self.stream.reusable():
            return False
        return self.codec.reusable()

    def close_now(self) -> None:
        """Close without waiting (for idle connections to a replica that left routing)."""
        if isinstance(self.stream, TunnelStream):
            self.stream.close_now()  # resets the stream: the node closes its side to the replica
            return
        socket = getattr(self.stream, "socket", None)
        if socket is not None:
            socket.close()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    def still_open(self) -> bool:
        """An idle connection the replica has closed reads as EOF: detect it before reusing it
        (unless it was idle only a moment, see FRESH_IDLE_S). A tunnel stream knows without asking."""
        if isinstance(self.stream, TunnelStream):
            return self.stream.reusable()
        if time.monotonic() - self.idle_since < FRESH_IDLE_S:
            return True
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
    def __init__(self, connect_timeout_s: float = 2.0, connect: Connector = open_tcp,
                 parser: HttpParser = DEFAULT_PARSER) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.connect = connect
        self.parser = parser
        self._idle: defaultdict[str, list[UpstreamConnection]] = defaultdict(list)

    async def acquire(self, address: str, dial: Dial | None = None) -> UpstreamConnection:
        """A kept-alive connection to `address` (a pool key), else a new one: dialled over TCP, or
        opened by `dial` (a tunnel stream)."""
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()
            if connection.still_open():
                connection.reused = True
                connection.received = False
                return connection
            await connection.aclose()
        if dial is not None:
            try:
                return UpstreamConnection(await dial(), address, self.parser)
            except TunnelError as error:
                raise UpstreamConnectError(str(error)) from None
        host, _, port = address.rpartition(":")
        with trio.move_on_after(self.connect_timeout_s) as scope:
            try:
                stream = await self.connect(host.strip("[]"), int(port))
            except (OSError, ValueError) as error:
                reason = getattr(error, "strerror", None) or error
                raise UpstreamConnectError(f"connect to {address} failed: {reason}") from None
        if scope.cancelled_caught:
            raise UpstreamConnectError(f"connect to {address} timed out after {self.connect_timeout_s:g}s")
        return UpstreamConnection(stream, address, self.parser)

    async def release(self, connection: UpstreamConnection) -> None:
        """Keep the connection for the next request if HTTP allows it, else close it."""
        if connection.reusable():
            connection.codec.start_next_cycle()
            idle = self._idle[connection.address]
            if len(idle) < MAX_IDLE_PER_ADDRESS:
                connection.idle_since = time.monotonic()
                idle.append(connection)
                return
        await connection.aclose()

    def forget(self, address: str) -> None:
        """Close the idle connections to `address` (its replica left routing) without waiting."""
        for connection in self._idle.pop(address, []):
            connection.close_now()

    def forget_prefix(self, prefix: str) -> None:
        """Close the idle connections of every key starting with `prefix` (a node's tunnel streams,
        when its tunnel drains)."""
        for key in [k for k in self._idle if k.startswith(prefix)]:
            self.forget(key)

    async def aclose(self) -> None:
        for address in list(self._idle):
            for connection in self._idle.pop(address, []):
                await connection.aclose()
