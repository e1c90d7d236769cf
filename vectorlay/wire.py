"""Our one wrapper around trio-websocket: typed messages in, typed messages out.

Every role uses `Link` for its WebSocket, so decoding, size limits, close codes and the
translation of trio-websocket's exceptions into ours live in one place.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    wrap_client_stream,
)

from vectorlay import dial, tls
from vectorlay.core.protocol import MAX_MESSAGE_BYTES, CaBundle, Message, decode, encode
from vectorlay.core.tokens import token_pin
from vectorlay.errors import AuthError, ConnectError, PeerError, ProtocolError, unwrap_group
from vectorlay.listen import open_listeners
from vectorlay.tls_port import TlsPortListener

M = TypeVar("M", bound=Message)
log = logging.getLogger("vectorlay.wire")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008  # authentication or authorisation failed
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013  # the server cannot serve this now (its database is away): come back later
CONNECT_TIMEOUT_S = 10.0
DISCONNECT_TIMEOUT_S = 2.0  # for the closing handshake; a peer that does not answer is cut off
# How long one message may take to leave once its send has begun. Sends are not cancellable
# (see Link.send), so this bounds how long a peer that stopped reading can hold us up.
SEND_STALL_S = 10.0


class LinkClosed(PeerError):
    """The other end closed the link (or it broke); `code` and `reason` say why when known."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        self.code = code
        self.reason = reason or ""
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")


class Link:
    """One WebSocket carrying protocol messages."""

    def __init__(self, ws: WebSocketConnection, remote: str | None = None) -> None:
        self.ws = ws
        if remote is not None:
            self.remote = remote
            return
        try:
            found = ws.remote
            self.remote = str(found) if isinstance(found, str) else f"{found.address}:{found.port}"
        except OSError:
            self.remote = "unknown peer"  # the socket is already gone

    async def send(self, message: Message) -> None:
        """Send one message whole.

        Shielded: a send cancelled halfway leaves a TLS stream broken, so the close frame that
        tells the peer why it is being dropped could never follow it. A send that stalls for
        SEND_STALL_S (the peer stopped reading) gives up and the link counts as closed."""
        data = encode(message)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + SEND_STALL_S
            try:
                await self.ws.send_message(data)
            except ConnectionClosed as closed:
                raise _closed(closed) from None
        if scope.cancelled_caught:
            raise LinkClosed(None, f"peer did not read a message for {SEND_STALL_S:g}s")

    async def receive(self, allowed: tuple[type[Message], ...]) -> Message:
        """The next message; ProtocolError if it is malformed or not allowed here."""
        try:
            text = await self.ws.get_message()
        except ConnectionClosed as closed:
            raise _closed(closed) from None
        return decode(text, allowed)

    async def receive_one(self, kind: type[M]) -> M:
        message = await self.receive((kind,))
        assert isinstance(message, kind)
        return message

    async def ping(self, timeout_s: float) -> None:
        """Round-trip a WebSocket ping; ConnectError if no pong comes back in time.

        The only way a silent peer behind a dead path (no FIN, no RST) can be told apart from
        an idle one."""
        try:
            with trio.fail_after(timeout_s):
                await self.ws.ping()
        except trio.TooSlowError:
            raise ConnectError(f"no answer to a ping within {timeout_s:g}s") from None
        except ConnectionClosed as closed:
            raise _closed(closed) from None

    async def keepalive(self, interval_s: float, timeout_s: float) -> None:
        """Ping forever; raises (ending the caller's nursery) when the peer stops answering."""
        while True:
            await trio.sleep(interval_s)
            await self.ping(timeout_s)

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        # Close reasons are limited to 123 bytes by the WebSocket spec. Shielded: a peer being
        # told why it is dropped should hear it even if we are cancelled meanwhile.
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self.ws.aclose(code, reason.encode()[:120].decode(errors="ignore"))

    async def reject(self, error: Exception) -> None:
        """Close with the code that fits the error, and its message as the reason."""
        code = CLOSE_PROTOCOL_ERROR if isinstance(error, ProtocolError) else CLOSE_POLICY
        await self.close(code, str(error))


