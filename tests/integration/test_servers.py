"""A control plane that survives its own machine: several servers on one PostgreSQL, real
processes, real faults (kill -9 of the leader, SIGSTOP past its lease, its database cut)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from testsupport.load import SteadyClient
from testsupport.processes import Proc, Stack, http_request, replica_pids, tinylm_manifest, wait_for
from testsupport.relay import Relay

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

# A light replica (a stdlib HTTP server): twenty of them fit a small test machine.
LIGHT = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  runtime: process
  command: ["python3", "-m", "http.server", "${{PORT}}", "--bind", "127.0.0.1"]
  health: {{path: /, interval: 500ms, timeout: 400ms}}
  reschedule_after: 5s
"""


def servers(stack: Stack) -> list[dict[str, Any]]:
    return list(stack.cli_json("get", "servers"))


def leader(stack: Stack) -> dict[str, Any] | None:
    leading = [s for s in servers(stack) if s["leader"]]
    assert len(leading) <= 1, leading
    return leading[0] if leading else None


def proc_of(stack: Stack, address: str) -> Proc:
    port = int(address.rsplit(":", 1)[1])
    if port == stack.server_port:
        assert stack.server is not None
        return stack.server
    return next(proc for proc, p in stack.others if p == port)


def three_servers(stack: Stack, postgres_url: str) -> None:
    stack.db_url = postgres_url
    stack.start_server()
    stack.start_another_server()
    stack.start_another_server()
    wait_for(lambda: len(servers(stack)) == 3 and leader(stack), 20, message="three servers, one leading")


def test_the_leader_killed_during_an_apply_hands_over_and_the_cluster_converges_exactly(
        stack: Stack, postgres_url: str) -> None:
    three_servers(stack, postgres_url)
    nodes = [stack.join_node(f"n{i}") for i in range(4)]
    _, proxy_port = stack.start_proxy()
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=2, gpu="{count: 0}"))
    first = leader(stack)
    assert first is not None

    with SteadyClient(proxy_port, "echo.localhost", rate_hz=10) as client:
        stack.cli("apply", "-", "--no-wait", input_text=LIGHT.format(name="big", replicas=20))
        time.sleep(0.3)
        killed_at = time.monotonic()
        proc_of(stack, first["address"]).kill()  # kill -9 the leader in the middle of placing 20 replicas

        def new_leader() -> dict[str, Any] | None:
            found = leader(stack)
            return found if found and found["id"] != first["id"] else None

        taken = wait_for(new_leader, 15, interval_s=0.2, message="another server to lead")
        assert time.monotonic() - killed_at < 5.0 + 2.0  # the lease (3 s) plus a poll, and the CLI's own time
        assert taken["epoch"] > first["epoch"]

        def converged() -> list[dict[str, Any]] | None:
            big = [r for r in stack.cli_json("get", "replicas") if r["cluster"] == "big"]
            return big if len(big) == 20 and all(r["state"] == "ready" for r in big) else None

        big = wait_for(converged, 90, interval_s=1.0, message="exactly 20 ready replicas of big")
        time.sleep(2)
    assert client.samples and client.failures() == []  # the proxy's clients saw no error
    assert len({r["id"] for r in big}) == 20
    assert sum(len(replica_pids(replica=r["id"])) for r in big) == 20  # one process each: no duplicate
    # The dead server drops out of the listing once it has not beaten for GONE_AFTER_S (6 s).
    wait_for(lambda: len(servers(stack)) == 2, 15, interval_s=0.5, message="the killed server to be gone")
    assert all(n.alive for n in nodes)
    connected = [n for n in stack.cli_json("get", "nodes") if n["state"] == "ready"]
    assert len(connected) == 4  # the dead server's nodes reconnected elsewhere


