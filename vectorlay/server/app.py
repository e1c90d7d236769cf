"""`vectorlay server`: load state, then serve nodes, proxies and the CLI until cancelled."""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from vectorlay.core.api import client_version_problem
from vectorlay.core.api_views import ServerView
from vectorlay.core.health import LivenessPolicy
from vectorlay.core.model import Role
from vectorlay.core.protocol import (
    CLIENT_FIRST,
    NODE_FIRST,
    PROXY_FIRST,
    CaBundle,
    ClientHello,
    DatabaseHealth,
    Join,
    NodeHello,
    ProxyHello,
    Ready,
)
from vectorlay.core.tokens import parse_token
from vectorlay.errors import AuthError, ProtocolError, StoreUnavailable, UserError
from vectorlay.files import write_private
from vectorlay.metrics_http import serve_metrics
from vectorlay.server import metrics, shared_state
from vectorlay.server.api import Api
from vectorlay.server.auth import Authenticator, Principal
from vectorlay.server.controller import Controller
from vectorlay.server.cut_off import HAND_OVER_AFTER_S, Closer, CutOff, peer_context, probe_database
from vectorlay.server.cut_off import REASON as cut_off_reason
from vectorlay.server.fleet import Fleet
from vectorlay.server.idle_links import API_IDLE_TIMEOUT_S
from vectorlay.server.ids import random_id
from vectorlay.server.node_session import handle_hello, handle_join
from vectorlay.server.records import TokenRecord, health_from_record
from vectorlay.server.registry import GONE_AFTER_S, Registry, advertised_host
from vectorlay.server.replication import Replicator
from vectorlay.server.route_feed import RouteFeed
from vectorlay.server.secrets_box import SecretBox
from vectorlay.server.store import Store, open_store, ops
from vectorlay.server.store import engine as store_engine
from vectorlay.server.store.engine import describe_url, sqlite_path, sqlite_url
from vectorlay.server.tunnel_ca import TunnelCa
from vectorlay.server.tunnels import TunnelService
from vectorlay.server.write_behind import retry_delay
from vectorlay.tls import ServerTls
from vectorlay.wire import CLOSE_POLICY, CLOSE_PROTOCOL_ERROR, CLOSE_TRY_AGAIN, Link, LinkClosed, serve

log = logging.getLogger("vectorlay.server")

HELLO_DEADLINE_S = 10.0  # a socket that does not introduce itself in time is dropped
PATHS = frozenset({"/v1/node", "/v1/proxy", "/v1/api", "/v1/ca", "/v1/health"})


@dataclass(frozen=True)
class ServerConfig:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 7070
    db_url: str | None = None
    heartbeat_interval_s: float = 1.0
    failover_grace_s: float | None = None  # after a restart; default: the down threshold
    crash_points: frozenset[str] = frozenset()  # fault-injection tests only
    tls: ServerTls | None = None  # None: plain ws:// (loopback development)
    metrics_listen: tuple[str, int] | None = None  # Prometheus text format at http://HOST:PORT/metrics
    api_idle_timeout_s: float = API_IDLE_TIMEOUT_S  # a CLI link with no call in flight this long is closed
    advertise: str | None = None  # the host other servers reach this one at (default: see advertised_host)

    @property
    def database_url(self) -> str:
        return self.db_url or sqlite_url(self.state_dir)

    @property
    def policy(self) -> LivenessPolicy:
        return LivenessPolicy.for_interval(self.heartbeat_interval_s)


@dataclass(frozen=True)
class ServerStarted:
    port: int
    admin_token: str | None  # only known when this start created it or it is in the state dir
    created_admin_token: bool


