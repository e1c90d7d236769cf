"""`vectorlay proxy`: follow the server's routes and serve HTTP on the listen address."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import trio

from vectorlay.proxy.feed import follow_routes
from vectorlay.proxy.http import Proxy, ProxyLimits
from vectorlay.proxy.routing import RouteTable

log = logging.getLogger("vectorlay.proxy")

FIRST_ROUTES_WAIT_S = 10.0


@dataclass(frozen=True)
class ProxyConfig:
    server: str
    token: str
    host: str = "127.0.0.1"
    port: int = 8080
    domain: str = "localhost"
    limits: ProxyLimits = ProxyLimits()
    public_port: int | None = None  # the port in endpoint URLs, if not the listen port

    def url_template(self, port: int) -> str:
        return f"http://{{cluster}}.{self.domain}:{self.public_port or port}/"


@dataclass(frozen=True)
class ProxyStarted:
    port: int
    proxy: Proxy


async def run_proxy(
    config: ProxyConfig, *, task_status: trio.TaskStatus[ProxyStarted] = trio.TASK_STATUS_IGNORED
) -> None:
    table = RouteTable()
    proxy = Proxy(table, config.domain, config.limits)
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(FIRST_ROUTES_WAIT_S) as scope:
            await nursery.start(follow_routes, config.server, config.token, config.url_template(port), table)
        if scope.cancelled_caught:
            log.warning("no route table from %s yet; serving anyway (every cluster is unknown until it arrives)",
                        config.server)
            nursery.start_soon(follow_routes, config.server, config.token, config.url_template(port), table)
        nursery.start_soon(partial(trio.serve_listeners, partial(_serve_client, proxy), listeners))
        log.info("proxy listening on http://%s:%d (clusters at %s)", config.host, port, config.url_template(port))
        task_status.started(ProxyStarted(port, proxy))


async def _serve_client(proxy: Proxy, stream: trio.SocketStream) -> None:
    try:
        host, port = stream.socket.getpeername()[:2]
        peer = str(host)
    except OSError:
        peer = "unknown"
    await proxy.handle_connection(stream, peer)