def test_a_leader_paused_past_its_lease_is_fenced_and_steps_down(stack: Stack, postgres_url: str) -> None:
    three_servers(stack, postgres_url)
    stack.join_node("n1")
    stack.join_node("n2")
    first = leader(stack)
    assert first is not None
    paused = proc_of(stack, first["address"])
    offset = len(paused.log())
    paused.signal(signal.SIGSTOP)
    try:
        taken = wait_for(lambda: (found := leader(stack)) and found["id"] != first["id"] and found, 20,
                         message="another server to lead")
        stack.cli("apply", "-", input_text=LIGHT.format(name="web", replicas=2))  # decided by the new leader
    finally:
        paused.signal(signal.SIGCONT)
    paused.wait_log(r"stepping down as leader \(epoch \d+\)", timeout_s=10)
    assert "leading (epoch" not in paused.log()[offset:]
    time.sleep(3)
    now = leader(stack)
    assert now is not None and now["id"] == taken["id"] and now["epoch"] == taken["epoch"]
    web = [r for r in stack.cli_json("get", "replicas") if r["cluster"] == "web"]
    assert len(web) == 2 and {r["state"] for r in web} == {"ready"}


def test_a_server_cut_from_its_database_stops_leading_hands_its_nodes_over_and_comes_back(
        stack: Stack, postgres_url: str, tmp_path: Path) -> None:
    with Relay(5432) as relay:
        relay.start()
        stack.db_url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        stack.start_server()  # leads first: the only one yet
        wait_for(lambda: leader(stack), 10, message="the first server to lead")
        stack.db_url = postgres_url  # the others reach the database directly
        stack.start_another_server()
        stack.start_another_server()
        n1 = stack.join_node("n1")
        # A node starts on a random server of its list: have it on the one about to be cut off.
        for _ in range(30):
            if re.findall(r"connected to (\S+) as n1", n1.log())[-1] == stack.server_url:
                break
            n1 = stack.restart_node(n1)
        else:
            pytest.fail("n1 never started on the first server")
        first = leader(stack)
        assert first is not None and int(first["address"].rsplit(":", 1)[1]) == stack.server_port
        offset = len(n1.log())

        relay.set_mode("reject")
        assert stack.server is not None
        stack.server.wait_log(r"stepping down as leader", timeout_s=15)
        wait_for(lambda: (found := leader(stack)) and found["id"] != first["id"], 15,
                 message="a server with its database to lead")
        # The cut-off server hands n1 to a server that has the database, which serves it from then on.
        stack.server.wait_log(r"cut off from the database for \d+s while another server has it: handing 1 node",
                              timeout_s=15)
        moved = wait_for(lambda: re.search(r"connected to (\S+) as n1", n1.log()[offset:]), 20,
                         message="n1 to connect to another server")
        assert moved.group(1) != stack.server_url
        refused = subprocess.run([*stack.cli_argv(), "apply", "-", "--no-wait", "--server", stack.server_url],
                                 input=LIGHT.format(name="web", replicas=1), capture_output=True, text=True,
                                 env=stack.env(), timeout=60)
        assert refused.returncode == 1 and "database unavailable" in refused.stderr
        stack.cli("apply", "-", input_text=LIGHT.format(name="web", replicas=1))  # the others decide, n1 runs it
        [web] = [r for r in stack.cli_json("get", "replicas") if r["cluster"] == "web"]
        assert web["node"] == "n1" and web["state"] == "ready"

        relay.set_mode("pass")
        wait_for(lambda: any(s["id"] == first["id"] for s in servers(stack)), 20,
                 message="the cut-off server to be back among the servers")
        stack.server.wait_log("database back: taking nodes and proxies again", timeout_s=10)
        back = subprocess.run([*stack.cli_argv(), "status", "--server", stack.server_url], capture_output=True,
                              text=True, env=stack.env(), timeout=60)
        assert back.returncode == 0, back.stdout + back.stderr
        assert leader(stack) is not None and len(servers(stack)) == 3


