"""A client for the server's API link: `call` for a result, `stream` for events then a result."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import count
from typing import Any

import trio

from vectorlay.core.protocol import (
    PROTOCOL_VERSION,
    SERVER_TO_CLIENT,
    Call,
    ClientHello,
    Event,
    Failure,
    Ready,
    Result,
)
from vectorlay.errors import (
    AuthError,
    ConflictError,
    ConnectError,
    NotFoundError,
    PeerError,
    ProtocolError,
    UserError,
    unwrap_group,
)
from vectorlay.wire import CLOSE_POLICY, CONNECT_TIMEOUT_S, Link, LinkClosed, connect, secure_context

PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 10.0


class ApiClient:
    def __init__(self, link: Link) -> None:
        self.link = link
        self._ids = count(1)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        async for kind, value in self.stream(method, params):
            if kind == "result":
                return value
        raise ProtocolError("the server ended the call without a result")

    async def stream(self, method: str, params: dict[str, Any] | None = None) -> AsyncIterator[tuple[str, Any]]:
        """Yield ("event", value)... then ("result", value); raise the server's error as ours."""
        call_id = next(self._ids)
        try:
            await self.link.send(Call(call_id, method, params or {}))
            while True:
                message = await self.link.receive(SERVER_TO_CLIENT)
                if isinstance(message, Event) and message.id == call_id:
                    yield "event", message.value
                elif isinstance(message, Result) and message.id == call_id:
                    yield "result", message.value
                    return
                elif isinstance(message, Failure) and message.id == call_id:
                    raise _error(message)
        except LinkClosed as closed:
            raise PeerError(f"the server closed the connection: {closed.reason or closed.code}") from None


def _error(failure: Failure) -> Exception:
    kinds: dict[str, type[Exception]] = {
        "not_found": NotFoundError, "conflict": ConflictError, "auth": AuthError, "user": UserError,
    }
    return kinds.get(failure.kind, PeerError)(failure.message)


@asynccontextmanager
async def open_api(server: str, token: str) -> AsyncIterator[ApiClient]:
    """A link to the server's API. It is pinged while in use: a server that stops answering
    (paused, or behind a dead path) ends the command with an error instead of a hang."""
    url = server.rstrip("/") + "/v1/api"
    async with connect(url, await secure_context(url, token)) as link:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            await link.send(ClientHello(PROTOCOL_VERSION, token))
            try:
                await link.receive_one(Ready)
            except LinkClosed as closed:
                if closed.code == CLOSE_POLICY:
                    raise AuthError(f"the server refused the token: {closed.reason}") from None
                raise PeerError(f"the server closed the connection: {closed.reason or closed.code}") from None
        with unwrap_group():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch, link, server)
                yield ApiClient(link)
                nursery.cancel_scope.cancel()


async def _watch(link: Link, server: str) -> None:
    try:
        await link.keepalive(PING_INTERVAL_S, PING_TIMEOUT_S)
    except ConnectError:
        raise PeerError(f"the server at {server} stopped answering (no reply to a ping within "
                        f"{PING_TIMEOUT_S:g}s); what was asked may or may not have been done") from None
