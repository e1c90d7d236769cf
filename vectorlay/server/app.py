"""`vectorlay server`: load state, then serve nodes, proxies and the CLI until cancelled."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from vectorlay.core.health import LivenessPolicy
from vectorlay.core.model import Role
from vectorlay.core.protocol import (
    CLIENT_FIRST,
    NODE_FIRST,
    PROXY_FIRST,
    ClientHello,
    Join,
    NodeHello,
    ProxyHello,
    Ready,
)
from vectorlay.errors import AuthError, ProtocolError
from vectorlay.files import write_private
from vectorlay.server.api import Api
from vectorlay.server.auth import Authenticator
from vectorlay.server.controller import Controller
from vectorlay.server.fleet import Fleet
from vectorlay.server.node_session import handle_hello, handle_join
from vectorlay.server.route_feed import RouteFeed
from vectorlay.server.store import Store, open_store, ops
from vectorlay.server.store.engine import describe_url, sqlite_url
from vectorlay.wire import CLOSE_POLICY, Link, LinkClosed, serve

log = logging.getLogger("vectorlay.server")

HELLO_DEADLINE_S = 10.0  # a socket that does not introduce itself in time is dropped
PATHS = frozenset({"/v1/node", "/v1/proxy", "/v1/api"})


@dataclass(frozen=True)
class ServerConfig:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 7070
    db_url: str | None = None
    heartbeat_interval_s: float = 1.0
    failover_grace_s: float | None = None  # after a restart; default: the down threshold
    crash_points: frozenset[str] = frozenset()  # fault-injection tests only

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
    task_status: trio.TaskStatus[ServerStarted] = trio.TASK_STATUS_IGNORED,
) -> None:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    store = await trio.to_thread.run_sync(open_store, config.database_url)
    try:
        await _serve(config, store, wall_clock, task_status)
    finally:
        store.close()


async def _serve(config: ServerConfig, store: Store, wall_clock: Callable[[], float],
                 task_status: trio.TaskStatus[ServerStarted]) -> None:
    snapshot = await store.load()
    fleet = Fleet()
    for node in snapshot.nodes:
        fleet.put_node(node)
    for record in snapshot.clusters:
        fleet.clusters[record.spec.name] = record
    for replica, created_at in snapshot.replicas:
        fleet.put_replica(replica, created_at)
    for command in snapshot.commands:
        fleet.outbox[command.node_id].append(command)
    for key in snapshot.api_keys:
        fleet.api_keys[key.id] = key
    fleet.generation = int(snapshot.meta.get("generation", "0"))

    policy = config.policy
    controller = Controller(fleet, store, policy, wall_clock, config.crash_points)
    # Nodes get this long to reconnect after a server restart before silence counts against them;
    # a fleet of thousands reconnecting with jittered backoff needs most of a minute.
    grace = config.failover_grace_s if config.failover_grace_s is not None else max(60.0, 2 * policy.down_after_s)
    await controller.restore_liveness(grace)
    auth = Authenticator(store, fleet, wall_clock)
    feed = RouteFeed(controller)
    api = Api(controller, auth, feed)
    admin_token, created = await _bootstrap_admin_token(config, store, auth, snapshot.meta)
    log.info("state: %s; %d node(s), %d cluster(s), %d replica(s)", describe_url(config.database_url),
             len(fleet.nodes), len(fleet.clusters), len(fleet.replicas))

    async def handle(path: str, link: Link) -> None:
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
                await handle_join(link, first, auth, controller)
            elif isinstance(first, NodeHello):
                await handle_hello(link, first, auth, controller, config.heartbeat_interval_s)
            elif isinstance(first, ProxyHello):
                await auth.check_token(first.token, frozenset({Role.PROXY, Role.ADMIN}))
                await link.send(Ready("proxy"))
                await feed.serve(link, first.url_template)
            elif isinstance(first, ClientHello):
                record = await auth.check_token(first.token, frozenset({Role.ADMIN}))
                await link.send(Ready(record.role.value))
                await api.serve(link, record.role)
        except AuthError as error:
            log.warning("refused %s on %s: %s", link.remote, path, error)
            await link.close(CLOSE_POLICY, str(error))
        except LinkClosed:
            pass

    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await nursery.start(feed.run)
        server = await nursery.start(serve, handle, config.host, config.port, PATHS)
        port = server.port
        log.info("listening on ws://%s:%d", config.host, port)
        task_status.started(ServerStarted(port, admin_token, created))


_FIRST = {"/v1/node": NODE_FIRST, "/v1/proxy": PROXY_FIRST, "/v1/api": CLIENT_FIRST}


async def _bootstrap_admin_token(config: ServerConfig, store: Store, auth: Authenticator,
                                 meta: dict[str, str]) -> tuple[str | None, bool]:
    """On the first start, create the admin token and write it to DIR/admin.token."""
    path = config.state_dir / "admin.token"
    if "admin_token_id" in meta:
        return (path.read_text().strip() if path.exists() else None), False
    token = await auth.create_token(Role.ADMIN, None, None, "created on first start")
    await store.apply([ops.SetMeta("admin_token_id", token.split(".")[0])])
    write_private(path, token + "\n")
    return token, True
