"""A client for the server's API link: `call` for a response, `stream` for events then a response.

Requests and responses are the typed values of core/api.py; a failed call raises the error its
kind names there (NotFoundError, UserError, ServerUnavailable, ...). The link is pinged while it
is in use, so a server that stops answering ends the command with an error, never a hang.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import count
from typing import Any, Generic, TypeVar

import trio

from vectorlay.core import api
from vectorlay.core.api import Request, StreamRequest
from vectorlay.core.protocol import PROTOCOL_VERSION, SERVER_TO_CLIENT, Call, ClientHello, Event, Failure, Ready, Result
from vectorlay.errors import AuthError, ConnectError, LinkLost, PeerError, ProtocolError, unwrap_group
from vectorlay.wire import (
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    CONNECT_TIMEOUT_S,
    Link,
    LinkClosed,
    connect,
    secure_context,
    server_urls,
)

R = TypeVar("R")
E = TypeVar("E")

PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Done(Generic[R]):
    """The end of a streamed call: its response."""

    response: R


class ApiClient:
    def __init__(self, link: Link) -> None:
        self.link = link
        self._ids = count(1)

    async def call(self, request: Request[R]) -> R:
        """The response to `request` (a streaming call's events are skipped)."""
        async for item in self._exchange(request):
            if isinstance(item, Done):
                response: R = item.response
                return response
        raise ProtocolError("the server ended the call without a result")

    async def stream(self, request: StreamRequest[R, E]) -> AsyncIterator[E | Done[R]]:
        """Each event of the call, then `Done(response)`."""
        async for item in self._exchange(request):
            yield item

    async def _exchange(self, request: Request[Any]) -> AsyncIterator[Any]:
        call_id = next(self._ids)
        method = api.call_type(request).method
        try:
            await self.link.send(Call(call_id, method, api.encode(request)))
            while True:
                message = await self.link.receive(SERVER_TO_CLIENT)
                if isinstance(message, Event) and message.id == call_id:
                    yield api.decode_event(request, message.value)
                elif isinstance(message, Result) and message.id == call_id:
                    yield Done(api.decode_response(request, message.value))
                    return
                elif isinstance(message, Failure) and message.id == call_id:
                    if message.message == f"unknown method {method!r}":
                        # Calls are added within an API version (describe node, rollout): a
                        # server from before one says so, and the fix is on its side.
                        raise PeerError(f"this server does not know {method!r} (it is older than this "
                                        "vectorlay): upgrade the server")
                    raise api.error_for(message.kind, message.message)
        except LinkClosed as closed:
            raise LinkLost(f"the server closed the connection: {closed.reason or closed.code}") from None


async def handshake(link: Link, token: str) -> ApiClient:
    """Introduce ourselves on a fresh link: token and API version; the server's refusal as one line."""
    with trio.fail_after(CONNECT_TIMEOUT_S):
        await link.send(ClientHello(PROTOCOL_VERSION, token, api.API_VERSION))
        try:
            await link.receive_one(Ready)
        except LinkClosed as closed:
            if closed.code == CLOSE_POLICY:
                raise AuthError(f"the server refused the token: {closed.reason}") from None
            if (refusal := api.version_refusal(closed.reason)) is not None:
                raise PeerError(refusal) from None
            if closed.code == CLOSE_TRY_AGAIN:  # this server cannot serve now; another of the list may
                raise ConnectError(f"the server at {link.remote} cannot serve now: {closed.reason}") from None
            raise PeerError(f"the server closed the connection: {closed.reason or closed.code}") from None
    return ApiClient(link)


@asynccontextmanager
async def open_api(server: str, token: str, start: int = 0) -> AsyncIterator[ApiClient]:
    """A link to the server's API. `server` may list several servers (`ws://a,ws://b`): the first
    that answers, from `start` on, is used."""
    urls = server_urls(server)
    failure: ConnectError | None = None
    for index in range(len(urls)):
        base = urls[(start + index) % len(urls)]
        url = base + "/v1/api"
        opened = False
        try:
            async with connect(url, await secure_context(url, token)) as link:
                client = await handshake(link, token)
                opened = True
                with unwrap_group():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_watch, link, base)
                        yield client
                        nursery.cancel_scope.cancel()
                return
        except ConnectError as error:
            if opened or len(urls) == 1:
                raise
            failure = error  # try the next server
    assert failure is not None
    raise ConnectError(f"no server answered ({len(urls)} tried); last: {failure}")


async def _watch(link: Link, server: str) -> None:
    try:
        await link.keepalive(PING_INTERVAL_S, PING_TIMEOUT_S)
    except ConnectError:
        raise LinkLost(f"the server at {server} stopped answering (no reply to a ping within "
                       f"{PING_TIMEOUT_S:g}s); what was asked may or may not have been done") from None
