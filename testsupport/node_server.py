"""A stand-in control plane for a real `vectorlay node`: it sends what a test scripts, however wrong.

The real server refuses bad input at the door, so it can never send a node an assignment no
process can take; a server of an older version, or a hostile one, could. This one speaks the
server's side of the node protocol on 127.0.0.1 (welcome, then a full desired state, then any
message the test pushes), accepts any credential, and keeps the latest report per replica:

    with ScriptedNodeServer([assignment, ...]) as server:
        server.write_credentials(state_dir, "n1")
        node = stack.start_node("n1", "--allow-process-runtime")
        wait_for(lambda: server.state("r1") is ReplicaState.READY)

It runs its own trio loop in a background thread, so synchronous tests can drive it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import trio

from testsupport.background import BackgroundLoop
from vectorlay.core.model import Assignment, ReplicaState
from vectorlay.core.protocol import (
    NODE_FIRST,
    NODE_TO_SERVER,
    Goodbye,
    LogsData,
    LogsEnd,
    Message,
    NodeHello,
    ReplicaReport,
    ReplicaStatus,
    Sync,
    Welcome,
)
from vectorlay.errors import PeerError, ProtocolError
from vectorlay.node.state_dir import Credentials, NodeStateDir
from vectorlay.wire import Link, serve

NODE_ID = "n-scripted"


class ScriptedNodeServer(BackgroundLoop):
    def __init__(self, assignments: Sequence[Assignment] = (), generation: int = 1,
                 heartbeat_interval_s: float = 1.0) -> None:
        super().__init__("node server")
        self._sync = Sync(generation, 0, tuple(assignments))
        self._interval = heartbeat_interval_s
        self._lock = threading.Lock()
        self._reports: dict[str, ReplicaReport] = {}
        self._logs: list[LogsData | LogsEnd] = []
        self._links: list[trio.MemorySendChannel[Message]] = []
        self._port: int | None = None
        self.hellos = 0  # sessions the agent opened: one unless it reconnected or restarted
        self.goodbyes: list[str] = []

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("node server is not started")
        return f"ws://127.0.0.1:{self._port}"

    def write_credentials(self, state_dir: Path, name: str) -> None:
        """What `vectorlay node join` would have saved, pointing at this server."""
        NodeStateDir(state_dir).save_credentials(Credentials(self.url, NODE_ID, name, f"{NODE_ID}.scripted",
                                                             "127.0.0.1"))

    def report(self, replica_id: str) -> ReplicaReport | None:
        with self._lock:
            return self._reports.get(replica_id)

    def state(self, replica_id: str) -> ReplicaState | None:
        report = self.report(replica_id)
        return report.state if report is not None else None

    def logs(self) -> list[LogsData | LogsEnd]:
        with self._lock:
            return list(self._logs)

    def send(self, message: Message) -> None:
        """Push `message` to every connected agent."""
        self._call(lambda: self._push(message))

    # ---- inside the server's loop ----

    def _push(self, message: Message) -> None:
        for channel in list(self._links):
            try:
                channel.send_nowait(message)
            except (trio.WouldBlock, trio.BrokenResourceError):
                self._links.remove(channel)

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, self._handle, "127.0.0.1", 0, frozenset({"/v1/node"}))
            self._port = server.port
            self._started()

    async def _handle(self, path: str, link: Link) -> None:
        try:
            hello = await link.receive(NODE_FIRST)
            if not isinstance(hello, NodeHello):
                raise ProtocolError("expected a node hello")
            self.hellos += 1
            send, receive = trio.open_memory_channel[Message](64)
            self._links.append(send)
            await link.send(Welcome(NODE_ID, "scripted", self._interval))
            await link.send(self._sync)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, link, receive)
                await self._read(link)
                nursery.cancel_scope.cancel()
        except PeerError:
            pass

    async def _forward(self, link: Link, receive: trio.MemoryReceiveChannel[Message]) -> None:
        async with receive:
            async for message in receive:
                await link.send(message)

    async def _read(self, link: Link) -> None:
        while True:
            message = await link.receive(NODE_TO_SERVER)
            with self._lock:
                if isinstance(message, ReplicaStatus):
                    self._reports[message.report.replica_id] = message.report
                elif isinstance(message, LogsData | LogsEnd):
                    self._logs.append(message)
                elif isinstance(message, Goodbye):
                    self.goodbyes.append(message.reason)
