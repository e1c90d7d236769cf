"""The node's supervisor against a fake runtime, on trio's autojump clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vectorlay.core.model import Assignment, ClusterSpec, HealthCheck, ReplicaState
from vectorlay.core.protocol import Command, ReplicaReport, Sync
from vectorlay.node.supervisor import NodeIdentity, Supervisor
from vectorlay.testing.fakes import FakeRuntime

SPEC = ClusterSpec(name="echo", replicas=1, command=("serve",), health=HealthCheck(interval_s=1.0, timeout_s=0.5))
IDENTITY = NodeIdentity("n-1", "n1", "10.0.0.1")


def assignment(replica_id: str = "echo-a", generation: int = 1) -> Assignment:
    return Assignment(replica_id, "echo", generation, SPEC)


def start(seq: int, replica_id: str = "echo-a", generation: int = 1) -> Command:
    return Command(seq, "start", generation, replica_id, assignment(replica_id, generation))


def stop(seq: int, replica_id: str = "echo-a", generation: int = 2) -> Command:
    return Command(seq, "stop", generation, replica_id)


class Harness:
    def __init__(self, state_dir: Path, runtime: FakeRuntime) -> None:
        self.reports: list[ReplicaReport] = []
        self.supervisor = Supervisor(runtime, state_dir, IDENTITY, self.reports.append, probe=runtime.probe)

    def states(self, replica_id: str = "echo-a") -> list[ReplicaState]:
        return [r.state for r in self.reports if r.replica_id == replica_id]


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


async def test_a_command_delivered_twice_or_late_has_one_effect(tmp_path: Path, runtime: FakeRuntime,
                                                                  autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(tmp_path, runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.supervisor.run)
        assert h.supervisor.apply_command(start(1))
        assert not h.supervisor.apply_command(start(1))  # redelivered: already applied
        await trio.sleep(2)
        assert len(runtime.launches) == 1
        assert h.states()[-1] is ReplicaState.READY

        assert h.supervisor.apply_command(stop(3))
        assert not h.supervisor.apply_command(start(2))  # arrives after a newer command: ignored
        await trio.sleep(2)
        assert runtime.running() == [] and len(runtime.launches) == 1
        assert h.states()[-1] is ReplicaState.STOPPED

        # A full state older than what was applied is ignored too.
        assert not h.supervisor.apply_sync(Sync(1, 1, (assignment(),)))
        await trio.sleep(1)
        assert runtime.running() == []
        nursery.cancel_scope.cancel()


async def test_sync_replaces_the_desired_set(tmp_path: Path, runtime: FakeRuntime,
                                             autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(tmp_path, runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.supervisor.run)
        h.supervisor.apply_command(start(1, "echo-a"))
        h.supervisor.apply_command(start(2, "echo-b", generation=2))
        await trio.sleep(1)
        assert {p.request.assignment.replica_id for p in runtime.running()} == {"echo-a", "echo-b"}
        assert h.supervisor.apply_sync(Sync(3, 2, (assignment("echo-b", 2),)))
        await trio.sleep(1)
        assert {p.request.assignment.replica_id for p in runtime.running()} == {"echo-b"}
        assert h.supervisor.state.applied_seq == 2 and h.supervisor.state.generation == 3
        nursery.cancel_scope.cancel()


async def test_a_crashing_replica_restarts_with_growing_backoff(tmp_path: Path, runtime: FakeRuntime,
                                                                autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(tmp_path, runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.supervisor.run)
        h.supervisor.apply_command(start(1))
        await trio.sleep(1)
        launched_at = []
        for _ in range(3):
            runtime.crash("echo-a", code=3)
            crashed = trio.current_time()
            await trio.sleep(0.01)
            report = h.reports[-1]
            assert report.state is ReplicaState.STARTING and "exited with code 3" in report.reason
            while len(runtime.running("echo-a")) == 0:
                await trio.sleep(0.05)
            launched_at.append(trio.current_time() - crashed)
        assert launched_at[0] == pytest.approx(1.0, abs=0.1)
        assert launched_at[1] == pytest.approx(2.0, abs=0.1)
        assert launched_at[2] == pytest.approx(4.0, abs=0.1)
        nursery.cancel_scope.cancel()


async def test_a_launch_failure_is_reported_failed_with_the_reason(tmp_path: Path, runtime: FakeRuntime,
                                                                    autojump_clock: trio.testing.MockClock) -> None:
    runtime.fail_next["echo-a"] = "cannot start 'serve': No such file or directory"
    h = Harness(tmp_path, runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.supervisor.run)
        h.supervisor.apply_command(start(1))
        await trio.sleep(1)
        assert h.reports[-1].state is ReplicaState.FAILED
        assert "No such file or directory" in h.reports[-1].reason
        nursery.cancel_scope.cancel()


async def test_an_unhealthy_replica_turns_unready_after_the_threshold(tmp_path: Path, runtime: FakeRuntime,
                                                                      autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(tmp_path, runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.supervisor.run)
        h.supervisor.apply_command(start(1))
        await trio.sleep(1.5)
        assert h.states()[-1] is ReplicaState.READY
        runtime.running("echo-a")[0].healthy = False
        await trio.sleep(2.1)  # two failed probes: still ready (threshold 3)
        assert h.states()[-1] is ReplicaState.READY
        await trio.sleep(1)
        assert h.reports[-1].state is ReplicaState.UNREADY
        assert "answered 503" in h.reports[-1].reason
        runtime.running("echo-a")[0].healthy = True
        await trio.sleep(1)
        assert h.states()[-1] is ReplicaState.READY
        nursery.cancel_scope.cancel()


async def test_a_restarted_agent_reattaches_instead_of_relaunching(tmp_path: Path, runtime: FakeRuntime,
                                                                   autojump_clock: trio.testing.MockClock) -> None:
    first = Harness(tmp_path, runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.supervisor.run)
        first.supervisor.apply_command(start(1))
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()  # the agent goes away; its replica must not
    assert len(runtime.running("echo-a")) == 1

    second = Harness(tmp_path, runtime)
    await second.supervisor.reattach()
    assert [r.state for r in second.supervisor.current_reports()] == [ReplicaState.READY]
    assert second.supervisor.state.applied_seq == 1
    async with trio.open_nursery() as nursery:
        await nursery.start(second.supervisor.run)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert len(runtime.launches) == 1 and len(runtime.running("echo-a")) == 1


async def test_corrupt_local_state_never_leaves_two_copies(tmp_path: Path, runtime: FakeRuntime,
                                                           autojump_clock: trio.testing.MockClock) -> None:
    first = Harness(tmp_path, runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.supervisor.run)
        first.supervisor.apply_command(start(1))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    state_file = tmp_path / "agent-state.json"
    state_file.write_text(state_file.read_text().replace('"applied_seq": 1', '"applied_seq": 7'))  # checksum breaks

    second = Harness(tmp_path, runtime)
    await second.supervisor.reattach()
    assert (tmp_path / "agent-state.json.corrupt").exists()
    assert runtime.running() == []  # the orphan was stopped, not adopted blindly
    async with trio.open_nursery() as nursery:
        await nursery.start(second.supervisor.run)
        second.supervisor.apply_sync(Sync(1, 1, (assignment(),)))  # the server's full state
        await trio.sleep(1)
        assert len(runtime.running("echo-a")) == 1
        nursery.cancel_scope.cancel()


async def test_the_tunnels_reach_only_replicas_running_here_now(tmp_path: Path, runtime: FakeRuntime,
                                                                autojump_clock: trio.testing.MockClock) -> None:
    identity = NodeIdentity("n-1", "n1", "127.0.0.1", data_plane="tunnel")
    supervisor = Supervisor(runtime, tmp_path, identity, lambda report: None, probe=runtime.probe)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        assert supervisor.local_address("echo-a") is None  # not given to this node
        supervisor.apply_command(start(1))
        await trio.sleep(1)
        [process] = runtime.running()
        assert supervisor.local_address("echo-a") == ("127.0.0.1", process.request.host_port)
        # Behind tunnels a process replica is told to listen on loopback only.
        assert process.request.env["VECTORLAY_HOST"] == "127.0.0.1"
        assert supervisor.local_address("echo-b") is None
        supervisor.apply_command(stop(2))
        assert supervisor.local_address("echo-a") is None  # being stopped: no new streams to it
        await trio.sleep(1)
        assert supervisor.local_address("echo-a") is None
        nursery.cancel_scope.cancel()
    assert NodeIdentity("n-1", "n1", "10.0.0.1", data_plane="direct").listen_host == "0.0.0.0"
