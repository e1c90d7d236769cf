"""Fakes for component tests and simulations: a replica runtime that runs nothing.

`FakeRuntime` implements the node's `ReplicaRuntime` protocol in memory: launches succeed (or
fail on request), "processes" exit when told to crash or stop, and its `probe` answers health
checks from a flag per replica. One instance can outlive a `Supervisor`, so tests can restart
the agent and see it re-attach. For one replica, any method (or the probe) can be made to raise
any exception, a launch to hang, or the workload to exit the moment it starts.
"""

from __future__ import annotations

import copy
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
        # (replica id, "launch" | "wait" | "stop" | "is_alive" | "probe") -> what that call raises
        # for that replica, every time, until the entry is removed.
        self.raises: dict[tuple[str, str], Exception] = {}
        self.hanging_launches: set[str] = set()  # replica ids whose launch never returns
        self.exiting_at_once: dict[str, int] = {}  # replica id -> exit code it exits with as it starts
        self._pids = itertools.count(10_000)

    def _raise_for(self, replica_id: str, method: str) -> None:
        error = self.raises.get((replica_id, method))
        if error is not None:
            raise copy.copy(error)  # a fresh one each time, with a traceback of its own

    # --- the ReplicaRuntime protocol ---

    async def launch(self, request: LaunchRequest) -> Handle:
        await trio.lowlevel.checkpoint()
        replica_id = request.assignment.replica_id
        if replica_id in self.fail_next:
            raise RuntimeFailure(self.fail_next.pop(replica_id))
        self._raise_for(replica_id, "launch")
        if replica_id in self.hanging_launches:
            await trio.sleep_forever()
        if request.assignment.spec.image:
            request.progress(f"pulling image {request.assignment.spec.image}")
            await trio.lowlevel.checkpoint()
        self.launches.append(request)
        process = FakeProcess(request, next(self._pids))
        self.processes[process.pid] = process
        if replica_id in self.exiting_at_once:
            process.exit(self.exiting_at_once[replica_id])
        return Handle(replica_id, self.name, pid=process.pid, start_time=1, image_digest=self.image_digest)

    async def wait(self, handle: Handle) -> Exit:
        await trio.lowlevel.checkpoint()
        self._raise_for(handle.replica_id, "wait")
        process = self.processes[handle.pid or 0]
        await process.exited.wait()
        return Exit(process.exit_code, process.oom_killed)

    async def stop(self, handle: Handle, grace_s: float) -> None:
        await trio.lowlevel.checkpoint()
        if self.broken:
            raise RuntimeFailure(self.broken)
        self._raise_for(handle.replica_id, "stop")
        process = self.processes.get(handle.pid or 0)
        if process is not None:
            process.exit(-15)

    async def is_alive(self, handle: Handle) -> bool:
        await trio.lowlevel.checkpoint()
        self._raise_for(handle.replica_id, "is_alive")
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
                self._raise_for(process.request.assignment.replica_id, "probe")
                return (True, "") if process.healthy else (False, f"GET {path} answered 503")
        return False, f"refused the connection (nothing listens on port {port} yet)"

    # --- for tests ---

    def running(self, replica_id: str | None = None) -> list[FakeProcess]:
        return [p for p in self.processes.values() if not p.exited.is_set()
                and (replica_id is None or p.request.assignment.replica_id == replica_id)]

    def crash(self, replica_id: str, code: int = 1, oom_killed: bool = False) -> None:
        for process in self.running(replica_id):
            process.exit(code, oom_killed)