async def run_server(
    config: ServerConfig,
    wall_clock: Callable[[], float] = time.time,
    *,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None,
    store: Store | None = None,
    task_status: trio.TaskStatus[ServerStarted] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. Tests may pass in-memory `listeners` instead of host:port, and a
    `store` of their own (which they then close)."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    if store is not None:
        await _serve(config, store, wall_clock, listeners, task_status)
        return
    with _one_server_on_sqlite(config.database_url):
        opened = await _open_store_patiently(config.database_url)
        try:
            await _serve(config, opened, wall_clock, listeners, task_status)
        finally:
            opened.close()


@contextmanager
def _one_server_on_sqlite(url: str) -> Iterator[None]:
    """SQLite serves one server: a second one on the same file is refused with one line (several
    servers share a PostgreSQL database instead). An advisory lock next to the file, held while
    the server runs, released by the kernel even after kill -9."""
    database = sqlite_path(url)
    if database is None:
        yield
        return
    path = Path(database + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"another vectorlay server (pid {holder}) uses the SQLite database {database}: "
                            "SQLite is for one server; run several on PostgreSQL (--db postgresql+psycopg://...)"
                            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def _open_store_patiently(url: str) -> Store:
    """Open the database, waiting for it with capped backoff if it is not there yet (a server
    started with its database, or before it, must not give up); a failure that waiting cannot
    heal (a bad URL, a schema newer than this vectorlay) stops the start with its one line."""
    attempt = 0
    while True:
        try:
            return await trio.to_thread.run_sync(open_store, url)
        except StoreUnavailable as error:
            delay = retry_delay(attempt, random.random())
            attempt += 1
            log.warning("%s at %s; trying again in %.1fs", error, describe_url(url), delay)
            await trio.sleep(delay)


async def _serve(config: ServerConfig, store: Store, wall_clock: Callable[[], float],
                 listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None,
                 task_status: trio.TaskStatus[ServerStarted]) -> None:
    snapshot = await store.load()
    fleet = Fleet()
    for node in snapshot.nodes:
        fleet.put_node(node)
    for record in snapshot.clusters:
        fleet.clusters[record.spec.key] = record
    for replica, created_at in snapshot.replicas:
        fleet.put_replica(replica, created_at)
    for command in snapshot.commands:
        fleet.outbox[command.node_id].append(command)
    for key in snapshot.api_keys:
        fleet.api_keys[key.id] = key
    for secret in snapshot.secrets:
        fleet.secrets[(secret.project, secret.name)] = secret
    fleet.generation = int(snapshot.meta.get("generation", "0"))
    now, wall = trio.current_time(), wall_clock()
    for health in snapshot.health:
        fleet.health[health.cluster] = health_from_record(health, now, wall)

    policy = config.policy
    secret_box = await trio.to_thread.run_sync(SecretBox.in_state_dir, config.state_dir)
    server_id = f"s-{random_id(8)}"
    store.notify_as = server_id
    controller = Controller(fleet, store, policy, wall_clock, config.crash_points, secret_box, server_id)
    # Nodes get this long to reconnect after a server restart before silence counts against them;
    # a fleet of thousands reconnecting with jittered backoff needs most of a minute.
    grace = config.failover_grace_s if config.failover_grace_s is not None else max(60.0, 2 * policy.down_after_s)
    controller.intake.restore_liveness(grace)
    auth = Authenticator(store, fleet, wall_clock, config.tls.pin if config.tls else None)
    feed = RouteFeed(fleet, controller.signals)
    replicator = Replicator(fleet, store, controller.writer, controller.signals, controller.sessions, auth,
                            controller.leadership, policy, server_id)
    controller.on_lead.append(replicator.took_lead)
    controller.intake.on_judged_unheld = replicator.reload_nodes
    auth.load_node = replicator.load_node
    controller.writer.other_servers = lambda: tuple(replicator.live_servers - {server_id})
    tunnel_ca = await trio.to_thread.run_sync(TunnelCa.in_state_dir, config.state_dir)
    keys = {"secrets_key": secret_box.fingerprint, "tunnel_ca": shared_state.fingerprint(tunnel_ca.pem)}
    if config.tls is not None:
        keys["tls_ca"] = config.tls.pin
    await _check_shared_state(store, config.state_dir, server_id, keys, snapshot.meta)
    tunnels = TunnelService(tunnel_ca, fleet, controller.signals, feed, wall_clock)
    api = Api(fleet, controller.admin, controller.sessions, controller.signals, auth, feed,
              controller.writer.database, lambda: len(controller.writer.journal), config.api_idle_timeout_s)
    registry = Registry(store, server_id, f"{config.host}:{config.port}",
                        lambda: (len(controller.sessions), len(feed.proxies), api.links), replicator.servers_seen,
                        tunnels.local_proxies, tunnels.set_remote_proxies)
    api.servers = partial(_servers_view, store, registry, server_id)
    context = peer_context(config.tls.ca_pem if config.tls else None)
    cut_off = CutOff(registry, partial(probe_database, context=context), [
        Closer("node", lambda: len(controller.sessions), partial(controller.sessions.close_all, code=CLOSE_TRY_AGAIN)),
        Closer("proxy", lambda: len(feed.proxies), partial(feed.close_all, code=CLOSE_TRY_AGAIN)),
    ])
    admin_token, created = await _bootstrap_admin_token(config, store, auth, snapshot.meta)
    log.info("state: %s; %d node(s), %d cluster(s), %d replica(s)", describe_url(config.database_url),
             len(fleet.nodes), len(fleet.clusters), len(fleet.replicas))

    async def handle(path: str, link: Link) -> None:
        if path == "/v1/ca":
            if config.tls is None:
                await link.close(CLOSE_POLICY, "this server does not use TLS")
            else:
                await link.send(CaBundle(config.tls.ca_pem.decode()))
                await link.close()
            return
        if path == "/v1/health":
            available = registry.silent_for(trio.current_time()) < HAND_OVER_AFTER_S
            await link.send(DatabaseHealth(available))
            await link.close()
            return
        try:
            with trio.fail_after(HELLO_DEADLINE_S):
                first = await link.receive(_FIRST[path])
        except trio.TooSlowError:
            await link.close(CLOSE_POLICY, "no hello within the deadline")
            return
        except ProtocolError as error:
            await link.reject(error)
            return
        except LinkClosed:
            return
        try:
            if isinstance(first, Join):
                await handle_join(link, first, auth, controller.admin)
            elif isinstance(first, (NodeHello, ProxyHello, ClientHello)) and cut_off.active:
                await link.close(CLOSE_TRY_AGAIN, cut_off_reason)
            elif isinstance(first, NodeHello):
                await handle_hello(link, first, auth, controller.intake, config.heartbeat_interval_s, tunnels)
            elif isinstance(first, ProxyHello):
                record = await auth.check_token(first.token, frozenset({Role.PROXY, Role.ADMIN}))
                credential = tunnels.proxy_credential(first)
                await link.send(Ready("proxy"))
                if credential is not None:
                    await link.send(credential)
                with tunnels.proxy_connected(first, link):
                    await _until_revoked(auth, record, link, partial(feed.serve, link, first.url_template))
            elif isinstance(first, ClientHello):
                record = await auth.check_token(first.token, frozenset({Role.ADMIN, Role.DEPLOYER}))
                if (problem := client_version_problem(first.api)) is not None:
                    await link.close(CLOSE_PROTOCOL_ERROR, problem)  # one line that says whom to upgrade
                    return
                await link.send(Ready(record.role.value))
                principal = Principal(record.role, record.id, record.project)
                await _until_revoked(auth, record, link, partial(api.serve, link, principal))
        except AuthError as error:
            log.warning("refused %s on %s: %s", link.remote, path, error)
            await link.close(CLOSE_POLICY, str(error))
        except StoreUnavailable as error:  # a peer to tell, not a bug: no traceback
            await link.close(CLOSE_TRY_AGAIN, f"{error}; try again shortly")
        except ProtocolError as error:  # a tunnel certificate request we will not sign
            log.warning("refused %s on %s: %s", link.remote, path, error)
            await link.reject(error)
        except LinkClosed:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(auth.sessions.close_expired, wall_clock)
        await nursery.start(registry.run)
        await nursery.start(replicator.run)
        await nursery.start(controller.run)
        await nursery.start(feed.run)
        await nursery.start(tunnels.run)
        if store.dialect == "postgresql":  # only there can another server have the database
            await nursery.start(cut_off.run)
        ssl_context = config.tls.context() if config.tls else None
        if config.metrics_listen is not None:
            metrics_host, metrics_port = config.metrics_listen
            metrics_listeners = await trio.open_tcp_listeners(metrics_port, host=metrics_host)
            render = partial(metrics.render, fleet, controller.writer, controller.sessions)
            await nursery.start(serve_metrics, render, metrics_listeners)
            log.info("metrics on http://%s:%d/metrics", metrics_host,
                     metrics_listeners[0].socket.getsockname()[1])
        server = await nursery.start(partial(serve, handle, config.host, config.port, PATHS, ssl_context,
                                             listeners=listeners))
        port = server.port if listeners is None else 0
        host = advertised_host(config.host, config.advertise, config.database_url)
        registry.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        scheme = "wss" if config.tls else "ws"
        log.info("listening on %s://%s:%d", scheme, config.host, port)
        if config.tls is None and not _is_loopback(config.host):
            log.warning("TLS IS OFF on %s: tokens and node credentials cross the network in clear text. "
                        "Use --tls auto (or --tls-cert/--tls-key) anywhere but a development machine.", config.host)
        task_status.started(ServerStarted(port, admin_token, created))


_FIRST = {"/v1/node": NODE_FIRST, "/v1/proxy": PROXY_FIRST, "/v1/api": CLIENT_FIRST}


async def _check_shared_state(store: Store, state_dir: Path, server_id: str, keys: dict[str, str],
                              stored: dict[str, str]) -> None:
    """Refuse to run beside servers of this database that hold other keys (shared_state.py)."""
    others: list[str] = []
    if store.dialect == "postgresql":  # on SQLite no other server can run (the database is locked)
        rows, now = await store.run(store_engine.list_servers)
        others = [f"{r.id} at {r.address}" for r in rows if r.id != server_id and now - r.seen_at <= GONE_AFTER_S]
    decision = shared_state.decide(stored, keys, others, state_dir)
    shared_state.log_replaced(decision.replaced)
    if decision.to_record:
        await store.apply([ops.SetMeta(key, value) for key, value in decision.to_record.items()])


async def _servers_view(store: Store, registry: Registry, me: str) -> list[ServerView]:
    """`vectorlay get servers`: every live server, which one leads and with which epoch."""
    holder, epoch, lease_until, now = await store.run(store_engine.leader_row)
    if store.dialect != "postgresql":
        holder, lease_until = me, now + 1  # one server on SQLite: it leads
    views = []
    for s in registry.servers:
        if not s.alive:
            continue
        leads = s.id == holder and lease_until >= now
        views.append(ServerView(s.id, s.address, leads, epoch if leads else None, s.nodes, s.proxies, s.clients,
                                round(s.seen_s_ago, 1), s.id == me))
    return views


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _until_revoked(auth: Authenticator, record: TokenRecord, link: Link,
                         serve: Callable[[], Awaitable[None]]) -> None:
    """Serve a link opened with `record`'s token until it ends or the token is revoked or
    expires; then the link is closed with that reason."""
    scope = trio.CancelScope()
    reasons: list[str] = []

    def close(reason: str) -> None:
        reasons.append(reason)
        scope.cancel()

    with auth.sessions.track(record, close), scope:
        await serve()
    if reasons:
        await link.close(CLOSE_POLICY, reasons[0])


async def _bootstrap_admin_token(config: ServerConfig, store: Store, auth: Authenticator,
                                 meta: dict[str, str]) -> tuple[str | None, bool]:
    """On the first start, create the admin token and write it to DIR/admin.token."""
    path = config.state_dir / "admin.token"
    if "admin_token_id" in meta:
        if not path.exists():
            return None, False
        token = path.read_text().strip()
        parsed = parse_token(token)
        if parsed is not None and parsed.pin != auth.ca_pin:
            # TLS was turned on (or its CA changed) since the token was written: same token, new pin.
            token = auth.token_text(parsed.id, parsed.secret)
            write_private(path, token + "\n")
        return token, False
    record, token = await auth.create_token(Role.ADMIN, None, None, "created on first start")
    await store.apply([ops.SetMeta("admin_token_id", record.id)])
    write_private(path, token + "\n")
    return token, True
