"""One tunnel stream as a trio byte stream, so HTTP/1.1 code runs over it unchanged.

`TunnelStream` implements `trio.abc.HalfCloseableStream`: `send_all` waits for the peer's flow
control window (a reader that stops reading stops the writer), `receive_some` hands back what
arrived and only then gives that much window back, `send_eof` ends our side, and `aclose` resets
the stream unless both sides ended it (the peer learns at once that we left).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import h2.exceptions
import trio

if TYPE_CHECKING:
    from vectorlay.tunnel.connection import TunnelConnection


class StreamState:
    """What the connection knows of one stream; shared by the connection and the stream's owner."""

    __slots__ = ("broken", "chunks", "connection", "ended", "id", "local_ended", "response", "unacked", "_lot",
                 "_send_lot")

    def __init__(self, connection: TunnelConnection, stream_id: int) -> None:
        self.connection = connection
        self.id = stream_id
        self.chunks: deque[bytes] = deque()  # received, not read yet: at most the stream window
        self.ended = False  # the peer ended its side
        self.local_ended = False
        self.broken: str | None = None  # why the stream can no longer carry anything
        self.response: list[tuple[bytes, bytes]] | None = None  # the peer's answer (client side)
        self.unacked = 0  # read, not yet acknowledged to the sender (see TunnelConnection.consumed)
        self._lot = trio.lowlevel.ParkingLot()  # the reader, or the opener waiting for an answer
        self._send_lot = trio.lowlevel.ParkingLot()  # the writer waiting for window

    def push(self, data: bytes) -> None:
        self.chunks.append(data)
        self._lot.unpark_all()

    def wake(self) -> None:
        self._lot.unpark_all()

    def wake_sender(self) -> None:
        self._send_lot.unpark_all()

    def break_(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        self._lot.unpark_all()
        self._send_lot.unpark_all()

    async def wait(self) -> None:
        await self._lot.park()

    async def wait_window(self) -> None:
        await self._send_lot.park()


class TunnelStream(trio.abc.HalfCloseableStream):
    def __init__(self, connection: TunnelConnection, state: StreamState) -> None:
        self.connection = connection
        self._state = state
        self._closed = False
        self._sending = False
        self._receiving = False

    @property
    def stream_id(self) -> int:
        return self._state.id

    def reusable(self) -> bool:
        """Whether another exchange may start on it: open both ways on a tunnel that is not
        closing or draining (a draining tunnel is being replaced)."""
        state = self._state
        connection = self.connection
        return not (self._closed or state.broken is not None or state.ended or state.local_ended
                    or connection.closing or connection.draining)

    # ---- sending ----

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            connection = self.connection
            h2c = connection.h2
            state = self._state
            payload = bytes(data)
            total = len(payload)
            sent = 0
            while sent < total:
                self._check_send()
                try:
                    window = h2c.local_flow_control_window(state.id)
                except h2.exceptions.ProtocolError:
                    raise trio.BrokenResourceError(state.broken or "stream closed") from None
                if window <= 0:
                    waited = True
                    await state.wait_window()
                    continue
                size = min(window, h2c.max_outbound_frame_size, total - sent)
                try:
                    h2c.send_data(state.id, payload if size == total else payload[sent:sent + size])
                except h2.exceptions.ProtocolError as error:
                    raise trio.BrokenResourceError(f"stream closed: {error}") from None
                sent += size
                connection.bytes_sent += size
                connection._wake_writer()
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream is closed")
        if self._state.local_ended:
            raise trio.ClosedResourceError("send_eof was already called")
        if self._state.broken is not None:
            raise trio.BrokenResourceError(self._state.broken)

    async def wait_send_all_might_not_block(self) -> None:
        state = self._state
        while state.broken is None and not self._closed:
            try:
                if self.connection.h2.local_flow_control_window(state.id) > 0:
                    break
            except h2.exceptions.ProtocolError:
                break
            await state.wait_window()
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("this stream is closed")
        state = self._state
        if not state.local_ended:
            if state.broken is not None:
                raise trio.BrokenResourceError(state.broken)
            try:
                self.connection.h2.end_stream(state.id)
            except h2.exceptions.ProtocolError as error:
                raise trio.BrokenResourceError(f"stream closed: {error}") from None
            state.local_ended = True
            self.connection._wake_writer()
        await trio.lowlevel.cancel_shielded_checkpoint()

    # ---- receiving ----

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            state = self._state
            waited = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream is closed")
                if state.chunks:
                    data = _take(state.chunks, max_bytes)
                    self.connection.consumed(state, len(data))
                    break
                if state.ended:
                    data = b""
                    break
                if state.broken is not None:
                    raise trio.BrokenResourceError(state.broken)
                waited = True
                await state.wait()
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """What already arrived (b"" at the end), without waiting or yielding; None if nothing did
        (or the stream broke: `receive_some` says how)."""
        state = self._state
        if self._closed or self._receiving:
            return None
        if state.chunks:
            data = _take(state.chunks, max_bytes)
            self.connection.consumed(state, len(data))
            return data
        return b"" if state.ended else None

    # ---- closing ----

    def close_now(self) -> None:
        """Close without waiting: reset the stream unless both sides ended it."""
        if not self._closed:
            self._closed = True
            self.connection.release(self._state)

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()


def _take(chunks: deque[bytes], max_bytes: int | None) -> bytes:
    """As much as fits in `max_bytes` from the front of `chunks` (all of it when None)."""
    first = chunks[0]
    if max_bytes is not None and len(first) > max_bytes:
        chunks[0] = first[max_bytes:]
        return first[:max_bytes]
    chunks.popleft()
    if not chunks or (max_bytes is not None and len(first) + len(chunks[0]) > max_bytes):
        return first
    parts = [first]
    size = len(first)
    while chunks and (max_bytes is None or size + len(chunks[0]) <= max_bytes):
        chunk = chunks.popleft()
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)
