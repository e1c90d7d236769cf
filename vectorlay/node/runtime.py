"""The small protocol every replica runtime implements: `process` and `container` (podman/docker)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vectorlay.core.model import Assignment


def _ignore_progress(note: str) -> None:
    pass


@dataclass(frozen=True)
class Exit:
    """How a replica's workload ended."""

    code: int | None  # None when it cannot be known (a re-attached process is not our child)
    oom_killed: bool = False  # killed for using more memory than its limit (`resources.memory`)


@dataclass(frozen=True)
class LaunchRequest:
    assignment: Assignment
    node_id: str
    node_name: str
    host_port: int  # where the workload must be reachable on the node
    env: dict[str, str]  # the replica's full environment on top of the runtime's base
    log_path: Path
    host_ip: str = "127.0.0.1"  # the node's address the port is published on (containers)
    progress: Callable[[str], None] = _ignore_progress  # slow steps say what they do ("pulling image ...")
    # The node's own directory for this replica's runtime files: the container CLI runs there, so
    # what its helpers write in their working directory (conmon's `oom` marker) stays out of the
    # user's. None: one next to the log file.
    run_dir: Path | None = None

    @property
    def runtime_dir(self) -> Path:
        return self.run_dir or self.log_path.with_name(self.log_path.stem + ".run")


@dataclass(frozen=True)
class Handle:
    """Enough to find a running replica again, even after the agent restarts."""

    replica_id: str
    runtime: str
    pid: int | None = None
    start_time: int | None = None  # kernel start time of `pid`, to tell a reused pid apart
    container: str | None = None  # the container id (container runtime)
    image_digest: str | None = None  # what the image resolved to when it was launched


class ReplicaRuntime(Protocol):
    name: str

    async def launch(self, request: LaunchRequest) -> Handle:
        """Start the workload; raise RuntimeFailure with a readable reason if it cannot start."""
        ...

    async def wait(self, handle: Handle) -> Exit:
        """Return when the workload exits: its exit code (None when it cannot be known), and
        whether it was killed for using more memory than its limit."""
        ...

    async def stop(self, handle: Handle, grace_s: float) -> None:
        """Ask it to stop, and kill it after `grace_s`; remove what is left of it."""
        ...

    async def is_alive(self, handle: Handle) -> bool:
        """Whether the workload behind `handle` still runs (RuntimeFailure if that cannot be told)."""
        ...

    async def list_owned(self, node_id: str) -> list[Handle]:
        """Every workload this runtime started for `node_id` that still exists (running, or exited
        and not yet removed), found without local state."""
        ...
