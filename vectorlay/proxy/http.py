"""The proxy's HTTP side: HTTP/1.1 codecs over trio streams, one task per client connection.

Each request is admitted (known cluster, body size, API key, rate limits), then forwarded to a
replica chosen by the balancer on a pooled keep-alive connection, and the response is streamed
back event by event (chunked and SSE responses pass through as they arrive, with back-pressure
both ways). A request whose body was fully buffered is retried on another replica if the first
one fails before any response byte reached the client, within the cluster's retry budget.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Protocol, TypeVar

import trio

from vectorlay.core.protocol import TUNNEL, Endpoint
from vectorlay.errors import TunnelError, unwrap_group
from vectorlay.proxy import headers as hdr
from vectorlay.proxy.admission import ConnectionAdmission
from vectorlay.proxy.auth import API_KEY, authorize
from vectorlay.proxy.client import ClientConnection, ClientGone
from vectorlay.proxy.codec import (
    DEFAULT_PARSER,
    END,
    NEED_DATA,
    Data,
    Headers,
    HttpParser,
    LocalProtocolError,
    RemoteProtocolError,
    Request,
    Response,
)
from vectorlay.proxy.deadlines import DeadlineKeeper
from vectorlay.proxy.limits import ProxyLimits
from vectorlay.proxy.metrics import UNKNOWN, ClusterMetrics, Metrics
from vectorlay.proxy.routing import ClusterRoute, EndpointStats, RouteTable, cluster_from_host, upstream_key
from vectorlay.proxy.upstream import UpstreamConnectError, UpstreamConnection, UpstreamError, UpstreamPool

__all__ = ["ClientGone", "Proxy", "ProxyLimits"]

log = logging.getLogger("vectorlay.proxy")

T = TypeVar("T")

GATEWAY_ERRORS = frozenset({502, 503, 504})  # from a replica: it is failing; eject, try another
QUICK_HEAD_S = 0.05  # a head this fast needs no watch on the client meanwhile
DRAIN_BODY_BYTES = 64 * 1024  # an unread body up to this is read and dropped after an error reply
MAX_FLUSH_BYTES = 256 * 1024
CLIENT_GONE_STATUS = 499
CLOSE_TIMEOUT_S = 1.0
LINGER_S = 0.5
LINGER_BYTES = 1024 * 1024  # nginx's code, for the metrics of requests whose client left
MAX_KNOWN_HOSTS = 1024


@dataclass
class _Attempt:
    """A failure of one attempt before any response byte reached the client."""

    error: str
    eject: bool = True  # the replica's fault (not a stale pooled connection or a route change)
    stale: bool = False  # a reused keep-alive connection failed: try again, not the replica's fault
    retry: bool = True  # worth another replica (a response timeout is not: it would double the wait)
    status: int = 502  # what the client gets if nothing else can be tried


class TunnelDialer(Protocol):
    """Opens a stream to a replica through its node's tunnel (the proxy's `TunnelHub`)."""

    async def open_stream(self, node_id: str, replica_id: str) -> trio.abc.Stream: ...


class _Retry(Exception):
    def __init__(self, attempt: _Attempt) -> None:
        super().__init__(attempt.error)
        self.attempt = attempt


class Proxy:
    def __init__(self, routes: RouteTable, domain: str, limits: ProxyLimits | None = None,
                 metrics: Metrics | None = None, pool: UpstreamPool | None = None,
                 parser: HttpParser = DEFAULT_PARSER, tunnels: TunnelDialer | None = None) -> None:
        self.routes = routes
        self.domain = domain
        self.limits = limits or ProxyLimits()
        self.metrics = metrics or Metrics()
        self.parser = parser
        self.pool = pool or UpstreamPool(self.limits.upstream_connect_timeout_s, parser=parser)
        self.in_flight = 0
        self.draining = False
        self._clients: set[ClientConnection] = set()
        self.deadlines = DeadlineKeeper(min(self.limits.header_timeout_s, self.limits.idle_timeout_s))
        self.admission = ConnectionAdmission(self.limits.max_connections, self.limits.max_connections_per_client)
        self._hosts: dict[bytes, str | None] = {}  # Host header -> cluster name
        self.tunnels = tunnels  # streams through nodes' tunnels, for their tunnel-plane endpoints
        routes.on_endpoint_removed.append(lambda endpoint: self.pool.forget(upstream_key(endpoint)))

    # ---- connections ----

    def drain(self) -> None:
        """Graceful shutdown: idle connections close now; busy ones after their current response."""
        self.draining = True
        for client in list(self._clients):
            if client.waiting_idle:
                client.scope.cancel()

    async def handle_connection(self, stream: trio.abc.Stream, peer: str, scheme: str = "http",
                                admitted: bool = False) -> None:
        """Serve one client connection until it ends. `admitted`: counted by `admission.admit`,
        which is told when it ends."""
        client = ClientConnection(stream, self.limits, peer, scheme, self.parser, self.deadlines, self.admission)
        self.metrics.connections += 1
        self._clients.add(client)
        try:
            with client.scope:  # cancelled at the idle or header deadline, or by drain()
                await self._serve(client)
            if client.timed_out_in_head:
                await self._reply_error(client, 408, "request headers took too long")
        except ClientGone:
            pass
        finally:
            self._clients.discard(client)
            self.metrics.connections -= 1
            if admitted:
                self.admission.finished(peer, client.evicted)
            # Shielded so a cancelled connection still closes; bounded so a TLS peer that stopped
            # reading cannot hold the close_notify forever.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                try:
                    if client.unread_input:
                        await _linger(stream)
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async def _serve(self, client: ClientConnection) -> None:
        codec = client.codec
        while not self.draining:
            try:
                request = await client.next_request()
            except RemoteProtocolError as error:
                await self._reply_error(client, error.status, _protocol_problem(error))
                return
            if request is None:
                return  # the client closed the connection
            await self._serve_request(client, request)
            if not codec.reusable():
                return  # closing, or we answered without reading the whole body
            codec.start_next_cycle()

    async def _reply_error(self, client: ClientConnection, status: int, message: str) -> int:
        """Answer a broken request if nothing was sent yet; the connection closes after it."""
        if client.response_started:
            return CLIENT_GONE_STATUS
        client.unread_input = True
        try:
            await self._error(client, status, message, close=True)
        except (ClientGone, LocalProtocolError):
            return CLIENT_GONE_STATUS
        return status

    # ---- one request ----

    async def _serve_request(self, client: ClientConnection, request: Request) -> None:
        started = trio.current_time()
        client.sent_status = None
        named = hdr.first_values(request.headers)
        client.request_length = named.get(b"content-length", b"")
        name = self._cluster_name(named.get(b"host", b""))
        cluster = self.routes.clusters.get(name) if name else None
        metrics = self.metrics.clusters[cluster.name if cluster else UNKNOWN]
        metrics.in_flight += 1
        self.in_flight += 1
        status = CLIENT_GONE_STATUS
        try:
            if name is None:
                status = await self._refuse(client, 404, f"unknown host; use http://<cluster>.{self.domain}/")
            elif cluster is None:
                status = await self._refuse(client, 404, "unknown cluster", cluster=name)
            elif request.method == b"CONNECT":
                status = await self._refuse(client, 405, "CONNECT is not supported", cluster=name)
            else:
                status = await self._admit_and_forward(client, request, named, cluster, metrics, started)
        except ClientGone as gone:
            # The status the client received, if its head went out before the client left or the
            # replica failed mid-response; 499 if the client left before any answer (as nginx counts).
            status = client.sent_status or (gone.status if isinstance(gone, _Truncated) else CLIENT_GONE_STATUS)
            raise
        except trio.TooSlowError:
            status = await self._reply_error(client, 408, "request body took too long")
        except _BodyTooLarge:
            status = await self._reply_error(client, 413, f"request body over {self.limits.max_body_bytes} bytes")
        except RemoteProtocolError as error:
            status = await self._reply_error(client, error.status, _protocol_problem(error))
        finally:
            metrics.in_flight -= 1
            self.in_flight -= 1
            metrics.observe(status, trio.current_time() - started)

    def _cluster_name(self, host: bytes) -> str | None:
        """The cluster a Host header names, worked out once per distinct Host."""
        if host not in self._hosts:
            if len(self._hosts) >= MAX_KNOWN_HOSTS:
                self._hosts.clear()  # clients can send any Host: the cache must not grow with them
            self._hosts[host] = cluster_from_host(host.decode("latin-1"), self.domain) if host else None
        return self._hosts[host]

    async def _admit_and_forward(self, client: ClientConnection, request: Request, named: dict[bytes, bytes],
                                 cluster: ClusterRoute, metrics: ClusterMetrics, now: float) -> int:
        """`named` is the first value of each of the request's headers."""
        length = client.request_length
        if length.isdigit() and int(length) > self.limits.max_body_bytes:
            return await self._refuse(client, 413, f"request body over {self.limits.max_body_bytes} bytes",
                                      cluster=cluster.name)
        route = cluster.route
        auth = authorize(route.auth, cluster.key_hashes, named.get(b"authorization", b""))
        if not auth.allowed:
            return await self._refuse(client, 401, auth.problem, cluster=cluster.name,
                                      extra=[(b"www-authenticate", b'Bearer realm="vectorlay"')])
        wait = cluster.limiter.admit(auth.key_hash or client.peer, now)
        if wait is not None:
            retry_after = str(max(1, math.ceil(wait))).encode()
            return await self._refuse(client, 429, "rate limit exceeded", cluster=cluster.name,
                                      extra=[(b"retry-after", retry_after)])
        if not cluster.endpoints:
            return await self._refuse(client, 503, "no ready replica", cluster=cluster.name)
        if client.codec.waiting_for_100_continue:
            client.inform(100, b"Continue")
            await client.flush()
        body, complete = await self._read_body(client)
        if body:
            now = trio.current_time()  # reading it may have taken a while; the attempt starts now
        rid = hdr.request_id(named)
        headers = hdr.upstream_request_headers(request.headers, client.peer_bytes, client.scheme_bytes, rid,
                                               strip_authorization=route.auth == API_KEY, named=named)
        hdr.add_body_framing(headers, sum(map(len, body)) if complete else None, client.request_length,
                             had_body=bool(body or client.request_length) or b"transfer-encoding" in named)
        return await self._forward(client, cluster, metrics, request, headers, body, complete, rid, now)

    async def _read_body(self, client: ClientConnection) -> tuple[list[bytes], bool]:
        """Buffer the request body up to the retry limit; (chunks, whether it is complete)."""
        chunks: list[bytes] = []
        size = 0
        while size <= self.limits.retry_buffer_bytes:
            event = await client.next_body_event()
            if isinstance(event, Data):
                chunks.append(event.data)
                size += len(event.data)
                if size > self.limits.max_body_bytes:
                    raise _BodyTooLarge()
            elif event is END:
                return chunks, True
            else:
                raise ClientGone()
        return chunks, False

    async def _forward(self, client: ClientConnection, cluster: ClusterRoute, metrics: ClusterMetrics,
                       request: Request, headers: Headers, body: list[bytes], complete: bool, rid: bytes,
                       now: float) -> int:
        cluster.budget.on_request()
        tried: set[str] = set()
        stale_retried = False
        failure = None
        while True:
            stats = self.routes.choose(cluster, now, tried)
            if stats is None:
                break
            try:
                return await self._exchange(client, cluster, stats, metrics, request, headers, body, complete, rid,
                                            tried, now)
            except _Retry as retry:
                failure = retry.attempt
            log.warning("%s: replica %s failed: %s", cluster.name, stats.endpoint.replica_id, failure.error)
            now = trio.current_time()
            if failure.eject:
                stats.eject(now, self.limits)
                metrics.ejections += 1
            if not failure.retry or not complete:
                break  # a timeout, or part of the body is gone upstream and cannot be sent again
            if failure.stale and not stale_retried:
                stale_retried = True  # a kept-alive connection the replica had closed: not its fault
                continue
            tried.add(stats.endpoint.replica_id)
            if len(tried) >= self.limits.max_attempts:
                break
            if not cluster.budget.try_retry(now):
                failure = _Attempt(f"{failure.error}; retry budget spent", status=failure.status)
                break
            metrics.retries += 1
        if client.response_started:
            raise ClientGone()
        failure = failure or _Attempt("no replica answered")
        return await self._refuse(client, failure.status, f"bad gateway: {failure.error}", cluster=cluster.name)

    def _can_retry(self, cluster: ClusterRoute, complete: bool, others: set[str]) -> bool:
        """Whether a failed attempt could go to another replica (not one of `others`)."""
        return (complete and len(others) < self.limits.max_attempts
                and self.routes.choose(cluster, trio.current_time(), others) is not None)

    async def _exchange(self, client: ClientConnection, cluster: ClusterRoute, stats: EndpointStats,
                        metrics: ClusterMetrics, request: Request, headers: Headers, body: list[bytes],
                        complete: bool, rid: bytes, tried: set[str], started: float) -> int:
        """One attempt on one replica, begun at `started`: send the request (`headers` are the
        ones to send), relay the answer."""
        try:
            endpoint = stats.endpoint
            if endpoint.data_plane == TUNNEL:
                upstream = await self.pool.acquire(stats.pool_key, partial(self._open_tunnel_stream, endpoint))
            else:
                upstream = await self.pool.acquire(endpoint.address)
        except UpstreamConnectError as error:
            metrics.connect_errors += 1
            raise _Retry(_Attempt(str(error))) from None
        stats.outstanding += 1
        clean = False
        try:
            try:
                upstream.request(request.method, request.target, headers)
                for chunk in body:
                    upstream.write(chunk)
                if complete:
                    upstream.end()
                    await upstream.flush()
                else:
                    await upstream.flush()
                    await self._stream_rest_of_body(client, upstream, sum(map(len, body)))
                response = await self._await_head(client, upstream, stats)
            except UpstreamError as error:
                stale = upstream.reused and not upstream.received
                raise _Retry(_Attempt(str(error), eject=not stale, stale=stale)) from None
            now = trio.current_time()
            stats.record_latency(now - started, now)
            if response.status_code in GATEWAY_ERRORS:
                if self._can_retry(cluster, complete, tried | {stats.endpoint.replica_id}):
                    raise _Retry(_Attempt(f"answered {response.status_code}", status=response.status_code))
                stats.eject(now, self.limits)
                metrics.ejections += 1
            else:
                stats.record_success()
            close = self.draining or not client.codec.request_done
            named = hdr.first_values(response.headers)
            client.respond(response.status_code, response.reason,
                           hdr.client_response_headers(response.headers, rid, named), close)
            try:
                if b"content-length" not in named:  # chunked or close-delimited: maybe long and paced (SSE)
                    await self._watching_client(client, lambda: self._relay_body(client, upstream))
                else:
                    await self._relay_body(client, upstream)
            except UpstreamError as error:
                log.warning("replica %s failed mid-response: %s", stats.endpoint.replica_id, error)
                raise _Truncated(response.status_code) from None
            clean = True
            return response.status_code
        finally:
            stats.outstanding -= 1
            if clean:
                await self.pool.release(upstream)
            else:
                await upstream.aclose()

    async def _open_tunnel_stream(self, endpoint: Endpoint) -> trio.abc.Stream:
        if self.tunnels is None:
            raise TunnelError("this proxy accepts no tunnels (start it with --tunnel-listen)")
        return await self.tunnels.open_stream(endpoint.node_id, endpoint.replica_id)

    async def _await_head(self, client: ClientConnection, upstream: UpstreamConnection,
                          stats: EndpointStats) -> Response:
        """The replica's response head. A slow one is awaited while watching the client, so a
        client that gives up cancels the request upstream (a GPU stops working for nobody)."""
        head = _head_nowait(upstream)
        if head is not None:
            return head  # already here: no timer needed
        with trio.move_on_after(QUICK_HEAD_S):
            return await _next_head(upstream)
        timeout = self.limits.upstream_response_timeout_s
        with trio.move_on_after(timeout) as scope:
            stats.awaiting_head.add(scope)
            try:
                return await self._watching_client(client, lambda: _next_head(upstream))
            finally:
                stats.awaiting_head.discard(scope)
        if not stats.routed:
            raise _Retry(_Attempt("the replica left routing before answering", eject=False))
        raise _NoHead(f"no response within {timeout:g}s")

    async def _watching_client(self, client: ClientConnection, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work`, cancelling it (ClientGone) if the client closes its connection meanwhile."""
        gone = False
        result: list[T] = []
        with unwrap_group():
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal gone
                    await client.wait_gone()
                    gone = True
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                result.append(await work())
                nursery.cancel_scope.cancel()
        # The work finished (its last write done) even if the client closed meanwhile: a client
        # that closes the moment a response ends (curl) got all of it.
        if not result:
            raise ClientGone()
        return result[0]

    async def _stream_rest_of_body(self, client: ClientConnection, upstream: UpstreamConnection,
                                   size: int) -> None:
        while True:
            event = await client.next_body_event()
            if isinstance(event, Data):
                size += len(event.data)
                if size > self.limits.max_body_bytes:
                    raise _BodyTooLarge()
                upstream.write(event.data)
                await upstream.flush()
            elif event is END:
                upstream.end()
                await upstream.flush()
                return
            else:
                raise ClientGone()

    async def _relay_body(self, client: ClientConnection, upstream: UpstreamConnection) -> None:
        """Pass the response body through as it arrives: whatever is buffered goes out in one
        write, and the client's write completes before more is read from the replica."""
        timeout = self.limits.upstream_response_timeout_s
        while True:
            event = upstream.event_nowait()
            if event is NEED_DATA or client.pending_bytes > MAX_FLUSH_BYTES:
                await client.flush()
                if event is NEED_DATA:
                    with trio.move_on_after(timeout) as scope:
                        event = await upstream.next_event()
                    if scope.cancelled_caught:
                        raise ClientGone()  # the replica stalled mid-response: end the client's too
            if isinstance(event, Data):
                client.write(event.data)
            elif event is END:
                client.end()
                await client.flush()
                return
            elif event is not NEED_DATA:
                raise ClientGone()  # the replica vanished mid-response: the client must not reuse this

    # ---- refusals ----

    async def _refuse(self, client: ClientConnection, status: int, message: str, cluster: str | None = None,
                      extra: list[tuple[bytes, bytes]] | None = None) -> int:
        """Answer with an error, reading a small unread body first so the connection stays usable."""
        close = self.draining
        if not client.codec.request_done and not await self._discard_body(client, client.request_length):
            close = client.unread_input = True
        await self._error(client, status, message, close=close, cluster=cluster, extra=extra)
        return status

    async def _discard_body(self, client: ClientConnection, request_length: bytes) -> bool:
        """Read and drop a small unread request body; False if it is too big or too slow for that."""
        if client.codec.waiting_for_100_continue:
            return False  # the client has not sent it and need not
        if request_length.isdigit() and int(request_length) > DRAIN_BODY_BYTES:
            return False
        read = 0
        with trio.move_on_after(self.limits.header_timeout_s):
            while read <= DRAIN_BODY_BYTES:
                event = await client.next_body_event()
                if event is END:
                    return True
                if not isinstance(event, Data):
                    return False
                read += len(event.data)
        return False

    async def _error(self, client: ClientConnection, status: int, message: str, close: bool = False,
                     cluster: str | None = None, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        payload: dict[str, object] = {"error": message, "status": status}
        if cluster:
            payload["cluster"] = cluster
        body = json.dumps(payload).encode() + b"\n"
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *(extra or [])]
        client.respond(status, HTTPStatus(status).phrase.encode(), headers, close)
        client.write(body)
        client.end()
        await client.flush()


class _BodyTooLarge(Exception):
    pass


class _NoHead(_Retry):
    def __init__(self, error: str) -> None:
        super().__init__(_Attempt(error, retry=False, status=504))


class _Truncated(ClientGone):
    """The replica failed mid-response: the client's connection is closed to show it."""

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status


async def _linger(stream: trio.abc.Stream) -> None:
    """Close our side, then read and drop what the client still sends for a moment.

    Closing a socket with unread input makes the kernel send a reset, which can destroy the error
    response we just wrote before the client reads it (nginx's lingering close, for the same reason).
    """
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return
    await stream.send_eof()
    drained = 0
    with trio.move_on_after(LINGER_S):
        while drained < LINGER_BYTES:
            data = await stream.receive_some(64 * 1024)
            if not data:
                return
            drained += len(data)


def _head_nowait(upstream: UpstreamConnection) -> Response | None:
    """The response head if it already arrived (informational responses skipped), else None."""
    event = upstream.event_nowait()
    while isinstance(event, Response):
        if event.status_code >= 200:
            return event
        event = upstream.event_nowait()  # an informational response (100 Continue): not passed on
    if event is NEED_DATA:
        return None
    raise UpstreamError(f"{upstream.address} closed the connection without a response")


async def _next_head(upstream: UpstreamConnection) -> Response:
    event = await upstream.next_event()
    while isinstance(event, Response) and event.status_code < 200:
        event = await upstream.next_event()  # an informational response (100 Continue): not passed on
    if isinstance(event, Response):
        return event
    raise UpstreamError(f"{upstream.address} closed the connection without a response")


def _protocol_problem(error: RemoteProtocolError) -> str:
    if error.status == 431:
        return "request line and headers too large"
    return f"bad request: {str(error)[:200]}"
