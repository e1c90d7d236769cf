"""The supervisor with a runtime per replica (process or container), on the autojump clock: the
spec picks the runtime, the process runtime only runs where it is allowed, container replicas
report their image digest and their pull, and a runtime that fails never takes the agent down."""

from __future__ import annotations

from pathlib import Path

import trio

from vectorlay.core.model import Assignment, ClusterSpec, HealthCheck, ReplicaState, Runtime
from vectorlay.core.protocol import Command, ReplicaReport
from vectorlay.node.selector import RuntimeSelector
from vectorlay.node.supervisor import STOP_RETRY_MAX_S, NodeIdentity, Supervisor
from vectorlay.testing.fakes import FakeRuntime

DIGEST = "sha256:" + "d" * 64
HEALTH = HealthCheck(interval_s=1.0, timeout_s=0.5)
PROCESS_SPEC = ClusterSpec(name="tiny", replicas=1, runtime=Runtime.PROCESS, command=("serve",), health=HEALTH)
CONTAINER_SPEC = ClusterSpec(name="web", replicas=1, runtime=Runtime.CONTAINER, image="localhost/web:1",
                             health=HEALTH)
IDENTITY = NodeIdentity("n-1", "n1", "10.0.0.1", publish_ip="10.0.0.1")


def start(seq: int, replica_id: str, spec: ClusterSpec) -> Command:
    return Command(seq, "start", seq, replica_id, Assignment(replica_id, spec.name, seq, spec))


class Node:
    def __init__(self, state_dir: Path, offered: tuple[str, ...], process: FakeRuntime | None = None,
                 container: FakeRuntime | None = None) -> None:
        self.process = process or FakeRuntime("process")
        self.container = container or FakeRuntime("container", image_digest=DIGEST)
        self.probed_hosts: list[str] = []
        self.reports: list[ReplicaReport] = []
        selector = RuntimeSelector({"process": self.process, "container": self.container}, offered)
        self.supervisor = Supervisor(selector, state_dir, IDENTITY, self.reports.append, probe=self.probe)

    async def probe(self, host: str, port: int, path: str, timeout_s: float) -> tuple[bool, str]:
        self.probed_hosts.append(host)
        for runtime in (self.process, self.container):
            for process in runtime.running():
                if process.request.host_port == port:
                    return True, ""
        return False, "nothing listening"

    def last(self, replica_id: str) -> ReplicaReport:
        return [r for r in self.reports if r.replica_id == replica_id][-1]


async def test_each_replica_runs_under_the_runtime_its_spec_names(tmp_path: Path,
                                                                  autojump_clock: trio.testing.MockClock) -> None:
    node = Node(tmp_path, ("container", "process"))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.supervisor.run)
        node.supervisor.apply_command(start(1, "tiny-a", PROCESS_SPEC))
        node.supervisor.apply_command(start(2, "web-a", CONTAINER_SPEC))
        await trio.sleep(2)
        assert [p.request.assignment.replica_id for p in node.process.running()] == ["tiny-a"]
        assert [p.request.assignment.replica_id for p in node.container.running()] == ["web-a"]
        web = node.last("web-a")
        assert (web.state, web.image_digest, web.address) == (ReplicaState.READY, DIGEST,
                                                              f"10.0.0.1:{node.container.launches[0].host_port}")
        assert node.last("tiny-a").image_digest is None
        # The container reported its pull while it happened.
        assert any(r.reason == "pulling image localhost/web:1" and r.state is ReplicaState.STARTING
                   for r in node.reports if r.replica_id == "web-a")
        # The container's port is published on the advertised address: probed there.
        assert node.container.launches[0].host_ip == "10.0.0.1"
        assert set(node.probed_hosts) == {"127.0.0.1", "10.0.0.1"}

        node.supervisor.apply_command(Command(3, "stop", 3, "web-a"))
        await trio.sleep(1)
        assert node.container.running() == [] and len(node.process.running()) == 1
        nursery.cancel_scope.cancel()


async def test_a_node_without_allow_process_runtime_refuses_process_replicas(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    node = Node(tmp_path, ("container",))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.supervisor.run)
        node.supervisor.apply_command(start(1, "tiny-a", PROCESS_SPEC))
        await trio.sleep(1)
        failed = node.last("tiny-a")
        assert failed.state is ReplicaState.FAILED
        assert "--allow-process-runtime" in failed.reason and "not isolated" in failed.reason
        assert failed.node_fault  # a node that allows process replicas would run it
        assert node.process.launches == []
        nursery.cancel_scope.cancel()


async def test_process_replicas_left_from_when_it_was_allowed_are_stopped_not_adopted(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    process = FakeRuntime("process")
    before = Node(tmp_path, ("container", "process"), process=process)
    async with trio.open_nursery() as nursery:
        await nursery.start(before.supervisor.run)
        before.supervisor.apply_command(start(1, "tiny-a", PROCESS_SPEC))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(process.running()) == 1

    after = Node(tmp_path, ("container",), process=process)  # restarted without --allow-process-runtime
    await after.supervisor.reattach()
    assert process.running() == []
    assert after.supervisor.current_reports() == []


async def test_a_failing_runtime_never_takes_the_supervisor_down(tmp_path: Path,
                                                                 autojump_clock: trio.testing.MockClock) -> None:
    container = FakeRuntime("container", image_digest=DIGEST)
    node = Node(tmp_path, ("container",), container=container)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.supervisor.run)
        container.fail_next["web-a"] = "pulling image localhost/web:1 failed: connection refused"
        node.supervisor.apply_command(start(1, "web-a", CONTAINER_SPEC))
        node.supervisor.apply_command(start(2, "web-b", CONTAINER_SPEC))
        await trio.sleep(2)
        assert node.last("web-a").state is ReplicaState.FAILED
        assert node.last("web-a").reason == "pulling image localhost/web:1 failed: connection refused"
        assert node.last("web-b").state is ReplicaState.READY

        container.broken = "podman is not installed on this node"  # stop fails from now on
        node.supervisor.apply_command(Command(3, "stop", 3, "web-b"))
        await trio.sleep(1)
        # Not reported stopped while it may still run (and hold its GPUs): it is tried again.
        stopping = node.last("web-b")
        assert stopping.state is ReplicaState.FAILED
        assert stopping.reason.startswith("stopping it failed: podman is not installed on this node; trying again")
        node.supervisor.apply_command(start(4, "web-c", CONTAINER_SPEC))
        await trio.sleep(2)
        assert node.last("web-c").state is ReplicaState.READY  # still converging
        container.broken = None  # podman is back: the next try stops it
        await trio.sleep(STOP_RETRY_MAX_S)
        assert node.last("web-b").state is ReplicaState.STOPPED and container.running("web-b") == []
        nursery.cancel_scope.cancel()

    # A restart while the runtime cannot even list what it runs: the agent still comes up.
    container.broken = "podman is not installed on this node"
    again = Node(tmp_path, ("container",), container=container)
    await again.supervisor.reattach()
    assert {r.replica_id for r in again.supervisor.current_reports()} == {"web-c"}
