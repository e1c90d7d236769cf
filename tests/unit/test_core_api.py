"""core.api: every call's request, response and events round-trip; anything else is refused with
the path of the offending value; error kinds and API versions mean the same on both sides."""

from __future__ import annotations

import json
from typing import Any

import pytest
from core_strategies import PER_TYPE, dataclass_strategy
from hypothesis import given, settings
from hypothesis import strategies as st

from vectorlay.core import api, api_views
from vectorlay.core.model import ReplicaState, Role
from vectorlay.errors import (
    AuthError,
    ConflictError,
    NotFoundError,
    PeerError,
    ProtocolError,
    StoreError,
    UserError,
)


def test_every_request_type_is_a_call_once() -> None:
    defined = {v for v in vars(api).values()
               if isinstance(v, type) and issubclass(v, api.Request) and v not in (api.Request, api.StreamRequest)}
    assert defined == set(api.BY_REQUEST)
    assert len(api.BY_METHOD) == len(api.CALLS) == len(api.BY_REQUEST)


def test_streaming_calls_are_exactly_those_with_events() -> None:
    for call in api.CALLS:
        assert (call.event is not None) == issubclass(call.request, api.StreamRequest), call.method


@pytest.mark.parametrize("call", api.CALLS, ids=lambda c: c.method)
@PER_TYPE
@given(data=st.data())
def test_a_call_decodes_to_the_request_sent(call: api.CallType, data: st.DataObject) -> None:
    """...and its response and events, through JSON, to the values sent."""
    request = data.draw(dataclass_strategy(call.request))
    assert api.call_type(request) is call
    params = json.loads(json.dumps(api.encode(request)))
    assert api.decode_request(call.method, params) == request
    response = data.draw(dataclass_strategy(call.response))
    assert api.decode_response(request, json.loads(json.dumps(api.encode(response)))) == response
    if call.event is not None:
        event = data.draw(dataclass_strategy(call.event))
        assert api.decode_event(request, json.loads(json.dumps(api.encode(event)))) == event


def test_a_request_encodes_to_its_fields() -> None:
    assert api.encode(api.GetReplicas("web", page_size=500)) == {"cluster": "web", "project": None, "page_size": 500}
    assert api.encode(api.TokenCreate(Role.NODE, uses=1)) == {
        "role": "node", "ttl": None, "uses": 1, "description": "", "project": None}


@pytest.mark.parametrize(("method", "params", "message"), [
    ("get_clusters", {"name": 5}, "invalid 'get_clusters' call: name: expected a string, got an integer"),
    ("get_clusters", {"nmae": "web"}, "invalid 'get_clusters' call: message: unknown field 'nmae'"),
    ("wait_ready", {"clusters": "web"}, "invalid 'wait_ready' call: clusters: expected a list, got a string"),
    ("wait_ready", {}, "invalid 'wait_ready' call: clusters: missing required field"),
    ("token_create", {"role": "root"}, "invalid 'token_create' call: role: expected one of"),
    ("logs", {"cluster": "web", "follow": 1}, "invalid 'logs' call: follow: expected true or false, got an integer"),
    ("drop_tables", {}, "unknown method 'drop_tables'"),
])
def test_a_call_with_an_unknown_field_or_a_wrong_type_is_refused_with_the_path(
        method: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as refused:
        api.decode_request(method, params)
    assert str(refused.value).startswith(message)


def test_a_response_that_is_not_the_calls_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="bad 'delete' result from the server: message: unknown field 'gone'"):
        api.decode_response(api.Delete("web"), {"deleted": "web", "gone": True})
    with pytest.raises(ProtocolError, match=r"bad 'get_clusters' result from the server: clusters\[0\]: expected"):
        api.decode_response(api.GetClusters(), {"clusters": [1]})
    with pytest.raises(ProtocolError, match="bad 'logs' event from the server: lines: expected a list"):
        api.decode_event(api.Logs("web"), {"replica": "r1", "node": None, "lines": "x"})
    with pytest.raises(ProtocolError, match="'delete', which streams none"):
        api.decode_event(api.Delete("web"), {})


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "kind"), [
    (NotFoundError("x"), "not_found"),
    (ConflictError("x"), "conflict"),
    (UserError("x"), "user"),
    (AuthError("x"), "auth"),
    (StoreError("x"), "internal"),
])
def test_each_error_travels_as_its_kind_and_comes_back_as_its_class(error: Exception, kind: str) -> None:
    assert api.error_kind(error) == kind  # type: ignore[arg-type]
    back = api.error_for(kind, "the message")
    assert str(back) == "the message"
    assert type(back) is (type(error) if kind != "internal" else PeerError)


