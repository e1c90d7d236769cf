"""The proxy's link to the server: receive the route snapshot, then deltas, forever.

When the link drops the proxy keeps serving from its last table and reconnects with backoff:
a control-plane outage must not become a data-plane outage.
"""

from __future__ import annotations

import logging

import trio

from vectorlay.backoff import Backoff, Rotation
from vectorlay.core.protocol import (
    PROTOCOL_VERSION,
    SERVER_TO_PROXY,
    AdmittedNodes,
    ProxyHello,
    Ready,
    RouteSnapshot,
    RouteUpdate,
    TunnelCredential,
)
from vectorlay.errors import AuthError, ConnectError, ProtocolError, unwrap_group
from vectorlay.proxy.routing import RouteTable
from vectorlay.proxy.tunnels import TunnelHub
from vectorlay.wire import CLOSE_POLICY, LinkClosed, connect, secure_context, server_urls

log = logging.getLogger("vectorlay.proxy")

KEEPALIVE_INTERVAL_S = 2.0
KEEPALIVE_TIMEOUT_S = 5.0


async def follow_routes(server: str, token: str, url_template: str, table: RouteTable,
                        tunnels: TunnelHub | None = None,
                        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Keep `table` in step with the server; `started` once the first snapshot is loaded. With
    `tunnels`, also get the tunnel certificate and the nodes admitted to tunnel in."""
    backoff = Backoff()
    servers = Rotation(server_urls(server), backoff)
    started = False
    while True:
        url = servers.current + "/v1/proxy"
        try:
            with unwrap_group():
                async with connect(url, await secure_context(url, token)) as link:
                    if tunnels is not None:
                        hello = ProxyHello(PROTOCOL_VERSION, token, url_template, tunnels.proxy_id, tunnels.address,
                                           tunnels.csr)
                    else:
                        hello = ProxyHello(PROTOCOL_VERSION, token, url_template)
                    await link.send(hello)
                    with trio.fail_after(KEEPALIVE_TIMEOUT_S * 2):
                        first = await link.receive(SERVER_TO_PROXY)
                    if not isinstance(first, Ready):
                        raise ProtocolError(f"expected ready, got {first.TYPE!r}")
                    servers.succeeded()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(link.keepalive, KEEPALIVE_INTERVAL_S, KEEPALIVE_TIMEOUT_S)
                        while True:
                            message = await link.receive(SERVER_TO_PROXY)
                            if isinstance(message, RouteSnapshot):
                                table.load_snapshot(message)
                                log.info("route table loaded from %s: %d cluster(s)", servers.current,
                                         len(table.clusters))
                                if not started:
                                    task_status.started()
                                    started = True
                            elif isinstance(message, RouteUpdate):
                                table.apply(message)
                            elif isinstance(message, TunnelCredential) and tunnels is not None:
                                tunnels.set_credential(message)
                            elif isinstance(message, AdmittedNodes) and tunnels is not None:
                                tunnels.admit(message)
        except LinkClosed as closed:
            if closed.code == CLOSE_POLICY:
                raise AuthError(f"the server refused this proxy: {closed.reason}") from None
            problem = str(closed)
        except (ConnectError, ProtocolError) as error:
            problem = str(error)
        except trio.TooSlowError:
            problem = "the server did not answer the hello"
        delay = servers.failed()
        log.warning("route feed: %s; keeping the last table, reconnecting to %s in %.1fs", problem, servers.current,
                    delay)
        await trio.sleep(delay)
