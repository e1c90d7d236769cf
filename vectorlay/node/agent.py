"""`vectorlay node`: join once, then keep a link to the server and serve what it asks.

The link is re-established with capped exponential backoff and jitter. Each (re)connect starts
with a hello reporting what really runs; the server answers with redelivered commands and the
full desired state, so nothing said while the link was down is lost.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import trio

from vectorlay.backoff import Backoff, Rotation
from vectorlay.core.launch_inputs import replica_id_problem
from vectorlay.core.model import Gpu, GpuStatus
from vectorlay.core.protocol import (
    DIRECT,
    PROTOCOL_VERSION,
    SERVER_TO_NODE,
    TUNNEL,
    Ack,
    Command,
    Goodbye,
    Heartbeat,
    Join,
    Joined,
    LogsClose,
    LogsData,
    LogsEnd,
    LogsOpen,
    Message,
    NodeHello,
    ReplicaReport,
    ReplicaStatus,
    Sync,
    TunnelCredential,
    TunnelProxies,
    Welcome,
)
from vectorlay.errors import AuthError, ConnectError, ProtocolError, unwrap_group
from vectorlay.lifecycle import NODE_NAME, CleanStop
from vectorlay.node import logs
from vectorlay.node.faults import FaultPoints
from vectorlay.node.gpu_health import NvmlMonitor, watch_gpus
from vectorlay.node.runtime import ReplicaRuntime
from vectorlay.node.state_dir import Credentials, NodeStateDir
from vectorlay.node.supervisor import NodeIdentity, Supervisor
from vectorlay.node.tunnels import NodeTunnels
from vectorlay.wire import CLOSE_POLICY, Link, LinkClosed, connect, secure_context, server_urls, verified_ca

log = logging.getLogger("vectorlay.node")

WELCOME_TIMEOUT_S = 10.0


async def join(server: str, token: str, name: str, gpus: list[Gpu], address: str, runtimes: tuple[str, ...],
               state_dir: Path, isolation: tuple[str, ...] = (), data_plane: str = TUNNEL) -> Credentials:
    """Trade a join token for this node's own credential and save it in `state_dir`.

    Over TLS, the server's CA is checked against the pin in the token before the token is sent,
    and kept: from then on the agent trusts that CA and nothing else for this server."""
    urls = server_urls(server)
    for index, base in enumerate(urls):  # several servers: the first that answers
        url = base + "/v1/node"
        try:
            ca = await verified_ca(url, token)
            joined = await _join_at(url, token, ca, Join(PROTOCOL_VERSION, token, name, tuple(gpus), address,
                                                         runtimes, isolation, data_plane))
            break
        except ConnectError:
            if index == len(urls) - 1:
                raise
    creds = Credentials(",".join(urls), joined.node_id, joined.name, joined.credential, address,
                        ca.decode() if ca else None)
    NodeStateDir(state_dir).save_credentials(creds)
    return creds


async def _join_at(url: str, token: str, ca: bytes | None, message: Join) -> Joined:
    async with connect(url, await secure_context(url, token, ca)) as link:
        await link.send(message)
        try:
            joined = await link.receive_one(Joined)
        except LinkClosed as closed:
            raise AuthError(f"the server refused to let this node join: {closed.reason or 'no reason given'}") from None
    return joined


class Agent:
    def __init__(self, creds: Credentials, supervisor: Supervisor, gpus: list[Gpu], runtimes: tuple[str, ...],
                 isolation: tuple[str, ...] = (), clean_stop: CleanStop | None = None,
                 tunnels: NodeTunnels | None = None) -> None:
        self.creds = creds
        # Set by whoever stops the agent on purpose (a signal, `vectorlay dev` exiting); only then
        # does it say goodbye. Any other end (an exception anywhere in the node) closes the link
        # without one, and the server takes the node out of routing at once.
        self.clean_stop = clean_stop if clean_stop is not None else CleanStop()
        self.supervisor = supervisor
        self.tunnels = tunnels  # None: the direct data plane (proxies dial the advertised address)
        self.gpus = gpus
        self.runtimes = runtimes
        self.isolation = isolation
        self._outbound_send, self._outbound = trio.open_memory_channel[Message](256)
        self._dirty_reports: dict[str, ReplicaReport] = {}
        self._reports_changed = trio.Event()
        self._log_scopes: dict[int, trio.CancelScope] = {}
        self.connected = False
        self.gpu_status: tuple[GpuStatus, ...] = ()  # the latest NVML sample, sent with each heartbeat

    def set_gpu_status(self, status: tuple[GpuStatus, ...]) -> None:
        for gpu in status:
            before = next((g for g in self.gpu_status if g.uuid == gpu.uuid), None)
            if not gpu.healthy and (before is None or before.healthy):
                log.warning("GPU %s is unhealthy: %s", gpu.uuid, gpu.reason)
        self.gpu_status = status

    def on_report(self, report: ReplicaReport) -> None:
        self._dirty_reports[report.replica_id] = report
        self._reports_changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected to the server until cancelled; raise AuthError if it refuses us."""
        backoff = Backoff()
        servers = Rotation(server_urls(self.creds.server), backoff)
        ca = self.creds.ca_pem.encode() if self.creds.ca_pem else None
        task_status.started()
        while True:
            url = servers.current + "/v1/node"
            try:
                with unwrap_group():
                    async with connect(url, await secure_context(url, None, ca)) as link:
                        await self._session(link, servers)
                problem = "the server closed the link"
            except (ConnectError, LinkClosed, ProtocolError) as error:
                if isinstance(error, LinkClosed) and error.code == CLOSE_POLICY:
                    # Removed or no longer trusted: nothing should keep running in our name.
                    with trio.CancelScope(shield=True):
                        await self.supervisor.stop_all()
                    raise AuthError(f"the server refused this node: {error.reason}") from None
                problem = str(error)
            finally:
                self.connected = False
            delay = servers.failed()
            log.warning("%s; reconnecting to %s in %.1fs", problem, servers.current, delay)
            await trio.sleep(delay)

    async def _session(self, link: Link, servers: Rotation) -> None:
        hello = NodeHello(
            protocol=PROTOCOL_VERSION, credential=self.creds.credential, gpus=tuple(self.gpus),
            address=self.creds.address, runtimes=self.runtimes, isolation=self.isolation,
            generation=self.supervisor.state.generation, replicas=tuple(self.supervisor.current_reports()),
            data_plane=TUNNEL if self.tunnels else DIRECT, tunnel_csr=self.tunnels.csr if self.tunnels else "",
        )
        self._dirty_reports.clear()
        await link.send(hello)
        with trio.move_on_after(WELCOME_TIMEOUT_S) as waiting:
            welcome = await link.receive(SERVER_TO_NODE)
        if waiting.cancelled_caught:
            raise ConnectError(f"no welcome from the server within {WELCOME_TIMEOUT_S:g}s")
        if not isinstance(welcome, Welcome):
            raise ProtocolError(f"expected a welcome, got {welcome.TYPE!r}")
        servers.succeeded()
        self.connected = True
        log.info("connected to %s as %s; heartbeat every %gs", servers.current, welcome.name,
                 welcome.heartbeat_interval_s)
        self._outbound_send, self._outbound = trio.open_memory_channel[Message](256)
        try:
            with unwrap_group():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, link)
                    nursery.start_soon(self._heartbeats, welcome.heartbeat_interval_s)
                    nursery.start_soon(self._send_reports)
                    # Pings catch a dead path that heartbeats alone never notice from this side. They
                    # are rarer than heartbeats: at fleet scale each one costs the server a pong.
                    interval = welcome.heartbeat_interval_s
                    nursery.start_soon(link.keepalive, max(5.0, 6 * interval), max(5.0, 5 * interval))
                    try:
                        await self._reader(link, nursery)
                    except ProtocolError as error:
                        await link.reject(error)
                        raise
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            for scope in self._log_scopes.values():
                scope.cancel()
            self._log_scopes.clear()
            if self.clean_stop.requested:
                await _say_goodbye(link)

    async def _writer(self, link: Link) -> None:
        async for message in self._outbound:
            await link.send(message)
            if isinstance(message, ReplicaStatus):
                self.supervisor.report_sent(message.report)

    async def _send(self, message: Message) -> None:
        await self._outbound_send.send(message)

    async def _heartbeats(self, interval_s: float) -> None:
        while True:
            tunnels = self.tunnels.connected if self.tunnels is not None else None
            await self._send(Heartbeat(time.time(), self.gpu_status, tunnels))
            await trio.sleep(interval_s)

    async def _send_reports(self) -> None:
        while True:
            await self._reports_changed.wait()
            self._reports_changed = trio.Event()
            reports, self._dirty_reports = self._dirty_reports, {}
            for report in reports.values():
                await self._send(ReplicaStatus(report))

    async def _reader(self, link: Link, nursery: trio.Nursery) -> None:
        while True:
            message = await link.receive(SERVER_TO_NODE)
            if isinstance(message, Command):
                self.supervisor.apply_command(message)
                await self._send(Ack(message.seq))
            elif isinstance(message, Sync):
                if self.supervisor.apply_sync(message):
                    await self._send(Ack(message.through_seq))
            elif isinstance(message, LogsOpen):
                scope = trio.CancelScope()
                self._log_scopes[message.stream_id] = scope
                nursery.start_soon(self._stream_logs, message, scope)
            elif isinstance(message, LogsClose):
                stream = self._log_scopes.pop(message.stream_id, None)
                if stream is not None:
                    stream.cancel()
            elif isinstance(message, TunnelCredential) and self.tunnels is not None:
                self.tunnels.set_credential(message)
            elif isinstance(message, TunnelProxies) and self.tunnels is not None:
                self.tunnels.set_proxies(message)
            elif isinstance(message, Welcome):
                raise ProtocolError("a second welcome on one link")

    async def _stream_logs(self, request: LogsOpen, scope: trio.CancelScope) -> None:
        with scope:
            # The id becomes a file name: never one that leaves the log directory or holds a NUL.
            problem = replica_id_problem(request.replica_id)
            if problem is not None:
                await self._send(LogsEnd(request.stream_id, problem))
                return
            path = self.supervisor.files.replica_log(request.replica_id)
            if not path.exists():
                await self._send(LogsEnd(request.stream_id, f"no log for replica {request.replica_id} on this node"))
                return
            try:
                dated, offset = await trio.to_thread.run_sync(logs.tail_dated, path, request.tail, request.since,
                                                              time.time())
                for start in range(0, len(dated), logs.MAX_LINES_PER_BATCH):
                    batch = dated[start:start + logs.MAX_LINES_PER_BATCH]
                    await self._send(LogsData(request.stream_id, tuple(line for _, line in batch),
                                              tuple(when for when, _ in batch)))
                if request.follow:
                    await self._send(LogsData(request.stream_id, (), (), live=True))  # the tail is complete
                    async for lines in logs.follow(path, offset):
                        now = time.time()
                        await self._send(LogsData(request.stream_id, tuple(lines), (now,) * len(lines), live=True))
            except OSError as error:  # one unreadable log ends its stream, not the node's link
                await self._send(LogsEnd(request.stream_id, f"cannot read the log of {request.replica_id}: {error}"))
                return
            await self._send(LogsEnd(request.stream_id))
        if self._log_scopes.get(request.stream_id) is scope:
            del self._log_scopes[request.stream_id]


