"""The CLI's API to the server: each call a frozen request and a frozen response, defined once.

On the wire a call travels in the envelope of `core/protocol.py`: `Call(id, method, params)`,
then `Event(id, value)`s for a streaming call, then `Result(id, value)` or `Failure(id, kind,
message)`. This module says what `method`, `params`, `value` and `kind` may be: `CALLS` lists every
call with its request, response and event types, and `decode_request` / `decode_response` /
`decode_event` refuse an unknown field or a wrong type with the path of the offending value.

The API has a version of its own, sent in the client's hello (`ClientHello.api`). A server
serves the versions from OLDEST_CLIENT_API_VERSION to API_VERSION and refuses any other with one
line that says which side to upgrade. Bump API_VERSION when a call, a field or a meaning changes
in a way the other side cannot read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from vectorlay.core import codec
from vectorlay.core.api_views import (
    AuditView,
    ClusterDescription,
    ClusterView,
    DatabaseView,
    FleetSummary,
    KeyView,
    NodeDescription,
    NodeView,
    ReplicaDescription,
    ReplicaView,
    RevisionView,
    SecretView,
    ServerView,
    TokenView,
)
from vectorlay.core.codec import CodecError
from vectorlay.core.model import Role
from vectorlay.errors import (
    AuthError,
    ConflictError,
    NotFoundError,
    PeerError,
    ProtocolError,
    ServerUnavailable,
    StoreUnavailable,
    UserError,
    VectorlayError,
)

# 1: calls with untyped params, lists as results, no version in the hello (servers before this
#    module refuse a hello that carries one). 2: this module.
API_VERSION = 2
OLDEST_CLIENT_API_VERSION = 2
UNVERSIONED_API = 1  # what a hello without `api` speaks
_SERVER_SPEAKS = "this server speaks API version"
_CLIENT_SPEAKS = "this vectorlay speaks API version"

R = TypeVar("R")
E = TypeVar("E")


# --- versions ----------------------------------------------------------------------------------


def client_version_problem(client_version: int) -> str | None:
    """Why this server cannot serve a client of `client_version` (one line), or None."""
    if client_version > API_VERSION:
        return server_too_old(API_VERSION, client_version)
    if client_version < OLDEST_CLIENT_API_VERSION:
        return f"{_CLIENT_SPEAKS} {client_version}; this server needs {OLDEST_CLIENT_API_VERSION}: upgrade vectorlay"
    return None


def server_too_old(server_version: int, client_version: int = API_VERSION) -> str:
    return f"{_SERVER_SPEAKS} {server_version}; this vectorlay needs {client_version}: upgrade the server"


def version_refusal(close_reason: str) -> str | None:
    """The one line to show when the server closed the link over the API version, else None.

    Servers from before API versions refuse the hello's `api` field as unknown."""
    if close_reason.startswith((_SERVER_SPEAKS, _CLIENT_SPEAKS)):
        return close_reason
    if "unknown field 'api'" in close_reason:
        return server_too_old(UNVERSIONED_API)
    return None


# --- errors ------------------------------------------------------------------------------------

# A failed call's `kind` -> the error the client raises. Subclasses come before their bases: the
# server names an error by the first entry it is an instance of. Anything else is "internal".
ERROR_KINDS: tuple[tuple[str, type[VectorlayError]], ...] = (
    ("not_found", NotFoundError),
    ("conflict", ConflictError),
    ("user", UserError),
    ("auth", AuthError),
    ("unavailable", ServerUnavailable),  # the server cannot serve this now: its database is away
)
INTERNAL = "internal"


def error_kind(error: VectorlayError) -> str:
    if isinstance(error, StoreUnavailable):
        return "unavailable"  # the server's own error; its client sees ServerUnavailable
    return next((kind for kind, cls in ERROR_KINDS if isinstance(error, cls)), INTERNAL)


def error_for(kind: str, message: str) -> VectorlayError:
    """The error a client raises for a failure of `kind` (a kind it does not know: PeerError)."""
    cls: type[VectorlayError] = next((c for k, c in ERROR_KINDS if k == kind), PeerError)
    return cls(message)


# --- requests and responses ----------------------------------------------------------------------


@dataclass(frozen=True)
class Request(Generic[R]):
    """A call whose response is an `R`."""


@dataclass(frozen=True)
class StreamRequest(Request[R], Generic[R, E]):
    """A call that sends `E` events (progress, pages, log lines) before its `R` response."""


# Where a request names a cluster or a secret, `project` defaults to the caller's token's project
# (else "default"); a deployer token sees only its own project.

