"""Fakes for component tests and simulations: a replica runtime that runs nothing.

`FakeRuntime` implements the node's `ReplicaRuntime` protocol in memory: launches succeed (or
fail on request), "processes" exit when told to crash or stop, and its `probe` answers health
checks from a flag per replica. One instance can outlive a `Supervisor`, so tests can restart
the agent and see it re-attach.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import trio

from vectorlay.errors import RuntimeFailure
from vectorlay.node.runtime import Exit, Handle, LaunchRequest


@dataclass
class FakeProcess:
    request: LaunchRequest
    pid: int
    exited: trio.Event = field(default_factory=trio.Event)
    exit_code: int | None = None
    oom_killed: bool = False
    healthy: bool = True

    def exit(self, code: int | None, oom_killed: bool = False) -> None:
        if not self.exited.is_set():
            self.exit_code = code
            self.oom_killed = oom_killed
            self.exited.set()


class FakeRuntime:
    """`name` is the runtime it poses as ("process" or "container"); a "container" one reports
    `image_digest` for each launch, and says it is pulling first, as the real one does."""

    def __init__(self, name: str = "process", image_digest: str | None = None) -> None:
        self.name = name
        self.image_digest = image_digest
        self.processes: dict[int, FakeProcess] = {}
        self.launches: list[LaunchRequest] = []
        self.fail_next: dict[str, str] = {}  # replica id -> reason its next launch fails with
        self.broken: str | None = None  # every stop and list fails with this (a runtime gone bad)
        self._pids = itertools.count(10_000)

    # --- the ReplicaRuntime protocol ---

    async def launch(self, request: LaunchRequest) -> Handle:
        await trio.lowlevel.checkpoint()
        replica_id = request.assignment.replica_id
        if replica_id in self.fail_next:
            raise RuntimeFailure(self.fail_next.pop(replica_id))
        if request.assignment.spec.image:
            request.progress(f"pulling image {request.assignment.spec.image}")
            await trio.lowlevel.checkpoint()
        self.launches.append(request)
        process = FakeProcess(request, next(self._pids))
        self.processes[process.pid] = process
        return Handle(replica_id, self.name, pid=process.pid, start_time=1, image_digest=self.image_digest)

    async def wait(self, handle: Handle) -> Exit:
        process = self.processes[handle.pid or 0]
        await process.exited.wait()
        return Exit(process.exit_code, process.oom_killed)

    async def stop(self, handle: Handle, grace_s: float) -> None:
        await trio.lowlevel.checkpoint()
        if self.broken:
            raise RuntimeFailure(self.broken)
        process = self.processes.get(handle.pid or 0)
        if process is not None:
            process.exit(-15)

    async def is_alive(self, handle: Handle) -> bool:
        await trio.lowlevel.checkpoint()
        return self.is_running(handle)

    async def list_owned(self, node_id: str) -> list[Handle]:
        await trio.lowlevel.checkpoint()
        if self.broken:
            raise RuntimeFailure(self.broken)
        return [Handle(p.request.assignment.replica_id, self.name, pid=p.pid, start_time=1)
                for p in self.processes.values() if not p.exited.is_set() and p.request.node_id == node_id]

    def is_running(self, handle: Handle) -> bool:
        process = self.processes.get(handle.pid or 0)
        return process is not None and not process.exited.is_set()

    # --- health, for Supervisor(probe=...) ---

    async def probe(self, host: str, port: int, path: str, timeout_s: float) -> tuple[bool, str]:
        await trio.lowlevel.checkpoint()
        for process in self.running():
            if process.request.host_port == port:
                return (True, "") if process.healthy else (False, f"GET {path} answered 503")
        return False, f"refused the connection (nothing listens on port {port} yet)"

    # --- for tests ---

    def running(self, replica_id: str | None = None) -> list[FakeProcess]:
        return [p for p in self.processes.values() if not p.exited.is_set()
                and (replica_id is None or p.request.assignment.replica_id == replica_id)]

    def crash(self, replica_id: str, code: int = 1, oom_killed: bool = False) -> None:
        for process in self.running(replica_id):
            process.exit(code, oom_killed)