async def _say_goodbye(link: Link) -> None:
    """The agent is stopping on purpose: tell the server our replicas stay up, so it keeps routing
    to them instead of treating the closed link as a lost node."""
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await link.send(Goodbye("agent stopping; replicas keep running"))
        except LinkClosed:
            pass


async def run_node(
    creds: Credentials,
    state_dir: Path,
    runtime: ReplicaRuntime,
    gpus: list[Gpu],
    runtimes: tuple[str, ...],
    *,
    isolation: tuple[str, ...] = (),
    publish_ip: str = "127.0.0.1",
    gpu_monitor: NvmlMonitor | None = None,
    clean_stop: CleanStop | None = None,
    faults: FaultPoints = FaultPoints(),
    data_plane: str = TUNNEL,
    task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Re-attach to running replicas, then run the supervisor, the GPU monitor, the tunnels to the
    proxies (tunnel data plane) and the server link. `clean_stop`: see `Agent`; `faults`:
    fault-injection tests only."""
    NODE_NAME.set(creds.name)  # this task's and its children's log lines are this node's
    if data_plane == TUNNEL:
        publish_ip = "127.0.0.1"  # nothing but the agent's tunnels reaches the replicas
    clean_stop = clean_stop if clean_stop is not None else CleanStop()
    identity = NodeIdentity(creds.node_id, creds.name, creds.address, publish_ip=publish_ip, data_plane=data_plane)
    supervisor = Supervisor(runtime, state_dir, identity, on_report=lambda report: None, faults=faults)
    tunnels = NodeTunnels(creds.node_id, supervisor, state_dir, clean_stop=clean_stop) if data_plane == TUNNEL else None
    agent = Agent(creds, supervisor, gpus, runtimes, isolation, clean_stop, tunnels)
    supervisor.on_report = agent.on_report
    await supervisor.reattach()
    async with trio.open_nursery() as nursery:
        if gpu_monitor is not None:
            await nursery.start(watch_gpus, gpu_monitor, agent.set_gpu_status)
        await nursery.start(supervisor.run)
        if tunnels is not None:
            await nursery.start(tunnels.run)
        nursery.start_soon(logs.note_log_times, supervisor.files.replica_log, lambda: list(supervisor.runners))
        await nursery.start(agent.run)
        task_status.started(agent)