# clusters


@dataclass(frozen=True)
class Identity:
    role: Role
    token: str
    project: str | None


@dataclass(frozen=True)
class WhoAmI(Request[Identity]):
    pass


@dataclass(frozen=True)
class ClusterChange:
    cluster: str  # the cluster's key
    action: str  # "created" | "updated" | "unchanged"
    detail: str = ""
    fields: tuple[str, ...] = ()  # what changed, one line per field: `spec.env.X: 4096 → 8192`


@dataclass(frozen=True)
class Applied:
    dry_run: bool
    changes: tuple[ClusterChange, ...]


@dataclass(frozen=True)
class Apply(Request[Applied]):
    manifest: str  # YAML, one or more documents
    dry_run: bool = False


@dataclass(frozen=True)
class Deleted:
    deleted: str  # the cluster's key


@dataclass(frozen=True)
class Delete(Request[Deleted]):
    name: str
    project: str | None = None


@dataclass(frozen=True)
class Unquarantined:
    cluster: str
    lifted: bool  # False: it was not quarantined


@dataclass(frozen=True)
class Unquarantine(Request[Unquarantined]):
    name: str
    project: str | None = None


@dataclass(frozen=True)
class Clusters:
    clusters: tuple[ClusterView, ...]


@dataclass(frozen=True)
class GetClusters(Request[Clusters]):
    name: str | None = None  # one cluster (NotFoundError if it is not there), else all visible
    project: str | None = None


@dataclass(frozen=True)
class ReplicaPage:
    replicas: tuple[ReplicaView, ...]


@dataclass(frozen=True)
class Replicas:
    total: int
    replicas: tuple[ReplicaView, ...] = ()  # without page_size; with it, the pages came as events


@dataclass(frozen=True)
class GetReplicas(StreamRequest[Replicas, ReplicaPage]):
    cluster: str | None = None
    project: str | None = None
    page_size: int | None = None  # stream pages of this size (a fleet of thousands), else all at once


@dataclass(frozen=True)
class DescribeCluster(Request[ClusterDescription]):
    name: str
    project: str | None = None


@dataclass(frozen=True)
class DescribeReplica(Request[ReplicaDescription]):
    id: str  # replica ids are unique across projects; another project's is "not found"


@dataclass(frozen=True)
class Revisions:
    revisions: tuple[RevisionView, ...]  # oldest first, the newest (what runs now) last


@dataclass(frozen=True)
class RolloutHistory(Request[Revisions]):
    name: str
    project: str | None = None


@dataclass(frozen=True)
class RolledBack:
    cluster: str  # the cluster's key
    to_revision: int  # the revision whose spec was applied again
    change: ClusterChange  # as `apply` reports it: "updated", or "unchanged" if it runs that spec already


@dataclass(frozen=True)
class RolloutUndo(Request[RolledBack]):
    """Apply a stored revision's spec again, as `apply` would (audited, a new revision, a roll)."""

    name: str
    project: str | None = None
    to_revision: int | None = None  # None: the revision before the newest


@dataclass(frozen=True)
class Blocked:
    cluster: str
    reason: str  # why it cannot get ready by waiting (crash loop, quarantine)


@dataclass(frozen=True)
class ReadyWaited:
    ready: bool
    clusters: tuple[ClusterView, ...]
    failed: tuple[Blocked, ...] = ()  # set when waiting stopped early


@dataclass(frozen=True)
class ClusterStatuses:
    clusters: tuple[ClusterView, ...]


@dataclass(frozen=True)
class WaitReady(StreamRequest[ReadyWaited, ClusterStatuses]):
    """The clusters' status on every change, until all are ready, one cannot get there, or the timeout."""

    clusters: tuple[str, ...]  # keys, as `Applied.changes` names them
    timeout_s: float | None = None  # None: no limit


@dataclass(frozen=True)
class Stopping:
    stopping: int


@dataclass(frozen=True)
class DeleteWaited:
    gone: bool
    left: int = 0


@dataclass(frozen=True)
class WaitDeleted(StreamRequest[DeleteWaited, Stopping]):
    name: str
    project: str | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class LogChunk:
    replica: str
    node: str | None
    lines: tuple[str, ...] = ()
    error: str | None = None  # this replica's log cannot be read (its node is away, ...)
    times: tuple[float, ...] = ()  # when each line was written (to about a second), wall clock
    live: bool = False  # written after the call began (follow): the replica's tail is complete
    expected: tuple[str, ...] = ()  # the first event only: every replica whose lines will come


