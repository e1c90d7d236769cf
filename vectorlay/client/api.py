"""A client for the server's API link: `call` for a response, `stream` for events then a response.

Requests and responses are the typed values of core/api.py; a failed call raises the error its
kind names there (NotFoundError, UserError, ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import count
from typing import Any, Generic, TypeVar

from vectorlay.core import api
from vectorlay.core.api import Request, StreamRequest
from vectorlay.core.protocol import PROTOCOL_VERSION, SERVER_TO_CLIENT, Call, ClientHello, Event, Failure, Ready, Result
from vectorlay.errors import AuthError, PeerError, ProtocolError
from vectorlay.wire import CLOSE_POLICY, Link, LinkClosed, connect, secure_context

R = TypeVar("R")
E = TypeVar("E")


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
                    raise api.error_for(message.kind, message.message)
        except LinkClosed as closed:
            raise PeerError(f"the server closed the connection: {closed.reason or closed.code}") from None


async def handshake(link: Link, token: str) -> ApiClient:
    """Introduce ourselves on a fresh link: token and API version; the server's refusal as one line."""
    await link.send(ClientHello(PROTOCOL_VERSION, token, api.API_VERSION))
    try:
        await link.receive_one(Ready)
    except LinkClosed as closed:
        if closed.code == CLOSE_POLICY:
            raise AuthError(f"the server refused the token: {closed.reason}") from None
        if (refusal := api.version_refusal(closed.reason)) is not None:
            raise PeerError(refusal) from None
        raise PeerError(f"the server closed the connection: {closed.reason or closed.code}") from None
    return ApiClient(link)


@asynccontextmanager
async def open_api(server: str, token: str) -> AsyncIterator[ApiClient]:
    url = server.rstrip("/") + "/v1/api"
    async with connect(url, await secure_context(url, token)) as link:
        yield await handshake(link, token)
