"""Observers for fault tests and benchmarks: a steady HTTP client and a route-feed watcher.

Both run in a background thread so that synchronous tests can kill and restart processes while
traffic flows, then look at what the client saw and when routes changed.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field

from testsupport.background import BackgroundLoop
from vectorlay.core.protocol import (
    PROTOCOL_VERSION,
    SERVER_TO_PROXY,
    Endpoint,
    ProxyHello,
    Ready,
    RouteSnapshot,
    RouteUpdate,
)
from vectorlay.wire import connect


@dataclass(frozen=True)
class Sample:
    sent_at: float  # time.monotonic()
    status: int | None  # None: the request failed without an HTTP response
    node: str
    error: str = ""


@dataclass
class SteadyClient:
    """Sends one request every 1/rate_hz seconds to the proxy (keep-alive) and records each."""

    port: int
    host: str
    rate_hz: float = 20.0
    path: str = "/v1/completions"
    body: bytes = b'{"prompt": "The ", "max_tokens": 4}'
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> SteadyClient:
        self._thread = threading.Thread(target=self._run, name="steady-client", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        return self.samples

    def __enter__(self) -> SteadyClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        interval = 1.0 / self.rate_hz
        next_at = time.monotonic()
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("POST", self.path, body=self.body, headers={"Host": self.host})
                response = conn.getresponse()
                response.read()
                self.samples.append(Sample(sent, response.status, response.getheader("x-vectorlay-node") or ""))
                if response.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as error:
                self.samples.append(Sample(sent, None, "", f"{type(error).__name__}: {error}"))
                if conn is not None:
                    conn.close()
                conn = None
            next_at += interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            conn.close()

    def failures(self, since: float = 0.0) -> list[Sample]:
        return [s for s in self.samples if s.sent_at >= since and s.status != 200]


@dataclass(frozen=True)
class RouteChange:
    at: float  # time.monotonic() when it arrived
    cluster: str
    endpoints: tuple[str, ...]  # replica ids routed to
    nodes: tuple[str, ...]


class RouteWatcher(BackgroundLoop):
    """Subscribes to the server's route feed like a proxy does and records every change."""

    def __init__(self, server_url: str, token: str) -> None:
        super().__init__("route watcher", start_timeout_s=20)
        self.server_url = server_url
        self.token = token
        self.changes: list[RouteChange] = []

    def stop(self) -> None:
        self.close()

    async def _serve(self) -> None:
        async with connect(self.server_url.rstrip("/") + "/v1/proxy") as link:
            await link.send(ProxyHello(PROTOCOL_VERSION, self.token, ""))
            await link.receive_one(Ready)
            while True:
                message = await link.receive(SERVER_TO_PROXY)
                now = time.monotonic()
                if isinstance(message, RouteSnapshot):
                    for route in message.routes:
                        self._record(now, route.cluster, route.endpoints)
                    self._started()
                elif isinstance(message, RouteUpdate):
                    self._record(now, message.route.cluster, () if message.removed else message.route.endpoints)

    def _record(self, now: float, cluster: str, endpoints: tuple[Endpoint, ...]) -> None:
        ids = tuple(e.replica_id for e in endpoints)
        nodes = tuple(e.node for e in endpoints)
        self.changes.append(RouteChange(now, cluster, ids, nodes))

    def first_change_after(self, t: float, cluster: str, without_node: str) -> RouteChange | None:
        """The first change after `t` in which `cluster` no longer routes to `without_node`."""
        for change in self.changes:
            if change.at >= t and change.cluster == cluster and without_node not in change.nodes:
                return change
        return None
