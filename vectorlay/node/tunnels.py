"""The node's tunnels: one to every proxy the server lists, opened by the node, outbound only.

This is what lets a machine behind NAT serve with no router change, and keeps its replicas'
ports off the internet: the proxy reaches a replica only by opening a stream on a tunnel this node
opened, TLS-encrypted, with both ends holding certificates from the server's tunnel CA. A stream
names a replica id; it is piped to that replica's port on the node's loopback only if the replica
runs here now, and refused otherwise.

Each proxy has a keeper task: dial, hold the tunnel, reconnect with backoff and jitter when it
drops. A renewed certificate makes each keeper open a new tunnel before it retires the old one
(which finishes its streams first), so renewal never takes the node out of routing. A proxy that
leaves the server's list keeps its established tunnel (it may still be serving from its last
route table while it cannot reach the server) but is not dialled again once it drops.

On a clean stop (a signal: an upgrade, a restart) the tunnels say `drain restart`: the proxies keep
this node's replicas routed for a grace and send nothing new; the streams in flight finish, then
the tunnels close. Tunnels that are up run in shielded scopes so that this drain can happen after
the agent has been told to stop. An agent dying of an error closes them at once instead.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from vectorlay.backoff import Backoff
from vectorlay.core.protocol import TunnelCredential, TunnelProxies, TunnelProxy
from vectorlay.errors import TunnelError
from vectorlay.files import write_private
from vectorlay.lifecycle import CleanStop
from vectorlay.node.state_dir import NodeStateDir
from vectorlay.tunnel import IncomingStream, TunnelConnection, TunnelLimits, TunnelStream, identity
from vectorlay.tunnel.connection import wait_any
from vectorlay.tunnel.tls import TlsSocketStream

log = logging.getLogger("vectorlay.node")

READ_SIZE = 64 * 1024
REPLICA_CONNECT_TIMEOUT_S = 2.0
RESTART_DRAIN_S = 5.0  # on shutdown: how long streams in flight get to finish
ROTATE_DRAIN_S = 300.0  # a replaced tunnel: as long as a streamed response may take (the proxy's default)
STABLE_S = 10.0  # a tunnel up this long resets the reconnect backoff (a proxy that drops us at once does not)
# A tunnel is moved to a renewed certificate this long before its own expires (the proxy closes it
# then). The server renews at half-life (30 min before expiry), so this leaves room for retries.
ROTATE_MARGIN_S = 600.0
ROTATE_RETRY_S = 10.0


class ReplicaPorts(Protocol):
    def local_address(self, replica_id: str) -> tuple[str, int] | None:
        """Where a replica this node runs now listens (on this machine), or None."""
        ...


@dataclass(frozen=True)
class _Credential:
    certificate: str
    ca: str
    expires_at: float
    context: ssl.SSLContext


class NodeTunnels:
    def __init__(self, node_id: str, replicas: ReplicaPorts, state_dir: Path | None = None,
                 limits: TunnelLimits = TunnelLimits(), wall_clock: Callable[[], float] = time.time,
                 clean_stop: CleanStop | None = None) -> None:
        self.node_id = node_id
        # Drain (`drain restart`) on shutdown only on a clean stop; an agent dying of an error
        # closes its tunnels at once, so proxies stop routing to it at once. None: always drain.
        self.clean_stop = clean_stop
        self.replicas = replicas
        self.state_dir = state_dir
        self.limits = limits
        self.wall_clock = wall_clock
        saved = _load(state_dir)
        try:
            self.key = identity.load_key(saved["key"])
        except (KeyError, TypeError, ValueError):
            self.key = identity.new_key()
        self._key_pem = identity.key_pem(self.key)
        self.csr = identity.certificate_request(self.key, node_id)
        self.credential: _Credential | None = None
        self._credential_changed = trio.Event()
        self.wanted: dict[str, TunnelProxy] = {}
        self.current: dict[str, TunnelConnection] = {}  # proxy id -> its tunnel now
        self._keepers: dict[str, tuple[TunnelProxy, trio.CancelScope]] = {}
        self._connection_scopes: dict[TunnelConnection, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._restore(saved)

    def _restore(self, saved: dict[str, Any]) -> None:
        """A restart while the server is away still reaches the proxies with what was saved, as
        long as the certificate is valid: serving needs nothing from the server."""
        try:
            credential = TunnelCredential(str(saved["certificate"]), str(saved["ca"]), float(saved["expires_at"]))
            proxies = {str(p["id"]): TunnelProxy(str(p["id"]), str(p["address"])) for p in saved["proxies"]}
        except (KeyError, TypeError, ValueError):
            return
        if credential.expires_at > self.wall_clock():
            self.set_credential(credential, save=False)
            self.wanted = proxies

    @property
    def connected(self) -> int:
        """Proxies this node has a usable tunnel to now."""
        return sum(1 for c in self.current.values() if c.ready and not c.closing)

    # ---- from the server ----

    def set_credential(self, credential: TunnelCredential, save: bool = True) -> None:
        try:
            context = identity.client_context(credential.certificate, self._key_pem, credential.ca)
        except (ssl.SSLError, ValueError, OSError) as error:
            log.error("the server sent a tunnel certificate that cannot be used (%s)", error)
            return
        self.credential = _Credential(credential.certificate, credential.ca, credential.expires_at, context)
        self._credential_changed.set()
        self._credential_changed = trio.Event()
        if save:
            self._save()

    def set_proxies(self, message: TunnelProxies) -> None:
        self.wanted = {proxy.id: proxy for proxy in message.proxies}
        self._save()
        self._start_keepers()

    def _start_keepers(self) -> None:
        if self._nursery is None:
            return
        for proxy in self.wanted.values():
            kept = self._keepers.get(proxy.id)
            if kept is not None and kept[0].address == proxy.address:
                continue
            if kept is not None:
                kept[1].cancel()  # the proxy moved: dial the new address
            scope = trio.CancelScope()
            self._keepers[proxy.id] = (proxy, scope)
            self._nursery.start_soon(self._keep, proxy, scope)

    def _save(self) -> None:
        if self.state_dir is None:
            return
        credential = self.credential
        data = {"key": self._key_pem, "certificate": credential.certificate if credential else None,
                "ca": credential.ca if credential else None,
                "expires_at": credential.expires_at if credential else 0,
                "proxies": [{"id": p.id, "address": p.address} for p in self.wanted.values()]}
        write_private(NodeStateDir(self.state_dir).tunnels_file, json.dumps(data, indent=1) + "\n")

    # ---- running ----

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._start_keepers()
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    if self.clean_stop is None or self.clean_stop.requested:
                        await self._drain_all()
                    else:
                        for connection in list(self._connection_scopes):
                            connection.close("the agent stopped")
                    for scope in self._connection_scopes.values():
                        scope.cancel()

    async def _drain_all(self) -> None:
        connections = [c for c in self._connection_scopes if not c.closing]
        if not connections:
            return
        log.info("telling %d proxy(ies) this node is restarting; finishing streams in flight", len(connections))
        async with trio.open_nursery() as nursery:
            for connection in connections:
                nursery.start_soon(connection.drain, "drain restart", RESTART_DRAIN_S)

    async def _keep(self, proxy: TunnelProxy, scope: trio.CancelScope) -> None:
        """Hold a tunnel to `proxy` while it is wanted: dial, reconnect, rotate certificates."""
        backoff = Backoff()
        with scope:
            while True:
                credential = await self._wait_credential()
                try:
                    connection = await self._open(proxy, credential)
                except (OSError, TunnelError, trio.TooSlowError) as error:
                    if proxy.id not in self.wanted:
                        return
                    delay = backoff.next_delay()
                    log.warning("tunnel to proxy %s at %s: %s; retrying in %.1fs", proxy.id, proxy.address,
                                _reason(error), delay)
                    await trio.sleep(delay)
                    continue
                up_since = trio.current_time()
                try:
                    connection = await self._hold(proxy, connection, credential)
                finally:
                    if self.current.get(proxy.id) is connection:
                        del self.current[proxy.id]
                    if scope.cancel_called and not connection.closing:
                        connection.close("the proxy moved to another address")
                    # Cancelled from outside: the node is stopping, and `run` drains the tunnel.
                if trio.current_time() - up_since >= STABLE_S:
                    backoff.reset()
                if proxy.id not in self.wanted:
                    log.info("tunnel to proxy %s closed (%s); the server no longer lists it", proxy.id,
                             connection.close_reason)
                    return
                delay = backoff.next_delay()
                log.warning("tunnel to proxy %s closed (%s); reconnecting in %.1fs", proxy.id,
                            connection.close_reason, delay)
                await trio.sleep(delay)

    async def _hold(self, proxy: TunnelProxy, connection: TunnelConnection, used: _Credential) -> TunnelConnection:
        """Keep `connection` as the proxy's tunnel until it closes. When its certificate nears
        expiry and a renewed one is here, open a new tunnel first, then retire the old one (it
        finishes its streams). Returns the tunnel that closed."""
        self.current[proxy.id] = connection
        log.info("tunnel to proxy %s at %s is up", proxy.id, proxy.address)
        while True:
            with trio.move_on_after(max(0.0, used.expires_at - ROTATE_MARGIN_S - self.wall_clock())):
                await connection.closed.wait()
            if connection.closed.is_set():
                return connection
            credential = self.credential
            if credential is None or credential.expires_at <= used.expires_at:
                await wait_any(connection.closed, self._credential_changed)  # for the renewal
                continue
            try:
                fresh = await self._open(proxy, credential)
            except (OSError, TunnelError, trio.TooSlowError) as error:
                log.warning("tunnel to proxy %s: could not open one with the renewed certificate (%s); keeping "
                            "the current one and trying again in %gs", proxy.id, _reason(error), ROTATE_RETRY_S)
                with trio.move_on_after(ROTATE_RETRY_S):
                    await connection.closed.wait()
                continue
            old, connection, used = connection, fresh, credential
            self.current[proxy.id] = connection
            if self._nursery is not None:
                self._nursery.start_soon(old.drain, "drain rotate", ROTATE_DRAIN_S)
            log.info("tunnel to proxy %s moved to the renewed certificate", proxy.id)

    async def _wait_credential(self) -> _Credential:
        while self.credential is None:
            await self._credential_changed.wait()
        return self.credential

    async def _open(self, proxy: TunnelProxy, credential: _Credential) -> TunnelConnection:
        host, _, port = proxy.address.rpartition(":")
        with trio.fail_after(self.limits.handshake_timeout_s):
            tcp = await trio.open_tcp_stream(host.strip("[]"), int(port))
            try:
                tls = await TlsSocketStream.wrap(tcp, credential.context, server_side=False,
                                                 server_hostname=identity.proxy_hostname(proxy.id))
            except trio.BrokenResourceError as error:
                await tcp.aclose()
                raise TunnelError(f"TLS failed: {error.__cause__ or error}") from None
        connection = TunnelConnection(tls, client_side=False, limits=self.limits, handler=self._serve_stream,
                                      peer=f"proxy {proxy.id}", ping=True)
        assert self._nursery is not None
        await self._nursery.start(self._run_connection, connection)
        # Up: from now on it must outlive the node's own cancellation long enough to drain (see
        # `run`). Until now a stop simply abandoned it.
        self._connection_scopes[connection].shield = True
        return connection

    async def _run_connection(self, connection: TunnelConnection,
                              *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._connection_scopes[connection] = scope
            try:
                await connection.run(task_status=task_status)
            finally:
                del self._connection_scopes[connection]

    # ---- streams from proxies ----

    async def _serve_stream(self, incoming: IncomingStream) -> None:
        target = self.replicas.local_address(incoming.authority)
        if target is None:
            log.info("%s asked for replica %r, which does not run on this node; refused",
                     incoming.connection.peer, incoming.authority[:100])
            incoming.refuse(404)
            return
        try:
            with trio.fail_after(REPLICA_CONNECT_TIMEOUT_S):
                replica = await trio.open_tcp_stream(*target)
        except (OSError, trio.TooSlowError) as error:
            log.warning("replica %s on %s:%d cannot be reached: %s", incoming.authority, *target, _reason(error))
            incoming.refuse(502)
            return
        async with replica:
            await pipe(incoming.accept(), replica)


@dataclass(frozen=True)
class ProxyReach:
    proxy: TunnelProxy
    ok: bool
    detail: str


async def check_proxies(state_dir: Path, timeout_s: float = 5.0) -> list[ProxyReach] | None:
    """Whether this machine reaches each proxy its agent last heard of (`vectorlay node check`):
    TCP, then TLS verifying the proxy's certificate against the tunnel CA. No tunnel is opened
    (the running agent's would be replaced), so the proxy ends each check at its client
    certificate check. None if the agent has saved no proxy list yet."""
    saved = _load(state_dir)
    try:
        proxies = [TunnelProxy(str(p["id"]), str(p["address"])) for p in saved["proxies"]]
        ca = str(saved["ca"])
    except (KeyError, TypeError):
        return None
    context = identity.verify_only_context(ca)
    results = []
    for proxy in proxies:
        host, _, port = proxy.address.rpartition(":")
        try:
            with trio.fail_after(timeout_s):
                tcp = await trio.open_tcp_stream(host.strip("[]"), int(port))
                try:
                    tls = await TlsSocketStream.wrap(tcp, context, server_side=False,
                                                     server_hostname=identity.proxy_hostname(proxy.id))
                finally:
                    await tcp.aclose()
                await tls.aclose()
        except trio.BrokenResourceError as error:
            results.append(ProxyReach(proxy, False, f"TLS failed: {error.__cause__ or error}"))
        except (OSError, ValueError, trio.TooSlowError) as error:
            results.append(ProxyReach(proxy, False, f"cannot connect: {_reason(error)}"))
        else:
            results.append(ProxyReach(proxy, True, "reachable; its tunnel certificate is valid"))
    return results


async def pipe(tunnel: TunnelStream, replica: trio.SocketStream) -> None:
    """Copy both ways until both sides ended, or until either breaks (a reset from the proxy, the
    replica gone), which ends the other direction too."""

    async def copy(source: trio.abc.HalfCloseableStream, sink: trio.abc.HalfCloseableStream,
                   scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(READ_SIZE):
                await sink.send_all(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(copy, tunnel, replica, nursery.cancel_scope)
        nursery.start_soon(copy, replica, tunnel, nursery.cancel_scope)


def _load(state_dir: Path | None) -> dict[str, Any]:
    if state_dir is None:
        return {}
    try:
        data = json.loads(NodeStateDir(state_dir).tunnels_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _reason(error: BaseException) -> str:
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    cause = error.__cause__
    while isinstance(cause, BaseExceptionGroup):  # trio's "all attempts to connect failed"
        cause = cause.exceptions[0]
    if isinstance(cause, OSError):
        error = cause
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)
