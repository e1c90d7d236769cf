"""One client connection: an HTTP/1.1 server codec over a trio stream, with the deadlines that stop slow clients.

Writes are queued and flushed together, so a small response (head, body and end) leaves in one
write; a streamed response is flushed whenever the proxy would otherwise wait for the replica.
"""

from __future__ import annotations

import trio

from vectorlay.proxy.admission import ConnectionAdmission
from vectorlay.proxy.codec import NEED_DATA, Data, Headers, HttpParser, Request, Signal, server_codec
from vectorlay.proxy.deadlines import DeadlineKeeper
from vectorlay.proxy.limits import ProxyLimits
from vectorlay.proxy.sockio import channel

READ_SIZE = 64 * 1024


class ClientGone(Exception):
    """The client closed its connection or stopped reading: stop work on its behalf."""


_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ClientConnection:
    def __init__(self, stream: trio.abc.Stream, limits: ProxyLimits, peer: str, scheme: str,
                 parser: HttpParser, deadlines: DeadlineKeeper, admission: ConnectionAdmission) -> None:
        self.stream = stream
        self.channel = channel(stream)
        self.limits = limits
        self.codec = server_codec(parser, limits.max_header_bytes)
        self.peer = peer
        self.scheme = scheme
        self.peer_bytes = peer.encode()  # for X-Forwarded-For, once per connection
        self.scheme_bytes = scheme.encode()
        self.deadlines = deadlines
        self.admission = admission  # told while this connection waits for a request (it may be closed for room)
        self.evicted = False  # closed to make room for a new connection (see admission.py)
        # Around the whole connection (entered by Proxy.handle_connection); cancelled when a wait
        # for the client outlasts its deadline, or when draining finds the connection idle.
        self.scope = trio.CancelScope()
        self.armed_with: object | None = None  # the current wait's deadline, if any (see `deadlines`)
        self.in_head = False  # that wait is for the rest of a started head (else for a first byte)
        self.timed_out_in_head = False  # the header deadline passed: the client gets 408
        self.request_length = b""  # the current request's Content-Length header, if any
        self.unread_input = False  # answered an error without reading all the client sent
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._queued_status: int | None = None  # of a response head queued and not yet sent
        self.sent_status: int | None = None  # of the current request's response head, once sent

    async def next_request(self) -> Request | None:
        """The next request's head; None when the client closed the connection between requests.

        The idle timeout runs until the request's first byte; from then on the whole head must
        arrive within the header timeout, however slowly it trickles in. Either deadline (or the
        proxy draining) cancels `scope`, which Proxy.handle_connection holds around the whole
        connection: see `expire`. Raises RemoteProtocolError for a broken request.
        """
        codec = self.codec
        event = codec.next_event()
        if event is NEED_DATA:
            # A head that has already arrived whole needs no deadline: the common keep-alive case.
            data = self._receive_nowait()
            if data is not None:
                codec.receive_data(data)
                event = codec.next_event()
        if event is not NEED_DATA:
            return event if isinstance(event, Request) else None
        deadlines = self.deadlines
        self.in_head = started = codec.request_started
        deadlines.arm(self, trio.current_time() + (self.limits.header_timeout_s if started
                                                   else self.limits.idle_timeout_s))
        if not started:
            self.admission.waiting(self)
        try:
            while event is NEED_DATA:
                data = await self._receive()
                if not started and data:
                    self.in_head = started = True
                    self.admission.busy(self)
                    deadlines.arm(self, trio.current_time() + self.limits.header_timeout_s)
                codec.receive_data(data)
                event = codec.next_event()
        finally:
            deadlines.disarm(self)
            self.admission.busy(self)
        if self.scope.cancel_called:
            # The deadline passed as the last bytes came in: too late, as if they had not. The
            # checkpoint raises Cancelled, so this ends the way every timeout does.
            await trio.lowlevel.checkpoint()
        return event if isinstance(event, Request) else None

    @property
    def waiting_idle(self) -> bool:
        """Waiting for the first byte of a next request (what draining closes at once)."""
        return self.armed_with is not None and not self.in_head

    def evict(self) -> None:
        """Close this idle connection to make room for a new one (called by ConnectionAdmission)."""
        self.evicted = True
        self.scope.cancel()

    def expire(self) -> None:
        """The idle or header deadline passed (called by the DeadlineKeeper): end the connection.
        Proxy.handle_connection answers 408 if `timed_out_in_head`, else closes it quietly."""
        self.timed_out_in_head = self.in_head
        self.scope.cancel()

    async def next_body_event(self) -> Request | Data | Signal:
        """The next event of the request body; the client may pause at most the body timeout."""
        event = self.codec.next_event()
        while event is NEED_DATA:
            with trio.fail_after(self.limits.body_timeout_s):
                data = await self._receive()
            self.codec.receive_data(data)
            event = self.codec.next_event()
        return event

    def _receive_nowait(self) -> bytes | None:
        try:
            return self.channel.receive_nowait(READ_SIZE)
        except _IO_ERRORS:
            raise ClientGone() from None

    async def _receive(self) -> bytes:
        try:
            return await self.channel.receive(READ_SIZE)
        except _IO_ERRORS:
            raise ClientGone() from None

    # ---- writing: queued, then sent in one write ----

    def respond(self, status: int, reason: bytes, headers: Headers, close: bool = False) -> None:
        self._queue(self.codec.send_response(status, reason, headers, close))
        self._queued_status = status

    def inform(self, status: int, reason: bytes) -> None:
        self._queue(self.codec.send_informational(status, reason))

    def write(self, data: bytes) -> None:
        self._queue(self.codec.send_data(data))

    def end(self) -> None:
        self._queue(self.codec.send_end())

    def _queue(self, data: bytes) -> None:
        if data:
            self._pending.append(data)
            self._pending_bytes += len(data)

    async def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        self._pending_bytes = 0
        try:
            await self.channel.send_all(data)
        except _IO_ERRORS:
            raise ClientGone() from None
        if self._queued_status is not None:
            self.sent_status, self._queued_status = self._queued_status, None

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def response_started(self) -> bool:
        return self.codec.response_started

    async def wait_gone(self) -> None:
        """Return once the client closes its side (used while a response is awaited or streamed).

        Bytes that arrive meanwhile (a pipelined next request) are kept for the codec, up to the
        header limit; past that the watch stops reading, which is back-pressure, not an error.
        """
        budget = self.limits.max_header_bytes
        while budget > 0:
            try:
                data = await self.channel.receive(READ_SIZE)
            except _IO_ERRORS:
                return
            if not data:
                return
            budget -= len(data)
            self.codec.receive_data(data)
        await trio.sleep_forever()
