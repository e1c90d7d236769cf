"""Secret values on a node: held in memory only, so a restarted agent must get them again.

The agent's state file keeps what it runs so that a restarted agent re-attaches, but never the
values of a replica's secrets (only their names, in the spec's env_from_secret). A re-attached
replica that must start again (it exited) takes them from the server's copy of its assignment,
which the server sends with its full desired state when the agent reconnects.
"""

from __future__ import annotations

from vectorlay.core.model import Assignment


def launchable(running: Assignment, latest: Assignment | None) -> tuple[Assignment, str | None]:
    """The assignment to start `running`'s replica from, and why it cannot start, if it cannot.
    `latest` is the desired copy of it, if any: the server's, unless it is `running` itself
    (a re-attached replica is desired as it was loaded, until the server says otherwise)."""
    if latest is not None and latest is not running and latest.generation == running.generation:
        return latest, None  # the server's copy, with the values it has
    if running.spec.env_from_secret and not running.secret_env:
        names = ", ".join(sorted(running.spec.env_from_secret))
        return running, (f"the values of its secrets ({names}) are not on this node after the agent restarted "
                         "(they are never stored); it starts again once the server has sent them")
    return running, None
