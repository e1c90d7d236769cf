"""One connected node: its hello, then heartbeats, reports, acks and log streams.

Everything the node says is attributed to the node id of the authenticated connection, never to
an id inside a message. Outbound messages go through one bounded queue with one writer task; a
node too slow to drain it is disconnected and catches up from the outbox when it reconnects.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from itertools import count

import trio

from vectorlay.core.manifest import is_dns_label
from vectorlay.core.model import Role
from vectorlay.core.protocol import (
    NODE_TO_SERVER,
    Ack,
    Goodbye,
    Heartbeat,
    Join,
    Joined,
    LogsClose,
    LogsData,
    LogsEnd,
    LogsOpen,
    Message,
    NodeHello,
    ReplicaStatus,
    Welcome,
)
from vectorlay.core.token_bucket import TokenBucket
from vectorlay.core.tokens import hash_secret
from vectorlay.errors import AuthError, ConflictError, ProtocolError, UserError, unwrap_group
from vectorlay.server.admin import Admin
from vectorlay.server.auth import Authenticator, new_secret
from vectorlay.server.ids import random_id
from vectorlay.server.node_intake import NodeIntake
from vectorlay.server.records import NodeRecord
from vectorlay.server.tunnels import TunnelService
from vectorlay.wire import CLOSE_GOING_AWAY, CLOSE_POLICY, Link, LinkClosed

log = logging.getLogger("vectorlay.server")

OUTBOUND_QUEUE = 1024
# A node sends a heartbeat a second and a report per replica change; a burst covers a node with
# many replicas restarting at once. Anything beyond is a broken or hostile agent.
NODE_MESSAGES_PER_S = 200.0
NODE_MESSAGE_BURST = 2000
LOG_STREAM_QUEUE = 64


class NodeConnection:
    """The server's side of one node's link (a `sessions.NodeSession`)."""

    _stream_ids = count(1)

    def __init__(self, link: Link, node: NodeRecord, intake: NodeIntake,
                 tunnels: TunnelService | None = None) -> None:
        self.link = link
        self.node_id = node.id
        self.name = node.name
        self.intake = intake
        self.tunnels = tunnels
        self._outbound_send, self._outbound = trio.open_memory_channel[Message](OUTBOUND_QUEUE)
        self._scope = trio.CancelScope()
        self._close_reason: tuple[int, str] | None = None
        self._log_streams: dict[int, trio.MemorySendChannel[LogsData | LogsEnd]] = {}

    def send_nowait(self, message: Message) -> None:
        try:
            self._outbound_send.send_nowait(message)
        except trio.WouldBlock:
            self.close_soon("node is not reading its messages fast enough")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def close_soon(self, reason: str, code: int = CLOSE_GOING_AWAY) -> None:
        self._close_reason = (code, reason)
        self._scope.cancel()

    async def run(self) -> None:
        try:
            with self._scope, unwrap_group():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    await self._reader()
                    nursery.cancel_scope.cancel()
        except LinkClosed:
            pass
        finally:
            for channel in self._log_streams.values():
                channel.close()
            with trio.CancelScope(shield=True):
                await self.intake.node_disconnected(self.node_id, self, self._close_reason is not None)
                if self._close_reason is not None:
                    await self.link.close(*self._close_reason)

    async def _writer(self) -> None:
        try:
            async for message in self._outbound:
                await self.link.send(message)
        except LinkClosed:
            self._scope.cancel()  # the reader notices too; stop both

    async def _reader(self) -> None:
        budget = TokenBucket.full(NODE_MESSAGES_PER_S, NODE_MESSAGE_BURST, trio.current_time())
        while True:
            try:
                message = await self.link.receive(NODE_TO_SERVER)
            except ProtocolError as error:
                log.warning("node %s sent a bad message, closing: %s", self.name, error)
                await self.link.reject(error)
                return
            except LinkClosed:
                return
            allowed, budget = budget.take(trio.current_time())
            if not allowed:
                log.warning("node %s exceeded %g messages/s, closing", self.name, NODE_MESSAGES_PER_S)
                await self.link.close(CLOSE_POLICY, "message rate limit exceeded")
                return
            self.intake.heartbeat(self.node_id)  # any message is a sign of life
            if isinstance(message, Heartbeat):
                if message.gpus:
                    self.intake.gpu_status(self.node_id, message.gpus)
                self.intake.tunnels(self.node_id, message.tunnels)
                continue
            if isinstance(message, Goodbye):
                log.info("node %s is restarting (%s); keeping its replicas routed", self.name, message.reason)
                self.intake.goodbye(self.node_id)
                continue
            if isinstance(message, ReplicaStatus):
                await self.intake.replica_status(self.node_id, message.report)
            elif isinstance(message, Ack):
                await self.intake.ack(self.node_id, message.seq)
            elif isinstance(message, LogsData | LogsEnd):
                channel = self._log_streams.get(message.stream_id)
                if channel is not None:
                    try:
                        channel.send_nowait(message)
                    except trio.WouldBlock:
                        pass  # the reader is slower than the log; drop rather than stall the node link
                    except trio.BrokenResourceError:
                        self._log_streams.pop(message.stream_id, None)

    def open_logs(
        self, replica_id: str, tail: int, follow: bool, since: float | None = None
    ) -> tuple[int, trio.MemoryReceiveChannel[LogsData | LogsEnd]]:
        stream_id = next(self._stream_ids)
        send, receive = trio.open_memory_channel[LogsData | LogsEnd](LOG_STREAM_QUEUE)
        self._log_streams[stream_id] = send
        self.send_nowait(LogsOpen(stream_id, replica_id, tail, follow, since))
        return stream_id, receive

    def close_logs(self, stream_id: int) -> None:
        channel = self._log_streams.pop(stream_id, None)
        if channel is not None:
            channel.close()
            self.send_nowait(LogsClose(stream_id))


async def handle_join(link: Link, join: Join, auth: Authenticator, admin: Admin) -> None:
    """Trade a join token for a node id and credential, then close the link."""
    try:
        if not is_dns_label(join.name):
            raise UserError(f"invalid node name {join.name!r}: use lowercase letters, digits and '-'")
        if join.name in admin.fleet.node_ids_by_name:
            raise ConflictError(f"a node named {join.name!r} already exists; pick another --name "
                                "or remove the old one with `vectorlay node rm`")
        token = await auth.check_token(join.token, frozenset({Role.NODE}), spend_use=True)
    except (AuthError, UserError) as error:
        log.warning("join refused from %s: %s", link.remote, error)
        await link.close(CLOSE_POLICY, str(error))
        return
    secret = new_secret()
    node_id = f"n-{random_id(10)}"
    record = NodeRecord(node_id, join.name, hash_secret(secret), join.gpus, join.address, join.runtimes,
                        joined_at=auth.wall_clock(), isolation=join.isolation, data_plane=join.data_plane)
    await admin.add_node(record, actor=f"node:{token.id}")
    log.info("node %s joined as %s from %s with %d GPU(s)", join.name, node_id, link.remote, len(join.gpus))
    await link.send(Joined(node_id, join.name, f"{node_id}.{secret}"))
    await link.close()


async def handle_hello(link: Link, hello: NodeHello, auth: Authenticator, intake: NodeIntake,
                       heartbeat_interval_s: float, tunnels: TunnelService | None = None) -> None:
    try:
        record = await auth.check_node_credential(hello.credential)
        tunnel_key = tunnels.node_key(hello) if tunnels is not None else None
    except AuthError as error:
        await link.close(CLOSE_POLICY, str(error))
        return
    except ProtocolError as error:
        await link.reject(error)
        return
    plane_changed = record.data_plane != hello.data_plane
    record = replace(record, gpus=hello.gpus, address=hello.address, runtimes=hello.runtimes,
                     isolation=hello.isolation, data_plane=hello.data_plane)
    connection = NodeConnection(link, record, intake, tunnels)
    welcome = Welcome(record.id, record.name, heartbeat_interval_s)
    await intake.node_connected(record, connection, welcome, hello.replicas, hello.generation)
    if tunnels is not None:
        tunnels.node_connected(record.id, connection, tunnel_key, plane_changed)
    log.info("node %s connected from %s (%s data plane)", record.name, link.remote, hello.data_plane)
    try:
        await connection.run()
    finally:
        if tunnels is not None:
            tunnels.node_disconnected(record.id, connection)
    log.info("node %s disconnected", record.name)
