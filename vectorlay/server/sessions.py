"""The connected nodes' sessions, and delivery of commands to them.

A command reaches a node only through here: the assignment's secrets are decrypted on the way
out (they are stored encrypted and never logged), and the time of delivery of each start is
noted, so an agent that dies right after receiving a replica can be told apart from one that
dies of old age (see `core/cluster_health.py`, poison pills).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Protocol

import trio

from vectorlay.core.model import Assignment
from vectorlay.core.protocol import Command, LogsData, LogsEnd, Message
from vectorlay.server.fleet import Fleet
from vectorlay.server.records import CommandRecord
from vectorlay.server.secrets_box import SecretBox


class NodeSession(Protocol):
    """What the server needs from a connected node's session."""

    def send_nowait(self, message: Message) -> None: ...

    def close_soon(self, reason: str, code: int = ...) -> None: ...

    def open_logs(self, replica_id: str, tail: int, follow: bool,
                  since: float | None = None) -> tuple[int, trio.MemoryReceiveChannel[LogsData | LogsEnd]]: ...

    def close_logs(self, stream_id: int) -> None: ...


class Sessions:
    def __init__(self, fleet: Fleet, secret_box: SecretBox, clock: Callable[[], float] = trio.current_time) -> None:
        self._fleet = fleet
        self._secret_box = secret_box
        self._clock = clock
        self._by_node: dict[str, NodeSession] = {}

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._by_node

    def __len__(self) -> int:
        return len(self._by_node)

    def attach(self, node_id: str, session: NodeSession) -> NodeSession | None:
        """Make `session` the node's; return the one it replaces, if any."""
        old = self._by_node.get(node_id)
        self._by_node[node_id] = session
        return old

    def detach(self, node_id: str, session: NodeSession) -> bool:
        """Forget `session` if it is still the node's (a newer one may have taken over)."""
        if self._by_node.get(node_id) is not session:
            return False
        del self._by_node[node_id]
        return True

    def close(self, node_id: str, reason: str, code: int) -> None:
        """Ask the node's session to close; it detaches itself when it ends."""
        session = self._by_node.get(node_id)
        if session is not None:
            session.close_soon(reason, code)

    def close_all(self, reason: str, code: int) -> None:
        """Ask every session to close (this server hands its nodes to another)."""
        for session in list(self._by_node.values()):
            session.close_soon(reason, code)

    def send(self, node_id: str, message: Message) -> bool:
        session = self._by_node.get(node_id)
        if session is None:
            return False
        session.send_nowait(message)
        return True

    def deliver(self, commands: Sequence[CommandRecord]) -> None:
        """Send committed commands to the nodes that are connected; the rest wait in the outbox."""
        now = self._clock()
        for command in commands:
            if self.send(command.node_id, self.outgoing(command)) and command.op == "start":
                self._fleet.delivered_at[command.replica_id] = now

    def outgoing(self, command: CommandRecord) -> Command:
        message = Command(command.seq, command.op, command.generation, command.replica_id, command.assignment)
        if message.assignment is not None:
            message = replace(message, assignment=self.with_secrets(message.assignment))
        return message

    def with_secrets(self, assignment: Assignment) -> Assignment:
        """The assignment with its secrets decrypted: only ever on the way to its own node."""
        spec = assignment.spec
        if not spec.env_from_secret:
            return assignment
        values = {}
        for env, secret in spec.env_from_secret.items():
            record = self._fleet.secrets.get((spec.project, secret))
            if record is not None:
                values[env] = self._secret_box.decrypt(record.ciphertext)
        return replace(assignment, secret_env=values)

    @asynccontextmanager
    async def logs(self, node_id: str, replica_id: str, tail: int, follow: bool, since: float | None = None
                   ) -> AsyncIterator[trio.MemoryReceiveChannel[LogsData | LogsEnd] | None]:
        """A stream of the replica's log lines from its node (lines written at or after `since`,
        a wall time); None if the node is not connected."""
        session = self._by_node.get(node_id)
        if session is None:
            yield None
            return
        stream_id, channel = session.open_logs(replica_id, tail, follow, since)
        try:
            yield channel
        finally:
            session.close_logs(stream_id)
