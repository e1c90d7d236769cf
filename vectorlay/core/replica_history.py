"""What a replica's reasons and events say about its past: how often it restarted or failed.

Nodes do not report counters; the agent puts `(restart N)` in the reason it reports when it
restarts a replica's process, and every state change is kept as an event (`failed: ...`). The
counts are read back from those lines, so they are as old as the oldest event kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_RESTART = re.compile(r"\(restart (\d+)\)")


def restart_count(reason: str, messages: Iterable[str]) -> int:
    """The highest restart number the node reported, in the current reason or any event."""
    found = [int(m.group(1)) for text in (reason, *messages) for m in _RESTART.finditer(text)]
    return max(found, default=0)


def failure_count(messages: Iterable[str]) -> int:
    """How many of the events say the replica failed (`failed` or `failed: <reason>`)."""
    return sum(1 for text in messages if text == "failed" or text.startswith("failed: "))
