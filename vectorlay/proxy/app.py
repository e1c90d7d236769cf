"""`vectorlay proxy`: follow the server's routes and serve HTTP (or HTTPS) on the listen address."""

from __future__ import annotations

import gc
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import trio

from vectorlay.listen import open_listeners
from vectorlay.proxy.codec import DEFAULT_PARSER, HttpParser
from vectorlay.proxy.feed import follow_routes
from vectorlay.proxy.http import Proxy
from vectorlay.proxy.limits import ProxyLimits
from vectorlay.proxy.listener import Edge, raise_open_files_limit
from vectorlay.proxy.metrics import serve_metrics
from vectorlay.proxy.routing import RouteTable
from vectorlay.proxy.tls import TlsTerminator
from vectorlay.proxy.tunnels import TunnelHub

log = logging.getLogger("vectorlay.proxy")

FIRST_ROUTES_WAIT_S = 10.0
# Container allocations between young-generation collections (Python's default is 700).
GC_YOUNG_THRESHOLD = 20_000


@dataclass(frozen=True)
class ProxyConfig:
    server: str
    token: str
    host: str = "127.0.0.1"
    port: int = 8080
    domain: str = "localhost"
    limits: ProxyLimits = ProxyLimits()
    public_port: int | None = None  # the port in endpoint URLs, if not the listen port
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_listen: tuple[str, int] | None = None
    http_parser: HttpParser = DEFAULT_PARSER  # h11, or httptools (several times faster)
    tunnel_listen: tuple[str, int] | None = None  # accept nodes' tunnels here (None: direct endpoints only)
    tunnel_advertise: str | None = None  # HOST[:PORT] nodes dial, where it differs from tunnel_listen

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    def url_template(self, port: int) -> str:
        return f"{self.scheme}://{{cluster}}.{self.domain}:{self.public_port or port}/"


@dataclass(frozen=True)
class ProxyStarted:
    port: int
    proxy: Proxy
    edge: Edge
    tls: TlsTerminator | None
    metrics_port: int | None
    tunnels: TunnelHub | None = None
    tunnel_port: int | None = None


async def run_proxy(
    config: ProxyConfig, *, task_status: trio.TaskStatus[ProxyStarted] = trio.TASK_STATUS_IGNORED
) -> None:
    tls = TlsTerminator(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
    raise_open_files_limit(2 * config.limits.max_connections + 256)
    table = RouteTable(limits=config.limits)
    hub = None
    tunnel_listeners: list[trio.SocketListener] = []
    tunnel_port = None
    if config.tunnel_listen is not None:
        hub = TunnelHub(table, connect_timeout_s=config.limits.upstream_connect_timeout_s)
        tunnel_host, wanted_port = config.tunnel_listen
        tunnel_listeners = await open_listeners(tunnel_host, wanted_port, "proxy's tunnels")
        tunnel_port = tunnel_listeners[0].socket.getsockname()[1]
        hub.address = tunnel_address(config.tunnel_advertise, tunnel_host, tunnel_port)
    proxy = Proxy(table, config.domain, config.limits, parser=config.http_parser, tunnels=hub)
    if hub is not None:
        hub.attach(proxy)
    listeners = await open_listeners(config.host, config.port, "proxy")
    port = listeners[0].socket.getsockname()[1]
    template = config.url_template(port)
    edge = Edge(proxy, listeners, tls)
    async with trio.open_nursery() as nursery:
        if hub is not None:
            await nursery.start(hub.serve, tunnel_listeners)
            log.info("accepting tunnels on port %d (nodes dial %s)", tunnel_port, hub.address)
        metrics_port = None
        if config.metrics_listen is not None:
            metrics_host, wanted = config.metrics_listen
            metrics_listeners = await open_listeners(metrics_host, wanted, "proxy's metrics")
            metrics_port = metrics_listeners[0].socket.getsockname()[1]
            await nursery.start(serve_metrics, proxy.metrics, metrics_listeners)
            log.info("metrics on http://%s:%d/metrics", metrics_host, metrics_port)
        with trio.move_on_after(FIRST_ROUTES_WAIT_S) as scope:
            await nursery.start(follow_routes, config.server, config.token, template, table, hub)
        if scope.cancelled_caught:
            log.warning("no route table from %s yet; serving anyway (every cluster is unknown until it arrives)",
                        config.server)
            nursery.start_soon(follow_routes, config.server, config.token, template, table, hub)
        await nursery.start(edge.serve)
        log.info("proxy listening on %s://%s:%d (clusters at %s)", config.scheme, config.host, port, template)
        task_status.started(ProxyStarted(port, proxy, edge, tls, metrics_port, hub, tunnel_port))


def tunnel_address(advertise: str | None, host: str, port: int) -> str:
    """HOST:PORT for nodes to dial: `advertise` (its port, else the bound one), else the listen
    address (an unspecified one, 0.0.0.0 or ::, is replaced by the server with the address the
    proxy connects from)."""
    if advertise:
        if advertise.startswith("["):
            return advertise if "]:" in advertise else f"{advertise}:{port}"
        return advertise if advertise.count(":") == 1 else f"{advertise}:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tune_gc_for_serving() -> None:
    """Make the cyclic garbage collector cheap for a process that serves requests.

    Each request allocates dozens of short-lived containers (coroutines, header tuples, events),
    which reference counting frees; with the default thresholds the collector still scans the
    young generation every 700 allocations and, ever more often, everything that survived
    startup. Freezing the startup objects takes them out of those scans, and a higher young
    threshold makes the scans rarer: about a tenth of the proxy's CPU per request at saturation
    (bench/proxy.py, BENCHMARKS.md). Process-wide, so called by the `vectorlay proxy` command,
    not by code that tests run in-process.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def serve_until_signalled(config: ProxyConfig) -> None:
    """Run the proxy. SIGHUP reloads the TLS certificate; SIGTERM or SIGINT stop accepting and let
    requests in flight finish (up to the shutdown grace); a second one stops at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            started: ProxyStarted = await nursery.start(run_proxy, config)
            tune_gc_for_serving()

            async def stop_gracefully() -> None:
                grace = config.limits.shutdown_grace_s
                if await started.edge.shutdown(grace):
                    log.info("every request in flight finished; stopping")
                nursery.cancel_scope.cancel()

            stopping = False
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if started.tls is not None:
                        started.tls.reload()
                    else:
                        log.info("received SIGHUP; no TLS certificate to reload")
                elif not stopping:
                    stopping = True
                    log.info("received %s, shutting down: finishing %d request(s) in flight (up to %gs)",
                             name, started.proxy.in_flight, config.limits.shutdown_grace_s)
                    nursery.start_soon(stop_gracefully)
                else:
                    log.info("received %s again; stopping now", name)
                    nursery.cancel_scope.cancel()
