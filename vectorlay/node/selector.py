"""One runtime in front of several: each replica runs under the runtime its spec names.

The supervisor sees a single `ReplicaRuntime`. Launches go to `spec.runtime`; everything else
goes to the runtime that made the handle. A runtime this node does not offer (the process runtime
without `--allow-process-runtime`) launches nothing, and what it left running is not adopted:
the supervisor finds it through `list_owned` and stops it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from vectorlay.errors import RuntimeFailure
from vectorlay.node.runtime import Exit, Handle, LaunchRequest, ReplicaRuntime

log = logging.getLogger("vectorlay.node")

REFUSALS = {
    "process": "this node does not run process replicas (they are not isolated); "
               "start it with --allow-process-runtime to allow them",
    "container": "this node has no working container runtime (see `vectorlay node check`)",
}


class RuntimeSelector:
    name = "selector"

    def __init__(self, runtimes: Mapping[str, ReplicaRuntime], offered: tuple[str, ...]) -> None:
        self.runtimes = dict(runtimes)  # every runtime whose leftovers this node can find and stop
        self.offered = tuple(name for name in offered if name in self.runtimes)

    def _for(self, name: str) -> ReplicaRuntime | None:
        return self.runtimes.get(name) if name in self.offered else None

    async def launch(self, request: LaunchRequest) -> Handle:
        wanted = request.assignment.spec.runtime.value
        runtime = self._for(wanted)
        if runtime is None:
            raise RuntimeFailure(REFUSALS.get(wanted, f"this node does not offer the {wanted} runtime"),
                                 node_fault=True)
        return await runtime.launch(request)

    async def wait(self, handle: Handle) -> Exit:
        return await self._owner(handle).wait(handle)

    async def stop(self, handle: Handle, grace_s: float) -> None:
        runtime = self.runtimes.get(handle.runtime)
        if runtime is not None:
            await runtime.stop(handle, grace_s)

    async def is_alive(self, handle: Handle) -> bool:
        runtime = self._for(handle.runtime)
        return runtime is not None and await runtime.is_alive(handle)

    async def list_owned(self, node_id: str) -> list[Handle]:
        found: list[Handle] = []
        for name, runtime in self.runtimes.items():
            try:
                found += await runtime.list_owned(node_id)
            except RuntimeFailure as error:
                log.warning("cannot list the %s replicas left on this node: %s", name, error)
        return found

    def _owner(self, handle: Handle) -> ReplicaRuntime:
        runtime = self.runtimes.get(handle.runtime)
        if runtime is None:
            raise RuntimeFailure(f"no {handle.runtime} runtime on this node for replica {handle.replica_id}")
        return runtime
