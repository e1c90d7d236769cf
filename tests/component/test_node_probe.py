"""The health probe against real sockets: each way a replica can fail it is told in the replica's
terms (what it did), never in the HTTP library's (`can't handle event type ConnectionClosed ...`)."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from vectorlay.node.probe import http_probe


async def _replica(behaviour: str, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A replica on a loopback port that answers each connection as `behaviour` says."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)  # the probe's request
        if behaviour == "ok":
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
        elif behaviour == "500":
            await stream.send_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
        elif behaviour == "garbage":
            await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        elif behaviour == "half a head":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-")
        elif behaviour == "reset":
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.socket.close()
            return
        elif behaviour == "silent":
            await trio.sleep_forever()
        await stream.aclose()  # "close": nothing sent at all

    await trio.serve_listeners(handle, listeners)


@pytest.mark.parametrize(("behaviour", "expected"), [
    ("close", (False, "GET /healthz: closed the connection before answering")),
    ("garbage", (False, "GET /healthz: answered with invalid HTTP")),
    ("half a head", (False, "GET /healthz: closed the connection in the middle of its answer")),
    ("reset", (False, "GET /healthz: reset the connection before answering")),
    ("silent", (False, "GET /healthz timed out after 0.5s")),
    ("500", (False, "GET /healthz answered 500")),
    ("ok", (True, "")),
])
async def test_a_failed_probe_says_what_the_replica_did(behaviour: str, expected: tuple[bool, str]) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_replica, behaviour)
        assert await http_probe("127.0.0.1", port, "/healthz", 0.5) == expected
        nursery.cancel_scope.cancel()


async def test_a_port_nobody_listens_on_is_a_refused_connection() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        assert await http_probe("127.0.0.1", port, "/healthz", 0.5) == (
            False, f"refused the connection (nothing listens on port {port} yet)")
