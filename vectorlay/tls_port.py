"""A TLS port that answers a plain-HTTP client in plain HTTP, so that it learns its mistake at once.

A client that speaks ws:// to a wss:// server sends an HTTP request where a TLS ClientHello
belongs; the TLS layer would wait for more and the client would hear nothing until a timeout.
Here the first bytes are looked at: a TLS handshake goes on as usual, anything else gets a short
`400` saying "this server uses TLS" (as nginx does on its HTTPS ports) and the connection closes.
"""

from __future__ import annotations

import ssl

import trio

TLS_HANDSHAKE = 0x16  # the record type every TLS connection starts with (the ClientHello)
_BODY = b"this server uses TLS: connect with wss://\n"
PLAIN_HTTP_ANSWER = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                     b"connection: close\r\n\r\n%s" % (len(_BODY), _BODY))
ANSWER_TIMEOUT_S = 1.0


class TlsPortListener(trio.abc.Listener[trio.SSLStream[trio.abc.Stream]]):
    """Like trio.SSLListener (https_compatible), with a plain answer to plain HTTP."""

    def __init__(self, listener: trio.SocketListener, context: ssl.SSLContext) -> None:
        self.listener = listener
        self.context = context

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.listener.socket

    async def accept(self) -> trio.SSLStream[trio.abc.Stream]:
        tcp = await self.listener.accept()
        return trio.SSLStream(_FirstBytes(tcp), self.context, server_side=True, https_compatible=True)

    async def aclose(self) -> None:
        await self.listener.aclose()


class _FirstBytes(trio.abc.HalfCloseableStream):
    """The transport under the TLS layer: checks the client's first bytes, then just passes through."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.checked = False

    @property
    def socket(self) -> trio.socket.SocketType:
        """trio-websocket reads the peer's address from here."""
        return self.stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        if not self.checked and data:
            self.checked = True
            if data[0] != TLS_HANDSHAKE:
                with trio.move_on_after(ANSWER_TIMEOUT_S):
                    try:
                        await self.stream.send_all(PLAIN_HTTP_ANSWER)
                        await self.stream.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                raise trio.BrokenResourceError("a plain-text client on a TLS port")
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
