"""The day-one path with real processes on loopback: server, two nodes, a proxy, a cluster."""

from __future__ import annotations

import http.client
import json
import re
import time
from pathlib import Path

import pytest

from testsupport.processes import Stack, http_request, replica_pids, tinylm_manifest, wait_for
from vectorlay.node.state_dir import NodeStateDir

pytestmark = pytest.mark.slow


def test_request_served_end_to_end(any_db_stack: Stack) -> None:
    stack = any_db_stack
    stack.start_server()
    stack.join_node("n1", gpus=["RTX 4090:24"])
    stack.join_node("n2", gpus=["NVIDIA GeForce RTX 4090:24"])
    _, proxy_port = stack.start_proxy()

    applied = stack.cli("apply", "-", "--timeout", "60s", input_text=tinylm_manifest("echo", replicas=2))
    assert "cluster/echo created" in applied.stdout
    assert "ready at http://echo.localhost:" in applied.stdout

    replicas = stack.cli_json("get", "replicas")
    assert {r["state"] for r in replicas} == {"ready"}
    assert sorted(r["node"] for r in replicas) == ["n1", "n2"]  # spread over both nodes
    assert len({r["address"] for r in replicas}) == 2

    # Responses come from both replicas, over one kept-alive client connection.
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
    seen_nodes = set()
    seen_replicas = set()
    for _ in range(40):
        result = http_request(proxy_port, "echo.localhost", "/v1/completions", "POST",
                              b'{"prompt": "The ", "max_tokens": 8}', connection=conn)
        assert result.status == 200, result.body
        assert result.json()["choices"][0]["text"]
        seen_nodes.add(result.headers["x-vectorlay-node"])
        seen_replicas.add(result.headers["x-vectorlay-replica"])
        assert result.headers["x-request-id"]
    conn.close()
    assert seen_nodes == {"n1", "n2"}
    assert seen_replicas == {r["id"] for r in replicas}

    clusters = stack.cli_json("get", "clusters")
    assert [(c["name"], c["replicas"], c["ready"]) for c in clusters] == [("echo", 2, 2)]
    assert clusters[0]["endpoint"] == f"http://echo.localhost:{proxy_port}/"
    nodes = stack.cli_json("get", "nodes")
    assert sorted((n["name"], n["state"], len(n["gpus"])) for n in nodes) == [("n1", "ready", 1), ("n2", "ready", 1)]
    # Served through the tunnels the nodes opened to the proxy (the default data plane).
    assert {(n["data_plane"], n["tunnels"]) for n in nodes} == {("tunnel", 1)}

    # Logs carry both replicas' output, prefixed with their ids.
    logs = stack.cli("logs", "echo", "--tail", "50").stdout
    for replica in replicas:
        assert f"[{replica['id']}] tinylm listening on" in logs
        assert f"[{replica['id']}] tinylm replica={replica['id']} POST /v1/completions 200" in logs

    # Delete stops the processes and takes the endpoint away.
    pids = [pid for r in replicas for pid in replica_pids(replica=r["id"])]
    assert len(pids) == 2
    deleted = stack.cli("delete", "echo", "--timeout", "30s")
    assert "cluster/echo deleted" in deleted.stdout
    wait_for(lambda: not any(replica_pids(replica=r["id"]) for r in replicas), 15, message="replicas to stop")
    assert stack.cli_json("get", "replicas") == []
    gone = wait_for(lambda: r if (r := http_request(proxy_port, "echo.localhost")).status == 404 else None, 10)
    assert gone.json()["error"] == "unknown cluster"