def _closed(closed: ConnectionClosed) -> LinkClosed:
    reason = closed.reason
    return LinkClosed(getattr(reason, "code", None), getattr(reason, "reason", None))


@asynccontextmanager
async def connect(
    url: str, ssl_context: ssl.SSLContext | None = None, timeout_s: float = CONNECT_TIMEOUT_S
) -> AsyncIterator[Link]:
    """Open a link to `url` (ws:// or wss://); ConnectError with one readable line if that fails:
    what went wrong (nothing listens there, the scheme does not match the server's, its certificate
    is not trusted, it is not a vectorlay server, ...) and what to do about it (see `dial`)."""
    target = _target(url)
    context = ssl_context
    if target.scheme == "wss" and context is None:
        context = ssl.create_default_context()
    deadline = trio.current_time() + timeout_s
    step = "tls" if context is not None else "tcp"
    with trio.move_on_at(deadline) as opening:
        stream = await dial.open_stream(target, context)
    if opening.cancelled_caught:
        raise target.failed(dial.describe_silence(target, step, timeout_s))
    recording = dial.Recording(stream)
    try:
        with unwrap_group():
            async with trio.open_nursery() as nursery:
                ws = await _upgrade(nursery, recording, target, deadline, timeout_s)
                try:
                    yield Link(ws, target.address)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(DISCONNECT_TIMEOUT_S):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
    except ConnectionRejected as rejected:  # raised by trio-websocket's reader, during the upgrade only
        raise target.failed(dial.describe_rejection(target, rejected.status_code, rejected.body)) from None


def _target(url: str) -> dial.Target:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("ws", "wss") or not parts.hostname or port == -1:
        raise ConnectError(f"invalid server URL {url!r}: expected ws://HOST:PORT or wss://HOST:PORT")
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default_port = 443 if parts.scheme == "wss" else 80
    return dial.Target(url, parts.scheme, parts.hostname, port or default_port, resource)


async def _upgrade(nursery: trio.Nursery, recording: dial.Recording, target: dial.Target, deadline: float,
                   timeout_s: float) -> WebSocketConnection:
    """The WebSocket handshake on an open stream. trio-websocket waits out its whole timeout when
    the server closes or answers garbage; the recording ends that wait at once, and says what
    came instead."""
    done: list[WebSocketConnection] = []
    async with trio.open_nursery() as race:
        race.cancel_scope.deadline = deadline

        async def handshake() -> None:
            # Any trio stream works; trio-websocket's annotation names the two it opens itself.
            done.append(await wrap_client_stream(nursery, recording, target.host,  # type: ignore[arg-type]
                                                 target.resource, max_message_size=MAX_MESSAGE_BYTES))
            race.cancel_scope.cancel()

        async def watch() -> None:
            await recording.ended.wait()
            race.cancel_scope.cancel()

        race.start_soon(handshake)
        race.start_soon(watch)
    if done:
        return done[0]
    if not recording.ended.is_set() and not recording.received:
        raise target.failed(dial.describe_silence(target, "upgrade", timeout_s))
    raise target.failed(dial.describe_answer(target, recording))


def server_urls(text: str) -> list[str]:
    """`ws://a:7070,ws://b:7070`: every server of a control plane, in order (one URL is a list of
    one). A name with several addresses also works: connecting tries each of them."""
    urls = list(dict.fromkeys(part.strip().rstrip("/") for part in text.split(",") if part.strip()))
    if not urls:
        raise ConnectError(f"no server URL in {text!r}")
    for url in urls:
        _target(url + "/v1/api")  # ConnectError with one line for a malformed one
    return urls


