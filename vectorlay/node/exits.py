"""How a replica's exit is told to its user, as the replica's reason."""

from __future__ import annotations

from vectorlay.core.model import ClusterSpec
from vectorlay.node.runtime import Exit


def memory_text(memory_mb: int) -> str:
    """As a manifest would say it: 64Mi, 4Gi."""
    return f"{memory_mb // 1024}Gi" if memory_mb % 1024 == 0 else f"{memory_mb}Mi"


def describe_exit(exited: Exit, spec: ClusterSpec) -> str:
    """`exited with code 3`; for a workload the kernel killed for its memory, what to change."""
    if exited.oom_killed:
        limit = spec.resources.memory_mb
        what = f" ({memory_text(limit)})" if limit is not None else ""
        return f"killed for using more memory than `resources.memory`{what}: give it more in the manifest"
    return f"exited with code {exited.code}" if exited.code is not None else "exited"
