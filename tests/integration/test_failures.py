"""Nodes will fail: real faults (kill -9, SIGSTOP, server crashes, skewed clocks) on loopback."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from tests_support import missing_service

from testsupport.load import RouteWatcher, SteadyClient
from testsupport.processes import Stack, faketime_available, replica_pids, tinylm_manifest, wait_for
from testsupport.relay import Relay

pytestmark = pytest.mark.slow


def replicas_by_node(stack: Stack) -> dict[str, list[dict[str, object]]]:
    found: dict[str, list[dict[str, object]]] = {}
    for replica in stack.cli_json("get", "replicas"):
        found.setdefault(str(replica["node"]), []).append(replica)
    return found


def live_replica_processes(stack: Stack) -> dict[str, list[int]]:
    return {r["id"]: replica_pids(replica=r["id"]) for r in stack.cli_json("get", "replicas")}


def test_killed_node_leaves_routing_fast_is_replaced_and_its_stale_copy_stopped(stack: Stack) -> None:
    stack.start_server()
    nodes = {name: stack.join_node(name, gpus=["RTX 4090:24"]) for name in ("n1", "n2", "n3")}
    _, proxy_port = stack.start_proxy()
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=2, reschedule_after="2s"))
    placed = replicas_by_node(stack)
    victim = sorted(placed)[0]
    spare = ({"n1", "n2", "n3"} - set(placed)).pop()
    stale_id = str(placed[victim][0]["id"])
    stale_pids = replica_pids(replica=stale_id)

    watcher = RouteWatcher(stack.server_url, stack.admin_token).start()
    with SteadyClient(proxy_port, "echo.localhost", rate_hz=20) as client:
        time.sleep(1.0)
        killed_at = time.monotonic()
        nodes[victim].kill()  # kill -9 the agent; its replica process lives on, unrouted
        removed = wait_for(lambda: watcher.first_change_after(killed_at, "echo", victim), 5,
                           message=f"{victim} to leave the route table")
        assert removed.at - killed_at < 2.0
        # Replaced on the spare node once the node is down (10 s) plus reschedule_after (2 s).
        wait_for(lambda: any(r["node"] == spare and r["state"] == "ready"
                             for r in stack.cli_json("get", "replicas")), 30, message="a replacement on the spare")
        time.sleep(0.5)
    watcher.stop()
    assert client.samples and client.failures() == []

    # The node comes back: its stale copy is stopped, exactly two copies remain.
    stack.restart_node(nodes[victim])
    wait_for(lambda: not replica_pids(replica=stale_id), 20, message="the stale copy to stop")
    assert stale_pids
    final = stack.cli_json("get", "replicas")
    assert len(final) == 2 and {r["state"] for r in final} == {"ready"}
    assert stale_id not in {r["id"] for r in final}
    assert all(len(pids) == 1 for pids in live_replica_processes(stack).values())


def test_paused_agent_cannot_resurrect_its_replica(stack: Stack) -> None:
    stack.start_server()
    nodes = {name: stack.join_node(name, gpus=["RTX 4090:24"]) for name in ("n1", "n2")}
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1, reschedule_after="1s"))
    [original] = stack.cli_json("get", "replicas")
    victim = nodes[str(original["node"])]
    victim.signal(signal.SIGSTOP)  # past the down threshold (10 s): its replica is replaced
    try:
        wait_for(lambda: any(r["id"] != original["id"] and r["state"] == "ready"
                             for r in stack.cli_json("get", "replicas")), 40, message="a replacement")
    finally:
        victim.signal(signal.SIGCONT)
    # Once resumed, the paused agent's reports about its old replica must not bring it back.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        replicas = stack.cli_json("get", "replicas")
        old = [r for r in replicas if r["id"] == original["id"]]
        assert not old or old[0]["stopping"], old
        time.sleep(0.3)
    wait_for(lambda: len(stack.cli_json("get", "replicas")) == 1, 20, message="one copy")
    assert not replica_pids(replica=original["id"])


@pytest.mark.parametrize("crash_point", ["after-commit", "before-ack-stored"])
def test_server_killed_mid_delivery_runs_every_replica_exactly_once(stack: Stack, crash_point: str) -> None:
    stack.start_server()
    nodes = [stack.join_node(name, gpus=["RTX 4090:24"]) for name in ("n1", "n2")]
    server = stack.server
    assert server is not None
    server.stop()
    stack.start_server(env={"VECTORLAY_FAULTS": crash_point})
    for node in nodes:
        node.wait_log("connected to", timeout_s=30)
    crashing = stack.server
    assert crashing is not None
    stack.cli("apply", "-", "--no-wait", input_text=tinylm_manifest("echo", replicas=2), check=False)
    wait_for(lambda: not crashing.alive, 20, message=f"the server to die at {crash_point}")
    assert crashing.popen.returncode == -signal.SIGKILL
    assert f"crash point '{crash_point}' reached" in crashing.log()

    stack.start_server()  # same state dir and port, no fault this time
    wait_for(lambda: len(stack.cli_json("get", "replicas")) == 2 and
             {r["state"] for r in stack.cli_json("get", "replicas")} == {"ready"}, 40, message="2 ready replicas")
    time.sleep(2)  # let any duplicate start show itself
    processes = live_replica_processes(stack)
    assert len(processes) == 2 and all(len(pids) == 1 for pids in processes.values()), processes
    starts = sum(node.log().count("started on port") for node in nodes)
    assert starts == 2, "a redelivered command must not start a replica twice"


def test_agent_restarts_do_not_restart_replicas_or_drop_requests(stack: Stack) -> None:
    stack.start_server()
    node = stack.join_node("n1", gpus=["RTX 4090:24"])
    _, proxy_port = stack.start_proxy()
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1))
    [replica] = stack.cli_json("get", "replicas")
    pids = replica_pids(replica=replica["id"])
    with SteadyClient(proxy_port, "echo.localhost", rate_hz=20) as client:
        for _ in range(5):
            node = stack.restart_node(node)
            time.sleep(0.5)
            assert replica_pids(replica=replica["id"]) == pids
    assert len(client.samples) > 50
    assert client.failures() == []
    assert stack.cli_json("get", "replicas")[0]["state"] == "ready"


def test_an_agent_that_dies_of_an_error_is_suspect_at_once_not_restarting(stack: Stack) -> None:
    stack.start_server()
    # The agent raises in its supervisor as soon as it has a replica to start: a bug, not a stop.
    node = stack.join_node("n1", gpus=["RTX 4090:24"], env={"VECTORLAY_NODE_FAULTS": "converge"})
    assert [n["state"] for n in stack.cli_json("get", "nodes")] == ["ready"]
    stack.cli("apply", "-", "--no-wait", input_text=tinylm_manifest("echo", replicas=1))
    wait_for(lambda: not node.alive, 20, message="the agent to die of the injected error")
    died_at = time.monotonic()
    assert node.popen.returncode == 1 and "fault point 'converge' reached" in node.log()
    # It said no goodbye, so the server does not hold it ready through a restart grace (10 s):
    # its link closed without one, which makes it suspect at once.
    [after] = wait_for(lambda: [n for n in stack.cli_json("get", "nodes") if n["state"] == "suspect"], 5,
                       message="the node to be suspect")
    assert time.monotonic() - died_at < 5
    assert after["name"] == "n1" and not after["connected"]
    assert stack.server is not None and "n1 is restarting" not in stack.server.log()


def test_a_node_with_a_skewed_clock_stays_healthy(stack: Stack) -> None:
    if not faketime_available():
        missing_service("faketime (Debian package faketime)")
    stack.start_server()
    # The agent's wall clock runs ten minutes behind; its monotonic clock is untouched, as on a
    # machine whose NTP is off.
    stack.join_node("skewed", gpus=["RTX 4090:24"], prefix=["faketime", "-f", "-10m"],
                    env={"FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1))
    for _ in range(8):
        time.sleep(0.5)
        [node] = stack.cli_json("get", "nodes")
        assert node["state"] == "ready" and node["last_seen_s"] < 2.0
    assert stack.cli_json("get", "replicas")[0]["state"] == "ready"


def test_drain_moves_replicas_before_stopping_them_and_rm_forgets_the_node(stack: Stack, tmp_path: Path) -> None:
    stack.start_server()
    nodes = {name: stack.join_node(name, gpus=["RTX 4090:24"]) for name in ("n1", "n2", "n3")}
    _, proxy_port = stack.start_proxy()
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=2))
    victim = sorted(replicas_by_node(stack))[0]
    with SteadyClient(proxy_port, "echo.localhost", rate_hz=20) as client:
        drained = stack.cli("node", "drain", victim, "--timeout", "60s")
        assert f"node/{victim} drained" in drained.stdout
    assert client.failures() == []
    assert victim not in replicas_by_node(stack)
    assert len(stack.cli_json("get", "replicas")) == 2
    cordoned = [n for n in stack.cli_json("get", "nodes") if n["name"] == victim][0]
    assert cordoned["schedulable"] is False

    removed = stack.cli("node", "rm", victim)
    assert f"node/{victim} removed" in removed.stdout
    assert victim not in {n["name"] for n in stack.cli_json("get", "nodes")}
    wait_for(lambda: not nodes[victim].alive, 10, message="the removed agent to exit")
    assert "this node was removed from the fleet" in nodes[victim].log()
    missing = stack.cli("node", "rm", victim, check=False)
    assert missing.returncode == 1 and f"node '{victim}' not found" in missing.stderr


def test_server_restart_keeps_routes_and_marks_no_node_down(stack: Stack) -> None:
    stack.start_server()
    for name in ("n1", "n2"):
        stack.join_node(name, gpus=["RTX 4090:24"])
    _, proxy_port = stack.start_proxy()
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=2, reschedule_after="1s"))
    before = {r["id"] for r in stack.cli_json("get", "replicas")}
    with SteadyClient(proxy_port, "echo.localhost", rate_hz=20) as client:
        assert stack.server is not None
        stack.server.kill()
        time.sleep(1.0)
        stack.start_server()
        wait_for(lambda: all(n["connected"] for n in stack.cli_json("get", "nodes")), 40, message="nodes back")
        for _ in range(6):
            assert {n["state"] for n in stack.cli_json("get", "nodes")} == {"ready"}
            time.sleep(0.5)
    assert client.failures() == []  # the proxy kept its table while the server was away
    assert {r["id"] for r in stack.cli_json("get", "replicas")} == before
    assert os.path.exists(stack.root / "server" / "vectorlay.db")


@pytest.mark.parametrize("fault", ["blackhole", "stall", "reject"])
def test_cut_link_heals_with_exactly_the_desired_copies(stack: Stack, fault: str) -> None:
    stack.start_server()
    with Relay(stack.server_port) as relay:
        relay.start()
        # n1 reaches the server only through the relay; the replica is placed there first.
        n1 = stack.join_node("n1", gpus=["RTX 4090:24"], server_url=f"ws://127.0.0.1:{relay.port}")
        stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1, reschedule_after="1s"))
        [original] = stack.cli_json("get", "replicas")
        assert original["node"] == "n1"
        stack.join_node("n2", gpus=["RTX 4090:24"])

        # A flicker (both sides reset, the agent reconnects at once) causes no churn at all.
        relay.cut()
        n1.wait_log(r"reconnecting to \S+ in", timeout_s=10)
        wait_for(lambda: {n["name"]: n["connected"] for n in stack.cli_json("get", "nodes")}.get("n1"), 30,
                 message="n1 to reconnect")
        assert [r["id"] for r in stack.cli_json("get", "replicas")] == [original["id"]]

        # A long outage: the server gives up on n1 and replaces the replica on n2.
        relay.set_mode(fault)
        replacement = wait_for(lambda: next((r for r in stack.cli_json("get", "replicas")
                                             if r["node"] == "n2" and r["state"] == "ready"), None), 40,
                               message="a replacement on n2")
        assert replica_pids(replica=original["id"])  # still running on the cut-off node

        relay.set_mode("pass")  # heal: n1 learns its copy is stale and stops it
        wait_for(lambda: not replica_pids(replica=original["id"]), 60, message="the stale copy to stop")
        wait_for(lambda: [r["id"] for r in stack.cli_json("get", "replicas")] == [replacement["id"]], 20,
                 message="exactly one copy")
        wait_for(lambda: all(n["state"] == "ready" for n in stack.cli_json("get", "nodes")), 60,
                 message="n1 back")
        assert [r["id"] for r in stack.cli_json("get", "replicas")] == [replacement["id"]]
        assert n1.alive
