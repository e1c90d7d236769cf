"""The proxy's end of the tunnels: accept the ones nodes open, and open streams on them to replicas.

A node dials `--tunnel-listen` with TLS and a client certificate from the server's tunnel CA; the
proxy takes the node id from that certificate and keeps the tunnel only while the server lists
the node as admitted (a node that is removed has its tunnel dropped at once). Each node has at
most one current tunnel here; a newer one (the node renewing its certificate) replaces the old,
which finishes what it carries and closes.

Failure is routing: a node's tunnel endpoints are routable only while its tunnel is up
(`RouteTable.set_reachable`), so a dropped tunnel takes them out of this proxy's routing at once
and requests waiting on them are retried elsewhere. A node that says it is restarting
(`drain restart` on the control stream: its agent is being upgraded, its replicas keep running)
keeps its routes for `restart_grace_s`; requests meanwhile wait for its new tunnel instead of failing.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import string
import time
from collections.abc import Callable
from functools import partial

import h2.config
import h2.connection
import h2.errors
import trio

from vectorlay.core.protocol import AdmittedNodes, TunnelCredential
from vectorlay.errors import TunnelError
from vectorlay.proxy.http import Proxy
from vectorlay.proxy.routing import RouteTable
from vectorlay.tunnel import TunnelConnection, TunnelLimits, TunnelStream, identity
from vectorlay.tunnel.tls import TlsSocketStream

log = logging.getLogger("vectorlay.proxy")

# How long a restarting node's replicas stay routed without a tunnel: an agent restart (process
# start, preflight checks, server hello, tunnel handshake) takes one to three seconds.
RESTART_GRACE_S = 10.0
# A tunnel replaced by a newer one from the same node finishes its streams, then the proxy closes
# it; this long at most (the proxy's default upstream timeout: a streamed response may last that).
RETIRE_MAX_S = 300.0
SWEEP_INTERVAL_S = 1.0  # restart graces, idle tunnels and expired certificates are checked this often
ACCEPT_BACKOFF_S = 0.1
REFUSE_TIMEOUT_S = 1.0
ID_ALPHABET = string.ascii_lowercase + string.digits


class TunnelHub:
    def __init__(self, routes: RouteTable, limits: TunnelLimits = TunnelLimits(), connect_timeout_s: float = 2.0,
                 restart_grace_s: float = RESTART_GRACE_S, wall_clock: Callable[[], float] = time.time) -> None:
        self.routes = routes
        self.limits = limits
        self.connect_timeout_s = connect_timeout_s
        self.restart_grace_s = restart_grace_s
        self.wall_clock = wall_clock
        self.proxy_id = "p-" + "".join(secrets.choice(ID_ALPHABET) for _ in range(10))
        self.address = ""  # where nodes dial us, set once listening
        self.key = identity.new_key()
        self.csr = identity.certificate_request(self.key, self.proxy_id)
        self.context: ssl.SSLContext | None = None  # None until the server issued our certificate
        self.admitted: set[str] = set()
        self.tunnels: dict[str, TunnelConnection] = {}  # node id -> its current tunnel
        self.expiry: dict[TunnelConnection, float] = {}  # when each tunnel's node certificate expires
        self.restarting: dict[str, float] = {}  # node id -> when its restart grace ends
        self.on_drain: list[Callable[[str], None]] = []  # a node's tunnel stops taking new streams
        self._waiters: dict[str, trio.Event] = {}  # requests waiting for a node's tunnel
        self._retired: set[TunnelConnection] = set()  # replaced, finishing their streams
        self._nursery: trio.Nursery | None = None
        # Metrics (totals over tunnels that closed, plus the live ones when rendered).
        self.accepted = 0
        self.refused = 0
        self._closed_streams = 0
        self._closed_bytes_in = 0
        self._closed_bytes_out = 0

    def attach(self, proxy: Proxy) -> None:
        """Serve `proxy`: count in its metrics, and close its idle pooled streams to a node whose
        tunnel drains (so the node's streams finish and it can close that tunnel)."""
        proxy.metrics.tunnels = self
        self.on_drain.append(lambda node_id: proxy.pool.forget_prefix(f"{node_id}/"))

    # ---- from the server ----

    def set_credential(self, credential: TunnelCredential) -> None:
        try:
            self.context = identity.server_context(credential.certificate, identity.key_pem(self.key), credential.ca)
        except (ssl.SSLError, ValueError, OSError) as error:
            log.error("the server sent a tunnel certificate that cannot be used (%s); keeping the previous one",
                      error)
            return
        log.info("tunnel certificate received; accepting tunnels from nodes on %s", self.address)

    def admit(self, change: AdmittedNodes) -> None:
        if change.snapshot:
            gone = self.admitted - set(change.added)
            self.admitted = set(change.added)
        else:
            gone = set(change.removed)
            self.admitted |= set(change.added)
            self.admitted -= gone
        for node_id in gone:
            self.restarting.pop(node_id, None)
            connections = self._connections_of(node_id)
            self.tunnels.pop(node_id, None)  # at once: nothing new goes to it from now on
            for connection in connections:
                log.warning("node %s is no longer admitted by the server; dropping its tunnel", node_id)
                connection.close("this node is no longer admitted")
            self._set_unreachable(node_id)

    def _connections_of(self, node_id: str) -> list[TunnelConnection]:
        current = self.tunnels.get(node_id)
        found = [current] if current is not None else []
        return found + [c for c in self._retired if c.peer == _peer(node_id)]

    # ---- accepting ----

    async def serve(self, listeners: list[trio.SocketListener],
                    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._sweep)
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                log.error("tunnel accept failed (%s); retrying in %gs", error.strerror, ACCEPT_BACKOFF_S)
                await trio.sleep(ACCEPT_BACKOFF_S)
                continue
            nursery.start_soon(self._handle, stream)

    async def _handle(self, raw: trio.SocketStream) -> None:
        try:
            peer = str(raw.socket.getpeername()[0])
        except OSError:
            peer = "unknown"
        try:
            await self._serve_tunnel(raw, peer)
        except Exception:  # noqa: BLE001 - one tunnel's failure must never take the proxy down
            log.exception("internal error on the tunnel from %s; closed it", peer)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await raw.aclose()

    async def _serve_tunnel(self, raw: trio.SocketStream, peer: str) -> None:
        context = self.context
        if context is None:
            self.refused += 1
            log.warning("tunnel from %s refused: no tunnel certificate from the server yet", peer)
            return
        with trio.move_on_after(self.limits.handshake_timeout_s) as scope:
            try:
                tls = await TlsSocketStream.wrap(raw, context, server_side=True)
            except trio.BrokenResourceError as error:
                self.refused += 1
                log.warning("tunnel from %s refused: TLS failed (%s)", peer, error.__cause__ or error)
                return
        if scope.cancelled_caught:
            self.refused += 1
            log.warning("tunnel from %s refused: no TLS handshake within %gs", peer,
                        self.limits.handshake_timeout_s)
            return
        certificate = tls.getpeercert()
        name = identity.peer_name(certificate)
        if name is None or name.role != identity.NODE:
            self.refused += 1
            log.warning("tunnel from %s refused: its certificate names no node", peer)
            return
        node_id = name.id
        if node_id not in self.admitted:
            self.refused += 1
            log.warning("tunnel from %s refused: node %s is not admitted by the server", peer, node_id)
            await _refuse(tls, f"node {node_id} is not admitted by the server")
            return
        connection = TunnelConnection(tls, client_side=True, limits=self.limits, peer=_peer(node_id))
        connection.on_control = partial(self._on_control, node_id, connection)
        self.expiry[connection] = identity.not_after(certificate) or float("inf")
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(connection.run)
                except TunnelError as error:
                    self.refused += 1
                    if not connection.failure_logged:
                        log.warning("tunnel from %s (node %s) failed: %s", peer, node_id, error)
                    return
                self.accepted += 1
                self._up(node_id, connection, peer)
        finally:
            self._down(node_id, connection)
            self.expiry.pop(connection, None)
            self._closed_streams += connection.streams_opened
            self._closed_bytes_in += connection.bytes_received
            self._closed_bytes_out += connection.bytes_sent

    def _up(self, node_id: str, connection: TunnelConnection, peer: str) -> None:
        if node_id not in self.admitted or connection.closing:
            connection.close("this node is no longer admitted")
            return
        old = self.tunnels.get(node_id)
        self.tunnels[node_id] = connection
        self.restarting.pop(node_id, None)
        if old is not None:
            old.draining = True  # replaced: nothing new goes to it
            self._retired.add(old)
            self._drained(node_id)
            if self._nursery is not None:
                self._nursery.start_soon(self._retire, old)
            log.info("tunnel from node %s (%s) replaced its previous one", node_id, peer)
        else:
            log.info("tunnel from node %s (%s) is up", node_id, peer)
        self.routes.set_reachable(node_id, True)
        self._wake(node_id)

    def _down(self, node_id: str, connection: TunnelConnection) -> None:
        self._retired.discard(connection)
        if self.tunnels.get(node_id) is not connection:
            return
        del self.tunnels[node_id]
        if node_id in self.restarting:
            log.info("node %s is restarting; its replicas stay routed for up to %gs", node_id, self.restart_grace_s)
        else:
            log.info("tunnel from node %s closed (%s); its replicas leave routing", node_id,
                     connection.close_reason)
            self._set_unreachable(node_id)
        self._wake(node_id)

    async def _retire(self, connection: TunnelConnection) -> None:
        """Close a replaced tunnel once its streams are done. The node closes it itself when it
        renewed its certificate; another program holding its key (or an agent that restarted
        without closing its old tunnel) learns this way that its tunnel is not the current one."""
        with trio.move_on_after(RETIRE_MAX_S):
            await connection.wait_idle()
        connection.close("replaced by a newer tunnel from the same node")

    def _on_control(self, node_id: str, connection: TunnelConnection, message: str) -> None:
        if not message.startswith("drain"):
            return
        if message == "drain restart" and self.tunnels.get(node_id) is connection:
            self.restarting[node_id] = trio.current_time() + self.restart_grace_s
        self._drained(node_id)
        self._wake(node_id)

    def _drained(self, node_id: str) -> None:
        for callback in self.on_drain:
            callback(node_id)

    def _set_unreachable(self, node_id: str) -> None:
        self.routes.set_reachable(node_id, False)
        self._wake(node_id)

    def _wake(self, node_id: str) -> None:
        event = self._waiters.pop(node_id, None)
        if event is not None:
            event.set()

    async def _sweep(self) -> None:
        """Restart graces that ran out, tunnels silent too long, node certificates that expired."""
        while True:
            await trio.sleep(SWEEP_INTERVAL_S)
            now = trio.current_time()
            for node_id, until in list(self.restarting.items()):
                if until <= now:
                    del self.restarting[node_id]
                    if node_id not in self.tunnels:
                        log.warning("node %s did not come back within %gs of its restart; its replicas leave "
                                    "routing", node_id, self.restart_grace_s)
                        self._set_unreachable(node_id)
            wall = self.wall_clock()
            for connection in [*self.tunnels.values(), *self._retired]:
                if connection.check_stall(now):
                    log.warning("%s read nothing for %gs; closed it", connection.peer, self.limits.send_stall_s)
                elif now - connection.last_received > self.limits.idle_timeout_s:
                    log.warning("%s said nothing for %gs; closing it", connection.peer, self.limits.idle_timeout_s)
                    connection.close("idle")
                elif self.expiry.get(connection, float("inf")) <= wall:
                    log.warning("%s: its certificate expired; closing it", connection.peer)
                    connection.close("certificate expired")

    # ---- streams to replicas ----

    async def open_stream(self, node_id: str, replica_id: str) -> TunnelStream:
        """A stream to `replica_id` through `node_id`'s tunnel. Waits for a tunnel being replaced
        (up to the connect timeout) or a restarting node's return (up to its grace);
        TunnelError if there is none."""
        deadline = trio.current_time() + self.connect_timeout_s
        while True:
            connection = self.tunnels.get(node_id)
            if connection is not None and not connection.draining and not connection.closing:
                with trio.move_on_after(self.connect_timeout_s):
                    return await connection.open_stream(replica_id)
                raise TunnelError(f"node {node_id} did not answer a stream within {self.connect_timeout_s:g}s")
            until = self.restarting.get(node_id)
            if until is None and connection is None:
                raise TunnelError(f"no tunnel from node {node_id} to this proxy")
            wait_until = max(deadline, until) if until is not None else deadline
            if trio.current_time() >= wait_until:
                raise TunnelError(f"no usable tunnel from node {node_id} (it is restarting or being replaced)")
            event = self._waiters.setdefault(node_id, trio.Event())
            with trio.move_on_at(wait_until):
                await event.wait()

    # ---- metrics ----

    @property
    def open_tunnels(self) -> int:
        return len(self.tunnels)

    @property
    def streams_open(self) -> int:
        return sum(c.open_streams for c in self._live())

    @property
    def streams_total(self) -> int:
        return self._closed_streams + sum(c.streams_opened for c in self._live())

    @property
    def bytes_in(self) -> int:
        return self._closed_bytes_in + sum(c.bytes_received for c in self._live())

    @property
    def bytes_out(self) -> int:
        return self._closed_bytes_out + sum(c.bytes_sent for c in self._live())

    def _live(self) -> list[TunnelConnection]:
        return [*self.tunnels.values(), *self._retired]


async def _refuse(tls: TlsSocketStream, reason: str) -> None:
    """Say why in an HTTP/2 GOAWAY (the node logs it), then close."""
    refusal = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    refusal.initiate_connection()
    refusal.close_connection(h2.errors.ErrorCodes.REFUSED_STREAM, additional_data=reason.encode())
    with trio.move_on_after(REFUSE_TIMEOUT_S):
        try:
            await tls.send_all(refusal.data_to_send())
            await tls.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _peer(node_id: str) -> str:
    return f"node {node_id}"
