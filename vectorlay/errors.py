"""One root exception; subclasses say whose fault a failure is.

Third-party exceptions are translated where they enter (the store, the WebSocket helper, the
runtimes) so callers only ever handle these.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class VectorlayError(Exception):
    """Root of every error vectorlay raises on purpose."""


class UserError(VectorlayError):
    """The user asked for something invalid: a bad manifest, argument or name."""


class ManifestError(UserError):
    """A manifest is invalid; carries the YAML path and line of the offending value."""

    def __init__(self, message: str, path: str = "", line: int | None = None) -> None:
        self.message = message
        self.path = path
        self.line = line
        where = path or "manifest"
        if line is not None:
            where += f" (line {line})"
        super().__init__(f"{where}: {message}")


class ManifestErrors(ManifestError):
    """Every problem found in one manifest, so a user fixes them in one go. With one problem it
    reads as that problem; `source` (the file) is named first when known."""

    def __init__(self, problems: list[ManifestError], source: str | None = None) -> None:
        first = problems[0]
        super().__init__(first.message, first.path, first.line)
        self.problems = problems
        self.source = source

    def __str__(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return prefix + str(self.problems[0])
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        return f"{prefix}{len(self.problems)} problems:\n{lines}"


class NotFoundError(UserError):
    """A named object (cluster, node, token) does not exist."""


class ConflictError(UserError):
    """The request clashes with existing state (for example a duplicate node name)."""


class ListenError(UserError):
    """A role could not listen on an address; `purpose` says which of its addresses it was."""

    def __init__(self, address: str, purpose: str, reason: str) -> None:
        self.address = address
        self.purpose = purpose
        self.reason = reason
        super().__init__(f"cannot listen on {address} for the {purpose}: {reason}")

    def with_flag(self, flag: str) -> UserError:
        """The same failure, telling the user which flag picks another address."""
        return UserError(f"{self}; choose another with {flag}")


class AuthError(VectorlayError):
    """A token or credential is missing, wrong, expired or not allowed to do this."""


class PeerError(VectorlayError):
    """A peer on the other end of a connection misbehaved or went away."""


class ProtocolError(PeerError):
    """A message could not be decoded or broke the protocol's rules."""


class ConnectError(PeerError):
    """A server could not be reached."""


class LinkLost(PeerError):
    """The server closed the link (or it broke) before a call was answered."""


class ServerUnavailable(PeerError):
    """The server answered that it cannot serve this now (its database is away)."""
class TunnelError(PeerError):
    """A tunnel between a node and a proxy, or one stream on it, failed or was refused."""


class StoreError(VectorlayError):
    """The database failed (unreachable, locked, schema too new)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or cannot take writes now (refused, stalled, disk full):
    weather, not death. Nothing was changed by the statement that failed."""


class StoreInDoubt(StoreUnavailable):
    """The database did not answer in time while a change was being committed: whether it was
    stored is known only later (`outcome`)."""

    def __init__(self, message: str, outcome: object) -> None:
        super().__init__(message)
        self.outcome = outcome


class StoreFenced(StoreError):
    """A leader's write refused by the fence: another server leads now (or this one's lease ran
    out while it was paused or cut off). Nothing was changed; it must step down."""


class StoreFatal(StoreError):
    """A database failure that waiting cannot heal (a schema newer than this vectorlay)."""


class RuntimeFailure(VectorlayError):
    """A replica runtime could not start, stop or inspect a workload.

    `node_fault` says the cause lies with this node rather than the cluster (an image it lacks
    under `image_pull: never`, an isolation level, runtime or GPU it cannot give): the same
    replica may well start on another node."""

    def __init__(self, message: str, *, node_fault: bool = False) -> None:
        super().__init__(message)
        self.node_fault = node_fault


@contextmanager
def unwrap_group() -> Iterator[None]:
    """Re-raise a nursery's group as its one meaningful exception, so callers catch it by type.

    Trio wraps whatever escapes a nursery in an ExceptionGroup. When a link breaks, several tasks
    on it (reader, writer, pinger) may each fail with the same kind of error at once: a group of
    only PeerErrors is the link's failure, reported as its first. Anything else stays a group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        failures = [leaf for leaf in leaves if isinstance(leaf, Exception)]  # not cancellations
        if len(leaves) == 1:
            raise leaves[0] from None
        if failures and len(failures) == len(leaves) and all(isinstance(f, PeerError) for f in failures):
            raise failures[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found.extend(_leaves(error))
        else:
            found.append(error)
    return found


def first_error(error: BaseException) -> BaseException:
    """The exception worth reporting: the first VectorlayError inside any group, else the error."""
    if isinstance(error, BaseExceptionGroup):
        leaves = _leaves(error)
        for leaf in leaves:
            if isinstance(leaf, VectorlayError):
                return leaf
        return leaves[0] if len(leaves) == 1 else error
    return error