def test_apply_is_idempotent_dry_run_changes_nothing_and_unplaceable_is_pending(stack: Stack) -> None:
    stack.start_server()
    stack.join_node("n1", gpus=["RTX 4090:24"])

    dry = stack.cli("apply", "-", "--dry-run", input_text=tinylm_manifest("echo", replicas=1))
    assert "cluster/echo would be created" in dry.stdout
    assert stack.cli_json("get", "clusters") == []

    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1))
    before = stack.cli_json("get", "replicas")
    again = stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1))
    assert "cluster/echo unchanged" in again.stdout
    assert stack.cli_json("get", "replicas") == before

    # A valid manifest asking for a GPU no node has is accepted; its replica waits with the reason.
    stack.cli("apply", "-", "--no-wait", input_text=tinylm_manifest("big", replicas=1, gpu='{type: "H100"}'))
    pending = [r for r in stack.cli_json("get", "replicas") if r["cluster"] == "big"]
    assert [(r["state"], r["node"]) for r in pending] == [("pending", None)]
    assert "no ready node has 1 GPU(s) of 'H100'" in pending[0]["reason"]
    table = stack.cli("get", "replicas").stdout
    assert "no ready node has 1 GPU(s) of 'H100'" in table

    # Waiting on a cluster no node can run ends at once with the reason (not the timeout), non-zero
    # exit; the change is kept.
    waited = stack.cli("apply", "-", "--timeout", "5m", check=False,
                       input_text=tinylm_manifest("big", replicas=1, gpu='{type: "H100"}'))
    assert waited.returncode == 1
    assert "cluster/big cannot be placed: no ready node has 1 GPU(s) of 'H100'" in waited.stderr
    assert [c["name"] for c in stack.cli_json("get", "clusters")] == ["big", "echo"]


def test_scaling_and_template_change_roll_replicas(stack: Stack) -> None:
    stack.start_server()
    for name in ("n1", "n2", "n3"):
        stack.join_node(name, gpus=["RTX 4090:24", "RTX 4090:24"])
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=2))
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=3))
    replicas = stack.cli_json("get", "replicas")
    assert len(replicas) == 3 and len({r["node"] for r in replicas}) == 3

    changed = stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=3, extra_args=["--delay-ms", "1"]))
    assert "rolling replacement" in changed.stdout
    after = stack.cli_json("get", "replicas")
    assert len(after) == 3
    assert not {r["id"] for r in after} & {r["id"] for r in replicas}
    assert {r["state"] for r in after} == {"ready"}

    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1, extra_args=["--delay-ms", "1"]))
    wait_for(lambda: len(stack.cli_json("get", "replicas")) == 1, 15, message="scale down to 1")


def test_dev_serves_the_example(tmp_path: Path) -> None:
    """The README's main job: `vectorlay dev --apply examples/tinylm.yaml` serves tinylm."""
    stack = Stack(tmp_path)
    try:
        proc = stack._spawn("dev", ["dev", "--state-dir", str(tmp_path / "dev"), "--server-port", "0",
                                    "--proxy-port", "0", "--apply", "examples/tinylm.yaml"])
        stack.procs.append(proc)
        match = proc.wait_log(r"curl -s http://tinylm\.localhost:(\d+)/v1/completions", timeout_s=60)
        port = int(match.group(1))
        nodes = set()
        for _ in range(20):
            result = http_request(port, "tinylm.localhost", "/v1/completions", "POST",
                                  b'{"prompt": "The function returns", "max_tokens": 16}')
            assert result.status == 200
            nodes.add(result.json()["node"])
        assert nodes == {"dev-1", "dev-2"}
        # Its log says which node each node's line comes from, and what the nodes offer in one line
        # (no `missing: kata / IOMMU / NVIDIA` on a CPU machine).
        log = proc.log()
        for name in ("dev-1", "dev-2"):
            assert re.search(rf"vectorlay\.node: \[{name}\] replica \S+ started on port \d+", log), log
        assert log.count("this node offers") == 1 and "missing:" not in log
        # The CLI now talks to the dev stack through the context dev wrote.
        listed = stack.cli("get", "clusters", "-o", "json")
        assert '"name": "tinylm"' in listed.stdout
        # dev walks the path every user takes: the proxy reaches the replicas through tunnels.
        wait_for(lambda: {(n["data_plane"], n["tunnels"]) for n in stack.cli_json("get", "nodes")} == {("tunnel", 1)},
                 10, message="dev's nodes to report their tunnels")
        node_ids = [NodeStateDir(tmp_path / "dev" / name).load_credentials().node_id
                    for name in ("dev-1", "dev-2")]
        assert sum(len(replica_pids(node_id=n)) for n in node_ids) == 2
        proc.stop()
        # dev takes its replicas with it.
        wait_for(lambda: not any(replica_pids(node_id=n) for n in node_ids), 15, message="dev replicas to stop")
    finally:
        stack.close()


