"""`vectorlay dev`: a whole local stack in one process: server, N nodes and a proxy.

Each role runs exactly as it would on its own (same code, real WebSockets on loopback, real
replica processes, and the proxy reaching replicas only through the nodes' tunnels, the default
data plane); only the process boundary is gone. Replicas are stopped when dev exits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from vectorlay.client import commands, output
from vectorlay.client.api import open_api
from vectorlay.client.config import Context, save_context
from vectorlay.core import api
from vectorlay.core.api_views import ClusterView
from vectorlay.core.model import Role
from vectorlay.errors import AuthError, RuntimeFailure, unwrap_group
from vectorlay.lifecycle import CleanStop
from vectorlay.node.agent import Agent, join, run_node
from vectorlay.node.gpu_health import NvmlMonitor
from vectorlay.node.setup import NodeOptions, NodeSetup, prepare_node
from vectorlay.node.state_dir import Credentials, NodeStateDir
from vectorlay.proxy.app import ProxyConfig, run_proxy
from vectorlay.proxy.routing import RouteTable
from vectorlay.server.app import ServerConfig, run_server

log = logging.getLogger("vectorlay.dev")

ROUTED_WAIT_S = 10.0  # for the proxy to receive the replicas the server reports ready


@dataclass(frozen=True)
class DevConfig:
    state_dir: Path
    nodes: int = 2
    server_port: int = 7070
    proxy_port: int = 8080
    domain: str = "localhost"
    gpus: tuple[str, ...] = ()
    apply_file: str | None = None
    apply_timeout_s: float = 120.0
    heartbeat_interval_s: float = 1.0


async def run_dev(config: DevConfig, clean_stop: CleanStop | None = None, *,
                  task_status: trio.TaskStatus[Context] = trio.TASK_STATUS_IGNORED) -> None:
    """`clean_stop`, marked by the signal that stops dev, lets its nodes say goodbye as they go."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(run_server, ServerConfig(
            config.state_dir / "server", port=config.server_port, heartbeat_interval_s=config.heartbeat_interval_s))
        url = f"ws://127.0.0.1:{server.port}"
        admin = server.admin_token or (config.state_dir / "server" / "admin.token").read_text().strip()
        # dev runs the process examples, so its nodes allow the (unisolated) process runtime.
        setup = await prepare_node(NodeOptions(allow_process_runtime=True, gpu_declarations=config.gpus), "127.0.0.1")
        supervisors = []
        for index in range(1, config.nodes + 1):
            supervisors.append(await _start_node(nursery, config, url, admin, f"dev-{index}", setup, clean_stop))
        async with open_api(url, admin) as client:
            proxy_token = (await client.call(api.TokenCreate(Role.PROXY, description="vectorlay dev"))).token
        # The path every user takes: nodes reach the proxy only through the tunnels they open.
        proxy = await nursery.start(run_proxy, ProxyConfig(url, proxy_token, port=config.proxy_port,
                                                           domain=config.domain, tunnel_listen=("127.0.0.1", 0)))
        context = Context(url, admin, proxy=f"http://127.0.0.1:{proxy.port}")
        path = save_context("dev", context)
        output.stderr.print(f"vectorlay dev: server {url}, proxy http://127.0.0.1:{proxy.port}, "
                            f"{config.nodes} node(s); state in {config.state_dir}; context 'dev' in {path}")
        if config.apply_file:
            await _apply_example(context, config, proxy.port, proxy.proxy.routes)
        task_status.started(context)
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(15):
                for agent in supervisors:
                    await agent.supervisor.stop_all()