@dataclass(frozen=True)
class LogsEnded:
    replicas: int  # how many replicas' logs were read


@dataclass(frozen=True)
class Logs(StreamRequest[LogsEnded, LogChunk]):
    cluster: str
    project: str | None = None
    tail: int = 100
    follow: bool = False
    since: float | None = None  # wall clock: only lines written at or after it


# endpoint keys and secrets


@dataclass(frozen=True)
class CreatedKey(KeyView):
    key: str  # shown once; only its hash is stored
    enforced: bool  # whether the cluster's endpoint asks for keys (spec.endpoint.auth)


@dataclass(frozen=True)
class KeyCreate(Request[CreatedKey]):
    cluster: str
    name: str | None = None
    project: str | None = None


@dataclass(frozen=True)
class Keys:
    keys: tuple[KeyView, ...]


@dataclass(frozen=True)
class KeyList(Request[Keys]):
    cluster: str
    project: str | None = None


@dataclass(frozen=True)
class KeyRevoke(Request[KeyView]):
    cluster: str
    id: str
    project: str | None = None


@dataclass(frozen=True)
class SecretSaved:
    project: str
    name: str
    updated: bool  # False: created


@dataclass(frozen=True)
class SecretSet(Request[SecretSaved]):
    project: str
    name: str
    value: str


@dataclass(frozen=True)
class Secrets:
    secrets: tuple[SecretView, ...]


@dataclass(frozen=True)
class SecretList(Request[Secrets]):
    project: str


@dataclass(frozen=True)
class SecretDeleted:
    project: str
    name: str
    deleted: bool


@dataclass(frozen=True)
class SecretDelete(Request[SecretDeleted]):
    project: str
    name: str


@dataclass(frozen=True)
class AuditLog:
    records: tuple[AuditView, ...]


@dataclass(frozen=True)
class Audit(Request[AuditLog]):
    limit: int = 100
    project: str | None = None  # admin: all projects unless named


# the fleet (admin tokens only)


@dataclass(frozen=True)
class NodePage:
    nodes: tuple[NodeView, ...]


@dataclass(frozen=True)
class Nodes:
    total: int
    nodes: tuple[NodeView, ...] = ()  # without page_size; with it, the pages came as events


@dataclass(frozen=True)
class GetNodes(StreamRequest[Nodes, NodePage]):
    name: str | None = None
    page_size: int | None = None


@dataclass(frozen=True)
class DescribeNode(Request[NodeDescription]):
    name: str


@dataclass(frozen=True)
class GetFleetSummary(Request[FleetSummary]):
    pass


@dataclass(frozen=True)
class ServerStatus:
    version: str
    database: DatabaseView
    nodes: int
    nodes_connected: int
    clusters: int


@dataclass(frozen=True)
class GetStatus(Request[ServerStatus]):
    pass


@dataclass(frozen=True)
class Servers:
    servers: tuple[ServerView, ...]


@dataclass(frozen=True)
class GetServers(Request[Servers]):
    pass


@dataclass(frozen=True)
class NodeFlags:
    node: str
    schedulable: bool


@dataclass(frozen=True)
class NodeCordon(Request[NodeFlags]):
    name: str


@dataclass(frozen=True)
class NodeUncordon(Request[NodeFlags]):
    name: str


@dataclass(frozen=True)
class DrainProgress:
    node: str
    replicas_left: int


@dataclass(frozen=True)
class Drained:
    node: str
    drained: bool
    replicas_left: int


@dataclass(frozen=True)
class NodeDrain(StreamRequest[Drained, DrainProgress]):
    name: str
    wait: bool = True  # False: answer once draining has started
    timeout_s: float | None = None


@dataclass(frozen=True)
class NodeRemoved:
    node: str
    replicas_replaced: int


@dataclass(frozen=True)
class NodeRemove(Request[NodeRemoved]):
    name: str


@dataclass(frozen=True)
class CreatedToken(TokenView):
    token: str  # shown once; only a hash of its secret is stored


@dataclass(frozen=True)
class TokenCreate(Request[CreatedToken]):
    role: Role
    ttl: str | None = None  # a duration ("24h"); None or "0": it never expires
    uses: int | None = None  # None: unlimited
    description: str = ""
    project: str | None = None  # deployer tokens only


@dataclass(frozen=True)
class Tokens:
    tokens: tuple[TokenView, ...]


@dataclass(frozen=True)
class TokenList(Request[Tokens]):
    pass


