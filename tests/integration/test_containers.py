"""Real containers: real `vectorlay` processes on loopback, real podman with runc (and gVisor's
runsc), and a busybox httpd image built here with `podman import` (no registry is reachable)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests_support import missing_service

from testsupport.images import DEFAULT_TAG, build_image, container_prerequisites
from testsupport.processes import REPO_ROOT, Stack, container_ids, http_request, wait_for

pytestmark = pytest.mark.slow

MANIFEST = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata:
  name: {name}
spec:
  replicas: {replicas}
  image: {image}
  isolation: {isolation}
  image_pull: {pull}
  env: {{GREETING: "hello from a container"}}
  port: 8000
  resources: {{cpus: 0.5, memory: 64Mi}}
  health: {{path: /healthz, interval: 500ms, timeout: 400ms}}
"""

PROCESS_MANIFEST = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {name: tiny}
spec:
  runtime: process
  command: ["python3", "examples/tinylm/serve.py", "--port", "${PORT}"]
"""


def manifest(name: str = "web", replicas: int = 2, image: str = DEFAULT_TAG, isolation: str = "container",
             pull: str = "if-not-present") -> str:
    return MANIFEST.format(name=name, replicas=replicas, image=image, isolation=isolation, pull=pull)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    reason = container_prerequisites("runc")
    if reason:
        missing_service(reason)
    build_image(DEFAULT_TAG)
    yield DEFAULT_TAG


def podman_json(*args: str) -> Any:
    return json.loads(subprocess.run(["podman", *args], capture_output=True, text=True, timeout=60).stdout or "[]")


def started_at(container: str) -> str:
    return str(podman_json("container", "inspect", container)[0]["State"]["StartedAt"])


def test_container_replicas_served_reattached_logged_and_removed(stack: Stack, image: str) -> None:
    stack.start_server()
    nodes = [stack.join_node(name, allow_process=False, extra=["--oci-runtime", "runc"]) for name in ("c1", "c2")]
    _, proxy_port = stack.start_proxy()
    assert sorted((n["name"], n["runtimes"]) for n in stack.cli_json("get", "nodes")) == \
        [("c1", ["container"]), ("c2", ["container"])]

    applied = stack.cli("apply", "examples/busybox-httpd/cluster.yaml", "--timeout", "90s")
    assert "ready at http://web.localhost:" in applied.stdout
    replicas = stack.cli_json("get", "replicas")
    assert sorted((r["node"], r["state"]) for r in replicas) == [("c1", "ready"), ("c2", "ready")]
    digest = podman_json("image", "inspect", image)[0]["Digest"]
    assert [r["image_digest"] for r in replicas] == [digest, digest]

    # One running container per replica, labelled with its cluster, replica and node.
    containers = {r["id"]: container_ids(replica=r["id"], running_only=True) for r in replicas}
    assert all(len(ids) == 1 for ids in containers.values()), containers
    for replica in replicas:
        labels = podman_json("container", "inspect", containers[replica["id"]][0])[0]["Config"]["Labels"]
        assert (labels["vectorlay.cluster"], labels["vectorlay.replica"]) == ("web", replica["id"])
        assert labels["vectorlay.node"] == next(n.node_id for n in nodes if n.name == replica["node"])

    # Served through the proxy by both replicas, each with its own environment.
    seen = set()
    for _ in range(20):
        result = http_request(proxy_port, "web.localhost", "/cgi-bin/env")
        assert result.status == 200, result.body
        env = dict(line.split("=", 1) for line in result.body.decode().splitlines() if "=" in line)
        assert env["GREETING"] == "hello from a container" and env["PORT"] == "8000"
        seen.add(env["VECTORLAY_REPLICA"])
    assert seen == {r["id"] for r in replicas}
    page = http_request(proxy_port, "web.localhost", "/")
    assert (page.status, page.body) == (200, b"hello from vectorlay busybox httpd\n")

    # Container output reaches `vectorlay logs`.
    logs = stack.cli("logs", "web", "--tail", "50").stdout
    for replica in replicas:
        assert f"[{replica['id']}] busybox httpd on port 8000 (replica {replica['id']})" in logs
    assert "response:200" in logs

    # The agent restarts: it re-attaches to the same containers, which never stopped.
    before = {rid: started_at(ids[0]) for rid, ids in containers.items()}
    restarted = stack.restart_node(nodes[0])
    restarted.wait_log(r"re-attached to 1 running replica")
    wait_for(lambda: {r["state"] for r in stack.cli_json("get", "replicas")} == {"ready"}, 30,
             message="replicas ready after the agent restart")
    assert {r["id"]: container_ids(replica=r["id"], running_only=True) for r in replicas} == containers
    assert {rid: started_at(ids[0]) for rid, ids in containers.items()} == before
    assert http_request(proxy_port, "web.localhost", "/").status == 200

    # These nodes do not run process replicas: such a cluster waits, with the reason.
    stack.cli("apply", "-", "--no-wait", input_text=PROCESS_MANIFEST)
    tiny = wait_for(lambda: [r for r in stack.cli_json("get", "replicas") if r["cluster"] == "tiny"], 10)
    assert (tiny[0]["state"], tiny[0]["reason"]) == ("pending", "no ready node offers the process runtime")
    stack.cli("delete", "tiny", "--timeout", "30s")

    # Delete: the containers are gone, not just stopped.
    stack.cli("delete", "web", "--timeout", "60s")
    wait_for(lambda: not any(container_ids(replica=r["id"]) for r in replicas), 30, message="containers removed")
    assert stack.cli_json("get", "replicas") == []


def test_a_pull_failure_fails_the_replica_with_the_reason(stack: Stack, image: str) -> None:
    stack.start_server()
    node = stack.join_node("c1", allow_process=False, extra=["--oci-runtime", "runc"])
    # A registry that is not there: a closed port on loopback.
    stack.cli("apply", "-", "--no-wait", input_text=manifest("broken", 1, "127.0.0.1:9/vectorlay/absent:1"))

    # The server replaces a failed replica at once; its events keep the reason.
    reason = "failed: pulling image 127.0.0.1:9/vectorlay/absent:1 failed: "
    def describe() -> str | None:
        text = stack.cli("describe", "cluster", "broken").stdout
        return text if reason in text else None

    described = wait_for(describe, 60, interval_s=0.5, message="the pull failure in `describe cluster`")
    line = next(line for line in described.splitlines() if reason in line)
    assert "connection refused" in line  # podman's own words, on one line
    assert node.alive  # a failing pull never takes the agent down

    # `never` with an image the node lacks fails the same way, with its own reason.
    stack.cli("apply", "-", "--no-wait", input_text=manifest("never", 1, "localhost/vectorlay/absent:1",
                                                             pull="never"))
    never = "failed: image localhost/vectorlay/absent:1 is not on this node and image_pull is never"
    wait_for(lambda: never in stack.cli("describe", "cluster", "never").stdout, 60, interval_s=0.5,
             message="the missing image in `describe cluster`")
    stack.cli("delete", "broken", "--timeout", "30s")
    stack.cli("delete", "never", "--timeout", "30s")
    assert container_ids(node.node_id) == []  # nothing was left behind by the failed starts


def test_a_sandbox_replica_runs_under_gvisor(stack: Stack, image: str) -> None:
    reason = container_prerequisites("runsc")
    if reason:
        missing_service(reason)
    stack.start_server()
    stack.join_node("plain", allow_process=False, extra=["--oci-runtime", "runc"])
    stack.join_node("gvisor", allow_process=False, extra=["--oci-runtime", "runc", "--oci-runtime", "runsc"])
    _, proxy_port = stack.start_proxy()

    stack.cli("apply", "-", "--timeout", "90s", input_text=manifest("sandboxed", 1, isolation="sandbox"))
    [replica] = stack.cli_json("get", "replicas")
    assert (replica["node"], replica["state"]) == ("gvisor", "ready")  # only that node offers sandbox
    [container] = container_ids(replica=replica["id"], running_only=True)
    assert podman_json("container", "inspect", container)[0]["OCIRuntime"] == "runsc"
    result = http_request(proxy_port, "sandboxed.localhost", "/cgi-bin/env")
    assert result.status == 200 and "GREETING=hello from a container" in result.body.decode()

    # Kata is not on this machine: microvm isolation waits, with the reason.
    stack.cli("apply", "-", "--no-wait", input_text=manifest("vm", 1, isolation="microvm"))
    vm = wait_for(lambda: [r for r in stack.cli_json("get", "replicas") if r["cluster"] == "vm"], 10)
    assert (vm[0]["state"], vm[0]["reason"]) == ("pending", "no ready node offers microvm isolation")


def test_the_busybox_example_holds_8_requests_at_once_under_each_isolation_it_claims(
        stack: Stack, image: str, tmp_path: Path) -> None:
    """examples/busybox-httpd as shipped, under runc and under gVisor, 8 CGI requests at once for a
    while: no replica is killed (at 64Mi gVisor's was, for memory, after about 130 requests), and
    no file lands in the directory the node was started from."""
    reason = container_prerequisites("runsc")
    if reason:
        missing_service(reason)
    started_from = tmp_path / "where-the-user-is"
    started_from.mkdir()
    stack.start_server()
    for name in ("n1", "n2"):
        stack.join_node(name, allow_process=False, extra=["--oci-runtime", "runc", "--oci-runtime", "runsc"],
                        cwd=started_from)
    _, proxy_port = stack.start_proxy()
    example = (REPO_ROOT / "examples" / "busybox-httpd" / "cluster.yaml").read_text()
    for isolation in ("container", "sandbox"):
        name = f"web-{isolation}"
        text = example.replace("name: web", f"name: {name}").replace("isolation: container", f"isolation: {isolation}")
        stack.cli("apply", "-", "--timeout", "120s", input_text=text)
        replicas = [r for r in stack.cli_json("get", "replicas") if r["cluster"] == name]
        containers = {r["id"]: container_ids(replica=r["id"], running_only=True) for r in replicas}
        runtime = "runsc" if isolation == "sandbox" else "runc"
        assert all(podman_json("container", "inspect", ids[0])[0]["OCIRuntime"] == runtime
                   for ids in containers.values())

        def fetch(_: int, host: str = f"{name}.localhost") -> int:
            return http_request(proxy_port, host, "/cgi-bin/env", timeout_s=60).status

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(fetch, range(400)))
        counts = {s: statuses.count(s) for s in set(statuses)}
        if isolation == "container":
            assert counts == {200: 400}
        else:
            # gVisor (Debian's runsc 20221219, network=host) fails a read on a fresh connection
            # whose request has not arrived yet, so busybox httpd closes a connection unanswered
            # when the request comes a millisecond or more after the connect, as it often does from
            # a busy proxy: those are the 502s. Not a kill, and not the memory limit.
            assert set(counts) <= {200, 502} and counts.get(200, 0) >= len(statuses) // 4, counts
        after = [r for r in stack.cli_json("get", "replicas") if r["cluster"] == name]
        assert [(r["state"], r["reason"]) for r in after] == [("ready", "")] * 2, after
        assert {r["id"]: container_ids(replica=r["id"], running_only=True) for r in after} == containers
    assert list(started_from.iterdir()) == []
