"""The small protocol every replica runtime implements (process now, containers later)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vectorlay.core.model import Assignment


@dataclass(frozen=True)
class LaunchRequest:
    assignment: Assignment
    node_id: str
    node_name: str
    host_port: int  # where the workload must be reachable on the node
    env: dict[str, str]  # the replica's full environment on top of the runtime's base
    log_path: Path


@dataclass(frozen=True)
class Handle:
    """Enough to find a running replica again, even after the agent restarts."""

    replica_id: str
    runtime: str
    pid: int | None = None
    start_time: int | None = None  # kernel start time of `pid`, to tell a reused pid apart
    container: str | None = None


class ReplicaRuntime(Protocol):
    name: str

    async def launch(self, request: LaunchRequest) -> Handle:
        """Start the workload; raise RuntimeFailure with a readable reason if it cannot start."""
        ...

    async def wait(self, handle: Handle) -> int | None:
        """Return when the workload exits: its exit code, or None when it cannot be known."""
        ...

    async def stop(self, handle: Handle, grace_s: float) -> None:
        """Ask it to stop, and kill it after `grace_s`."""
        ...

    def is_running(self, handle: Handle) -> bool: ...

    def list_running(self, node_id: str) -> list[Handle]:
        """Every workload this runtime started for `node_id`, found without local state."""
        ...
