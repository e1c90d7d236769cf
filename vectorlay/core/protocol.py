"""The wire protocol between server, nodes, proxies and the CLI.

Every message is one JSON object in one WebSocket text frame: `{"type": "<name>", ...fields}`.
The first message on a link (`NodeHello`, `Join`, `ProxyHello`, `ClientHello`) carries
`protocol`; a peer speaking another version is refused. `decode` accepts only the message types a
channel allows and checks every field, so handlers only ever see well-formed values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vectorlay.core import codec
from vectorlay.core.api import UNVERSIONED_API
from vectorlay.core.codec import CodecError
from vectorlay.core.model import Assignment, Gpu, GpuStatus, RateLimit, ReplicaState
from vectorlay.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a full desired state for a large node fits comfortably

# How a node's replicas are reached. `tunnel` (what `vectorlay node join` does by default): through
# the tunnels the node opens to every proxy, nothing listening beyond its loopback. `direct`: the
# proxy dials the node's advertised address (datacenter machines only: the port is open).
TUNNEL = "tunnel"
DIRECT = "direct"
DATA_PLANES = frozenset({TUNNEL, DIRECT})
MAX_CSR_CHARS = 4096  # a P-256 CSR in PEM is about 500 characters
MAX_CERT_CHARS = 16 * 1024
TUNNEL_PEER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):[0-9]{1,5}")


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
    data_plane: str = DIRECT


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
    data_plane: str = DIRECT
    tunnel_csr: str = ""  # with data_plane tunnel: a CSR for the node's tunnel certificate (PEM)


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
    tunnels: int | None = None  # proxies the node has a tunnel to now (tunnel data plane)


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


# --- tunnels (server -> node, server -> proxy) -------------------------------------------------


@dataclass(frozen=True)
class TunnelCredential(Message):
    """A tunnel certificate the server issued for the key in the peer's CSR, and the tunnel CA
    (PEM). A node gets a short-lived one on every hello and again before it expires."""

    TYPE: ClassVar[str] = "tunnel_credential"
    certificate: str
    ca: str
    expires_at: float  # wall clock


@dataclass(frozen=True)
class TunnelProxy:
    id: str
    address: str  # host:port where the proxy accepts tunnels


@dataclass(frozen=True)
class TunnelProxies(Message):
    """Every proxy a node should keep a tunnel to; sent after the welcome and on every change."""

    TYPE: ClassVar[str] = "tunnel_proxies"
    proxies: tuple[TunnelProxy, ...]


@dataclass(frozen=True)
class AdmittedNodes(Message):
    """Which nodes a proxy may accept tunnels from: all of them (`snapshot`), then changes. A
    node that leaves has its tunnel dropped at once."""

    TYPE: ClassVar[str] = "admitted_nodes"
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    snapshot: bool = False


# --- proxy <-> server -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyHello(Message):
    TYPE: ClassVar[str] = "proxy_hello"
    protocol: int
    token: str
    url_template: str = ""  # the public URL of a cluster, e.g. "http://{cluster}.localhost:8080/"
    # A proxy that accepts tunnels: its id (stable while it runs), where nodes dial it, and a CSR.
    tunnel_id: str = ""
    tunnel_address: str = ""
    tunnel_csr: str = ""


@dataclass(frozen=True)
class Endpoint:
    replica_id: str
    address: str  # host:port (on the node itself for the tunnel data plane)
    node: str  # node name, for headers and metrics
    node_id: str = ""
    data_plane: str = DIRECT  # tunnel: reached only through node_id's tunnel


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


@dataclass(frozen=True)
class DatabaseHealth(Message):
    """Whether a server reaches its database now, sent to anyone on `/v1/health` (another server
    of the control plane asks before it hands its nodes over: `server/cut_off.py`)."""

    TYPE: ClassVar[str] = "database_health"
    available: bool


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
SERVER_TO_NODE: tuple[type[Message], ...] = (Welcome, Command, Sync, LogsOpen, LogsClose, TunnelCredential,
                                             TunnelProxies)
NODE_FIRST: tuple[type[Message], ...] = (Join, NodeHello)
PROXY_FIRST: tuple[type[Message], ...] = (ProxyHello,)
SERVER_TO_PROXY: tuple[type[Message], ...] = (Ready, RouteSnapshot, RouteUpdate, TunnelCredential, AdmittedNodes)
CLIENT_FIRST: tuple[type[Message], ...] = (ClientHello,)
CLIENT_TO_SERVER: tuple[type[Message], ...] = (Call, Cancel)
SERVER_TO_CLIENT: tuple[type[Message], ...] = (Ready, Result, Event, Failure)
SERVER_TO_DISCOVERY: tuple[type[Message], ...] = (CaBundle, DatabaseHealth)


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
    if isinstance(message, Join | NodeHello) and message.data_plane not in DATA_PLANES:
        raise ProtocolError(f"unknown data plane {message.data_plane!r} (expected tunnel or direct)")
    if isinstance(message, NodeHello):
        if len(message.tunnel_csr) > MAX_CSR_CHARS:
            raise ProtocolError("tunnel_csr is too long")
        if message.data_plane == TUNNEL and not message.tunnel_csr:
            raise ProtocolError("a node on the tunnel data plane must send tunnel_csr")
    if isinstance(message, ProxyHello):
        _check_proxy_tunnel(message)
    if isinstance(message, RouteSnapshot | RouteUpdate):
        for route in message.routes if isinstance(message, RouteSnapshot) else (message.route,):
            for endpoint in route.endpoints:
                if endpoint.data_plane not in DATA_PLANES:
                    raise ProtocolError(f"unknown data plane {endpoint.data_plane!r}")
                if endpoint.data_plane == TUNNEL and not endpoint.node_id:
                    raise ProtocolError(f"tunnel endpoint {endpoint.replica_id!r} names no node")
    if isinstance(message, TunnelCredential) and (len(message.certificate) > MAX_CERT_CHARS
                                                  or len(message.ca) > MAX_CERT_CHARS):
        raise ProtocolError("tunnel certificate is too long")
    if isinstance(message, TunnelProxies):
        for proxy in message.proxies:
            _check_tunnel_peer(proxy.id, proxy.address)


def _check_proxy_tunnel(hello: ProxyHello) -> None:
    given = [bool(hello.tunnel_id), bool(hello.tunnel_address), bool(hello.tunnel_csr)]
    if not any(given):
        return
    if not all(given):
        raise ProtocolError("tunnel_id, tunnel_address and tunnel_csr go together")
    if len(hello.tunnel_csr) > MAX_CSR_CHARS:
        raise ProtocolError("tunnel_csr is too long")
    _check_tunnel_peer(hello.tunnel_id, hello.tunnel_address)


def _check_tunnel_peer(ident: str, address: str) -> None:
    if not TUNNEL_PEER_ID.fullmatch(ident):
        raise ProtocolError(f"invalid tunnel id {ident[:70]!r}")
    if not HOST_PORT.fullmatch(address) or not 0 < int(address.rsplit(":", 1)[1]) < 65536:
        raise ProtocolError(f"invalid tunnel address {address[:270]!r}: expected HOST:PORT")

