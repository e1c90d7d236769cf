"""One client connection: h11 server side over a trio stream, with the deadlines that stop slow clients.

Writes are queued and flushed together, so a small response (head, body and end) leaves in one
write; a streamed response is flushed whenever the proxy would otherwise wait for the replica.
"""

from __future__ import annotations

import h11
import trio

from vectorlay.proxy.limits import ProxyLimits

READ_SIZE = 64 * 1024


class ClientGone(Exception):
    """The client closed its connection or stopped reading: stop work on its behalf."""


class HeaderTimeout(Exception):
    """The client started a request but did not finish its headers in time (slowloris)."""


_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ClientConnection:
    def __init__(self, stream: trio.abc.Stream, limits: ProxyLimits, peer: str, scheme: str) -> None:
        self.stream = stream
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.peer = peer
        self.scheme = scheme
        self.idle_scope: trio.CancelScope | None = None  # set while waiting for a next request
        self.request_length = b""  # the current request's Content-Length header, if any
        self.unread_input = False  # answered an error without reading all the client sent
        self._pending = bytearray()

    async def next_request(self) -> h11.Event | None:
        """The next request's head (or another event to act on); None when the connection should
        end quietly: the client closed it or sent nothing for the idle timeout.

        The idle timeout runs until the request's first byte; from then on the whole head must
        arrive within the header timeout, however slowly it trickles in.
        """
        now = trio.current_time()
        started = bool(self.conn.trailing_data[0])  # a pipelined request already began
        deadline = now + (self.limits.header_timeout_s if started else self.limits.idle_timeout_s)
        with trio.CancelScope(deadline=deadline) as scope:
            self.idle_scope = None if started else scope
            while True:
                event = self.conn.next_event()
                if isinstance(event, h11.Event):
                    self.idle_scope = None
                    return event
                if event is h11.PAUSED:
                    return None  # cannot happen between cycles; end the connection if it does
                data = await self._receive()
                if not started and data:
                    started = True
                    self.idle_scope = None
                    scope.deadline = trio.current_time() + self.limits.header_timeout_s
                self.conn.receive_data(data)
        self.idle_scope = None
        if started:
            raise HeaderTimeout()
        return None

    async def next_body_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event of the request body; the client may pause at most the body timeout."""
        event = self.conn.next_event()
        while event is h11.NEED_DATA:
            with trio.fail_after(self.limits.body_timeout_s):
                data = await self._receive()
            self.conn.receive_data(data)
            event = self.conn.next_event()
        return event

    async def _receive(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(READ_SIZE))
        except _IO_ERRORS:
            raise ClientGone() from None

    def queue(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self._pending += data

    async def flush(self) -> None:
        if not self._pending:
            return
        data, self._pending = bytes(self._pending), bytearray()
        try:
            await self.stream.send_all(data)
        except _IO_ERRORS:
            raise ClientGone() from None

    async def send(self, event: h11.Event) -> None:
        self.queue(event)
        await self.flush()

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    @property
    def response_started(self) -> bool:
        return self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    async def wait_gone(self) -> None:
        """Return once the client closes its side (used while a response is awaited or streamed).

        Bytes that arrive meanwhile (a pipelined next request) are kept for h11, up to the header
        limit; past that the watch stops reading, which is back-pressure, not an error.
        """
        budget = self.limits.max_header_bytes
        while budget > 0:
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except _IO_ERRORS:
                return
            if not data:
                return
            budget -= len(data)
            self.conn.receive_data(bytes(data))
        await trio.sleep_forever()
