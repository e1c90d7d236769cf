"""Every way opening a link can fail, against real sockets on loopback: one line saying what is
wrong and what to do, at once (never a library's exception name, never a wait for a timeout that
the situation cannot need)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trustme

from vectorlay.errors import ConnectError
from vectorlay.wire import Link, connect, serve

# Long, so that a message that is not about a timeout proves no timeout was waited for.
PATIENT_S = 30.0


async def _idle(path: str, link: Link) -> None:
    await trio.sleep_forever()


async def _tcp_server(answer: bytes | None, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Not a vectorlay server: reads the request, then sends `answer` and closes (None: says nothing)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await stream.receive_some(4096)
            if answer is None:
                await trio.sleep_forever()
            await stream.send_all(answer)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    await trio.serve_listeners(handle, listeners)


@dataclass
class Servers:
    plain: int  # a vectorlay server on ws://
    tls: int  # a vectorlay server on wss://, with a CA of its own
    ca: trustme.CA
    free: int  # a port nobody listens on


@asynccontextmanager
async def servers() -> AsyncIterator[Servers]:
    ca = trustme.CA()
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]  # bound but not listening: refused
        async with trio.open_nursery() as nursery:
            plain = await nursery.start(serve, _idle, "127.0.0.1", 0, frozenset({"/v1/api"}))
            tls = await nursery.start(serve, _idle, "127.0.0.1", 0, frozenset({"/v1/api"}), server_ssl)
            yield Servers(plain.port, tls.port, ca, free)
            nursery.cancel_scope.cancel()


async def _failure(url: str, context: ssl.SSLContext | None = None, timeout_s: float = PATIENT_S) -> str:
    with pytest.raises(ConnectError) as failed:
        async with connect(url, context, timeout_s):
            pass
    message = str(failed.value)
    assert message.startswith(f"cannot reach the server at {url}: "), message
    assert "\n" not in message
    return message.removeprefix(f"cannot reach the server at {url}: ")


async def test_nothing_listening_says_so_for_ws_and_wss() -> None:
    async with servers() as s:
        for scheme in ("ws", "wss"):
            assert await _failure(f"{scheme}://127.0.0.1:{s.free}/v1/api") == (
                f"nothing listens at 127.0.0.1:{s.free} — is the server running, and is the port right?")


async def test_an_unknown_host_is_named() -> None:
    problem = await _failure("ws://no-such-host.invalid:7070/v1/api")
    assert problem.startswith("cannot find the host 'no-such-host.invalid' (")


async def test_plain_ws_to_a_tls_server_is_told_to_use_wss() -> None:
    async with servers() as s:
        assert await _failure(f"ws://127.0.0.1:{s.tls}/v1/api") == (
            f"the server uses TLS: use wss://127.0.0.1:{s.tls} instead of ws://")


async def test_wss_to_a_plain_server_is_told_to_use_ws() -> None:
    async with servers() as s:
        assert await _failure(f"wss://127.0.0.1:{s.plain}/v1/api") == (
            f"the server does not use TLS: use ws://127.0.0.1:{s.plain} instead of wss://")


async def test_a_tls_server_whose_ca_is_not_trusted_points_at_a_pinned_token() -> None:
    """A token without the CA's pin makes the client fall back to the system's CAs."""
    async with servers() as s:
        problem = await _failure(f"wss://127.0.0.1:{s.tls}/v1/api", ssl.create_default_context())
        assert problem.startswith("the server's TLS certificate is not trusted (")
        assert "use a token from `vectorlay token create`, which carries that CA's pin" in problem


async def test_a_trusted_tls_server_connects() -> None:
    async with servers() as s:
        context = ssl.create_default_context()
        s.ca.configure_trust(context)
        async with connect(f"wss://127.0.0.1:{s.tls}/v1/api", context) as link:
            assert link.remote == f"127.0.0.1:{s.tls}"


async def test_a_wrong_path_is_a_404_that_names_it() -> None:
    async with servers() as s:
        assert await _failure(f"ws://127.0.0.1:{s.plain}/v2/nope") == (
            f"the server has no /v2/nope (HTTP 404): is 127.0.0.1:{s.plain} a vectorlay server, "
            "and is the URL just scheme://host:port?")


@pytest.mark.parametrize(("answer", "expected"), [
    (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
     "the server answered HTTP 200 instead of a WebSocket handshake: is this a vectorlay server?"),
    (b"SSH-2.0-OpenSSH_9.2\r\n",
     "the server does not speak HTTP (it sent 'SSH-2.0-OpenSSH_9.2'): is this the vectorlay server's address?"),
    (b"", "the server closed the connection without answering: is this a vectorlay server? "
          "if it uses TLS, use wss://127.0.0.1:{port}"),
])
async def test_a_server_that_is_not_vectorlay_is_described_by_what_it_sent(answer: bytes, expected: str) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_tcp_server, answer)
        assert await _failure(f"ws://127.0.0.1:{port}/v1/api") == expected.format(port=port)
        nursery.cancel_scope.cancel()


async def test_a_server_that_never_answers_times_out_saying_where() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_tcp_server, None)
        assert await _failure(f"ws://127.0.0.1:{port}/v1/api", timeout_s=0.5) == (
            "the server accepted the connection but did not answer within 0.5s: is it a vectorlay server?")
        nursery.cancel_scope.cancel()


async def test_an_invalid_url_is_refused_before_connecting() -> None:
    for url in ("http://127.0.0.1:7070", "ws://", "ws://127.0.0.1:notaport"):
        with pytest.raises(ConnectError, match="invalid server URL"):
            async with connect(url):
                pass
