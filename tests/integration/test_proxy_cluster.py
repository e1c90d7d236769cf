"""The edge proxy in a whole stack: server, nodes running tinylm replicas, keys and limits from manifests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time

import pytest

from testsupport.load import SteadyClient
from testsupport.processes import Stack, http_request, replica_pids, tinylm_manifest, wait_for

pytestmark = pytest.mark.slow

GUARDED = tinylm_manifest("guarded", replicas=1) + """\
  endpoint:
    auth: api-key
    rate_limit:
      requests_per_second: 1000
      per_client: {requests_per_second: 0.01, burst: 3}
"""
COMPLETION = b'{"prompt": "The ", "max_tokens": 4}'


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_and_per_client_rate_limits_from_the_manifest(stack: Stack) -> None:
    stack.start_server()
    stack.join_node("n1", gpus=["RTX 4090:24"])
    _, port = stack.start_proxy()
    stack.cli("apply", "-", "--timeout", "60s", input_text=GUARDED)
    host = "guarded.localhost"

    missing = http_request(port, host, "/v1/completions", "POST", COMPLETION)
    assert missing.status == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert http_request(port, host, "/", headers=bearer("vk-nope.not-a-real-key")).status == 401
    first = stack.cli("key", "create", "guarded", "--name", "alice").stdout.strip()
    second = stack.cli("key", "create", "guarded", "--name", "bob").stdout.strip()
    # The key reaches the proxy as a pushed hash; from then on it is accepted.
    ok = wait_for(lambda: r if (r := http_request(port, host, "/v1/completions", "POST", COMPLETION,
                                                  headers=bearer(first))).status == 200 else None, 15,
                  message="the new key to be accepted")
    assert ok.json()["choices"][0]["text"]
    # Per client (per key) a burst of 3, then 429 with a Retry-After; another key has its own bucket.
    statuses = [http_request(port, host, "/", headers=bearer(first)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    limited = http_request(port, host, "/", headers=bearer(first))
    assert limited.status == 429 and int(limited.headers["retry-after"]) >= 1
    assert http_request(port, host, "/", headers=bearer(second)).status == 200

    # A token stream through the proxy: server-sent events, every token and the end marker.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("POST", "/v1/completions", body=b'{"prompt": "The ", "max_tokens": 5, "stream": true}',
                 headers={"Host": host, **bearer(second)})
    streamed = conn.getresponse()
    assert streamed.status == 200 and streamed.getheader("content-type") == "text/event-stream"
    events = [line for line in streamed.read().split(b"\n") if line.startswith(b"data: ")]
    conn.close()
    assert len(events) == 6 and events[-1] == b"data: [DONE]"
    assert all(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])

    # Revoked: the proxy refuses the key as soon as the change is pushed.
    key_id = first.split(".")[0]
    stack.cli("key", "revoke", "guarded", key_id)
    wait_for(lambda: http_request(port, host, "/", headers=bearer(first)).status == 401, 15,
             message="the revoked key to be refused")
    # The node's health probes go to the replica directly: it stays ready behind the key.
    assert {r["state"] for r in stack.cli_json("get", "replicas")} == {"ready"}


def test_a_replica_killed_under_load_costs_no_client_error(stack: Stack) -> None:
    stack.start_server()
    for name in ("n1", "n2", "n3"):
        stack.join_node(name, gpus=["RTX 4090:24"])
    _, port = stack.start_proxy()
    stack.cli("apply", "-", "--timeout", "60s",
              input_text=tinylm_manifest("echo", replicas=3, extra_args=["--delay-ms", "40"]))
    victim = stack.cli_json("get", "replicas")[0]["id"]
    clients = [SteadyClient(port, "echo.localhost", rate_hz=25.0).start() for _ in range(4)]
    try:
        wait_for(lambda: all(len(c.samples) >= 10 for c in clients), 20, message="load to flow")
        killed_at = time.monotonic()
        pids = replica_pids(replica=victim)
        assert pids
        for pid in pids:
            os.killpg(pid, signal.SIGKILL)
        # Load goes on while the node notices, the route changes and the replica is restarted.
        wait_for(lambda: all(len([s for s in c.samples if s.sent_at > killed_at]) >= 30 for c in clients), 30,
                 message="load to go on after the kill")
    finally:
        samples = [s for c in clients for s in c.stop()]
    assert len(samples) > 150
    # Requests in flight on the killed replica (reset) and those sent to it before the route
    # changed (refused) were retried on the others before any response byte reached the client.
    assert [s for s in samples if s.status != 200] == []