async def fetch_ca(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> bytes:
    """The server's CA certificate, fetched without verifying anything (see `secure_context`)."""
    base = url.rstrip("/").rsplit("/v1/", 1)[0]
    async with connect(base + "/v1/ca", tls.discovery_context(), timeout_s) as link:
        with trio.move_on_after(timeout_s):
            bundle = await link.receive_one(CaBundle)
            return bundle.pem.encode()
    raise ConnectError(f"the server at {url} did not send its CA certificate")


async def secure_context(url: str, token: str | None, ca_pem: bytes | None = None) -> ssl.SSLContext | None:
    """How to open `url` safely before any credential goes over it.

    ws:// needs nothing. For wss://, a CA we already trust (a node's saved `ca.pem`) is used as
    is; a token carrying a CA pin makes us fetch the server's CA and check its hash first: a
    server whose CA does not match gets no credential, because we never connect to it for real.
    Without either, the system's trusted CAs verify the server."""
    if urlsplit(url).scheme != "wss":
        if token and token_pin(token):
            raise AuthError(f"this token belongs to a server that uses TLS: use wss:// instead of {url}")
        return None
    if ca_pem is None:
        ca_pem = await verified_ca(url, token)
    return tls.client_context(ca_pem)


async def verified_ca(url: str, token: str | None) -> bytes | None:
    """The server's CA if `token` pins one and the server's matches it; ConnectError if it does
    not match; None for ws:// or a token without a pin."""
    pin = token_pin(token) if token else None
    if urlsplit(url).scheme != "wss" or pin is None:
        return None
    fetched = await fetch_ca(url)
    try:
        found = tls.public_key_pin(fetched)
    except ValueError:
        raise ConnectError(f"the server at {url} sent an invalid CA certificate") from None
    if found != pin:
        raise AuthError(f"the server at {url} is not the one that issued this token (its CA's key hash is "
                           f"{found[:16]}..., the token expects {pin[:16]}...): refusing to send credentials")
    return fetched


Handler = Callable[[str, Link], Awaitable[None]]


@dataclass(frozen=True)
class Serving:
    port: int  # the port the server listens on (the one the OS picked, for port 0)


async def serve(
    handler: Handler,
    host: str,
    port: int,
    paths: frozenset[str],
    ssl_context: ssl.SSLContext | None = None,
    *,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None,
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept WebSockets on `paths`; call `handler(path, link)` for each in its own task.

    `listeners`, when given, are used instead of a TCP listener on host:port (tests pass
    in-memory ones, as trio-websocket's own tests do)."""

    async def accept(request: WebSocketRequest) -> None:
        path = urlsplit(request.path).path
        if path not in paths:
            await request.reject(404, body=f"no such endpoint {path}; expected one of {sorted(paths)}".encode())
            return
        ws = await request.accept()
        link = Link(ws)
        try:
            await handler(path, link)
        except Exception:  # noqa: BLE001 - one peer's failure must never take the server down
            log.exception("internal error while serving %s on %s", link.remote, path)
            await link.close(CLOSE_INTERNAL, "internal server error")

    if listeners is not None:  # tests: in-memory listeners, as trio-websocket's own tests use
        memory = WebSocketServer(accept, listeners, max_message_size=MAX_MESSAGE_BYTES,  # type: ignore[arg-type]
                                 connect_timeout=CONNECT_TIMEOUT_S, disconnect_timeout=DISCONNECT_TIMEOUT_S)
        async with trio.open_nursery() as nursery:
            await nursery.start(memory.run)
            task_status.started(Serving(0))
        return
    # What trio-websocket's serve_websocket does, with our listener opening (one-line errors) and,
    # for TLS, a plain answer to a plain client (tls_port).
    tcp = await open_listeners(host, port, "server")
    tls_listeners: list[trio.SocketListener] | list[TlsPortListener] = tcp
    if ssl_context is not None:
        tls_listeners = [TlsPortListener(listener, ssl_context) for listener in tcp]
    server = WebSocketServer(accept, tls_listeners, max_message_size=MAX_MESSAGE_BYTES,  # type: ignore[arg-type]
                             connect_timeout=CONNECT_TIMEOUT_S, disconnect_timeout=DISCONNECT_TIMEOUT_S)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        task_status.started(Serving(tcp[0].socket.getsockname()[1]))