def test_a_kind_the_client_does_not_know_is_a_peer_error() -> None:
    assert type(api.error_for("quota", "over quota")) is PeerError


# --- versions ----------------------------------------------------------------------------------


def test_this_version_is_served() -> None:
    assert api.client_version_problem(api.API_VERSION) is None


def test_a_newer_client_is_told_to_upgrade_the_server_and_an_older_one_itself() -> None:
    assert api.client_version_problem(api.API_VERSION + 1) == (
        f"this server speaks API version {api.API_VERSION}; this vectorlay needs {api.API_VERSION + 1}: "
        "upgrade the server")
    assert api.client_version_problem(api.OLDEST_CLIENT_API_VERSION - 1) == (
        f"this vectorlay speaks API version {api.OLDEST_CLIENT_API_VERSION - 1}; this server needs "
        f"{api.OLDEST_CLIENT_API_VERSION}: upgrade vectorlay")


def test_the_client_reads_a_version_refusal_from_any_server() -> None:
    # A server from before API versions refuses the hello's `api` field (core/codec's wording).
    old = "bad 'client_hello' message: message: unknown field 'api'"
    assert api.version_refusal(old) == "this server speaks API version 1; this vectorlay needs 2: upgrade the server"
    newer = api.client_version_problem(api.OLDEST_CLIENT_API_VERSION - 1)
    assert newer is not None and api.version_refusal(newer) == newer
    assert api.version_refusal("message rate limit exceeded") is None


# --- views: what `-o json` prints --------------------------------------------------------------

# The JSON keys users and scripts read, in order. Add fields at the end; never rename or drop one.
VIEW_KEYS: dict[type[Any], list[str]] = {
    api_views.ClusterView: ["name", "project", "key", "replicas", "ready", "up_to_date", "endpoint", "states",
                            "stopping", "reasons", "runtime", "gpu", "created_at", "health", "serving"],
    api_views.HealthView: ["status", "message", "failures", "next_try_in_s"],
    api_views.NodeView: ["id", "name", "state", "connected", "address", "gpus", "gpus_healthy", "runtimes",
                         "isolation", "replicas", "last_seen_s", "joined_at", "schedulable", "data_plane",
                         "tunnels"],
    api_views.GpuView: ["uuid", "name", "memory_gb", "index", "in_use", "healthy", "health_reason",
                        "utilization_pct", "temperature_c", "memory_used_gb"],
    api_views.ReplicaView: ["id", "cluster", "project", "node", "node_id", "state", "reason", "address", "gpus",
                            "generation", "revision", "image_digest", "stopping", "created_at"],
    api_views.ClusterDescription: ["cluster", "spec", "replicas", "events"],
    api_views.EventView: ["at", "replica", "message"],
    api_views.KeyView: ["id", "cluster", "name", "created_at", "revoked_at", "state"],
    api.CreatedKey: ["id", "cluster", "name", "created_at", "revoked_at", "state", "key", "enforced"],
    api_views.TokenView: ["id", "role", "project", "created_at", "expires_at", "uses_left", "revoked",
                          "description"],
    api_views.AuditView: ["at", "actor", "action", "target", "project", "detail"],
    api_views.SecretView: ["project", "name", "updated_at"],
    api.Applied: ["dry_run", "changes"],
    api.ClusterChange: ["cluster", "action", "detail", "fields"],
    api.Blocked: ["cluster", "reason"],
}


@pytest.mark.parametrize("cls", VIEW_KEYS, ids=lambda c: c.__name__)
@settings(PER_TYPE, max_examples=3)  # the keys do not depend on the values
@given(data=st.data())
def test_the_json_of_a_view_keeps_its_keys(cls: type[Any], data: st.DataObject) -> None:
    assert list(api.encode(data.draw(dataclass_strategy(cls)))) == VIEW_KEYS[cls]


def test_a_replica_view_prints_plain_json() -> None:
    view = api_views.ReplicaView("web-1", "web", "default", "n1", "n-1", ReplicaState.READY, "", "10.0.0.1:9000",
                                 ("GPU-a",), 3, "abc", None, False, 1.5)
    assert json.dumps(api.encode(view)) == (
        '{"id": "web-1", "cluster": "web", "project": "default", "node": "n1", "node_id": "n-1", "state": "ready", '
        '"reason": "", "address": "10.0.0.1:9000", "gpus": ["GPU-a"], "generation": 3, "revision": "abc", '
        '"image_digest": null, "stopping": false, "created_at": 1.5}')
