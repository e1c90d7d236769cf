"""A control plane in-process, on in-memory links, with scripted fake nodes (Nomad-style harness).

The real server (`run_server`: auth, sessions, the writer, the reconcile loop, node intake, the
route feed, the API) runs on the test's trio loop with a real SQLite store, whose statements run
inline on the loop (no worker thread), so trio's autojump clock drives every timer
deterministically. Nodes are `FakeNode`s speaking the real node protocol over in-memory streams:
each start is answered as the test scripts it (ready, failed, silence, or the agent dying).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.lowlevel
import trio.testing
from trio_websocket import wrap_client_stream

from vectorlay.client.api import ApiClient, handshake
from vectorlay.core.api import Applied, Apply, GetClusters, GetNodes, GetReplicas, Request, TokenCreate
from vectorlay.core.api_views import ClusterView, NodeView, ReplicaView
from vectorlay.core.model import Assignment, Gpu, ReplicaState, Role
from vectorlay.core.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SERVER_TO_NODE,
    SERVER_TO_PROXY,
    Ack,
    Command,
    Goodbye,
    Heartbeat,
    Join,
    Joined,
    Message,
    NodeHello,
    ProxyHello,
    Ready,
    ReplicaReport,
    ReplicaStatus,
    Route,
    RouteSnapshot,
    RouteUpdate,
    Sync,
    Welcome,
)
from vectorlay.errors import StoreInDoubt, StoreUnavailable, unwrap_group
from vectorlay.server.app import ServerConfig, ServerStarted, run_server
from vectorlay.server.store import engine, ops
from vectorlay.server.store.engine import Store, open_store, sqlite_url
from vectorlay.wire import Link, LinkClosed

T = TypeVar("T")


def wall_clock() -> float:
    """Wall time that moves with the mock clock, as the real one moves with the real clock."""
    return 1_800_000_000.0 + trio.current_time()


class InlineStore(Store):
    """The real store, its statements run on the event loop's thread: under a mock clock, time
    must not jump while a statement runs in a worker thread."""

    async def run(self, work: Callable[[Any], T]) -> T:
        await trio.lowlevel.checkpoint()
        return self._run_sync(work)


class FlakyStore(InlineStore):
    """The real store, with switches: `down` makes every statement fail as a refused database;
    `doubt_next_commands` stores the next write that carries commands but reports it unanswered
    (a commit whose reply was lost), its outcome known only once `resolve_doubt()` is called."""

    down = False
    doubt_next_commands = False
    _pending: engine.Outcome | None = None

    async def run(self, work: Callable[[Any], T]) -> T:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise StoreUnavailable("database unavailable (connection refused)")
        return self._run_sync(work)

    async def apply(self, changes: Sequence[ops.Op]) -> None:
        if self.doubt_next_commands and not self.down and any(isinstance(c, ops.PutCommand) for c in changes):
            self.doubt_next_commands = False
            await super().apply(changes)
            self._pending = engine.Outcome(trio.lowlevel.current_trio_token())
            raise StoreInDoubt(f"database unavailable (timed out after {self.timeout_s:g}s)", self._pending)
        await super().apply(changes)

    def resolve_doubt(self) -> None:
        assert self._pending is not None
        self._pending.resolve(True)


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """Connections made with `connect` are accepted by the server as if over TCP."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](64)

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return client


@asynccontextmanager
async def open_link(listener: MemoryListener, path: str) -> AsyncIterator[tuple[Link, trio.abc.Stream]]:
    """A WebSocket to the server on `path`, and its raw stream (closing that is a crash)."""
    with unwrap_group():
        async with trio.open_nursery() as nursery:
            stream = await listener.connect()
            ws = await wrap_client_stream(nursery, stream, "server", path,  # type: ignore[arg-type]
                                          max_message_size=MAX_MESSAGE_BYTES)
            try:
                yield Link(ws), stream
            finally:
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()


