"""The wire protocol between server, nodes, proxies and the CLI.

Every message is one JSON object in one WebSocket text frame: `{"type": "<name>", ...fields}`.
The first message on a link (`NodeHello`, `Join`, `ProxyHello`, `ClientHello`) carries
`protocol`; a peer speaking another version is refused. `decode` accepts only the message types a
channel allows and checks every field, so handlers only ever see well-formed values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vectorlay.core import codec
from vectorlay.core.api import UNVERSIONED_API
from vectorlay.core.codec import CodecError
from vectorlay.core.model import Assignment, Gpu, GpuStatus, RateLimit, ReplicaState
from vectorlay.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a full desired state for a large node fits comfortably


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""


# --- node <-> server --------------------------------------------------------------------------


@dataclass(frozen=True)
class Join(Message):
    """First message of a joining node: trade a join token for a node credential."""

    TYPE: ClassVar[str] = "join"
    protocol: int
    token: str
    name: str
    gpus: tuple[Gpu, ...] = ()
    address: str = "127.0.0.1"
    runtimes: tuple[str, ...] = ("process",)
    isolation: tuple[str, ...] = ()


@dataclass(frozen=True)
class Joined(Message):
    TYPE: ClassVar[str] = "joined"
    node_id: str
    name: str
    credential: str


@dataclass(frozen=True)
class ReplicaReport:
    """What a node observes about one replica it runs."""

    replica_id: str
    generation: int
    state: ReplicaState
    reason: str = ""
    address: str | None = None
    image_digest: str | None = None  # what the node resolved the image to (containers)
    # With a failure: its cause is this node, not the cluster (an image missing under `image_pull:
    # never`, an isolation level, runtime or GPU the node cannot give); another node may succeed.
    node_fault: bool = False


@dataclass(frozen=True)
class NodeHello(Message):
    """First message of a running agent: its credential and what it really runs right now."""

    TYPE: ClassVar[str] = "node_hello"
    protocol: int
    credential: str
    gpus: tuple[Gpu, ...] = ()
    address: str = "127.0.0.1"
    runtimes: tuple[str, ...] = ("process",)
    isolation: tuple[str, ...] = ()  # isolation levels its container runtime offers
    generation: int = 0  # the highest generation the agent has applied
    replicas: tuple[ReplicaReport, ...] = ()


@dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    node_id: str
    name: str
    heartbeat_interval_s: float


@dataclass(frozen=True)
class Command(Message):
    """A durable instruction: committed to the server's outbox before it is sent.

    `seq` grows per node; the agent acks it after applying and ignores a seq it already applied.
    """

    TYPE: ClassVar[str] = "command"
    seq: int
    op: str  # "start" | "stop" | "restart"
    generation: int
    replica_id: str
    assignment: Assignment | None = None


COMMAND_OPS = frozenset({"start", "stop", "restart"})


@dataclass(frozen=True)
class Sync(Message):
    """The node's full desired state; replaces whatever the agent believed it should run."""

    TYPE: ClassVar[str] = "sync"
    generation: int
    through_seq: int  # commands up to here are reflected in `assignments`
    assignments: tuple[Assignment, ...]


@dataclass(frozen=True)
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    seq: int


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    sent_at: float = 0.0  # the node's wall clock, for display only; liveness uses the server's clock
    gpus: tuple[GpuStatus, ...] = ()  # utilisation and health, when NVML can read them


@dataclass(frozen=True)
class Goodbye(Message):
    """The agent is shutting down on purpose; its replicas keep running (it will be back)."""

    TYPE: ClassVar[str] = "goodbye"
    reason: str = ""


@dataclass(frozen=True)
class ReplicaStatus(Message):
    TYPE: ClassVar[str] = "replica_status"
    report: ReplicaReport


@dataclass(frozen=True)
class LogsOpen(Message):
    """Server asks a node to stream one replica's log: the last `tail` lines (of those written at or
    after `since`, a wall time, if given), then new ones if `follow`."""

    TYPE: ClassVar[str] = "logs_open"
    stream_id: int
    replica_id: str
    tail: int = 100
    follow: bool = False
    since: float | None = None


@dataclass(frozen=True)
class LogsData(Message):
    """Lines of a replica's log, with the wall time each was written (to about a second; empty from
    an older agent). `live`: new lines (follow); the first live batch, maybe empty, says the tail
    is complete."""

    TYPE: ClassVar[str] = "logs_data"
    stream_id: int
    lines: tuple[str, ...]
    times: tuple[float, ...] = ()
    live: bool = False


@dataclass(frozen=True)
class LogsEnd(Message):
    TYPE: ClassVar[str] = "logs_end"
    stream_id: int
    error: str = ""


@dataclass(frozen=True)
class LogsClose(Message):
    TYPE: ClassVar[str] = "logs_close"
    stream_id: int


# --- proxy <-> server -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyHello(Message):
    TYPE: ClassVar[str] = "proxy_hello"
    protocol: int
    token: str
    url_template: str = ""  # the public URL of a cluster, e.g. "http://{cluster}.localhost:8080/"


