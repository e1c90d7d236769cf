"""The proxy's HTTP side: h11 over trio streams, one task per client connection.

Requests are routed by Host header to a ready replica, forwarded on a pooled keep-alive
connection and the response is streamed back event by event (chunked and SSE responses pass
through as they arrive). A request whose body was fully buffered is retried on another replica
if the first one fails before any response byte reached the client.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio

from vectorlay.core import balancer
from vectorlay.proxy.routing import EndpointStats, RouteTable, cluster_from_host
from vectorlay.proxy.upstream import UpstreamConnection, UpstreamError, UpstreamPool

log = logging.getLogger("vectorlay.proxy")

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-connection",
})
READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class ProxyLimits:
    max_header_bytes: int = 16 * 1024
    retry_buffer_bytes: int = 1024 * 1024  # bodies up to this are buffered so they can be retried
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    upstream_connect_timeout_s: float = 2.0
    upstream_response_timeout_s: float = 300.0
    max_attempts: int = 3
    eject_s: float = 5.0


class ClientGone(Exception):
    """The client closed its connection: stop work on its behalf."""


class ClientConnection:
    def __init__(self, stream: trio.abc.Stream, limits: ProxyLimits, peer: str, scheme: str) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.peer = peer
        self.scheme = scheme

    async def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise ClientGone() from None
            self.conn.receive_data(bytes(data))

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise ClientGone() from None

    @property
    def response_started(self) -> bool:
        return self.conn.our_state is not h11.SEND_RESPONSE


class Proxy:
    def __init__(self, routes: RouteTable, domain: str, limits: ProxyLimits | None = None) -> None:
        self.routes = routes
        self.domain = domain
        self.limits = limits or ProxyLimits()
        self.pool = UpstreamPool(self.limits.upstream_connect_timeout_s)
        self.in_flight = 0

    async def handle_connection(self, stream: trio.abc.Stream, peer: str, scheme: str = "http") -> None:
        client = ClientConnection(stream, self.limits, peer, scheme)
        try:
            while True:
                idle = client.conn.their_state is h11.IDLE
                timeout = self.limits.idle_timeout_s if idle else self.limits.header_timeout_s
                with trio.move_on_after(timeout) as scope:
                    event = await client.next_event()
                if scope.cancelled_caught:
                    if client.conn.their_state is h11.SEND_BODY or client.conn.our_state is h11.SEND_RESPONSE:
                        await self._error(client, 408, "request timeout")
                    return
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    self.in_flight += 1
                    try:
                        await self._forward(client, event)
                    finally:
                        self.in_flight -= 1
                if client.conn.our_state is h11.MUST_CLOSE or client.conn.their_state is h11.MUST_CLOSE:
                    return
                if client.conn.our_state is h11.DONE and client.conn.their_state is h11.DONE:
                    client.conn.start_next_cycle()
                elif client.conn.our_state is h11.DONE:
                    return  # we answered without reading the whole body: cannot reuse
        except h11.RemoteProtocolError as error:
            if client.conn.our_state is h11.SEND_RESPONSE:
                status = error.error_status_hint
                try:
                    await self._error(client, status, f"bad request: {error}")
                except (ClientGone, h11.LocalProtocolError):
                    pass
        except trio.TooSlowError:
            if client.conn.our_state is h11.SEND_RESPONSE:
                try:
                    await self._error(client, 408, "request timeout")
                except (ClientGone, h11.LocalProtocolError):
                    pass
        except ClientGone:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _forward(self, client: ClientConnection, request: h11.Request) -> None:
        # Read (up to the retry limit) before deciding anything, so that even an error reply
        # leaves the connection clean for the client's next request.
        body, complete = await self._read_body(client)
        host = _header(request.headers, b"host")
        cluster_name = cluster_from_host(host.decode("latin-1"), self.domain) if host else None
        if cluster_name is None:
            await self._error(client, 404, f"unknown host; use http://<cluster>.{self.domain}/")
            return
        route = self.routes.clusters.get(cluster_name)
        if route is None:
            await self._error(client, 404, "unknown cluster", cluster=cluster_name)
            return
        if not route.endpoints:
            await self._error(client, 503, "no ready replica", cluster=cluster_name)
            return
        request_id = _header(request.headers, b"x-request-id") or uuid.uuid4().hex.encode()
        headers = self._upstream_headers(request, client, request_id)
        tried: set[str] = set()
        last_error = "no replica answered"
        for _attempt in range(self.limits.max_attempts):
            stats = self.routes.choose(route, trio.current_time(), tried)
            if stats is None:
                break
            tried.add(stats.endpoint.replica_id)
            try:
                await self._exchange(client, stats, request, headers, body, complete, request_id)
                return
            except UpstreamError as error:
                last_error = str(error)
                self._eject(stats)
                log.warning("%s: replica %s failed: %s", cluster_name, stats.endpoint.replica_id, error)
                if client.response_started or not complete:
                    raise ClientGone() from None  # nothing safe left to do: close the client
        await self._error(client, 502, f"bad gateway: {last_error}", cluster=cluster_name)

    async def _read_body(self, client: ClientConnection) -> tuple[list[bytes], bool]:
        """Buffer the request body up to the retry limit; (chunks, whether it is complete)."""
        chunks: list[bytes] = []
        size = 0
        while size <= self.limits.retry_buffer_bytes:
            with trio.fail_after(self.limits.header_timeout_s):
                event = await client.next_event()
            if isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return chunks, True
            else:
                raise ClientGone()
        return chunks, False

    def _upstream_headers(self, request: h11.Request, client: ClientConnection,
                          request_id: bytes) -> list[tuple[bytes, bytes]]:
        headers = [(k, v) for k, v in request.headers if k not in HOP_BY_HOP and k not in _REPLACED]
        forwarded_for = _header(request.headers, b"x-forwarded-for")
        peer = client.peer.encode()
        headers.append((b"x-forwarded-for", forwarded_for + b", " + peer if forwarded_for else peer))
        headers.append((b"x-forwarded-proto", client.scheme.encode()))
        headers.append((b"x-request-id", request_id))
        return headers

    async def _exchange(self, client: ClientConnection, stats: EndpointStats, request: h11.Request,
                        headers: list[tuple[bytes, bytes]], body: list[bytes], complete: bool,
                        request_id: bytes) -> None:
        upstream = await self.pool.acquire(stats.endpoint.address)
        stats.outstanding += 1
        started = trio.current_time()
        clean = False
        try:
            await upstream.send(h11.Request(method=request.method, target=request.target, headers=headers))
            for chunk in body:
                await upstream.send(h11.Data(data=chunk))
            if complete:
                await upstream.send(h11.EndOfMessage())
            else:
                await self._stream_rest_of_body(client, upstream)
            with trio.move_on_after(self.limits.upstream_response_timeout_s) as scope:
                stats.awaiting_head.add(scope)
                try:
                    response = await upstream.next_event()
                finally:
                    stats.awaiting_head.discard(scope)
            if scope.cancelled_caught:
                if not stats.routed:
                    raise UpstreamError("the replica left routing before answering")
                raise UpstreamError(f"no response within {self.limits.upstream_response_timeout_s:g}s")
            while isinstance(response, h11.InformationalResponse):
                response = await upstream.next_event()
            if not isinstance(response, h11.Response):
                raise UpstreamError(f"closed the connection without a response ({type(response).__name__})")
            out_headers = [(k, v) for k, v in response.headers if k not in HOP_BY_HOP]
            out_headers.append((b"x-request-id", request_id))
            await client.send(h11.Response(status_code=response.status_code, headers=out_headers,
                                           reason=response.reason))
            stats.latency_s = balancer.update_latency(stats.latency_s, trio.current_time() - started)
            await self._relay_body(client, upstream)
            clean = True
        finally:
            stats.outstanding -= 1
            if clean:
                await self.pool.release(upstream)
            else:
                await upstream.aclose()

    async def _stream_rest_of_body(self, client: ClientConnection, upstream: UpstreamConnection) -> None:
        while True:
            event = await client.next_event()
            if isinstance(event, h11.Data):
                await upstream.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await upstream.send(h11.EndOfMessage())
                return
            else:
                raise ClientGone()

    async def _relay_body(self, client: ClientConnection, upstream: UpstreamConnection) -> None:
        """Pass the response body through event by event: each upstream chunk goes out at once."""
        while True:
            event = await upstream.next_event()
            if isinstance(event, h11.Data):
                await client.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await client.send(h11.EndOfMessage())
                return
            else:
                raise ClientGone()  # the replica vanished mid-response: the client must not reuse this

    def _eject(self, stats: EndpointStats) -> None:
        stats.failures += 1
        stats.ejected_until = trio.current_time() + min(60.0, self.limits.eject_s * 2 ** (stats.failures - 1))

    async def _error(self, client: ClientConnection, status: int, message: str, **extra: str) -> None:
        body = json.dumps({"error": message, "status": status, **extra}).encode() + b"\n"
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status in (400, 408, 431):
            headers.append((b"connection", b"close"))
        await client.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase))
        await client.send(h11.Data(data=body))
        await client.send(h11.EndOfMessage())


_REPLACED = frozenset({b"x-forwarded-proto", b"x-request-id", b"x-forwarded-for"})


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes:
    for key, value in headers:
        if key == name:
            return bytes(value)
    return b""