async def _start_node(nursery: trio.Nursery, config: DevConfig, url: str, admin: str, name: str,
                      setup: NodeSetup, clean_stop: CleanStop | None) -> Agent:
    state_dir = config.state_dir / name
    creds: Credentials | None = None
    files = NodeStateDir(state_dir)
    if files.is_joined():
        creds = files.load_credentials()
        if not await _still_in_fleet(url, admin, creds.node_id):
            # `node rm`'d in an earlier run (or the server's state was wiped): join afresh, and
            # stop whatever that earlier node left running, which would otherwise outlive the stack.
            log.info("%s is no longer in the fleet: joining it again", name)
            await _stop_leftovers(setup, creds.node_id)
            files.forget_node()
            creds = None
    if creds is None:
        async with open_api(url, admin) as client:
            token = (await client.call(api.TokenCreate(Role.NODE, ttl="10m", uses=1))).token
        creds = await join(url, token, name, setup.gpus, "127.0.0.1", setup.runtimes, state_dir, setup.isolation,
                           setup.data_plane)
    if creds.server != url:
        creds = Credentials(url, creds.node_id, creds.name, creds.credential, creds.address)
    agent: Agent = await nursery.start(partial(
        _run_dev_node, name, creds, state_dir, setup, clean_stop))
    return agent


async def _run_dev_node(name: str, creds: Credentials, state_dir: Path, setup: NodeSetup,
                        clean_stop: CleanStop | None,
                        *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
    """One dev node. Removed from the fleet (`vectorlay node rm`), it has stopped its replicas
    and leaves; the rest of the stack keeps serving."""
    try:
        with unwrap_group():
            await run_node(creds, state_dir, setup.runtime, setup.gpus, setup.runtimes, isolation=setup.isolation,
                           publish_ip=setup.publish_ip, gpu_monitor=_monitor_for_node(setup), clean_stop=clean_stop,
                           data_plane=setup.data_plane, task_status=task_status)
    except AuthError as error:
        output.stderr.print(f"vectorlay dev: {name} left the stack ({error}); its replicas are stopped, the "
                            "other nodes keep serving", markup=False)


async def _still_in_fleet(url: str, admin: str, node_id: str) -> bool:
    async with open_api(url, admin) as client:
        nodes = await client.call(api.GetNodes())
    return any(node.id == node_id for node in nodes.nodes)


async def _stop_leftovers(setup: NodeSetup, node_id: str) -> None:
    for handle in await setup.runtime.list_owned(node_id):
        log.info("stopping replica %s, left running by an earlier dev node", handle.replica_id)
        try:
            await setup.runtime.stop(handle, 10.0)
        except RuntimeFailure as error:
            log.warning("could not stop replica %s: %s", handle.replica_id, error)


def _monitor_for_node(setup: NodeSetup) -> NvmlMonitor | None:
    """Every dev node watches the machine's GPUs, each with its own NVML session."""
    return NvmlMonitor(setup.gpu_monitor.uuids) if setup.gpu_monitor is not None else None


async def _apply_example(context: Context, config: DevConfig, proxy_port: int, routes: RouteTable) -> None:
    assert config.apply_file is not None
    text = commands.read_manifest(config.apply_file)
    await commands.apply(context, text, dry_run=False, wait=True, timeout_s=config.apply_timeout_s, as_json=False)
    async with open_api(context.server, context.token) as client:
        clusters = (await client.call(api.GetClusters())).clusters
    # The server calls replicas ready a moment before its route update reaches the proxy: wait
    # for the proxy too, so that the curl printed below works the moment it appears.
    with trio.move_on_after(ROUTED_WAIT_S) as scope:
        while not all(_routed(routes, cluster) for cluster in clusters):
            await routes.next_change()
    if scope.cancelled_caught:
        log.warning("the proxy has not received every ready replica after %gs; requests may get 503 for now",
                    ROUTED_WAIT_S)
    for cluster in clusters:
        output.stdout.print(f"\n[bold]{cluster.name}[/bold] is served at {cluster.endpoint}")
        output.stdout.print(_sample_curl(cluster.name, config.domain, proxy_port), markup=False)
    output.stdout.print("\nPress Ctrl-C to stop the stack (replicas are stopped too).")


def _routed(routes: RouteTable, cluster: ClusterView) -> bool:
    """The proxy routes to as many replicas of `cluster` as are ready."""
    route = routes.clusters.get(cluster.key)
    return route is not None and len(route.endpoints) >= cluster.ready


def _sample_curl(cluster: str, domain: str, port: int) -> str:
    body = '{"prompt": "The function returns", "max_tokens": 48}'
    return f"  curl -s http://{cluster}.{domain}:{port}/v1/completions -H 'Content-Type: application/json' -d '{body}'"
