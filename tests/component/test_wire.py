"""Link over real TLS on loopback: a send that is cancelled halfway still finishes its message,
so the close frame after it arrives intact and the peer learns why it was dropped."""

from __future__ import annotations

import socket
import ssl

import trio
import trustme
from trio_websocket import ConnectionClosed, open_websocket_url

from vectorlay.core.protocol import LogsData
from vectorlay.wire import CLOSE_POLICY, Link, serve


def _tcp(stream: object) -> socket.socket:
    """The OS socket under a trio SSLStream."""
    return stream.transport_stream.socket  # type: ignore[attr-defined,no-any-return]


async def test_a_cancelled_send_on_tls_still_delivers_the_message_and_the_close_reason() -> None:
    ca = trustme.CA()
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    big = LogsData(1, tuple("x" * 1000 for _ in range(3000)))  # about 3 MB: far more than the socket buffers
    outcome: dict[str, object] = {}

    async def handler(path: str, link: Link) -> None:
        _tcp(link.ws._stream).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        await link.send(LogsData(1, ("a",)))
        await link.send(LogsData(1, ("b",)))
        with trio.move_on_after(0.3) as scope:
            # The client reads no further than "b" (its queue holds one message): this waits for it.
            await link.send(big)
        outcome["cancelled"] = scope.cancel_called
        await link.close(CLOSE_POLICY, "dropped for a reason")

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, handler, "127.0.0.1", 0, frozenset({"/t"}), server_ssl)
        url = f"wss://127.0.0.1:{server.port}/t"
        async with open_websocket_url(url, client_ssl, message_queue_size=1,
                                      max_message_size=8 * 1024 * 1024) as ws:
            # A fixed receive buffer: autotuning would otherwise soak up the whole message unread.
            _tcp(ws._stream).setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            await trio.sleep(1.0)  # past the server's cancellation, with its send half done
            received = []
            try:
                while True:
                    received.append(await ws.get_message())
            except ConnectionClosed as closed:
                assert closed.reason is not None
                code, reason = closed.reason.code, closed.reason.reason
        nursery.cancel_scope.cancel()
    assert outcome["cancelled"] is True  # the cancellation did arrive mid-send...
    assert len(received) == 3 and len(received[2]) > 3_000_000  # ...yet the message went out whole
    assert (code, reason) == (CLOSE_POLICY, "dropped for a reason")