class ControlPlane:
    """The server under test; `restart()` stops it (its tasks cancelled, as a crash would leave the
    store) and starts a new one on the same state."""

    def __init__(self, state_dir: Path, heartbeat_s: float = 1.0, faults: frozenset[str] = frozenset(),
                 failover_grace_s: float | None = None) -> None:
        self.state_dir = state_dir
        self.config = ServerConfig(state_dir, heartbeat_interval_s=heartbeat_s, crash_points=faults,
                                   failover_grace_s=failover_grace_s)
        self.listener = MemoryListener()
        self.admin_token = ""
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._store: FlakyStore | None = None

    async def start(self, nursery: trio.Nursery) -> ServerStarted:
        self._nursery = nursery
        opened = open_store(sqlite_url(self.state_dir))
        self._store = FlakyStore(opened.engine, trio.CapacityLimiter(1))
        self.listener = MemoryListener()
        started: ServerStarted = await nursery.start(self._run)
        self.admin_token = started.admin_token or self.admin_token
        return started

    async def _run(self, *, task_status: trio.TaskStatus[ServerStarted] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            assert self._store is not None
            await run_server(self.config, wall_clock, listeners=[self.listener], store=self._store,
                             task_status=task_status)

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
            await trio.lowlevel.checkpoint()
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def store(self) -> FlakyStore:
        assert self._store is not None
        return self._store

    async def restart(self) -> ServerStarted:
        await self.stop()
        assert self._nursery is not None
        return await self.start(self._nursery)

    @asynccontextmanager
    async def api(self, token: str | None = None) -> AsyncIterator[ApiClient]:
        async with open_link(self.listener, "/v1/api") as (link, _):
            yield await handshake(link, token or self.admin_token)

    async def call(self, request: Request[T]) -> T:
        async with self.api() as client:
            return await client.call(request)

    async def apply(self, manifest: str) -> Applied:
        return await self.call(Apply(manifest))

    async def cluster(self, name: str) -> ClusterView:
        return (await self.call(GetClusters(name))).clusters[0]

    async def replicas(self, cluster: str | None = None) -> tuple[ReplicaView, ...]:
        return (await self.call(GetReplicas(cluster))).replicas

    async def nodes(self) -> dict[str, NodeView]:
        return {n.name: n for n in (await self.call(GetNodes())).nodes}

    async def join(self, name: str, gpus: int = 0, **kwargs: Any) -> FakeNode:
        token = (await self.call(TokenCreate(Role.NODE, uses=1))).token
        node = FakeNode(self, name, tuple(Gpu(f"{name}-gpu{i}", "RTX 4090", 24.0, i) for i in range(gpus)), **kwargs)
        async with open_link(self.listener, "/v1/node") as (link, _):
            await link.send(Join(PROTOCOL_VERSION, token, name, node.gpus, "127.0.0.1", ("process",)))
            joined = await link.receive_one(Joined)
        node.node_id, node.credential = joined.node_id, joined.credential
        return node


class RouteWatcher:
    """A proxy's view of the route feed: the endpoints the server says each cluster has."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}

    async def run(self, plane: ControlPlane, token: str,
                  *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the feed until the server goes away (a restart ends it)."""
        try:
            await self._follow(plane, token, task_status)
        except LinkClosed:
            self.routes = {}

    async def _follow(self, plane: ControlPlane, token: str, task_status: trio.TaskStatus[None]) -> None:
        async with open_link(plane.listener, "/v1/proxy") as (link, _):
            await link.send(ProxyHello(PROTOCOL_VERSION, token))
            await link.receive_one(Ready)
            started = False
            while True:
                message = await link.receive(SERVER_TO_PROXY)
                if isinstance(message, RouteSnapshot):
                    self.routes = {r.cluster: r for r in message.routes}
                    if not started:
                        started = True
                        task_status.started()
                elif isinstance(message, RouteUpdate):
                    if message.removed:
                        self.routes.pop(message.route.cluster, None)
                    else:
                        self.routes[message.route.cluster] = message.route

    def endpoints(self, cluster: str) -> set[str]:
        route = self.routes.get(cluster)
        return {e.replica_id for e in route.endpoints} if route else set()


@dataclass
class Outcome:
    """How a fake node answers a start: the states it reports, in order; `die` kills its agent."""

    states: tuple[ReplicaState, ...] = (ReplicaState.STARTING, ReplicaState.READY)
    reason: str = ""
    node_fault: bool = False
    die: bool = False
    ready_after_s: float = 0.0  # the last state is reported this much later (a health check passing)


READY = Outcome()


class AgentDied(Exception):
    """The fake agent crashed (on purpose): its link drops without a goodbye."""


@dataclass
class FakeNode:
    plane: ControlPlane
    name: str
    gpus: tuple[Gpu, ...] = ()
    outcome: Callable[[Assignment], Outcome] = lambda assignment: READY
    node_id: str = ""
    credential: str = ""
    running: dict[str, Assignment] = field(default_factory=dict)
    reports: dict[str, ReplicaReport] = field(default_factory=dict)
    starts: list[Assignment] = field(default_factory=list)  # every start it received
    deaths: int = 0
    generation: int = 0
    applied_seq: int = 0
    connected: bool = False
    closed_with: tuple[int | None, str] | None = None  # (code, reason) when the server closed the link
    revive_after_s: float | None = 1.0  # after a death, reconnect this much later (None: stay dead)
    _task_status: trio.TaskStatus[None] | None = None
    _link: Link | None = None
    _nursery: trio.Nursery | None = None
    _outgoing: trio.MemorySendChannel[Message] = field(default_factory=lambda: trio.open_memory_channel[Message](0)[0])
    _crash: trio.Event = field(default_factory=trio.Event)
    _ports: itertools.count[int] = field(default_factory=lambda: itertools.count(20000))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected like an agent, reconnecting after a drop; `started` once connected."""
        self._task_status: trio.TaskStatus[None] | None = task_status
        while True:
            try:
                with unwrap_group():
                    await self._session()
            except AgentDied:
                self.deaths += 1
                self.connected = False
                if self.revive_after_s is None:
                    await trio.sleep_forever()
                await trio.sleep(self.revive_after_s)
                continue
            except LinkClosed as closed:
                self.closed_with = (closed.code, closed.reason)
            self.connected = False
            await trio.sleep(0.5)

    async def _session(self) -> None:
        self._crash = trio.Event()
        async with open_link(self.plane.listener, "/v1/node") as (link, stream):
            await link.send(NodeHello(PROTOCOL_VERSION, self.credential, self.gpus, "127.0.0.1", ("process",), (),
                                      self.generation, tuple(self.reports[r] for r in self.running
                                                             if r in self.reports)))
            welcome = await link.receive_one(Welcome)
            self.connected = True
            if self._task_status is not None:
                self._task_status.started()
                self._task_status = None
            try:
                with unwrap_group():
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        self._outgoing, outgoing = trio.open_memory_channel[Message](1000)
                        nursery.start_soon(self._writer, link, outgoing)
                        nursery.start_soon(self._heartbeats, link, welcome.heartbeat_interval_s)
                        nursery.start_soon(self._watch_crash, nursery.cancel_scope)
                        await self._reader(link, nursery)
            except AgentDied:
                await stream.aclose()  # the process is gone: no goodbye, no close frame
                raise

    async def _watch_crash(self, scope: trio.CancelScope) -> None:
        await self._crash.wait()
        raise AgentDied()

    async def _writer(self, link: Link, channel: trio.MemoryReceiveChannel[Message]) -> None:
        """One writer per link, as the agent has."""
        self._link = link
        async for message in channel:
            await link.send(message)

    async def _heartbeats(self, link: Link, interval_s: float) -> None:
        while True:
            await self._send(Heartbeat())
            await trio.sleep(interval_s)

    async def _send(self, message: Message) -> None:
        await self._outgoing.send(message)

    async def _reader(self, link: Link, nursery: trio.Nursery) -> None:
        while True:
            message = await link.receive(SERVER_TO_NODE)
            if isinstance(message, Command):
                if message.seq > self.applied_seq:
                    self.applied_seq = message.seq
                    self.generation = max(self.generation, message.generation)
                    if message.op == "start" and message.assignment is not None:
                        await self._start(link, message.assignment)
                    elif message.op == "stop":
                        await self._stop(link, message.replica_id)
                await self._send(Ack(message.seq))
            elif isinstance(message, Sync):
                self.generation = max(self.generation, message.generation)
                self.applied_seq = max(self.applied_seq, message.through_seq)
                wanted = {a.replica_id: a for a in message.assignments}
                for replica_id in list(self.running):
                    if replica_id not in wanted:
                        await self._stop(link, replica_id)
                for replica_id, assignment in wanted.items():
                    if replica_id not in self.running:
                        await self._start(link, assignment)
                await self._send(Ack(message.through_seq))

    async def _start(self, link: Link, assignment: Assignment) -> None:
        self.starts.append(assignment)
        outcome = self.outcome(assignment)
        if outcome.die:
            self._crash.set()
            await trio.sleep_forever()
        self.running[assignment.replica_id] = assignment
        address = f"127.0.0.1:{next(self._ports)}"
        for index, state in enumerate(outcome.states):
            if outcome.ready_after_s and index == len(outcome.states) - 1:
                self._later(outcome.ready_after_s, assignment, state, address, outcome)
                break
            await self._report_state(assignment, state, address, outcome)

    def _later(self, delay_s: float, assignment: Assignment, state: ReplicaState, address: str,
               outcome: Outcome) -> None:
        async def report() -> None:
            await trio.sleep(delay_s)
            if self.running.get(assignment.replica_id) is assignment:
                await self._report_state(assignment, state, address, outcome)

        assert self._nursery is not None
        self._nursery.start_soon(report)

    async def _report_state(self, assignment: Assignment, state: ReplicaState, address: str,
                            outcome: Outcome) -> None:
        report = ReplicaReport(assignment.replica_id, assignment.generation, state, outcome.reason if state is
                               ReplicaState.FAILED else "", address, None, outcome.node_fault)
        self.reports[assignment.replica_id] = report
        await self._send(ReplicaStatus(report))

    async def _stop(self, link: Link, replica_id: str) -> None:
        assignment = self.running.pop(replica_id, None)
        self.reports.pop(replica_id, None)
        if assignment is not None:
            await self._send(ReplicaStatus(ReplicaReport(replica_id, assignment.generation, ReplicaState.STOPPED,
                                                        "stopped")))

    async def report(self, replica_id: str, state: ReplicaState, reason: str = "") -> None:
        """Report on a replica it runs, as if its state changed (a process died, say)."""
        assignment = self.running[replica_id]
        report = ReplicaReport(replica_id, assignment.generation, state, reason,
                               self.reports[replica_id].address if replica_id in self.reports else None)
        self.reports[replica_id] = report
        await self._send(ReplicaStatus(report))

    def crash(self, revive_after_s: float | None = None) -> None:
        """Kill the agent now (no goodbye); it comes back after `revive_after_s` (None: never)."""
        self.revive_after_s = revive_after_s
        self._crash.set()

    async def goodbye(self, link: Link) -> None:
        await link.send(Goodbye("restarting"))

    def started_for(self, cluster: str) -> int:
        return sum(1 for a in self.starts if a.cluster == cluster)


def manifest(name: str, replicas: int = 1, reschedule_after: str = "30s", extra: str = "") -> str:
    return (f"apiVersion: vectorlay.dev/v1\nkind: Cluster\nmetadata: {{name: {name}}}\n"
            f"spec:\n  replicas: {replicas}\n  runtime: process\n  command: [serve]\n  health: null\n"
            f"  reschedule_after: {reschedule_after}\n{extra}")


async def wait_until(predicate: Callable[[], Any], timeout_s: float = 60.0, step_s: float = 0.1) -> Any:
    """Poll (on the mock clock) until `predicate()` is truthy."""
    with trio.fail_after(timeout_s):
        while not (value := predicate()):
            await trio.sleep(step_s)
    return value
