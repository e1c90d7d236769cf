"""core.protocol: every message round-trips; decode raises only ProtocolError for anything malformed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from core_strategies import MEDIUM, PER_TYPE, dataclass_strategy, json_values
from hypothesis import example, given
from hypothesis import strategies as st

from vectorlay.core import protocol as p
from vectorlay.core.model import Assignment, ClusterSpec, Gpu, ReplicaState
from vectorlay.errors import ProtocolError

ALL_MESSAGES: list[type[p.Message]] = [
    p.Join, p.Joined, p.NodeHello, p.Welcome, p.Command, p.Sync, p.Ack, p.Heartbeat, p.Goodbye, p.ReplicaStatus,
    p.LogsOpen, p.LogsData, p.LogsEnd, p.LogsClose, p.ProxyHello, p.RouteSnapshot, p.RouteUpdate,
    p.ClientHello, p.Ready, p.Call, p.Result, p.Event, p.Failure, p.Cancel, p.CaBundle, p.DatabaseHealth,
    p.TunnelCredential, p.TunnelProxies, p.AdmittedNodes,
]  # fmt: skip

CHANNELS: dict[str, tuple[type[p.Message], ...]] = {
    "NODE_TO_SERVER": p.NODE_TO_SERVER,
    "SERVER_TO_NODE": p.SERVER_TO_NODE,
    "NODE_FIRST": p.NODE_FIRST,
    "PROXY_FIRST": p.PROXY_FIRST,
    "SERVER_TO_PROXY": p.SERVER_TO_PROXY,
    "CLIENT_FIRST": p.CLIENT_FIRST,
    "CLIENT_TO_SERVER": p.CLIENT_TO_SERVER,
    "SERVER_TO_CLIENT": p.SERVER_TO_CLIENT,
    "SERVER_TO_DISCOVERY": p.SERVER_TO_DISCOVERY,
}
# Every message type (and, for the channel property, the one-type "channel" the node uses to
# receive `Joined`, which no channel tuple lists).
ALL_ALLOWED: list[tuple[type[p.Message], ...]] = [*CHANNELS.values(), (p.Joined,)]


peer_ids = st.from_regex(p.TUNNEL_PEER_ID, fullmatch=True)
addresses = st.builds(lambda host, port: f"{host}:{port}", st.sampled_from(["10.0.0.1", "edge.example.com", "[::1]"]),
                      st.integers(1, 65535))
csrs = st.text(min_size=1, max_size=50)
endpoints = st.one_of(
    dataclass_strategy(p.Endpoint, data_plane=st.just(p.DIRECT)),
    dataclass_strategy(p.Endpoint, data_plane=st.just(p.TUNNEL), node_id=st.text(min_size=1, max_size=12)),
)
routes = dataclass_strategy(p.Route, endpoints=st.lists(endpoints, max_size=3).map(tuple))
data_planes = st.sampled_from(sorted(p.DATA_PLANES))


def message_strategy(cls: type[p.Message]) -> st.SearchStrategy[p.Message]:
    """Valid messages of `cls`: they obey the rules decode checks beyond field types."""
    version = st.just(p.PROTOCOL_VERSION)
    if cls is p.NodeHello:
        return dataclass_strategy(cls, protocol=version, data_plane=data_planes, tunnel_csr=csrs)
    if cls is p.Join:
        return dataclass_strategy(cls, protocol=version, data_plane=data_planes)
    if cls is p.ProxyHello:
        plain = dataclass_strategy(cls, protocol=version, tunnel_id=st.just(""), tunnel_address=st.just(""),
                                   tunnel_csr=st.just(""))
        tunnelled = dataclass_strategy(cls, protocol=version, tunnel_id=peer_ids, tunnel_address=addresses,
                                       tunnel_csr=csrs)
        return st.one_of(plain, tunnelled)
    if cls is p.RouteSnapshot:
        return dataclass_strategy(cls, routes=st.lists(routes, max_size=3).map(tuple))
    if cls is p.RouteUpdate:
        return dataclass_strategy(cls, route=routes)
    if cls is p.TunnelProxies:
        proxy = st.builds(p.TunnelProxy, peer_ids, addresses)
        return dataclass_strategy(cls, proxies=st.lists(proxy, max_size=3).map(tuple))
    if cls is p.Command:
        not_start = dataclass_strategy(cls, op=st.sampled_from(["stop", "restart"]))
        start = dataclass_strategy(cls, op=st.just("start"), assignment=dataclass_strategy(Assignment))
        return st.one_of(not_start, start)
    if "protocol" in cls.__dataclass_fields__:
        return dataclass_strategy(cls, protocol=st.just(p.PROTOCOL_VERSION))
    return dataclass_strategy(cls)


any_message: st.SearchStrategy[p.Message] = st.one_of([message_strategy(cls) for cls in ALL_MESSAGES])


def channel_for(cls: type[p.Message]) -> tuple[type[p.Message], ...]:
    return next(allowed for allowed in ALL_ALLOWED if cls in allowed)


# --- round trips -------------------------------------------------------------------------------


def test_every_message_type_is_covered() -> None:
    # If a message class is added to protocol.py, this list (and so the round trip) must grow.
    defined = {v for v in vars(p).values() if isinstance(v, type) and issubclass(v, p.Message) and v is not p.Message}
    assert defined == set(ALL_MESSAGES)


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_encode_decode_round_trip(cls: type[p.Message], data: st.DataObject) -> None:
    message = data.draw(message_strategy(cls))
    text = p.encode(message)
    assert json.loads(text)["type"] == cls.TYPE
    assert p.decode(text, channel_for(cls)) == message
    assert p.decode(text.encode("utf-8"), (cls,)) == message


def test_encode_is_one_compact_json_object() -> None:
    text = p.encode(p.Ack(seq=7))
    assert text == '{"type":"ack","seq":7}'


def test_decode_fills_defaults() -> None:
    message = p.decode('{"type":"node_hello","protocol":1,"credential":"c"}', p.NODE_FIRST)
    assert message == p.NodeHello(protocol=1, credential="c")


def test_decode_command_with_assignment() -> None:
    spec = ClusterSpec("web", 2, command=("python", "serve.py"), env={"A": "1"})
    command = p.Command(seq=4, op="start", generation=9, replica_id="r1", assignment=Assignment("r1", "web", 9, spec))
    assert p.decode(p.encode(command), p.SERVER_TO_NODE) == command


# --- rejections --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        p.Join(protocol=2, token="t", name="n"),
        p.NodeHello(protocol=0, credential="c"),
        p.ProxyHello(protocol=p.PROTOCOL_VERSION + 1, token="t"),
        p.ClientHello(protocol=-1, token="t"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_other_protocol_versions_are_refused(message: p.Message) -> None:
    with pytest.raises(ProtocolError, match="protocol version"):
        p.decode(p.encode(message), channel_for(type(message)))


@pytest.mark.parametrize(
    ("message", "allowed"),
    [
        (p.Heartbeat(), p.SERVER_TO_NODE),
        (p.Welcome("n1", "box", 1.0), p.NODE_TO_SERVER),
        (p.Call(1, "apply"), p.SERVER_TO_CLIENT),
        (p.Join(p.PROTOCOL_VERSION, "t", "n"), p.PROXY_FIRST),
        (p.RouteSnapshot(1, ()), p.CLIENT_TO_SERVER),
        (p.Ack(1), ()),
    ],
)
def test_a_type_not_allowed_on_the_channel_is_refused(message: p.Message, allowed: tuple[type[p.Message], ...]) -> None:
    with pytest.raises(ProtocolError, match="unexpected message type"):
        p.decode(p.encode(message), allowed)


def test_a_message_over_the_size_limit_is_refused() -> None:
    padding = "x" * p.MAX_MESSAGE_BYTES
    text = p.encode(p.LogsData(stream_id=1, lines=(padding,)))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        p.decode(text, p.NODE_TO_SERVER)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        p.decode(text.encode(), p.NODE_TO_SERVER)


def test_a_message_exactly_at_the_size_limit_is_accepted() -> None:
    overhead = len(p.encode(p.LogsData(stream_id=1, lines=("",))))
    text = p.encode(p.LogsData(stream_id=1, lines=("x" * (p.MAX_MESSAGE_BYTES - overhead),)))
    assert len(text) == p.MAX_MESSAGE_BYTES
    message = p.decode(text, p.NODE_TO_SERVER)
    assert isinstance(message, p.LogsData) and len(message.lines[0]) == p.MAX_MESSAGE_BYTES - overhead


def test_the_size_limit_counts_utf8_bytes_not_characters() -> None:
    # MAX_MESSAGE_BYTES is a byte limit; a str frame of multi-byte characters must not get 3x more.
    line = "€" * (p.MAX_MESSAGE_BYTES // 2)  # 3 bytes each: about 6 MiB on the wire
    text = p.encode(p.LogsData(stream_id=1, lines=(line,))).replace("\\u20ac", "€")
    assert len(text.encode("utf-8")) > p.MAX_MESSAGE_BYTES
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        p.decode(text, p.NODE_TO_SERVER)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        (b"\xff\xfe\xfa", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('"ack"', "JSON object"),
        ('{"seq": 1}', "no 'type'"),
        ('{"type": 5, "seq": 1}', "no 'type'"),
        ('{"type": "ack"}', "seq"),
        ('{"type": "ack", "seq": "1"}', "seq"),
        ('{"type": "ack", "seq": true}', "seq"),
        ('{"type": "ack", "seq": 1, "extra": 2}', "extra"),
        ('{"type": "heartbeat", "sent_at": "now"}', "sent_at"),
        ('{"type": "replica_status", "report": {"replica_id": "r", "generation": 1, "state": "sleepy"}}', "state"),
        ('{"type": "replica_status", "report": {"replica_id": "r", "generation": 1, "state": "failed", '
         '"node_fault": "yes"}}', "report.node_fault: expected true or false"),
        ('{"type": "replica_status", "report": {"replica_id": "r", "generation": 1, "state": "failed", '
         '"node_fault": 1}}', "report.node_fault: expected true or false"),
        ('{"type": "replica_status", "report": {"replica_id": "r", "generation": 1, "state": "failed", '
         '"node_fault": null}}', "report.node_fault: expected true or false"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ],
)
def test_malformed_frames_raise_protocol_error(text: str | bytes, match: str) -> None:
    allowed = p.NODE_TO_SERVER
    with pytest.raises(ProtocolError, match=match):
        p.decode(text, allowed)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"seq": 1, "op": "explode", "generation": 1, "replica_id": "r"}, "op"),
        ({"seq": 1, "op": "start", "generation": 1, "replica_id": "r"}, "assignment"),
        ({"seq": 1, "op": "start", "generation": 1, "replica_id": "r", "assignment": None}, "assignment"),
    ],
)
def test_command_rules(body: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        p.decode(json.dumps({"type": "command", **body}), p.SERVER_TO_NODE)


def test_stop_command_needs_no_assignment() -> None:
    text = json.dumps({"type": "command", "seq": 1, "op": "stop", "generation": 1, "replica_id": "r"})
    assert p.decode(text, p.SERVER_TO_NODE) == p.Command(1, "stop", 1, "r")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_json_constants_are_refused(constant: str) -> None:
    # encode() refuses NaN/Infinity (allow_nan=False), so no well-behaved peer sends them; a GPU
    # that reports NaN GB of memory would otherwise match every `min_memory_gb` request.
    gpu = '{"uuid":"u","name":"RTX 4090","memory_gb":' + constant + "}"
    text = '{"type":"node_hello","protocol":1,"credential":"c","gpus":[' + gpu + "]}"
    with pytest.raises(ProtocolError):
        p.decode(text, p.NODE_FIRST)


@pytest.mark.parametrize("number", ["1" + "0" * 400, "-1" + "0" * 400])
def test_an_integer_too_large_for_a_float_field_is_a_protocol_error(number: str) -> None:
    # Valid JSON, valid int, but float(int) overflows: decode must still raise only ProtocolError.
    with pytest.raises(ProtocolError):
        p.decode('{"type":"heartbeat","sent_at":' + number + "}", p.NODE_TO_SERVER)


# --- the property: nothing but ProtocolError ever comes out of decode ----------------------------


def _decode_only_protocol_errors(frame: str | bytes, allowed: tuple[type[p.Message], ...]) -> None:
    """Assert the contract: a well-formed allowed message, or ProtocolError, and nothing else."""
    try:
        message = p.decode(frame, allowed)
    except ProtocolError:
        return
    assert isinstance(message, allowed)
    # What decode accepts is what a handler sees: it must be re-encodable and stable.
    assert p.decode(p.encode(message), allowed) == message


# Frames that hit known defects (see the explicit tests above); as @example they make each fuzz
# property fail deterministically until the defect is fixed, instead of only when the search finds it.
NAN_FRAME = '{"type":"heartbeat","sent_at":NaN}'
HUGE_INT_FRAME = '{"type":"heartbeat","sent_at":1' + "0" * 400 + "}"
INF_FRAME = '{"type":"heartbeat","sent_at":1e999}'


@MEDIUM
@given(frame=st.one_of(st.binary(max_size=200), st.text(max_size=200)), allowed=st.sampled_from(ALL_ALLOWED))
@example(frame=NAN_FRAME, allowed=p.NODE_TO_SERVER)
@example(frame=HUGE_INT_FRAME, allowed=p.NODE_TO_SERVER)
def test_random_frames_only_raise_protocol_error(frame: str | bytes, allowed: tuple[type[p.Message], ...]) -> None:
    _decode_only_protocol_errors(frame, allowed)


SNIPPETS = ['"', "{", "}", "[", "]", ",", ":", "0", "-", "1e999", "null", "true", "NaN", "\\", "\\u0000",
            "\\ud800", "1" * 30, "\x00", "é"]  # fmt: skip


@st.composite
def text_mutations(draw: st.DrawFn, text: str) -> str:
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        i = draw(st.integers(min_value=0, max_value=len(text)))
        op = draw(st.sampled_from(["flip", "delete", "insert", "snippet"]))
        if op == "flip" and i < len(text):
            text = text[:i] + draw(st.characters()) + text[i + 1 :]
        elif op == "delete":
            j = draw(st.integers(min_value=i, max_value=min(len(text), i + 5)))
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + draw(st.text(max_size=3)) + text[i:]
        else:
            text = text[:i] + draw(st.sampled_from(SNIPPETS)) + text[i:]
    return text


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_paths(item, (*prefix, index)))
    return found


odd_values: st.SearchStrategy[Any] = st.one_of(
    json_values,
    st.sampled_from([10**400, -(10**400), 2**64, 1e308, -1e308, 5e-324, True, False, None, "", [], {}, [[]], "ready"]),
    st.integers(),
)


@st.composite
def structural_mutations(draw: st.DrawFn, data: Any) -> Any:
    """Change the type of a field, drop a field, or add an unknown one, anywhere in the tree."""
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(_paths(data)))
        if not path:
            data = draw(odd_values) if draw(st.integers(0, 9)) == 0 else data
            continue
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[key] = draw(odd_values)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "type", "TYPE", "protocol", "op"]))] = draw(odd_values)
        else:
            parent.insert(key, draw(odd_values))
    return data


@st.composite
def mutated_frames(draw: st.DrawFn) -> tuple[str, tuple[type[p.Message], ...]]:
    allowed = draw(st.sampled_from(ALL_ALLOWED))
    message = draw(st.one_of([message_strategy(cls) for cls in allowed]))
    return draw(text_mutations(p.encode(message))), allowed


@st.composite
def retyped_frames(draw: st.DrawFn) -> tuple[str, tuple[type[p.Message], ...]]:
    allowed = draw(st.sampled_from(ALL_ALLOWED))
    message = draw(st.one_of([message_strategy(cls) for cls in allowed]))
    return json.dumps(draw(structural_mutations(json.loads(p.encode(message))))), allowed


@MEDIUM
@given(mutated_frames())
@example((INF_FRAME, p.NODE_TO_SERVER))
def test_mutated_valid_frames_only_raise_protocol_error(case: tuple[str, tuple[type[p.Message], ...]]) -> None:
    frame, allowed = case
    _decode_only_protocol_errors(frame, allowed)
    _decode_only_protocol_errors(frame.encode("utf-8", "surrogatepass"), allowed)


@MEDIUM
@given(retyped_frames())
@example((HUGE_INT_FRAME, p.NODE_TO_SERVER))
def test_retyped_fields_only_raise_protocol_error(case: tuple[str, tuple[type[p.Message], ...]]) -> None:
    _decode_only_protocol_errors(*case)


@MEDIUM
@given(message=any_message, allowed=st.sampled_from(ALL_ALLOWED))
def test_valid_messages_on_any_channel_decode_or_raise_protocol_error(
    message: p.Message, allowed: tuple[type[p.Message], ...]
) -> None:
    text = p.encode(message)
    if type(message) in allowed:
        assert p.decode(text, allowed) == message
    else:
        with pytest.raises(ProtocolError):
            p.decode(text, allowed)


def _hello(**fields: Any) -> str:
    return json.dumps({"type": "node_hello", "protocol": p.PROTOCOL_VERSION, "credential": "c", **fields})


@pytest.mark.parametrize(("frame", "allowed", "match"), [
    (_hello(data_plane="carrier-pigeon"), p.NODE_FIRST, "unknown data plane"),
    (_hello(data_plane="tunnel"), p.NODE_FIRST, "must send tunnel_csr"),
    (_hello(data_plane="tunnel", tunnel_csr="x" * 5000), p.NODE_FIRST, "tunnel_csr is too long"),
    (json.dumps({"type": "join", "protocol": 1, "token": "t", "name": "n", "data_plane": "both"}), p.NODE_FIRST,
     "unknown data plane"),
    (json.dumps({"type": "proxy_hello", "protocol": 1, "token": "t", "tunnel_id": "p-1"}), p.PROXY_FIRST,
     "go together"),
    (json.dumps({"type": "proxy_hello", "protocol": 1, "token": "t", "tunnel_id": "P 1", "tunnel_address": "h:1",
                 "tunnel_csr": "c"}), p.PROXY_FIRST, "invalid tunnel id"),
    (json.dumps({"type": "proxy_hello", "protocol": 1, "token": "t", "tunnel_id": "p-1", "tunnel_address": "h",
                 "tunnel_csr": "c"}), p.PROXY_FIRST, "expected HOST:PORT"),
    (json.dumps({"type": "proxy_hello", "protocol": 1, "token": "t", "tunnel_id": "p-1",
                 "tunnel_address": "h:70000", "tunnel_csr": "c"}), p.PROXY_FIRST, "expected HOST:PORT"),
    (json.dumps({"type": "tunnel_proxies", "proxies": [{"id": "p-1", "address": "a b:1"}]}), p.SERVER_TO_NODE,
     "expected HOST:PORT"),
    (json.dumps({"type": "route_update", "version": 1, "route": {"cluster": "c", "endpoints": [
        {"replica_id": "r", "address": "a:1", "node": "n", "data_plane": "tunnel"}]}}), p.SERVER_TO_PROXY,
     "names no node"),
    (json.dumps({"type": "tunnel_credential", "certificate": "x" * 20000, "ca": "", "expires_at": 1}),
     p.SERVER_TO_PROXY, "too long"),
])  # fmt: skip
def test_tunnel_rules(frame: str, allowed: tuple[type[p.Message], ...], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        p.decode(frame, allowed)


def test_gpu_report_round_trips_with_unknown_memory() -> None:
    hello = p.NodeHello(p.PROTOCOL_VERSION, "cred", gpus=(Gpu("u0", "RTX 4090", None, 0),),
                        replicas=(p.ReplicaReport("r", 3, ReplicaState.READY, address="1.2.3.4:9000"),))
    assert p.decode(p.encode(hello), p.NODE_FIRST) == hello


def test_a_failure_says_whether_it_is_the_nodes() -> None:
    report = p.ReplicaReport("r", 3, ReplicaState.FAILED, "image x is not on this node", node_fault=True)
    status = p.ReplicaStatus(report)
    assert json.loads(p.encode(status))["report"]["node_fault"] is True
    assert p.decode(p.encode(status), p.NODE_TO_SERVER) == status
    # An agent from before the field existed sends none: its failures are the cluster's.
    old = '{"type":"replica_status","report":{"replica_id":"r","generation":3,"state":"failed"}}'
    decoded = p.decode(old, p.NODE_TO_SERVER)
    assert isinstance(decoded, p.ReplicaStatus) and decoded.report.node_fault is False
