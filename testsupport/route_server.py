"""A stand-in control plane that serves a scripted route table to real `vectorlay proxy` processes.

Proxy tests and benchmarks need the proxy to route to upstreams they start themselves (nginx, a
scripted replica) with exact control over when routes change; running a real server and nodes
for that would only add noise. This speaks the server's side of the proxy protocol (hello, ready,
snapshot, then deltas) on 127.0.0.1 and accepts any token:

    with StaticRouteServer([Route("echo", (Endpoint("r1", "127.0.0.1:9000", "n1"),))]) as routes:
        proxy, port = spawn_proxy(tmp_path, routes.url)
        routes.set_route(Route("echo", ()))      # pushed at once to every connected proxy

With a tunnel CA (`tunnel_ca`), it also plays the server's part in the tunnels: it certifies a
proxy that asks, admits the node ids it is given, and records where each proxy takes tunnels.

It runs its own trio loop in a background thread, so synchronous tests can drive it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from testsupport.background import BackgroundLoop
from testsupport.processes import REPO_ROOT, Proc
from vectorlay.core.protocol import (
    PROXY_FIRST,
    AdmittedNodes,
    Message,
    ProxyHello,
    Ready,
    Route,
    RouteSnapshot,
    RouteUpdate,
    TunnelCredential,
)
from vectorlay.errors import PeerError, ProtocolError
from vectorlay.server.tunnel_ca import PROXY_CERT_VALID_S, TunnelCa
from vectorlay.wire import Link, serve


class StaticRouteServer(BackgroundLoop):
    def __init__(self, routes: Sequence[Route] = (), tunnel_ca: TunnelCa | None = None,
                 admitted: Sequence[str] = ()) -> None:
        super().__init__("route server")
        self.tunnel_ca = tunnel_ca
        self.admitted = tuple(admitted)
        self.tunnel_proxies: dict[str, str] = {}  # proxy id -> where it takes tunnels
        self._routes: dict[str, Route] = {r.cluster: r for r in routes}
        self._version = 0
        self._subscribers: list[trio.MemorySendChannel[Message]] = []
        self._port: int | None = None
        self.connections = 0  # proxies that have said hello, ever

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("route server is not started")
        return f"ws://127.0.0.1:{self._port}"

    def set_route(self, route: Route) -> None:
        """Replace (or add) a cluster's route and push it to every connected proxy."""
        self._call(lambda: self._push(route, removed=False))

    def remove(self, cluster: str) -> None:
        self._call(lambda: self._push(Route(cluster), removed=True))

    # ---- inside the route server's loop ----

    def _push(self, route: Route, removed: bool) -> None:
        if removed:
            self._routes.pop(route.cluster, None)
        else:
            self._routes[route.cluster] = route
        self._version += 1
        update = RouteUpdate(self._version, route, removed)
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(update)
            except (trio.WouldBlock, trio.BrokenResourceError):
                self._subscribers.remove(channel)

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, self._handle, "127.0.0.1", 0, frozenset({"/v1/proxy"}))
            self._port = server.port
            self._started()

    async def _handle(self, path: str, link: Link) -> None:
        try:
            hello = await link.receive(PROXY_FIRST)
            if not isinstance(hello, ProxyHello):
                raise ProtocolError("expected a proxy hello")
            self.connections += 1
            send, receive = trio.open_memory_channel[Message](1024)
            # Snapshot and subscription with no checkpoint between them: no update is missed.
            send.send_nowait(RouteSnapshot(self._version, tuple(self._routes.values())))
            self._subscribers.append(send)
            await link.send(Ready("proxy"))
            if self.tunnel_ca is not None and hello.tunnel_id:
                now = time.time()
                certificate = self.tunnel_ca.issue_proxy(self.tunnel_ca.requested_key(hello.tunnel_csr),
                                                         hello.tunnel_id, now)
                await link.send(TunnelCredential(certificate, self.tunnel_ca.pem, now + PROXY_CERT_VALID_S))
                await link.send(AdmittedNodes(self.admitted, snapshot=True))
                self.tunnel_proxies[hello.tunnel_id] = hello.tunnel_address
            async with receive:
                async for message in receive:
                    await link.send(message)
        except PeerError:
            pass


def spawn_proxy(root: Path, server_url: str, *extra: str, name: str = "proxy") -> tuple[Proc, int]:
    """Start a real `vectorlay proxy` process against `server_url`; (process, its HTTP port).

    The port comes from the proxy's own log line, so `--listen 127.0.0.1:0` can pick a free one."""
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"{name}.log"
    tunnel = [] if any(arg.startswith("--tunnel-listen") for arg in extra) else ["--tunnel-listen", "127.0.0.1:0"]
    argv = [sys.executable, "-m", "vectorlay", "proxy", "--server", server_url, "--token", "scripted",
            "--listen", "127.0.0.1:0", *tunnel, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VECTORLAY_CONFIG": str(root / "client-config.json")}
    with log_path.open("ab") as handle:
        popen = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                 start_new_session=True)
    proc = Proc(name, argv, log_path, popen)
    match = proc.wait_log(r"proxy listening on https?://127\.0\.0\.1:(\d+)")
    return proc, int(match.group(1))
