"""The CLI's API: request/response calls (and streamed results) over one WebSocket.

Each `Call` runs in its own task, so a streaming call (logs -f, wait) does not block others on
the same link; a `Cancel` or the link closing stops it. Every call runs as a `Principal`: admin
tokens may do anything, a deployer token only what concerns its own project (anything else is
"not found", so it learns nothing of other tenants), node and proxy tokens nothing here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vectorlay import __version__
from vectorlay.core import codec
from vectorlay.core.durations import parse_duration
from vectorlay.core.launch_inputs import secret_value_problem
from vectorlay.core.manifest import is_dns_label, parse_manifest
from vectorlay.core.model import DEFAULT_PROJECT, Role, cluster_key, split_key
from vectorlay.core.protocol import CLIENT_TO_SERVER, Call, Cancel, Event, Failure, LogsData, LogsEnd, Result
from vectorlay.core.token_bucket import TokenBucket
from vectorlay.errors import (
    AuthError,
    ConflictError,
    NotFoundError,
    ProtocolError,
    StoreInDoubt,
    StoreUnavailable,
    UserError,
    VectorlayError,
)
from vectorlay.server import views
from vectorlay.server.admin import Admin
from vectorlay.server.auth import Authenticator, Principal
from vectorlay.server.fleet import Fleet
from vectorlay.server.route_feed import RouteFeed
from vectorlay.server.sessions import Sessions
from vectorlay.server.signals import Signals
from vectorlay.server.views import audit_view, token_view
from vectorlay.server.write_behind import DatabaseStatus
from vectorlay.wire import CLOSE_POLICY, Link, LinkClosed

log = logging.getLogger("vectorlay.server")

Emit = Callable[[Any], Awaitable[None]]
Method = Callable[[Principal, dict[str, Any], Emit], Awaitable[Any]]
MAX_CALLS_IN_FLIGHT = 64  # per link: a client cannot make the server juggle unbounded work
MAX_SECRET_BYTES = 64 * 1024
CLIENT_MESSAGES_PER_S = 50.0
CLIENT_MESSAGE_BURST = 200


class Api:
    def __init__(self, fleet: Fleet, admin: Admin, sessions: Sessions, signals: Signals, auth: Authenticator,
                 feed: RouteFeed, database: DatabaseStatus, pending_writes: Callable[[], int]) -> None:
        self.fleet = fleet
        self.database = database
        self.pending_writes = pending_writes
        self.admin = admin
        self.sessions = sessions
        self.signals = signals
        self.auth = auth
        self.feed = feed
        # method -> (handler, admin only)
        self.methods: dict[str, tuple[Method, bool]] = {
            "whoami": (self.whoami, False),
            "status": (self.status, False),
            "apply": (self.apply, False),
            "delete": (self.delete, False),
            "cluster_unquarantine": (self.cluster_unquarantine, False),
            "get_clusters": (self.get_clusters, False),
            "get_replicas": (self.get_replicas, False),
            "describe_cluster": (self.describe_cluster, False),
            "wait_ready": (self.wait_ready, False),
            "wait_deleted": (self.wait_deleted, False),
            "logs": (self.logs, False),
            "key_create": (self.key_create, False),
            "key_list": (self.key_list, False),
            "key_revoke": (self.key_revoke, False),
            "secret_set": (self.secret_set, False),
            "secret_list": (self.secret_list, False),
            "secret_delete": (self.secret_delete, False),
            "audit": (self.audit, False),
            "get_nodes": (self.get_nodes, True),
            "fleet_summary": (self.fleet_summary, True),
            "node_cordon": (self.node_cordon, True),
            "node_uncordon": (self.node_uncordon, True),
            "node_drain": (self.node_drain, True),
            "node_rm": (self.node_rm, True),
            "token_create": (self.token_create, True),
            "token_list": (self.token_list, True),
            "token_revoke": (self.token_revoke, True),
        }

    async def serve(self, link: Link, principal: Principal) -> None:
        calls: dict[int, trio.CancelScope] = {}
        budget = TokenBucket.full(CLIENT_MESSAGES_PER_S, CLIENT_MESSAGE_BURST, trio.current_time())
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    message = await link.receive(CLIENT_TO_SERVER)
                except ProtocolError as error:
                    await link.reject(error)
                    break
                except LinkClosed:
                    break
                allowed, budget = budget.take(trio.current_time())
                if not allowed:
                    await link.close(CLOSE_POLICY, "message rate limit exceeded")
                    break
                if isinstance(message, Cancel):
                    scope = calls.get(message.id)
                    if scope is not None:
                        scope.cancel()
                elif isinstance(message, Call):
                    if message.id in calls or len(calls) >= MAX_CALLS_IN_FLIGHT:
                        await link.reject(ProtocolError("duplicate call id or too many calls in flight"))
                        break
                    scope = trio.CancelScope()
                    calls[message.id] = scope
                    nursery.start_soon(self._run_call, link, principal, message, scope, calls)
            nursery.cancel_scope.cancel()

    async def _run_call(self, link: Link, principal: Principal, call: Call, scope: trio.CancelScope,
                        calls: dict[int, trio.CancelScope]) -> None:
        async def emit(value: Any) -> None:
            await link.send(Event(call.id, value))

        try:
            with scope:
                entry = self.methods.get(call.method)
                if entry is None:
                    raise UserError(f"unknown method {call.method!r}")
                method, admin_only = entry
                if admin_only and not principal.is_admin:
                    raise AuthError(f"a {principal.role.value} token cannot do this (needs an admin token)")
                value = await method(principal, call.params, emit)
                await link.send(Result(call.id, value))
        except LinkClosed:
            pass
        except VectorlayError as error:
            try:
                await link.send(Failure(call.id, _kind(error), _explain(error, call.method)))
            except LinkClosed:
                pass
        finally:
            calls.pop(call.id, None)

    # --- scoping ----------------------------------------------------------------------------

    def _project(self, principal: Principal, params: dict[str, Any]) -> str:
        """The project a call is about: the one named, else the caller's own (admin: default)."""
        project = params.get("project") or principal.project or DEFAULT_PROJECT
        if not isinstance(project, str) or not is_dns_label(project):
            raise UserError(f"invalid project {project!r}")
        return project

    def _cluster(self, principal: Principal, params: dict[str, Any], field: str = "name",
                 must_exist: bool = True) -> str:
        """The key of the named cluster, if the caller may see it; NotFoundError otherwise."""
        name = _param(params, field, str)
        project = self._project(principal, params)
        key = cluster_key(name, project)
        visible = principal.may_touch(project)
        if not visible or (must_exist and key not in self.fleet.clusters and not self.fleet.by_cluster.get(key)):
            raise NotFoundError(f"cluster {name!r} not found" + (f" in project {project!r}"
                                                                 if project != DEFAULT_PROJECT else ""))
        return key

    def _visible(self, principal: Principal, key: str) -> bool:
        return principal.may_touch(split_key(key)[1])

    # --- clusters ---------------------------------------------------------------------------

    async def whoami(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        return {"role": principal.role.value, "token": principal.token_id, "project": principal.project or None}

    async def status(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        """How this server is: its database above all (unavailable since when, and why)."""
        connected = sum(1 for live in self.fleet.liveness.values() if live.connected)
        return {"version": __version__, "database": views.database_view(self.database, self.pending_writes()),
                "nodes": len(self.fleet.nodes), "nodes_connected": connected, "clusters": len(self.fleet.clusters)}

    async def apply(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        specs = parse_manifest(_param(params, "manifest", str), principal.project or DEFAULT_PROJECT)
        for spec in specs:
            if not principal.may_touch(spec.project):
                raise AuthError(f"a deployer token for project {principal.project!r} cannot change project "
                                f"{spec.project!r}")
        dry_run = bool(params.get("dry_run", False))
        changes = await self.admin.apply(specs, dry_run, principal.actor)
        return {"dry_run": dry_run, "changes": [
            {"cluster": c.cluster, "action": c.action, "detail": c.detail, "fields": list(c.fields)} for c in changes
        ]}

    async def delete(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        key = self._cluster(principal, params)
        if not await self.admin.delete(key, principal.actor):
            raise NotFoundError(f"cluster {params.get('name')!r} not found")
        return {"deleted": key}

    async def cluster_unquarantine(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        key = self._cluster(principal, params)
        return {"cluster": key, "lifted": await self.admin.unquarantine(key, principal.actor)}

    async def get_clusters(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        if params.get("name") is not None:
            keys = [self._cluster(principal, params)]
        else:
            keys = sorted(k for k in self.fleet.clusters if self._visible(principal, k))
        now = trio.current_time()
        return [views.cluster_view(self.fleet, k, self.feed.endpoint_url(k), now) for k in keys]

    async def get_replicas(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        if params.get("cluster") is not None:
            ids = sorted(self.fleet.by_cluster.get(self._cluster(principal, params, "cluster"), ()))
        else:
            ids = sorted((i for i, r in self.fleet.replicas.items() if self._visible(principal, r.cluster)),
                         key=lambda i: (self.fleet.replicas[i].cluster, i))
        return await _paged(params, emit, ids, lambda i: views.replica_view(self.fleet, i))

    async def describe_cluster(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        key = self._cluster(principal, params)
        record = self.fleet.clusters.get(key)
        events = await self.admin.events(key, 200)
        replicas = []
        for replica in self.fleet.replicas_of_cluster(key):
            mine = [views.event_view(e) for e in events if e.replica_id == replica.id][-5:]
            replicas.append({**views.replica_view(self.fleet, replica.id), "events": mine})
        return {
            "cluster": views.cluster_view(self.fleet, key, self.feed.endpoint_url(key), trio.current_time()),
            "spec": codec.dump(record.spec) if record else None,
            "replicas": replicas,
            "events": [views.event_view(e) for e in events[-20:]],
        }

    async def wait_ready(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        """Stream the clusters' status on every change until all are ready or the timeout passes."""
        keys = [k for k in _param(params, "clusters", list) if isinstance(k, str) and self._visible(principal, k)]
        timeout = _timeout(params)

        def statuses() -> list[dict[str, Any]]:
            now = trio.current_time()
            return [views.cluster_view(self.fleet, k, self.feed.endpoint_url(k), now) for k in keys]

        with trio.move_on_after(timeout):
            while True:
                current = statuses()
                await emit(current)
                if all(views.is_cluster_ready(s) for s in current):
                    return {"ready": True, "clusters": current}
                blocked = [(s["key"], reason) for s in current if (reason := views.blocked_reason(s))]
                if blocked:  # it will not get ready by waiting: say why now, not at the timeout
                    return {"ready": False, "clusters": current,
                            "failed": [{"cluster": key, "reason": reason} for key, reason in blocked]}
                with trio.move_on_after(1.0):
                    await self.signals.wait_changed()
        return {"ready": False, "clusters": statuses()}

    async def wait_deleted(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        key = self._cluster(principal, params, must_exist=False)
        with trio.move_on_after(_timeout(params)):
            while self.fleet.by_cluster.get(key):
                await emit({"stopping": len(self.fleet.by_cluster.get(key, ()))})
                with trio.move_on_after(1.0):
                    await self.signals.wait_changed()
            return {"gone": True}
        return {"gone": False, "left": len(self.fleet.by_cluster.get(key, ()))}

    async def logs(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        key = self._cluster(principal, params, "cluster")
        tail = params.get("tail", 100)
        if not isinstance(tail, int) or tail < 0:
            raise UserError("tail must be a non-negative integer")
        follow = bool(params.get("follow", False))
        replicas = [r for r in self.fleet.replicas_of_cluster(key) if r.node_id is not None]
        async with trio.open_nursery() as nursery:
            for replica in replicas:
                nursery.start_soon(self._replica_logs, replica.id, replica.node_id, tail, follow, emit)
        return {"replicas": len(replicas)}

    async def _replica_logs(self, replica_id: str, node_id: str | None, tail: int, follow: bool,
                            emit: Emit) -> None:
        node = self.fleet.nodes.get(node_id or "")
        header = {"replica": replica_id, "node": node.name if node else None}
        async with self.sessions.logs(node_id or "", replica_id, tail, follow) as stream:
            if stream is None:
                await emit({**header, "error": "its node is not connected; logs are unavailable now"})
                return
            async for message in stream:
                if isinstance(message, LogsData):
                    await emit({**header, "lines": list(message.lines)})
                elif isinstance(message, LogsEnd):
                    if message.error:
                        await emit({**header, "error": message.error})
                    return

    # --- endpoint keys and secrets ----------------------------------------------------------

    async def key_create(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        key = self._cluster(principal, params, "cluster")
        record, secret = await self.admin.create_api_key(key, str(params.get("name") or ""), principal.actor)
        auth = self.fleet.clusters[record.cluster].spec.endpoint.auth
        return {**views.key_view(record), "key": secret, "enforced": auth == "api-key"}

    async def key_list(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        key = self._cluster(principal, params, "cluster")
        keys = sorted((k for k in self.fleet.api_keys.values() if k.cluster == key), key=lambda k: k.created_at)
        return [views.key_view(k) for k in keys]

    async def key_revoke(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        key = self._cluster(principal, params, "cluster")
        record = await self.admin.revoke_api_key(key, _param(params, "id", str), principal.actor)
        return views.key_view(record)

    async def secret_set(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        project = self._scoped_project(principal, params)
        name = _param(params, "name", str)
        value = _param(params, "value", str)
        if not is_dns_label(name):
            raise UserError(f"invalid secret name {name!r}: use lowercase letters, digits and '-'")
        if (problem := secret_value_problem(value)) is not None:
            raise UserError(f"invalid secret {name!r}: {problem}")
        if len(value.encode()) > MAX_SECRET_BYTES:
            raise UserError(f"secret is larger than {MAX_SECRET_BYTES // 1024} KiB")
        existed = await self.admin.set_secret(project, name, value, principal.actor)
        return {"project": project, "name": name, "updated": existed}

    async def secret_list(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        project = self._scoped_project(principal, params)
        return [{"project": p, "name": n, "updated_at": r.updated_at}
                for (p, n), r in sorted(self.fleet.secrets.items()) if p == project]

    async def secret_delete(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        project = self._scoped_project(principal, params)
        name = _param(params, "name", str)
        await self.admin.delete_secret(project, name, principal.actor)
        return {"project": project, "name": name, "deleted": True}

    def _scoped_project(self, principal: Principal, params: dict[str, Any]) -> str:
        project = self._project(principal, params)
        if not principal.may_touch(project):
            raise NotFoundError(f"project {project!r} not found")
        return project

    async def audit(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        limit = params.get("limit", 100)
        if not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise UserError("limit must be between 1 and 10000")
        project = None if principal.is_admin and not params.get("project") else self._scoped_project(principal, params)
        return [audit_view(r) for r in await self.admin.audit_log(limit, project)]

    # --- fleet (admin) ----------------------------------------------------------------------

    async def get_nodes(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        now = trio.current_time()
        name = params.get("name")
        if name is not None:
            node_id = self.fleet.node_ids_by_name.get(str(name))
            if node_id is None:
                raise NotFoundError(f"node {name!r} not found")
            return [views.node_view(self.fleet, node_id, now)]
        ids = sorted(self.fleet.nodes, key=lambda i: self.fleet.nodes[i].name)
        return await _paged(params, emit, ids, lambda i: views.node_view(self.fleet, i, now))

    async def fleet_summary(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        """Counts only: cheap at any fleet size (for `get` headers and monitoring)."""
        return views.fleet_summary(self.fleet)

    async def node_cordon(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        record = await self.admin.set_node_flags(_param(params, "name", str), schedulable=False, draining=False,
                                                      actor=principal.actor)
        return {"node": record.name, "schedulable": False}

    async def node_uncordon(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        record = await self.admin.set_node_flags(_param(params, "name", str), schedulable=True, draining=False,
                                                      actor=principal.actor)
        return {"node": record.name, "schedulable": True}

    async def node_drain(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        """Cordon the node and move its replicas (new copies ready elsewhere first); stream the
        count left until none is, or the timeout passes."""
        record = await self.admin.set_node_flags(_param(params, "name", str), schedulable=False, draining=True,
                                                      actor=principal.actor)
        with trio.move_on_after(_timeout(params)):
            while True:
                left = [r.id for r in self.fleet.replicas_on_node(record.id)]
                await emit({"node": record.name, "replicas_left": len(left)})
                if not left or not params.get("wait", True):
                    return {"node": record.name, "drained": not left, "replicas_left": len(left)}
                with trio.move_on_after(1.0):
                    await self.signals.wait_changed()
        left = [r.id for r in self.fleet.replicas_on_node(record.id)]
        return {"node": record.name, "drained": not left, "replicas_left": len(left)}

    async def node_rm(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        name = _param(params, "name", str)
        lost = await self.admin.remove_node(name, principal.actor)
        return {"node": name, "replicas_replaced": lost}

    async def token_create(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        try:
            role = Role(_param(params, "role", str))
        except ValueError:
            raise UserError("role must be one of: node, proxy, deployer, admin") from None
        ttl = params.get("ttl")
        try:
            ttl_s = parse_duration(ttl) if isinstance(ttl, str | int | float) else None
        except ValueError as error:
            raise UserError(f"invalid ttl: {error}") from None
        uses = params.get("uses")
        if uses is not None and (not isinstance(uses, int) or uses < 1):
            raise UserError("uses must be a positive integer")
        project = str(params.get("project") or "")
        if role is Role.DEPLOYER:
            if not is_dns_label(project):
                raise UserError("a deployer token needs --project NAME (a DNS label)")
        elif project:
            raise UserError("--project applies only to deployer tokens")
        description = str(params.get("description", ""))[:200]
        audit = self.admin.audit_op(principal.actor, "token.create", "", project, f"{role.value} {description}")
        record, token = await self.auth.create_token(role, ttl_s or None, uses, description, project, [audit])
        return {**token_view(record), "token": token}

    async def token_list(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        return [token_view(r) for r in sorted(await self.auth.store.list_tokens(), key=lambda r: r.created_at)]

    async def token_revoke(self, principal: Principal, params: dict[str, Any], emit: Emit) -> Any:
        token_id = _param(params, "id", str)
        if token_id == principal.token_id:
            raise ConflictError("refusing to revoke the token this command runs with")
        audit = self.admin.audit_op(principal.actor, "token.revoke", token_id)
        return token_view(await self.auth.revoke_token(token_id, [audit]))


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


# Calls that change nothing: a database error there needs no word on what was changed.
READ_ONLY = frozenset({"whoami", "get_clusters", "get_replicas", "describe_cluster", "wait_ready", "wait_deleted",
                       "logs", "key_list", "secret_list", "audit", "get_nodes", "fleet_summary", "token_list",
                       "status"})


def _explain(error: VectorlayError, method: str) -> str:
    """The caller's one line: for a database away, whether their change was made."""
    if isinstance(error, StoreInDoubt):
        return (f"{error}: the change may or may not have been stored; look again in a moment "
                "(`vectorlay get clusters`, `vectorlay status`)")
    if isinstance(error, StoreUnavailable) and method not in READ_ONLY:
        return f"{error}; nothing was changed"
    return str(error)


def _kind(error: VectorlayError) -> str:
    if isinstance(error, NotFoundError):
        return "not_found"
    if isinstance(error, ConflictError):
        return "conflict"
    if isinstance(error, AuthError):
        return "auth"
    if isinstance(error, UserError):
        return "user"
    if isinstance(error, StoreUnavailable):
        return "unavailable"
    return "internal"