def test_node_restart_reattaches_without_restarting_replicas(stack: Stack) -> None:
    stack.start_server()
    node = stack.join_node("n1", gpus=["RTX 4090:24"])
    _, proxy_port = stack.start_proxy()
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1))
    replica = stack.cli_json("get", "replicas")[0]
    pids = replica_pids(replica=replica["id"])
    assert len(pids) == 1
    node = stack.restart_node(node)
    wait_for(lambda: node.log().count("re-attached to 1 running replica") == 1, 10, message="re-attach")
    assert replica_pids(replica=replica["id"]) == pids
    time.sleep(1.0)
    assert stack.cli_json("get", "replicas")[0]["state"] == "ready"
    assert http_request(proxy_port, "echo.localhost", "/healthz").status == 200


def test_dev_survives_node_rm_and_starts_again_after_it(tmp_path: Path) -> None:
    """`node rm` of a dev node used to end the whole stack, and the next `vectorlay dev` could not
    start (its saved credential was gone) while the old replicas ran on with parent 1."""
    stack = Stack(tmp_path)
    args = ["dev", "--state-dir", str(tmp_path / "dev"), "--server-port", "0", "--proxy-port", "0",
            "--apply", "examples/tinylm.yaml"]
    try:
        proc = stack._spawn("dev", args)
        stack.procs.append(proc)
        port = int(proc.wait_log(r"curl -s http://tinylm\.localhost:(\d+)/v1/completions", timeout_s=60).group(1))
        removed = json.loads((tmp_path / "dev" / "dev-1" / "node.json").read_text())["node_id"]
        stack.cli("node", "rm", "dev-1")
        proc.wait_log(r"dev-1 left the stack", timeout_s=20)
        wait_for(lambda: not replica_pids(node_id=removed), 15, message="the removed node's replicas to stop")
        wait_for(lambda: http_request(port, "tinylm.localhost", "/healthz").status == 200, 30,
                 message="the stack to serve from dev-2")
        assert proc.alive
        proc.stop()
        assert not replica_pids(node_id=removed)

        again = stack._spawn("dev-again", args)
        stack.procs.append(again)
        port = int(again.wait_log(r"curl -s http://tinylm\.localhost:(\d+)/v1/completions", timeout_s=60).group(1))
        assert "dev-1 is no longer in the fleet: joining it again" in again.log()

        def serving_nodes() -> set[str]:
            return {http_request(port, "tinylm.localhost", "/v1/completions", "POST",
                                 b'{"prompt": "x", "max_tokens": 4}').json()["node"] for _ in range(20)}

        # Both replicas ran on dev-2 since dev-1 was removed: with dev-1 back, one moves there.
        wait_for(lambda: serving_nodes() == {"dev-1", "dev-2"}, 40, interval_s=1.0, message="the spread again")
        node_ids = [json.loads((tmp_path / "dev" / name / "node.json").read_text())["node_id"]
                    for name in ("dev-1", "dev-2")]
        again.stop()
        wait_for(lambda: not any(replica_pids(node_id=n) for n in node_ids), 15, message="dev replicas to stop")
    finally:
        stack.close()
TICKER = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {name: ticker}
spec:
  replicas: 2
  runtime: process
  command: ["sh", "-c", "while true; do echo \\"t=$(date +%s.%N)\\"; sleep 0.4; done"]
  health: null
"""


def test_logs_of_several_replicas_are_merged_in_time_order_and_since_limits_them(stack: Stack) -> None:
    stack.start_server()
    stack.join_node("n1")
    stack.join_node("n2")
    stack.cli("apply", "-", input_text=TICKER)
    time.sleep(8)  # each replica writes about 20 lines

    def stamped(*args: str) -> list[tuple[str, float]]:
        out = stack.cli("logs", "ticker", *args).stdout
        return [(line.split()[0], float(line.rsplit("t=", 1)[1])) for line in out.splitlines() if "t=" in line]

    lines = stamped("--tail", "15")
    assert len(lines) == 30 and len({replica for replica, _ in lines}) == 2
    # In the order they were written, to the second or so the node dates them by; replica after
    # replica, a line would come about 6 s after a later one.
    worst = max(earlier - later for (_, earlier), (_, later) in zip(lines, lines[1:], strict=False))
    assert worst <= 2.5, lines
    recent = stamped("--since", "2s")
    cutoff = time.time() - 2
    assert recent and len(recent) < 30
    assert all(written >= cutoff - 2.5 for _, written in recent), (cutoff, recent)
