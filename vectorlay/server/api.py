"""The CLI's API: request/response calls (and streamed results) over one WebSocket.

Each `Call` runs in its own task, so a streaming call (logs -f, wait) does not block others on
the same link; a `Cancel` or the link closing stops it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from vectorlay.core import codec
from vectorlay.core.durations import parse_duration
from vectorlay.core.manifest import parse_manifest
from vectorlay.core.model import Role
from vectorlay.core.protocol import CLIENT_TO_SERVER, Call, Cancel, Event, Failure, LogsData, LogsEnd, Result
from vectorlay.errors import AuthError, ConflictError, NotFoundError, ProtocolError, UserError, VectorlayError
from vectorlay.server import views
from vectorlay.server.auth import Authenticator
from vectorlay.server.controller import Controller
from vectorlay.server.node_session import NodeConnection
from vectorlay.server.route_feed import RouteFeed
from vectorlay.wire import Link, LinkClosed

log = logging.getLogger("vectorlay.server")

Emit = Callable[[Any], Awaitable[None]]


class Api:
    def __init__(self, controller: Controller, auth: Authenticator, feed: RouteFeed) -> None:
        self.controller = controller
        self.fleet = controller.fleet
        self.auth = auth
        self.feed = feed
        self.methods: dict[str, Callable[[dict[str, Any], Emit], Awaitable[Any]]] = {
            "whoami": self.whoami,
            "apply": self.apply,
            "delete": self.delete,
            "get_clusters": self.get_clusters,
            "get_nodes": self.get_nodes,
            "get_replicas": self.get_replicas,
            "fleet_summary": self.fleet_summary,
            "wait_ready": self.wait_ready,
            "wait_deleted": self.wait_deleted,
            "logs": self.logs,
            "token_create": self.token_create,
            "node_cordon": self.node_cordon,
            "node_uncordon": self.node_uncordon,
            "node_drain": self.node_drain,
            "node_rm": self.node_rm,
            "key_create": self.key_create,
            "key_list": self.key_list,
            "key_revoke": self.key_revoke,
            "describe_cluster": self.describe_cluster,
        }

    async def serve(self, link: Link, role: Role) -> None:
        calls: dict[int, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    message = await link.receive(CLIENT_TO_SERVER)
                except ProtocolError as error:
                    await link.reject(error)
                    break
                except LinkClosed:
                    break
                if isinstance(message, Cancel):
                    scope = calls.get(message.id)
                    if scope is not None:
                        scope.cancel()
                elif isinstance(message, Call):
                    scope = trio.CancelScope()
                    calls[message.id] = scope
                    nursery.start_soon(self._run_call, link, message, scope, calls)
            nursery.cancel_scope.cancel()

    async def _run_call(self, link: Link, call: Call, scope: trio.CancelScope,
                        calls: dict[int, trio.CancelScope]) -> None:
        async def emit(value: Any) -> None:
            await link.send(Event(call.id, value))

        try:
            with scope:
                method = self.methods.get(call.method)
                if method is None:
                    raise UserError(f"unknown method {call.method!r}")
                value = await method(call.params, emit)
                await link.send(Result(call.id, value))
        except LinkClosed:
            pass
        except VectorlayError as error:
            try:
                await link.send(Failure(call.id, _kind(error), str(error)))
            except LinkClosed:
                pass
        finally:
            calls.pop(call.id, None)

    # --- methods ----------------------------------------------------------------------------

    async def whoami(self, params: dict[str, Any], emit: Emit) -> Any:
        return {"role": "admin"}

    async def apply(self, params: dict[str, Any], emit: Emit) -> Any:
        specs = parse_manifest(_param(params, "manifest", str))
        dry_run = bool(params.get("dry_run", False))
        changes = await self.controller.apply(specs, dry_run)
        return {"dry_run": dry_run, "changes": [
            {"cluster": c.cluster, "action": c.action, "detail": c.detail} for c in changes
        ]}

    async def delete(self, params: dict[str, Any], emit: Emit) -> Any:
        name = _param(params, "name", str)
        if not await self.controller.delete(name):
            raise NotFoundError(f"cluster {name!r} not found")
        return {"deleted": name}

    async def get_clusters(self, params: dict[str, Any], emit: Emit) -> Any:
        names = sorted(self.fleet.clusters)
        wanted = params.get("name")
        if wanted is not None:
            if wanted not in self.fleet.clusters:
                raise NotFoundError(f"cluster {wanted!r} not found")
            names = [wanted]
        return [views.cluster_view(self.fleet, n, self.feed.endpoint_url(n)) for n in names]

    async def get_nodes(self, params: dict[str, Any], emit: Emit) -> Any:
        now = trio.current_time()
        name = params.get("name")
        if name is not None:
            node_id = self.fleet.node_ids_by_name.get(str(name))
            if node_id is None:
                raise NotFoundError(f"node {name!r} not found")
            return [views.node_view(self.fleet, node_id, now)]
        ids = sorted(self.fleet.nodes, key=lambda i: self.fleet.nodes[i].name)
        return await _paged(params, emit, ids, lambda i: views.node_view(self.fleet, i, now))

    async def fleet_summary(self, params: dict[str, Any], emit: Emit) -> Any:
        """Counts only: cheap at any fleet size (for `get` headers and monitoring)."""
        return views.fleet_summary(self.fleet)

    async def get_replicas(self, params: dict[str, Any], emit: Emit) -> Any:
        cluster = params.get("cluster")
        if cluster is not None:
            ids = sorted(self.fleet.by_cluster.get(cluster, ()))
            if not ids and cluster not in self.fleet.clusters:
                raise NotFoundError(f"cluster {cluster!r} not found")
        else:
            ids = sorted(self.fleet.replicas, key=lambda i: (self.fleet.replicas[i].cluster, i))
        return await _paged(params, emit, ids, lambda i: views.replica_view(self.fleet, i))

    async def wait_ready(self, params: dict[str, Any], emit: Emit) -> Any:
        """Stream the clusters' status on every change until all are ready or the timeout passes."""
        names = _param(params, "clusters", list)
        timeout = _timeout(params)
        with trio.move_on_after(timeout):
            while True:
                statuses = [views.cluster_view(self.fleet, n, self.feed.endpoint_url(n)) for n in names]
                await emit(statuses)
                if all(views.is_cluster_ready(s) for s in statuses):
                    return {"ready": True, "clusters": statuses}
                with trio.move_on_after(1.0):
                    await self.controller.wait_changed()
        statuses = [views.cluster_view(self.fleet, n, self.feed.endpoint_url(n)) for n in names]
        return {"ready": False, "clusters": statuses}

    async def wait_deleted(self, params: dict[str, Any], emit: Emit) -> Any:
        name = _param(params, "name", str)
        with trio.move_on_after(_timeout(params)):
            while self.fleet.by_cluster.get(name):
                await emit({"stopping": len(self.fleet.by_cluster.get(name, ()))})
                with trio.move_on_after(1.0):
                    await self.controller.wait_changed()
            return {"gone": True}
        return {"gone": False, "left": len(self.fleet.by_cluster.get(name, ()))}

    async def logs(self, params: dict[str, Any], emit: Emit) -> Any:
        cluster = _param(params, "cluster", str)
        tail = int(params.get("tail", 100))
        follow = bool(params.get("follow", False))
        replicas = [r for r in self.fleet.replicas_of_cluster(cluster) if r.node_id is not None]
        if not replicas and cluster not in self.fleet.clusters:
            raise NotFoundError(f"cluster {cluster!r} not found")
        async with trio.open_nursery() as nursery:
            for replica in replicas:
                nursery.start_soon(self._replica_logs, replica.id, replica.node_id, tail, follow, emit)
        return {"replicas": len(replicas)}

    async def _replica_logs(self, replica_id: str, node_id: str | None, tail: int, follow: bool,
                            emit: Emit) -> None:
        node = self.fleet.nodes.get(node_id or "")
        session = self.controller.sessions.get(node_id or "")
        header = {"replica": replica_id, "node": node.name if node else None}
        if not isinstance(session, NodeConnection):
            await emit({**header, "error": "its node is not connected; logs are unavailable now"})
            return
        async with _log_stream(session, replica_id, tail, follow) as stream:
            async for message in stream:
                if isinstance(message, LogsData):
                    await emit({**header, "lines": list(message.lines)})
                elif isinstance(message, LogsEnd):
                    if message.error:
                        await emit({**header, "error": message.error})
                    return

    async def node_cordon(self, params: dict[str, Any], emit: Emit) -> Any:
        record = await self.controller.set_node_flags(_param(params, "name", str), schedulable=False, draining=False)
        return {"node": record.name, "schedulable": False}

    async def node_uncordon(self, params: dict[str, Any], emit: Emit) -> Any:
        record = await self.controller.set_node_flags(_param(params, "name", str), schedulable=True, draining=False)
        return {"node": record.name, "schedulable": True}

    async def node_drain(self, params: dict[str, Any], emit: Emit) -> Any:
        """Cordon the node and move its replicas (new copies ready elsewhere first); stream the
        count left until none is, or the timeout passes."""
        record = await self.controller.set_node_flags(_param(params, "name", str), schedulable=False, draining=True)
        with trio.move_on_after(_timeout(params)):
            while True:
                left = [r.id for r in self.fleet.replicas_on_node(record.id)]
                await emit({"node": record.name, "replicas_left": len(left)})
                if not left or not params.get("wait", True):
                    return {"node": record.name, "drained": not left, "replicas_left": len(left)}
                with trio.move_on_after(1.0):
                    await self.controller.wait_changed()
        left = [r.id for r in self.fleet.replicas_on_node(record.id)]
        return {"node": record.name, "drained": not left, "replicas_left": len(left)}

    async def node_rm(self, params: dict[str, Any], emit: Emit) -> Any:
        name = _param(params, "name", str)
        lost = await self.controller.remove_node(name)
        return {"node": name, "replicas_replaced": lost}

    async def key_create(self, params: dict[str, Any], emit: Emit) -> Any:
        record, key = await self.controller.create_api_key(_param(params, "cluster", str),
                                                           str(params.get("name") or ""))
        auth = self.fleet.clusters[record.cluster].spec.endpoint.auth
        return {**views.key_view(record), "key": key, "enforced": auth == "api-key"}

    async def key_list(self, params: dict[str, Any], emit: Emit) -> Any:
        cluster = _param(params, "cluster", str)
        if cluster not in self.fleet.clusters:
            raise NotFoundError(f"cluster {cluster!r} not found")
        keys = sorted((k for k in self.fleet.api_keys.values() if k.cluster == cluster), key=lambda k: k.created_at)
        return [views.key_view(k) for k in keys]

    async def key_revoke(self, params: dict[str, Any], emit: Emit) -> Any:
        record = await self.controller.revoke_api_key(_param(params, "cluster", str), _param(params, "id", str))
        return views.key_view(record)

    async def describe_cluster(self, params: dict[str, Any], emit: Emit) -> Any:
        name = _param(params, "name", str)
        record = self.fleet.clusters.get(name)
        if record is None and not self.fleet.by_cluster.get(name):
            raise NotFoundError(f"cluster {name!r} not found")
        events = await self.controller.store.events(name, 200)
        replicas = []
        for replica in self.fleet.replicas_of_cluster(name):
            mine = [views.event_view(e) for e in events if e.replica_id == replica.id][-5:]
            replicas.append({**views.replica_view(self.fleet, replica.id), "events": mine})
        return {
            "cluster": views.cluster_view(self.fleet, name, self.feed.endpoint_url(name)),
            "spec": codec.dump(record.spec) if record else None,
            "replicas": replicas,
            "events": [views.event_view(e) for e in events[-20:]],
        }

    async def token_create(self, params: dict[str, Any], emit: Emit) -> Any:
        try:
            role = Role(_param(params, "role", str))
        except ValueError:
            raise UserError("role must be one of: node, proxy, admin") from None
        ttl = params.get("ttl")
        ttl_s = parse_duration(ttl) if isinstance(ttl, str | int | float) else None
        if ttl_s == 0:
            ttl_s = None
        uses = params.get("uses")
        if uses is not None and (not isinstance(uses, int) or uses < 1):
            raise UserError("uses must be a positive integer")
        token = await self.auth.create_token(role, ttl_s, uses, str(params.get("description", "")))
        return {"token": token, "role": role.value, "ttl_s": ttl_s, "uses": uses}


