"""describe node / replica, get -w and rollout history / undo with real processes: a server (two
on PostgreSQL for rollout), a node running real replicas, the CLI as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testsupport.processes import REPO_ROOT, Stack, tinylm_manifest, wait_for

pytestmark = pytest.mark.slow


def versioned(version: str, replicas: int = 1) -> str:
    """The tinylm cluster `echo` on any node, with VERSION in its env (a change that rolls it)."""
    return tinylm_manifest("echo", replicas=replicas, gpu="{count: 0}") + f"  env: {{VERSION: '{version}'}}\n"


def test_describe_node_and_replica(stack: Stack) -> None:
    stack.start_server()
    stack.join_node("n1", gpus=["RTX 4090:24"])
    stack.cli("apply", "-", "--timeout", "60s", input_text=tinylm_manifest("echo", replicas=1))
    replica_id = stack.cli_json("get", "replicas")[0]["id"]

    node = stack.cli_json("describe", "node", "n1")
    assert node["node"]["name"] == "n1" and node["node"]["state"] == "ready"
    assert [(g["name"], g["in_use"]) for g in node["node"]["gpus"]] == [("RTX 4090", True)]
    assert [r["id"] for r in node["replicas"]] == [replica_id]
    assert any(e["replica"] == replica_id and e["message"] == "placed on n1" for e in node["events"])
    assert [c["action"] for c in node["changes"]] == ["node.join"]
    text = stack.cli("describe", "node", "n1").stdout
    assert "State:         ready" in text and f"{replica_id}  cluster=echo  state=ready" in text

    replica = stack.cli_json("describe", "replica", replica_id)
    assert (replica["replica"]["node"], replica["replica"]["state"], replica["port"]) == ("n1", "ready", 8000)
    assert replica["restarts"] == 0 and replica["events"][0]["message"] == "placed on n1"
    assert "Node:          n1" in stack.cli("describe", "replica", replica_id).stdout

    # A deployer token sees its own project's replicas only; nodes are the admin's.
    acme = stack.token("deployer", "--project", "acme")
    other = stack.cli("describe", "replica", replica_id, "--token", acme, check=False)
    assert other.returncode != 0 and other.stderr.strip() == f"error: replica '{replica_id}' not found"
    assert stack.cli("describe", "node", "n1", "--token", acme, check=False).returncode != 0
    mine = stack.token("deployer", "--project", "default")
    assert stack.cli_json("describe", "replica", replica_id, "--token", mine)["replica"]["id"] == replica_id
    assert replica_id in stack.cli("get", "replicas", "--token", mine).stdout  # without the admin's fleet counts

    for args, line in ((("node", "nope"), "node 'nope' not found"),
                       (("replica", "echo-nope"), "replica 'echo-nope' not found")):
        missing = stack.cli("describe", *args, check=False)
        assert missing.returncode != 0 and missing.stdout == ""
        assert missing.stderr.strip().splitlines() == [f"error: {line}"]


def test_get_replicas_watch_prints_changes_until_ctrl_c(stack: Stack) -> None:
    stack.start_server()
    stack.join_node("n1")
    out_path = stack.root / "watch.out"
    err_path = stack.root / "watch.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        watch = subprocess.Popen([sys.executable, "-m", "vectorlay", "get", "replicas", "-w"], stdout=out,
                                 stderr=err, env=stack.env(), cwd=REPO_ROOT)
    try:
        wait_for(lambda: "watching" in err_path.read_text(), 20, message="the watch to start")
        stack.cli("apply", "-", "--no-wait", input_text=versioned("1", replicas=2))
        rows = wait_for(lambda: [line for line in out_path.read_text().splitlines()
                                 if line.startswith("echo-") and " ready " in line] or None, 60,
                        message="the watch to show the replicas ready")
        assert len({row.split()[0] for row in rows}) >= 1
        stack.cli("delete", "echo", "--timeout", "30s")
        wait_for(lambda: "deleted" in out_path.read_text(), 30, message="the watch to show the replicas gone")
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
    assert "Traceback" not in err_path.read_text()

    json_watch = subprocess.Popen([sys.executable, "-m", "vectorlay", "get", "nodes", "-w", "-o", "json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=stack.env(), cwd=REPO_ROOT)
    assert json_watch.stdout is not None
    first = json.loads(json_watch.stdout.readline())  # one document per line
    assert [n["name"] for n in first] == ["n1"]
    stack.cli("node", "cordon", "n1")
    second = json.loads(json_watch.stdout.readline())
    assert second[0]["schedulable"] is False
    json_watch.send_signal(signal.SIGINT)
    assert json_watch.wait(10) == 0


def test_rollout_history_and_undo_on_two_servers(tmp_path: Path, postgres_url: str) -> None:
    stack = Stack(tmp_path, db_url=postgres_url)
    try:
        stack.start_server()
        stack.start_another_server()
        stack.join_node("n1")
        first, second = stack.server_url, stack.server_urls.split(",")[1]
        for version in ("1", "2"):
            stack.cli("apply", "-", "--timeout", "60s", "--server", first, input_text=versioned(version))
        stack.cli("apply", "-", "--timeout", "60s", "--server", first, input_text=versioned("2"))  # unchanged

        # The other server answers from the database: the same history.
        history = stack.cli_json("rollout", "history", "echo", "--server", second)
        assert [(r["revision"], r["spec"]["env"]["VERSION"], r["current"]) for r in history] == [
            (1, "1", False), (2, "2", True)]
        assert history == stack.cli_json("rollout", "history", "echo", "--server", first)
        table = stack.cli("rollout", "history", "echo").stdout.splitlines()
        assert table[0].split()[:2] == ["REVISION", "APPLIED"] and table[2].startswith("2 (current)")

        undone = stack.cli("rollout", "undo", "echo", "--timeout", "60s", "--server", second)
        assert "cluster/echo rolled back to revision 1 (rolling replacement)" in undone.stdout
        assert "cluster/echo ready" in undone.stdout
        replicas = stack.cli_json("get", "replicas")
        assert [r["state"] for r in replicas if not r["stopping"]] == ["ready"]
        described = stack.cli_json("describe", "cluster", "echo")
        assert described["spec"]["env"]["VERSION"] == "1"
        history = stack.cli_json("rollout", "history", "echo", "--server", first)
        assert [(r["revision"], r["spec"]["env"]["VERSION"]) for r in history] == [(1, "1"), (2, "2"), (3, "1")]
        assert history[-1]["change"].startswith("rollback to revision 1")
        audit = stack.cli_json("audit")
        assert [a["action"] for a in audit if a["target"] == "echo"][-1] == "cluster.rollback"

        bad = stack.cli("rollout", "undo", "echo", "--to-revision", "9", check=False)
        assert bad.returncode != 0
        assert bad.stderr.strip() == "error: cluster 'echo' has no revision 9 (revisions 1-3 are kept)"
        assert len(stack.cli_json("rollout", "history", "echo")) == 3
    finally:
        stack.close()
