"""The CLI's API: request/response calls (and streamed results) over one WebSocket.

Each `Call` runs in its own task, so a streaming call (logs -f, wait) does not block others on
the same link; a `Cancel` or the link closing stops it. The calls, their requests and responses
are defined in core/api.py; here each has its handler, which takes the typed request and returns
the typed response. Every call runs as a `Principal`: admin tokens may do anything, a deployer
token only what concerns its own project (anything else is "not found", so it learns nothing of
other tenants), node and proxy tokens nothing here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import trio

from vectorlay import __version__
from vectorlay.core import api
from vectorlay.core.api_views import (
    ClusterDescription,
    ClusterView,
    DescribedReplica,
    FleetSummary,
    KeyView,
    NodeDescription,
    ReplicaDescription,
    SecretView,
    ServerView,
    TokenView,
)
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
from vectorlay.server.idle_links import API_IDLE_TIMEOUT_S, IdleTimer
from vectorlay.server.route_feed import RouteFeed
from vectorlay.server.sessions import Sessions
from vectorlay.server.signals import Signals
from vectorlay.server.store import ops
from vectorlay.server.views import audit_view, token_view
from vectorlay.server.write_behind import DatabaseStatus
from vectorlay.wire import CLOSE_NORMAL, CLOSE_POLICY, Link, LinkClosed

log = logging.getLogger("vectorlay.server")
T = TypeVar("T")

Emit = Callable[[Any], Awaitable[None]]  # sends one event of the call's stream
Handler = Callable[[Principal, Any, Emit], Awaitable[Any]]
MAX_CALLS_IN_FLIGHT = 64  # per link: a client cannot make the server juggle unbounded work
MAX_SECRET_BYTES = 64 * 1024
CLIENT_MESSAGES_PER_S = 50.0
CLIENT_MESSAGE_BURST = 200


class Api:
    def __init__(self, fleet: Fleet, admin: Admin, sessions: Sessions, signals: Signals, auth: Authenticator,
                 feed: RouteFeed, database: DatabaseStatus, pending_writes: Callable[[], int],
                 idle_timeout_s: float = API_IDLE_TIMEOUT_S) -> None:
        self.fleet = fleet
        self.database = database
        self.pending_writes = pending_writes
        self.idle_timeout_s = idle_timeout_s
        self.links = 0  # CLI links open now (for `get servers`)
        self.servers: Callable[[], Awaitable[list[ServerView]]] | None = None  # set by the app
        self.admin = admin
        self.sessions = sessions
        self.signals = signals
        self.auth = auth
        self.feed = feed
        handlers: dict[type[api.Request[Any]], Handler] = {
            api.WhoAmI: self.whoami,
            api.GetStatus: self.status,
            api.GetServers: self.get_servers,
            api.Apply: self.apply,
            api.Delete: self.delete,
            api.Unquarantine: self.cluster_unquarantine,
            api.GetClusters: self.get_clusters,
            api.GetReplicas: self.get_replicas,
            api.DescribeCluster: self.describe_cluster,
            api.DescribeReplica: self.describe_replica,
            api.DescribeNode: self.describe_node,
            api.RolloutHistory: self.rollout_history,
            api.RolloutUndo: self.rollout_undo,
            api.WaitReady: self.wait_ready,
            api.WaitDeleted: self.wait_deleted,
            api.Logs: self.logs,
            api.KeyCreate: self.key_create,
            api.KeyList: self.key_list,
            api.KeyRevoke: self.key_revoke,
            api.SecretSet: self.secret_set,
            api.SecretList: self.secret_list,
            api.SecretDelete: self.secret_delete,
            api.Audit: self.audit,
            api.GetNodes: self.get_nodes,
            api.GetFleetSummary: self.fleet_summary,
            api.NodeCordon: self.node_cordon,
            api.NodeUncordon: self.node_uncordon,
            api.NodeDrain: self.node_drain,
            api.NodeRemove: self.node_rm,
            api.TokenCreate: self.token_create,
            api.TokenList: self.token_list,
            api.TokenRevoke: self.token_revoke,
        }
        missing = {call.method for call in api.CALLS if call.request not in handlers}
        if missing:  # a call added to core/api.py without its handler here
            raise TypeError(f"no handler for API call(s) {sorted(missing)}")
        self.handlers = handlers

    async def serve(self, link: Link, principal: Principal) -> None:
        self.links += 1
        try:
            await self._serve(link, principal)
        finally:
            self.links -= 1

    async def _serve(self, link: Link, principal: Principal) -> None:
        calls: dict[int, trio.CancelScope] = {}
        budget = TokenBucket.full(CLIENT_MESSAGES_PER_S, CLIENT_MESSAGE_BURST, trio.current_time())
        idle = IdleTimer(self.idle_timeout_s)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    with idle.waiting() as waiting:
                        message = await link.receive(CLIENT_TO_SERVER)
                except ProtocolError as error:
                    await link.reject(error)
                    break
                except LinkClosed:
                    break
                if waiting.cancelled_caught:
                    await link.close(CLOSE_NORMAL, f"idle for {self.idle_timeout_s:g}s with no call in flight")
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
                    idle.begin()
                    nursery.start_soon(idle.call, partial(self._run_call, link, principal, message, scope, calls))
            nursery.cancel_scope.cancel()

    async def _run_call(self, link: Link, principal: Principal, call: Call, scope: trio.CancelScope,
                        calls: dict[int, trio.CancelScope]) -> None:
        async def emit(value: Any) -> None:
            await link.send(Event(call.id, api.encode(value)))

        try:
            with scope:
                request = api.decode_request(call.method, call.params)
                if api.call_type(request).admin_only and not principal.is_admin:
                    raise AuthError(f"a {principal.role.value} token cannot do this (needs an admin token)")
                response = await self.handlers[type(request)](principal, request, emit)
                await link.send(Result(call.id, api.encode(response)))
        except LinkClosed:
            pass
        except VectorlayError as error:
            try:
                await link.send(Failure(call.id, api.error_kind(error), _explain(error, call.method)))
            except LinkClosed:
                pass
        finally:
            calls.pop(call.id, None)

    # --- scoping ----------------------------------------------------------------------------

    def _project(self, principal: Principal, named: str | None) -> str:
        """The project a call is about: the one named, else the caller's own (admin: default)."""
        project = named or principal.project or DEFAULT_PROJECT
        if not is_dns_label(project):
            raise UserError(f"invalid project {project!r}")
        return project

    def _cluster(self, principal: Principal, name: str, project_named: str | None, must_exist: bool = True) -> str:
        """The key of the named cluster, if the caller may see it; NotFoundError otherwise."""
        project = self._project(principal, project_named)
        key = cluster_key(name, project)
        visible = principal.may_touch(project)
        if not visible or (must_exist and key not in self.fleet.clusters and not self.fleet.by_cluster.get(key)):
            raise NotFoundError(f"cluster {name!r} not found in project {project!r}")
        return key

    def _visible(self, principal: Principal, key: str) -> bool:
        return principal.may_touch(split_key(key)[1])

    def _listed(self, principal: Principal, key: str, project_named: str | None) -> bool:
        """In a listing: visible to the caller, and of the project asked for (`-p`), if any."""
        project = split_key(key)[1]
        return principal.may_touch(project) and (project_named is None or project == project_named)

    def _scoped_project(self, principal: Principal, named: str | None) -> str:
        project = self._project(principal, named)
        if not principal.may_touch(project):
            raise NotFoundError(f"project {project!r} not found")
        return project

    # --- clusters ---------------------------------------------------------------------------

    async def whoami(self, principal: Principal, request: api.WhoAmI, emit: Emit) -> api.Identity:
        return api.Identity(principal.role, principal.token_id, principal.project or None)

    async def status(self, principal: Principal, request: api.GetStatus, emit: Emit) -> api.ServerStatus:
        """How this server is: its database above all (unavailable since when, and why)."""
        connected = sum(1 for live in self.fleet.liveness.values() if live.connected)
        return api.ServerStatus(__version__, views.database_view(self.database, self.pending_writes()),
                                len(self.fleet.nodes), connected, len(self.fleet.clusters))

    async def get_servers(self, principal: Principal, request: api.GetServers, emit: Emit) -> api.Servers:
        return api.Servers(tuple(await self.servers()) if self.servers is not None else ())

    async def apply(self, principal: Principal, request: api.Apply, emit: Emit) -> api.Applied:
        specs = parse_manifest(request.manifest, principal.project or DEFAULT_PROJECT)
        for spec in specs:
            if not principal.may_touch(spec.project):
                raise AuthError(f"a deployer token for project {principal.project!r} cannot change project "
                                f"{spec.project!r}")
        changes = await self.admin.apply(specs, request.dry_run, principal.actor)
        return api.Applied(request.dry_run, tuple(changes))

    async def delete(self, principal: Principal, request: api.Delete, emit: Emit) -> api.Deleted:
        key = self._cluster(principal, request.name, request.project)
        if not await self.admin.delete(key, principal.actor):
            raise NotFoundError(f"cluster {request.name!r} not found")
        return api.Deleted(key)

    async def cluster_unquarantine(self, principal: Principal, request: api.Unquarantine,
                                   emit: Emit) -> api.Unquarantined:
        key = self._cluster(principal, request.name, request.project)
        return api.Unquarantined(key, await self.admin.unquarantine(key, principal.actor))

    async def get_clusters(self, principal: Principal, request: api.GetClusters, emit: Emit) -> api.Clusters:
        if request.name is not None:
            keys = [self._cluster(principal, request.name, request.project)]
        else:
            keys = sorted(k for k in self.fleet.clusters if self._listed(principal, k, request.project))
        now = trio.current_time()
        return api.Clusters(tuple(views.cluster_view(self.fleet, k, self.feed.endpoint_url(k), now) for k in keys))

    async def get_replicas(self, principal: Principal, request: api.GetReplicas, emit: Emit) -> api.Replicas:
        if request.cluster is not None:
            ids = sorted(self.fleet.by_cluster.get(self._cluster(principal, request.cluster, request.project), ()))
        else:
            ids = sorted((i for i, r in self.fleet.replicas.items()
                          if self._listed(principal, r.cluster, request.project)),
                         key=lambda i: (self.fleet.replicas[i].cluster, i))

        def page(chunk: list[str]) -> api.ReplicaPage:
            return api.ReplicaPage(tuple(views.replica_view(self.fleet, i) for i in chunk))

        if await _paged(request.page_size, emit, ids, page):
            return api.Replicas(len(ids))
        return api.Replicas(len(ids), page(ids).replicas)

    async def describe_cluster(self, principal: Principal, request: api.DescribeCluster,
                               emit: Emit) -> ClusterDescription:
        key = self._cluster(principal, request.name, request.project)
        record = self.fleet.clusters.get(key)
        events = await self.admin.events(key, 200)
        replicas = []
        for replica in self.fleet.replicas_of_cluster(key):
            mine = tuple(views.event_view(e) for e in events if e.replica_id == replica.id)[-5:]
            replicas.append(_extended(DescribedReplica, views.replica_view(self.fleet, replica.id), events=mine))
        return ClusterDescription(
            cluster=views.cluster_view(self.fleet, key, self.feed.endpoint_url(key), trio.current_time()),
            spec=record.spec if record else None,
            replicas=tuple(replicas),
            events=tuple(views.event_view(e) for e in events[-20:]),
        )

    async def describe_replica(self, principal: Principal, request: api.DescribeReplica,
                               emit: Emit) -> ReplicaDescription:
        replica = self.fleet.replicas.get(request.id)
        if replica is None or not self._visible(principal, replica.cluster):
            raise NotFoundError(f"replica {request.id!r} not found")
        events = await self.admin.events(replica.cluster, 200)
        if request.id not in self.fleet.replicas:  # forgotten while its events were read
            raise NotFoundError(f"replica {request.id!r} not found")
        return views.replica_description(self.fleet, request.id, events)

    async def rollout_history(self, principal: Principal, request: api.RolloutHistory, emit: Emit) -> api.Revisions:
        key = self._cluster(principal, request.name, request.project)
        return api.Revisions(views.revision_views(await self.admin.revisions(key)))

    async def rollout_undo(self, principal: Principal, request: api.RolloutUndo, emit: Emit) -> api.RolledBack:
        key = self._cluster(principal, request.name, request.project)
        if request.to_revision is not None and request.to_revision < 1:
            raise UserError("to_revision must be a positive integer")
        revision, change = await self.admin.rollback(key, request.to_revision, principal.actor)
        return api.RolledBack(key, revision, change)

    async def wait_ready(self, principal: Principal, request: api.WaitReady, emit: Emit) -> api.ReadyWaited:
        """Stream the clusters' status on every change until all are ready or the timeout passes."""
        keys = [k for k in request.clusters if self._visible(principal, k)]

        def statuses() -> tuple[ClusterView, ...]:
            now = trio.current_time()
            return tuple(views.cluster_view(self.fleet, k, self.feed.endpoint_url(k), now) for k in keys)

        with trio.move_on_after(_timeout(request.timeout_s)):
            while True:
                current = statuses()
                await emit(api.ClusterStatuses(current))
                if all(views.cluster_readiness(self.fleet, k).ready for k in keys):
                    return api.ReadyWaited(True, current)
                blocked = tuple(api.Blocked(s.key, reason) for s in current if (reason := views.blocked_reason(s)))
                if blocked:  # it will not get ready by waiting: say why now, not at the timeout
                    return api.ReadyWaited(False, current, blocked)
                with trio.move_on_after(1.0):
                    await self.signals.wait_changed()
        return api.ReadyWaited(False, statuses())

    async def wait_deleted(self, principal: Principal, request: api.WaitDeleted, emit: Emit) -> api.DeleteWaited:
        key = self._cluster(principal, request.name, request.project, must_exist=False)
        with trio.move_on_after(_timeout(request.timeout_s)):
            while self.fleet.by_cluster.get(key):
                await emit(api.Stopping(len(self.fleet.by_cluster.get(key, ()))))
                with trio.move_on_after(1.0):
                    await self.signals.wait_changed()
            return api.DeleteWaited(True)
        return api.DeleteWaited(False, len(self.fleet.by_cluster.get(key, ())))

    async def logs(self, principal: Principal, request: api.Logs, emit: Emit) -> api.LogsEnded:
        """Every placed replica's log: first the list of them (the client merges their lines in
        time order and waits for each one's tail), then their lines as they come."""
        key = self._cluster(principal, request.cluster, request.project)
        if request.tail < 0:
            raise UserError("tail must be a non-negative integer")
        replicas = [r for r in self.fleet.replicas_of_cluster(key) if r.node_id is not None]
        await emit(api.LogChunk("", None, expected=tuple(r.id for r in replicas)))
        async with trio.open_nursery() as nursery:
            for replica in replicas:
                nursery.start_soon(self._replica_logs, replica.id, replica.node_id, request.tail, request.follow,
                                   emit, request.since)
        return api.LogsEnded(len(replicas))

    async def _replica_logs(self, replica_id: str, node_id: str | None, tail: int, follow: bool,
                            emit: Emit, since: float | None) -> None:
        node = self.fleet.nodes.get(node_id or "")
        node_name = node.name if node else None
        async with self.sessions.logs(node_id or "", replica_id, tail, follow, since) as stream:
            if stream is None:
                await emit(api.LogChunk(replica_id, node_name,
                                        error="its node is not connected; logs are unavailable now"))
                return
            async for message in stream:
                if isinstance(message, LogsData):
                    await emit(api.LogChunk(replica_id, node_name, message.lines, times=message.times,
                                            live=message.live))
                elif isinstance(message, LogsEnd):
                    if message.error:
                        await emit(api.LogChunk(replica_id, node_name, error=message.error))
                    return

    # --- endpoint keys and secrets ----------------------------------------------------------

    async def key_create(self, principal: Principal, request: api.KeyCreate, emit: Emit) -> api.CreatedKey:
        key = self._cluster(principal, request.cluster, request.project)
        record, secret = await self.admin.create_api_key(key, request.name or "", principal.actor)
        auth = self.fleet.clusters[record.cluster].spec.endpoint.auth
        return _extended(api.CreatedKey, views.key_view(record), key=secret, enforced=auth == "api-key")

    async def key_list(self, principal: Principal, request: api.KeyList, emit: Emit) -> api.Keys:
        key = self._cluster(principal, request.cluster, request.project)
        keys = sorted((k for k in self.fleet.api_keys.values() if k.cluster == key), key=lambda k: k.created_at)
        return api.Keys(tuple(views.key_view(k) for k in keys))

    async def key_revoke(self, principal: Principal, request: api.KeyRevoke, emit: Emit) -> KeyView:
        key = self._cluster(principal, request.cluster, request.project)
        return views.key_view(await self.admin.revoke_api_key(key, request.id, principal.actor))

    async def secret_set(self, principal: Principal, request: api.SecretSet, emit: Emit) -> api.SecretSaved:
        project = self._scoped_project(principal, request.project)
        name, value = request.name, request.value
        if not is_dns_label(name):
            raise UserError(f"invalid secret name {name!r}: use lowercase letters, digits and '-'")
        if (problem := secret_value_problem(value)) is not None:
            raise UserError(f"invalid secret {name!r}: {problem}")
        if len(value.encode()) > MAX_SECRET_BYTES:
            raise UserError(f"secret is larger than {MAX_SECRET_BYTES // 1024} KiB")
        existed = await self.admin.set_secret(project, name, value, principal.actor)
        return api.SecretSaved(project, name, existed)

    async def secret_list(self, principal: Principal, request: api.SecretList, emit: Emit) -> api.Secrets:
        project = self._scoped_project(principal, request.project)
        return api.Secrets(tuple(SecretView(p, n, r.updated_at)
                             for (p, n), r in sorted(self.fleet.secrets.items()) if p == project))

    async def secret_delete(self, principal: Principal, request: api.SecretDelete, emit: Emit) -> api.SecretDeleted:
        project = self._scoped_project(principal, request.project)
        await self.admin.delete_secret(project, request.name, principal.actor)
        return api.SecretDeleted(project, request.name, True)

    async def audit(self, principal: Principal, request: api.Audit, emit: Emit) -> api.AuditLog:
        if not 1 <= request.limit <= 10_000:
            raise UserError("limit must be between 1 and 10000")
        project = (None if principal.is_admin and not request.project
                   else self._scoped_project(principal, request.project))
        return api.AuditLog(tuple(audit_view(r) for r in await self.admin.audit_log(request.limit, project)))

    # --- fleet (admin) ----------------------------------------------------------------------

    async def get_nodes(self, principal: Principal, request: api.GetNodes, emit: Emit) -> api.Nodes:
        now = trio.current_time()
        if request.name is not None:
            node_id = self.fleet.node_ids_by_name.get(request.name)
            if node_id is None:
                raise NotFoundError(f"node {request.name!r} not found")
            return api.Nodes(1, (views.node_view(self.fleet, node_id, now),))
        ids = sorted(self.fleet.nodes, key=lambda i: self.fleet.nodes[i].name)

        def page(chunk: list[str]) -> api.NodePage:
            return api.NodePage(tuple(views.node_view(self.fleet, i, now) for i in chunk))

        if await _paged(request.page_size, emit, ids, page):
            return api.Nodes(len(ids))
        return api.Nodes(len(ids), page(ids).nodes)

    async def describe_node(self, principal: Principal, request: api.DescribeNode, emit: Emit) -> NodeDescription:
        node_id = self.fleet.node_ids_by_name.get(request.name)
        if node_id is None:
            raise NotFoundError(f"node {request.name!r} not found")
        events = []
        for cluster in sorted(self.fleet.clusters_on_node(node_id)):
            events += await self.admin.events(cluster, 200)
        changes = await self.admin.node_changes(request.name, 20)
        if node_id not in self.fleet.nodes:  # removed while its history was read
            raise NotFoundError(f"node {request.name!r} not found")
        return views.node_description(self.fleet, node_id, trio.current_time(), events, changes)

    async def fleet_summary(self, principal: Principal, request: api.GetFleetSummary, emit: Emit) -> FleetSummary:
        """Counts only: cheap at any fleet size (for `get` headers and monitoring)."""
        return views.fleet_summary(self.fleet)

    async def node_cordon(self, principal: Principal, request: api.NodeCordon, emit: Emit) -> api.NodeFlags:
        record = await self.admin.set_node_flags(request.name, schedulable=False, draining=False,
                                                 actor=principal.actor)
        return api.NodeFlags(record.name, False)

    async def node_uncordon(self, principal: Principal, request: api.NodeUncordon, emit: Emit) -> api.NodeFlags:
        record = await self.admin.set_node_flags(request.name, schedulable=True, draining=False,
                                                 actor=principal.actor)
        return api.NodeFlags(record.name, True)

    async def node_drain(self, principal: Principal, request: api.NodeDrain, emit: Emit) -> api.Drained:
        """Cordon the node and move its replicas (new copies ready elsewhere first); stream the
        count left until none is, or the timeout passes."""
        record = await self.admin.set_node_flags(request.name, schedulable=False, draining=True,
                                                 actor=principal.actor)
        with trio.move_on_after(_timeout(request.timeout_s)):
            while True:
                left = [r.id for r in self.fleet.replicas_on_node(record.id)]
                await emit(api.DrainProgress(record.name, len(left)))
                if not left or not request.wait:
                    return api.Drained(record.name, not left, len(left))
                with trio.move_on_after(1.0):
                    await self.signals.wait_changed()
        left = [r.id for r in self.fleet.replicas_on_node(record.id)]
        return api.Drained(record.name, not left, len(left))

    async def node_rm(self, principal: Principal, request: api.NodeRemove, emit: Emit) -> api.NodeRemoved:
        lost = await self.admin.remove_node(request.name, principal.actor)
        return api.NodeRemoved(request.name, lost)

    async def token_create(self, principal: Principal, request: api.TokenCreate, emit: Emit) -> api.CreatedToken:
        role = request.role
        try:
            ttl_s = parse_duration(request.ttl) if request.ttl is not None else None
        except ValueError as error:
            raise UserError(f"invalid ttl: {error}") from None
        if request.uses is not None and request.uses < 1:
            raise UserError("uses must be a positive integer")
        project = request.project or ""
        if role is Role.DEPLOYER:
            if not is_dns_label(project):
                raise UserError("a deployer token needs --project NAME (a DNS label)")
        elif project:
            raise UserError("--project applies only to deployer tokens")
        description = request.description[:200]

        def audit(token_id: str) -> list[ops.Op]:
            return [self.admin.audit_op(principal.actor, "token.create", token_id, project,
                                        f"{role.value} {description}")]

        record, token = await self.auth.create_token(role, ttl_s or None, request.uses, description, project, audit)
        return _extended(api.CreatedToken, token_view(record), token=token)

    async def token_list(self, principal: Principal, request: api.TokenList, emit: Emit) -> api.Tokens:
        records = sorted(await self.auth.store.list_tokens(), key=lambda r: r.created_at)
        return api.Tokens(tuple(token_view(r) for r in records))

    async def token_revoke(self, principal: Principal, request: api.TokenRevoke, emit: Emit) -> TokenView:
        if request.id == principal.token_id:
            raise ConflictError("refusing to revoke the token this command runs with")
        audit = self.admin.audit_op(principal.actor, "token.revoke", request.id)
        return token_view(await self.auth.revoke_token(request.id, [audit]))