@asynccontextmanager
async def _log_stream(session: NodeConnection, replica_id: str, tail: int,
                      follow: bool) -> AsyncIterator[trio.MemoryReceiveChannel[LogsData | LogsEnd]]:
    stream_id, channel = session.open_logs(replica_id, tail, follow)
    try:
        yield channel
    finally:
        session.close_logs(stream_id)


async def _paged(params: dict[str, Any], emit: Emit, ids: list[str], view: Callable[[str], Any]) -> Any:
    """The whole list as the result; or, with `page_size`, pages as events and a count as the
    result, so a fleet of thousands streams instead of one message that grows without bound."""
    size = params.get("page_size")
    if size is None:
        return [view(i) for i in ids]
    if not isinstance(size, int) or size < 1:
        raise UserError("page_size must be a positive integer")
    for start in range(0, len(ids), size):
        await emit([view(i) for i in ids[start:start + size]])
    return {"total": len(ids)}


def _param(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if not isinstance(value, kind):
        raise UserError(f"parameter {name!r} must be a {kind.__name__}")
    return value


def _timeout(params: dict[str, Any]) -> float:
    value = params.get("timeout_s")
    if value is None:
        return math.inf
    if not isinstance(value, int | float) or value < 0:
        raise UserError("timeout_s must be a non-negative number")
    return float(value)


def _kind(error: VectorlayError) -> str:
    if isinstance(error, NotFoundError):
        return "not_found"
    if isinstance(error, ConflictError):
        return "conflict"
    if isinstance(error, AuthError):
        return "auth"
    if isinstance(error, UserError):
        return "user"
    return "internal"
