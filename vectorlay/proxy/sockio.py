"""Sending and receiving a connection's bytes, with a short path for plain TCP sockets.

trio's SocketStream wraps each call in several layers (a conflict detector, an error-translating
context manager, the socket wrapper's try-then-wait helper); with HTTP parsing down to a few µs a
request, those layers cost more than the parsing. On a plain socket (POSIX) the proxy makes the
system call itself and waits with trio.lowlevel, keeping trio's rules: cancellation is checked
before each call, and a call that completes without waiting still yields to the scheduler, so
one busy connection cannot starve the others. Other streams (TLS; in-memory ones in tests) go
through their own methods.
"""

from __future__ import annotations

import os

import trio

from vectorlay.tunnel import TunnelStream


class Channel:
    """The stream's own send_all and receive_some."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def receive(self, max_bytes: int) -> bytes:
        """Some bytes, or b"" once the peer closed its side; raises trio's or the OS's errors."""
        return bytes(await self.stream.receive_some(max_bytes))

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """Bytes that already arrived (b"" if the peer closed), without waiting or yielding;
        None if none did, or if the stream cannot tell."""
        return None

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)


class SocketChannel(Channel):
    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self.socket = stream.socket

    async def receive(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        fd = self.socket.fileno()  # -1 once closed: the call fails instead of reading a reused number
        try:
            data = os.read(fd, max_bytes)
        except BlockingIOError:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    return os.read(fd, max_bytes)
                except BlockingIOError:
                    pass
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        try:
            return os.read(self.socket.fileno(), max_bytes)
        except BlockingIOError:
            return None

    async def send_all(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        fd = self.socket.fileno()
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        view = memoryview(data)
        while sent < len(data):
            await trio.lowlevel.wait_writable(fd)
            try:
                sent += os.write(fd, view[sent:])
            except BlockingIOError:
                pass


class TunnelChannel(Channel):
    """A tunnel stream knows what already arrived without a system call."""

    def __init__(self, stream: TunnelStream) -> None:
        super().__init__(stream)
        self.tunnel = stream

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        return self.tunnel.receive_nowait(max_bytes)


def channel(stream: trio.abc.Stream) -> Channel:
    if os.name == "posix" and isinstance(stream, trio.SocketStream):
        return SocketChannel(stream)
    if isinstance(stream, TunnelStream):
        return TunnelChannel(stream)
    return Channel(stream)