async def _paged(size: int | None, emit: Emit, ids: list[str], page: Callable[[list[str]], Any]) -> bool:
    """With a page size, send the list as pages of events (True), so a fleet of thousands
    streams instead of one message that grows without bound; without one, send nothing (False)."""
    if size is None:
        return False
    if size < 1:
        raise UserError("page_size must be a positive integer")
    for start in range(0, len(ids), size):
        await emit(page(ids[start:start + size]))
    return True


def _extended(cls: type[T], view: object, **more: Any) -> T:
    """A view with the fields its subclass `cls` adds (a created key with the key itself, ...)."""
    return cls(**{f.name: getattr(view, f.name) for f in dataclasses.fields(view)}, **more)  # type: ignore[arg-type]


def _timeout(timeout_s: float | None) -> float:
    if timeout_s is None:
        return math.inf
    if timeout_s < 0:
        raise UserError("timeout_s must be a non-negative number")
    return timeout_s


def _explain(error: VectorlayError, method: str) -> str:
    """The caller's one line: for a database away, whether their change was made."""
    if isinstance(error, StoreInDoubt):
        return (f"{error}: the change may or may not have been stored; look again in a moment "
                "(`vectorlay get clusters`, `vectorlay status`)")
    call = api.BY_METHOD.get(method)
    if isinstance(error, StoreUnavailable) and call is not None and call.changes:
        return f"{error}; nothing was changed"
    return str(error)