def test_an_apply_whose_server_dies_is_retried_on_another_and_applied_once(stack: Stack, postgres_url: str) -> None:
    three_servers(stack, postgres_url)
    stack.join_node("n1")
    stack.join_node("n2")
    victim, victim_port = stack.others[0]
    urls = f"ws://127.0.0.1:{victim_port},{stack.server_url}"
    manifest = stack.root / "once.yaml"
    slow = LIGHT.format(name="once", replicas=2).replace(
        'command: ["python3", "-m", "http.server", "${PORT}", "--bind", "127.0.0.1"]',
        'command: ["sh", "-c", "sleep 5; exec python3 -m http.server ${PORT} --bind 127.0.0.1"]')
    assert slow != LIGHT.format(name="once", replicas=2)
    manifest.write_text(slow)  # ready only after 5 s: the apply is still waiting when its server dies
    cli = subprocess.Popen([*stack.cli_argv(), "apply", str(manifest), "--server", urls, "--timeout", "60s"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stack.env())
    # Once the change is stored, the CLI is waiting for the replicas on the victim: kill it then.
    wait_for(lambda: any(c["name"] == "once" for c in stack.cli_json("get", "clusters")), 30, interval_s=0.2,
             message="the apply to be stored")
    victim.kill()
    out, err = cli.communicate(timeout=90)
    assert cli.returncode == 0, out + err
    assert "trying the next one" in err
    assert "cluster/once ready" in out
    clusters = [c for c in stack.cli_json("get", "clusters") if c["name"] == "once"]
    assert len(clusters) == 1 and clusters[0]["ready"] == 2
    assert len([r for r in stack.cli_json("get", "replicas") if r["cluster"] == "once"]) == 2


def test_a_node_held_by_one_server_is_reached_through_a_proxy_held_by_another(stack: Stack,
                                                                             postgres_url: str) -> None:
    """Tunnels across servers: each server publishes the proxies connected to it, so a node
    dials every proxy of the control plane whichever server holds its session."""
    three_servers(stack, postgres_url)
    _, other_port = stack.others[0]
    stack.join_node("n1", server_url=f"ws://127.0.0.1:{other_port}")  # its session: the second server
    _, proxy_port = stack.start_proxy(server_url=stack.server_url)  # its route feed: the first server

    def sessions_as_meant() -> bool:  # the counts come with each server's next heartbeat
        held = {s["address"].rsplit(":", 1)[1]: (s["nodes"], s["proxies"]) for s in servers(stack)}
        return held[str(other_port)] == (1, 0) and held[str(stack.server_port)] == (0, 1)

    wait_for(sessions_as_meant, 10, message="the node on the second server, the proxy on the first")
    # --server repeated: nothing listens at the first, the next answers.
    listed = json.loads(stack.cli("get", "servers", "-o", "json", "--server", "ws://127.0.0.1:1",
                                  "--server", f"ws://127.0.0.1:{other_port}").stdout)
    assert [s["this"] for s in listed if s["address"].endswith(f":{other_port}")] == [True]
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1, gpu="{count: 0}"))
    wait_for(lambda: [n["tunnels"] for n in stack.cli_json("get", "nodes")] == [1], 15,
             message="the node to hold a tunnel to the proxy of the other server")
    statuses: list[int] = []

    def served() -> bool:
        statuses.append(http_request(proxy_port, "echo.localhost", "/healthz").status)
        return statuses[-1] == 200

    wait_for(served, 15, message="a request through the tunnel")
    assert statuses[-1] == 200


def test_a_server_with_another_state_dir_is_refused_beside_the_running_ones(stack: Stack,
                                                                            postgres_url: str) -> None:
    """Every server of a database must hold the same CA and keys (tokens carry the CA's pin):
    one started with a state dir of its own is refused, saying what to copy."""
    stack.db_url = postgres_url
    stack.tls = True
    stack.start_server()
    other = subprocess.run([*stack.cli_argv(), "server", "--listen", "127.0.0.1:0", "--tls", "auto",
                            "--state-dir", str(stack.root / "elsewhere"), "--db", postgres_url],
                           capture_output=True, text=True, env=stack.env(), timeout=60)
    assert other.returncode == 1, other.stderr
    assert "differ from those of the running servers of this database" in other.stderr
    assert "copy tls/, secrets.key and tunnel-ca/ from a running server's state dir" in other.stderr
    assert "Traceback" not in other.stderr
    assert len(servers(stack)) == 1  # the running one carries on
    # A copy of the first server's state dir is accepted.
    stack.start_another_server()
    wait_for(lambda: len(servers(stack)) == 2, 20, message="the second server to join")


def test_a_second_server_on_sqlite_is_refused(stack: Stack) -> None:
    stack.start_server()
    second = subprocess.run([*stack.cli_argv(), "server", "--listen", "127.0.0.1:0", "--state-dir",
                             str(stack.root / "server")], capture_output=True, text=True, env=stack.env(), timeout=30)
    assert second.returncode == 1
    assert "another vectorlay server" in second.stderr and "SQLite is for one server" in second.stderr
    assert "Traceback" not in second.stderr