@dataclass(frozen=True)
class Endpoint:
    replica_id: str
    address: str  # host:port
    node: str  # node name, for headers and metrics


@dataclass(frozen=True)
class Route:
    """Where a cluster's traffic may go, and how its endpoint is guarded.

    `endpoints` holds only ready replicas on ready nodes. With `auth` "api-key", a request must
    carry `Authorization: Bearer <key>` for a key whose SHA-256 is in `key_hashes`.
    """

    cluster: str
    endpoints: tuple[Endpoint, ...] = ()
    auth: str = "none"
    key_hashes: tuple[str, ...] = ()
    rate_limit: RateLimit | None = None
    per_client_rate_limit: RateLimit | None = None


@dataclass(frozen=True)
class RouteSnapshot(Message):
    TYPE: ClassVar[str] = "route_snapshot"
    version: int
    routes: tuple[Route, ...]


@dataclass(frozen=True)
class RouteUpdate(Message):
    """A delta: `route` replaces the cluster's entry; `removed` means the cluster no longer exists."""

    TYPE: ClassVar[str] = "route_update"
    version: int
    route: Route
    removed: bool = False


# --- CA discovery ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CaBundle(Message):
    """The server's CA certificate (PEM), sent to anyone on `/v1/ca`; clients check it against the
    pin in their token before trusting it."""

    TYPE: ClassVar[str] = "ca_bundle"
    pem: str


# --- CLI <-> server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientHello(Message):
    """`api`: the version of the calls the client speaks (see core/api.py)."""

    TYPE: ClassVar[str] = "client_hello"
    protocol: int
    token: str
    api: int = UNVERSIONED_API


@dataclass(frozen=True)
class Ready(Message):
    """The server accepted a proxy's or client's hello."""

    TYPE: ClassVar[str] = "ready"
    role: str


@dataclass(frozen=True)
class Call(Message):
    """One API call: `method` and `params` are a request of core/api.py."""

    TYPE: ClassVar[str] = "call"
    id: int
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Result(Message):
    """The call's response (core/api.py); it ends the call."""

    TYPE: ClassVar[str] = "result"
    id: int
    value: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event(Message):
    """One item of a streamed result (log lines, progress, a page); the stream ends with a `Result`."""

    TYPE: ClassVar[str] = "event"
    id: int
    value: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure(Message):
    TYPE: ClassVar[str] = "failure"
    id: int
    kind: str  # one of core/api.py's ERROR_KINDS, or "internal"
    message: str


@dataclass(frozen=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    id: int


# --- channels ---------------------------------------------------------------------------------

NODE_TO_SERVER: tuple[type[Message], ...] = (Ack, Heartbeat, ReplicaStatus, LogsData, LogsEnd, Goodbye)
SERVER_TO_NODE: tuple[type[Message], ...] = (Welcome, Command, Sync, LogsOpen, LogsClose)
NODE_FIRST: tuple[type[Message], ...] = (Join, NodeHello)
PROXY_FIRST: tuple[type[Message], ...] = (ProxyHello,)
SERVER_TO_PROXY: tuple[type[Message], ...] = (Ready, RouteSnapshot, RouteUpdate)
CLIENT_FIRST: tuple[type[Message], ...] = (ClientHello,)
CLIENT_TO_SERVER: tuple[type[Message], ...] = (Call, Cancel)
SERVER_TO_CLIENT: tuple[type[Message], ...] = (Ready, Result, Event, Failure)
SERVER_TO_DISCOVERY: tuple[type[Message], ...] = (CaBundle,)


def encode(message: Message) -> str:
    body = codec.dump(message)
    return json.dumps({"type": message.TYPE, **body}, separators=(",", ":"), allow_nan=False)


def decode(text: str | bytes, allowed: tuple[type[Message], ...]) -> Message:
    """Parse one frame; raise ProtocolError for anything but a well-formed allowed message."""
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {size} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise ProtocolError(f"message is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ProtocolError("message must be a JSON object")
    kind = data.pop("type", None)
    if not isinstance(kind, str):
        raise ProtocolError("message has no 'type'")
    by_type = {cls.TYPE: cls for cls in allowed}
    cls = by_type.get(kind)
    if cls is None:
        raise ProtocolError(f"unexpected message type {kind!r}")
    try:
        message = codec.load(cls, data)
    except CodecError as error:
        raise ProtocolError(f"bad {kind!r} message: {error}") from None
    _check_rules(message)
    return message


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _check_rules(message: Message) -> None:
    """Rules the field types alone cannot express."""
    if isinstance(message, Join | NodeHello | ProxyHello | ClientHello) and message.protocol != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {message.protocol} is not supported (this server speaks {PROTOCOL_VERSION})"
        )
    if isinstance(message, Command):
        if message.op not in COMMAND_OPS:
            raise ProtocolError(f"unknown command op {message.op!r}")
        if message.op == "start" and message.assignment is None:
            raise ProtocolError("a start command needs an assignment")