@dataclass(frozen=True)
class TokenRevoke(Request[TokenView]):
    id: str


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallType:
    method: str  # its name on the wire
    request: type[Request[Any]]
    response: type[Any]
    event: type[Any] | None = None  # streaming calls only
    admin_only: bool = False
    changes: bool = False  # it changes what is stored (a failure then says whether anything was)


CALLS: tuple[CallType, ...] = (
    CallType("whoami", WhoAmI, Identity),
    CallType("status", GetStatus, ServerStatus),
    CallType("apply", Apply, Applied, changes=True),
    CallType("delete", Delete, Deleted, changes=True),
    CallType("cluster_unquarantine", Unquarantine, Unquarantined, changes=True),
    CallType("get_clusters", GetClusters, Clusters),
    CallType("get_replicas", GetReplicas, Replicas, ReplicaPage),
    CallType("describe_cluster", DescribeCluster, ClusterDescription),
    CallType("describe_replica", DescribeReplica, ReplicaDescription),
    CallType("rollout_history", RolloutHistory, Revisions),
    CallType("rollout_undo", RolloutUndo, RolledBack, changes=True),
    CallType("wait_ready", WaitReady, ReadyWaited, ClusterStatuses),
    CallType("wait_deleted", WaitDeleted, DeleteWaited, Stopping),
    CallType("logs", Logs, LogsEnded, LogChunk),
    CallType("key_create", KeyCreate, CreatedKey, changes=True),
    CallType("key_list", KeyList, Keys),
    CallType("key_revoke", KeyRevoke, KeyView, changes=True),
    CallType("secret_set", SecretSet, SecretSaved, changes=True),
    CallType("secret_list", SecretList, Secrets),
    CallType("secret_delete", SecretDelete, SecretDeleted, changes=True),
    CallType("audit", Audit, AuditLog),
    CallType("get_nodes", GetNodes, Nodes, NodePage, admin_only=True),
    CallType("describe_node", DescribeNode, NodeDescription, admin_only=True),
    CallType("fleet_summary", GetFleetSummary, FleetSummary, admin_only=True),
    CallType("get_servers", GetServers, Servers, admin_only=True),
    CallType("node_cordon", NodeCordon, NodeFlags, admin_only=True, changes=True),
    CallType("node_uncordon", NodeUncordon, NodeFlags, admin_only=True, changes=True),
    CallType("node_drain", NodeDrain, Drained, DrainProgress, admin_only=True, changes=True),
    CallType("node_rm", NodeRemove, NodeRemoved, admin_only=True, changes=True),
    CallType("token_create", TokenCreate, CreatedToken, admin_only=True, changes=True),
    CallType("token_list", TokenList, Tokens, admin_only=True),
    CallType("token_revoke", TokenRevoke, TokenView, admin_only=True, changes=True),
)
BY_METHOD: dict[str, CallType] = {call.method: call for call in CALLS}
BY_REQUEST: dict[type[Request[Any]], CallType] = {call.request: call for call in CALLS}


def call_type(request: Request[Any]) -> CallType:
    return BY_REQUEST[type(request)]


# --- encoding ----------------------------------------------------------------------------------


def encode(value: object) -> dict[str, Any]:
    """A request's params, or a response's or event's value (a dataclass of this module or of
    api_views.py): a JSON object."""
    body: dict[str, Any] = codec.dump(value)
    return body


def decode_request(method: str, params: dict[str, Any]) -> Request[Any]:
    """The request a `Call` carries; UserError naming the method and field if it is not one."""
    call = BY_METHOD.get(method)
    if call is None:
        raise UserError(f"unknown method {method!r}")
    try:
        return codec.load(call.request, params)
    except CodecError as error:
        raise UserError(f"invalid {method!r} call: {error}") from None


def decode_response(request: Request[R], value: dict[str, Any]) -> R:
    """The response to `request` from a `Result`'s value; ProtocolError if it is not one."""
    call = call_type(request)
    try:
        response: R = codec.load(call.response, value)
    except CodecError as error:
        raise ProtocolError(f"bad {call.method!r} result from the server: {error}") from None
    return response


def decode_event(request: Request[Any], value: dict[str, Any]) -> Any:
    """One event of `request`'s stream (an `E` of its StreamRequest[R, E]); ProtocolError if not."""
    call = call_type(request)
    if call.event is None:
        raise ProtocolError(f"the server sent an event for {call.method!r}, which streams none")
    try:
        return codec.load(call.event, value)
    except CodecError as error:
        raise ProtocolError(f"bad {call.method!r} event from the server: {error}") from None
