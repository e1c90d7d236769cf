"""One bad cluster must never hurt the fleet: real processes, a manifest that cannot run."""

from __future__ import annotations

import time

import pytest

from testsupport.processes import Stack, tinylm_manifest, wait_for

pytestmark = pytest.mark.slow

CANNOT_START = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {name: nobin}
spec:
  replicas: 2
  runtime: process
  command: ["/nonexistent/vectorlay-test-binary", "--port", "${PORT}"]
  health: null
"""


def test_a_cluster_that_cannot_start_backs_off_and_apply_says_why_early(stack: Stack) -> None:
    """The process never starts (the runtime's launch fails at once): without backoff the server
    churned a replica every 30 ms and then crashed. With it: a handful of tries, `apply` ends
    early with the reason, and every other cluster is served as usual."""
    stack.start_server()
    node = stack.join_node("n1", gpus=["RTX 4090:24"])
    began = time.monotonic()
    result = stack.cli("apply", "-", "--timeout", "5m", input_text=CANNOT_START, check=False)
    assert result.returncode == 1
    assert time.monotonic() - began < 60  # not the five-minute timeout
    assert "cluster/nobin crash-looping: cannot start '/nonexistent/vectorlay-test-binary'" in result.stderr, \
        result.stderr
    assert "next try in" in result.stderr or "replacing it now" in result.stderr

    time.sleep(15)
    starts = node.log().count("failed to start")
    assert starts <= 6, starts  # 2 at once, 2 after 10 s (the next ones wait 20 s and more)
    [view] = stack.cli_json("get", "clusters", "nobin")
    assert view["health"]["status"] == "crash-looping"
    table = stack.cli("get", "clusters").stdout
    assert "crash-looping: cannot start" in table

    # The control plane and the node still serve everyone else.
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1, gpu="{count: 0}"))
    [echo] = stack.cli_json("get", "clusters", "echo")
    assert echo["ready"] == 1
    assert stack.server is not None and stack.server.alive and node.alive

    # Fixing the manifest starts its history over: it runs at once, no backoff left.
    fixed = CANNOT_START.replace("/nonexistent/vectorlay-test-binary", "python3") \
        .replace('"--port", "${PORT}"', '"examples/tinylm/serve.py", "--port", "${PORT}"')
    stack.cli("apply", "-", "--timeout", "60s", input_text=fixed)
    [view] = stack.cli_json("get", "clusters", "nobin")
    assert view["ready"] == 2 and view["health"] == {"status": "ok", "message": "", "failures": 0,
                                                     "next_try_in_s": None}


POISON = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {name: poison}
spec:
  replicas: 1
  runtime: process
  command: ["python3", "examples/tinylm/serve.py", "--port", "${PORT}"]
  env: {POISON_PILL_FOR_TESTS: "1"}
  reschedule_after: 1s
"""


def test_a_cluster_that_kills_the_agents_it_reaches_is_quarantined(stack: Stack) -> None:
    """Agents that die right after receiving one cluster's replicas (a fault point stands for the
    NUL byte that did it before inputs were checked): two dead nodes, and the cluster is placed
    nowhere; the third node and every other cluster carry on."""
    stack.start_server()
    faulty = {"VECTORLAY_NODE_FAULTS": "poison"}
    nodes = [stack.join_node(name, env=faulty) for name in ("n1", "n2", "n3")]
    stack.cli("apply", "-", "--no-wait", input_text=POISON)

    def quarantined() -> dict[str, object] | None:
        [view] = stack.cli_json("get", "clusters", "poison")
        return view if view["health"]["status"] == "quarantined" else None

    view = wait_for(quarantined, 60, interval_s=0.5, message="the poison cluster to be quarantined")
    assert "quarantined: the agents of 2 node(s)" in str(view["health"])
    # The server hears the link drop a moment before the dying agent's process is gone.
    wait_for(lambda: sum(1 for n in nodes if not n.alive) == 2, 15, message="two agents to exit")
    survivor = next(n for n in nodes if n.alive)
    time.sleep(12)  # past the dead nodes' down time and the cluster's reschedule_after
    assert survivor.alive  # it was never given the poison
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1, gpu="{count: 0}"))
    [echo] = stack.cli_json("get", "clusters", "echo")
    assert echo["ready"] == 1
    assert "poison" in stack.cli("get", "clusters").stdout and "quarantined" in stack.cli("get", "clusters").stdout
    audit = stack.server.log() if stack.server else ""
    assert "cluster default is quarantined" not in audit  # the name is the cluster's, not a project's
    assert "cluster poison is quarantined" in audit
