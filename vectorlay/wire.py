"""Our one wrapper around trio-websocket: typed messages in, typed messages out.

Every role uses `Link` for its WebSocket, so decoding, size limits, close codes and the
translation of trio-websocket's exceptions into ours live in one place.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TypeVar
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    open_websocket_url,
    serve_websocket,
)

from vectorlay import tls
from vectorlay.core.protocol import MAX_MESSAGE_BYTES, CaBundle, Message, decode, encode
from vectorlay.core.tokens import token_pin
from vectorlay.errors import AuthError, ConnectError, PeerError, ProtocolError

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

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        try:
            remote = ws.remote
            self.remote = str(remote) if isinstance(remote, str) else f"{remote.address}:{remote.port}"
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
    """Open a link to `url` (ws:// or wss://); ConnectError with one readable line if that fails."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConnectError(f"invalid server URL {url!r}: expected ws://HOST:PORT or wss://HOST:PORT")
    context = ssl_context
    if parts.scheme == "wss" and context is None:
        context = ssl.create_default_context()
    async with AsyncExitStack() as stack:
        try:
            ws = await stack.enter_async_context(open_websocket_url(
                url, ssl_context=context, max_message_size=MAX_MESSAGE_BYTES,
                connect_timeout=timeout_s, disconnect_timeout=2,
            ))
        except HandshakeError as error:
            raise ConnectError(f"cannot reach the server at {url}: {_handshake_reason(error)}") from None
        except OSError as error:
            raise ConnectError(f"cannot reach the server at {url}: {error.strerror or error}") from None
        except trio.TooSlowError:
            raise ConnectError(f"cannot reach the server at {url}: timed out") from None
        except trio.BrokenResourceError as error:  # a TLS handshake that failed
            cause = error.__cause__ or error
            raise ConnectError(f"cannot reach the server at {url}: TLS failed ({cause})") from None
        yield Link(ws)


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


def _handshake_reason(error: HandshakeError) -> str:
    status = getattr(error, "status_code", None)
    if status is not None:
        return f"the server answered HTTP {status} (is this a vectorlay server?)"
    return type(error).__name__.replace("Connection", "connection ").lower().strip()


Handler = Callable[[str, Link], Awaitable[None]]


async def serve(
    handler: Handler,
    host: str,
    port: int,
    paths: frozenset[str],
    ssl_context: ssl.SSLContext | None = None,
    *,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
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

    if listeners is not None:
        server = WebSocketServer(accept, listeners, max_message_size=MAX_MESSAGE_BYTES,  # type: ignore[arg-type]
                                 connect_timeout=CONNECT_TIMEOUT_S, disconnect_timeout=2)
        await server.run(task_status=task_status)
        return
    await serve_websocket(
        accept, host, port, ssl_context, max_message_size=MAX_MESSAGE_BYTES,
        connect_timeout=CONNECT_TIMEOUT_S, disconnect_timeout=2, task_status=task_status,
    )
