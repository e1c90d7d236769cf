"""TLS on a socket as a trio stream, without trio.SSLStream's memory-BIO round trips.

trio's SSLStream runs OpenSSL on memory buffers and moves every record through Python (several
awaits and copies per call); for a tunnel that carries every request of a node, that was about a
fifth of the proxy's time per request (bench/tunnel.py, BENCHMARKS.md). Here OpenSSL reads and
writes the (non-blocking) socket itself, and trio only waits for it to become readable or
writable, keeping trio's rules: a checkpoint per call, cancellation checked before doing anything.
One task may receive while another sends (OpenSSL calls never overlap: trio is one thread).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio


class TlsSocketStream(trio.abc.Stream):
    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.tls = tls
        self._fd = tls.fileno()
        self._closed = False

    @classmethod
    async def wrap(cls, stream: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool,
                   server_hostname: str | None = None) -> TlsSocketStream:
        """TLS over an open TCP stream, handshake done; trio.BrokenResourceError if it fails
        (the stream is closed then)."""
        raw = socket.socket(fileno=stream.socket.detach())
        try:
            tls = context.wrap_socket(raw, server_side=server_side, server_hostname=server_hostname,
                                      do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as error:
            raw.close()
            raise trio.BrokenResourceError(error) from error
        tls.setblocking(False)
        wrapped = cls(tls)
        done = False
        try:
            await wrapped._retry(tls.do_handshake)
            done = True
        finally:
            if not done:  # failed, or cancelled (a handshake deadline)
                wrapped.close_now()
        return wrapped

    def getpeercert(self) -> dict[str, Any] | None:
        return self.tls.getpeercert()

    async def _retry(self, call: Any, *args: Any, receiving: bool = False) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this stream is closed")
            try:
                result = call(*args)
            except ssl.SSLWantReadError:
                waited = True
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except ssl.SSLWantWriteError:
                waited = True
                await trio.lowlevel.wait_writable(self._fd)
                continue
            except ssl.SSLZeroReturnError as error:
                if not receiving:
                    raise trio.BrokenResourceError(error) from error
                result = b""  # the peer closed its side cleanly
            except (ssl.SSLError, OSError) as error:
                raise trio.BrokenResourceError(error) from error
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return result

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self._retry(self.tls.recv, max_bytes or 65536, receiving=True))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            sent += await self._retry(self.tls.send, view[sent:])

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._fd)

    def close_now(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._fd)
            self.tls.close()

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()
