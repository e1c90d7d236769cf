"""The node's supervisor against a fake runtime, on trio's autojump clock."""

from __future__ import annotations

import dataclasses
import errno
import logging
import traceback
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from vectorlay.core.model import Assignment, ClusterSpec, HealthCheck, ReplicaState, Resources
from vectorlay.core.protocol import Command, ReplicaReport, Sync
from vectorlay.errors import RuntimeFailure, UserError
from vectorlay.node import local_state
from vectorlay.node.faults import FaultPoints, InjectedFault
from vectorlay.node.runtime import LaunchRequest
from vectorlay.node.state_dir import NodeStateDir
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
    state_file = NodeStateDir(tmp_path).agent_state_file
    state_file.write_text(state_file.read_text().replace('"applied_seq": 1', '"applied_seq": 7'))  # checksum breaks

    second = Harness(tmp_path, runtime)
    await second.supervisor.reattach()
    assert NodeStateDir(tmp_path).corrupt_agent_state_file.exists()
    assert runtime.running() == []  # the orphan was stopped, not adopted blindly
    async with trio.open_nursery() as nursery:
        await nursery.start(second.supervisor.run)
        second.supervisor.apply_sync(Sync(1, 1, (assignment(),)))  # the server's full state
        await trio.sleep(1)
        assert len(runtime.running("echo-a")) == 1
        nursery.cancel_scope.cancel()


# --- a replica's failure is that replica's ------------------------------------------------------

ERRORS: dict[str, Exception] = {
    "value": ValueError("embedded null byte"),
    "os": OSError(errno.EMFILE, "Too many open files"),
    "key": KeyError("Id"),
    "runtime": RuntimeFailure("podman is not installed on this node"),
}
SAID = {"value": "ValueError: embedded null byte", "os": "OSError: [Errno 24] Too many open files",
        "key": "KeyError: 'Id'", "runtime": "podman is not installed on this node"}


class Fleet:
    """Commands with a sequence and generation that only grow, as the server sends them."""

    def __init__(self, harness: Harness) -> None:
        self.h = harness
        self.seq = 0

    def start(self, replica_id: str, spec: ClusterSpec = SPEC) -> None:
        self.seq += 1
        assert self.h.supervisor.apply_command(
            Command(self.seq, "start", self.seq, replica_id, Assignment(replica_id, "echo", self.seq, spec)))

    def stop(self, replica_id: str) -> None:
        self.seq += 1
        assert self.h.supervisor.apply_command(Command(self.seq, "stop", self.seq, replica_id))

    def last(self, replica_id: str) -> ReplicaReport:
        return [r for r in self.h.reports if r.replica_id == replica_id][-1]


async def test_every_way_a_replica_can_fail_fails_only_that_replica(
        tmp_path: Path, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vectorlay.node")
    for kind, error in ERRORS.items():
        for method in ("launch", "wait", "probe"):
            runtime.raises[(f"{method}-{kind}", method)] = error
    runtime.raises[("launch-node", "launch")] = RuntimeFailure("image localhost/x:1 is not on this node and "
                                                               "image_pull is never", node_fault=True)
    runtime.raises[("launch-ugly", "launch")] = ValueError("cannot use 'a\x00b\ud800'" + "x" * 5000)
    runtime.hanging_launches.add("hang")
    runtime.exiting_at_once["crashloop"] = 3
    poison = replace(SPEC, command=("sh", "-c", "sleep 100 # \x00"))  # what apply refuses, delivered anyway
    h = Harness(tmp_path, runtime)
    fleet = Fleet(h)
    doomed = [*(f"{m}-{k}" for m in ("launch", "wait", "probe") for k in ERRORS), "launch-node", "launch-ugly"]

    async with trio.open_nursery() as nursery:
        await nursery.start(h.supervisor.run)
        fleet.start("healthy")
        for replica_id in [*doomed, "hang", "crashloop", *(f"stop-{k}" for k in ERRORS)]:
            fleet.start(replica_id)
        fleet.start("poison", poison)
        await trio.sleep(3)

        # Each failed with its own reason; the healthy one is ready.
        assert fleet.last("healthy").state is ReplicaState.READY
        for kind in ERRORS:
            assert (fleet.last(f"launch-{kind}").state, fleet.last(f"launch-{kind}").reason) == (
                ReplicaState.FAILED, SAID[kind] if kind == "runtime" else f"failed to start: {SAID[kind]}")
            assert (fleet.last(f"wait-{kind}").state, fleet.last(f"wait-{kind}").reason) == (
                ReplicaState.FAILED, f"lost track of it: {SAID[kind]}")
            assert (fleet.last(f"probe-{kind}").state, fleet.last(f"probe-{kind}").reason) == (
                ReplicaState.FAILED, f"health probe failed: {SAID[kind]}")
        assert not any(fleet.last(r).node_fault for r in doomed if r != "launch-node")
        node_fault = fleet.last("launch-node")
        assert node_fault.state is ReplicaState.FAILED and node_fault.node_fault
        ugly = fleet.last("launch-ugly")
        assert ugly.state is ReplicaState.FAILED and ugly.reason.startswith("failed to start: ValueError: cannot use")
        assert "\x00" not in ugly.reason and "\ud800" not in ugly.reason and len(ugly.reason) <= 500
        poisoned = fleet.last("poison")
        assert poisoned.state is ReplicaState.FAILED
        assert poisoned.reason == ("cannot be launched: spec.command[2]: contains a NUL byte (\\0), which no "
                                   "argument, environment variable or path can hold")
        assert "poison" not in {r.assignment.replica_id for r in runtime.launches}  # never reached the runtime
        assert (fleet.last("hang").state, fleet.last("hang").reason) == (ReplicaState.STARTING, "launching")
        assert any(r.reason.startswith("exited with code 3; restarting in") for r in h.reports
                   if r.replica_id == "crashloop")
        # Each failure is logged with the replica and, at debug level, its traceback.
        traced = [r for r in caplog.records if r.levelno == logging.DEBUG and "launch-value" in r.getMessage()]
        assert traced and traced[0].exc_info is not None
        assert "embedded null byte" in "".join(traceback.format_exception(*traced[0].exc_info))

        # The server replaces them and stops these copies: what still ran is stopped, a hung
        # launch is abandoned; nothing of theirs is left.
        for replica_id in [*doomed, "hang", "poison"]:
            fleet.stop(replica_id)
        await trio.sleep(1)
        for replica_id in [*doomed, "hang", "poison"]:
            assert fleet.last(replica_id).state is ReplicaState.STOPPED, replica_id
            assert runtime.running(replica_id) == [], replica_id

        # A stop that fails is not reported as done (the workload may hold its GPUs): tried again
        # with backoff, and reported stopped once it worked.
        for kind, error in ERRORS.items():
            runtime.raises[(f"stop-{kind}", "stop")] = error
            fleet.stop(f"stop-{kind}")
        await trio.sleep(2.5)
        for kind in ERRORS:
            failing = fleet.last(f"stop-{kind}")
            assert failing.state is ReplicaState.FAILED
            assert failing.reason == f"stopping it failed: {SAID[kind]}; trying again in 2s"
            assert len(runtime.running(f"stop-{kind}")) == 1
            del runtime.raises[(f"stop-{kind}", "stop")]
        await trio.sleep(4.5)
        for kind in ERRORS:
            assert fleet.last(f"stop-{kind}").state is ReplicaState.STOPPED
            assert runtime.running(f"stop-{kind}") == []

        # The crash loop backs off (1, 2, 4, 8 s ...) and never takes anything else with it.
        restarts = [r.reason for r in h.reports if r.replica_id == "crashloop" and r.reason.startswith("exited")]
        assert restarts[:4] == [f"exited with code 3; restarting in {d}s (restart {n})"
                                for n, d in enumerate((1, 2, 4, 8), start=1)]
        fleet.stop("crashloop")

        # The supervisor still converges: a new replica starts and gets ready.
        fleet.start("late")
        await trio.sleep(2)
        assert fleet.last("late").state is ReplicaState.READY
        nursery.cancel_scope.cancel()

    # Through all of it the healthy replica ran once and stayed ready.
    healthy = [r.state for r in h.reports if r.replica_id == "healthy"]
    assert healthy[healthy.index(ReplicaState.READY):] == [ReplicaState.READY]
    assert len(runtime.running("healthy")) == 1
    assert [r.assignment.replica_id for r in runtime.launches].count("healthy") == 1

    # An agent restart where the runtime cannot tell whether a replica still runs: re-attached
    # (unknown counts as alive), never started twice, and the others are untouched.
    # A probe that raises as the agent comes back fails only its own replica, once it runs.
    runtime.raises[("healthy", "is_alive")] = OSError(errno.EIO, "Input/output error")
    runtime.raises[("late", "is_alive")] = KeyError("State")
    runtime.raises[("late", "probe")] = ValueError("Illegal target characters")
    probe_failed = "health probe failed: ValueError: Illegal target characters"
    again = Harness(tmp_path, runtime)
    await again.supervisor.reattach()
    assert {r.replica_id: (r.state, r.reason) for r in again.supervisor.current_reports()} == {
        "healthy": (ReplicaState.READY, ""), "late": (ReplicaState.STARTING, probe_failed)}
    async with trio.open_nursery() as nursery:
        await nursery.start(again.supervisor.run)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert [r.assignment.replica_id for r in runtime.launches].count("healthy") == 1
    assert [r.state for r in again.reports if r.replica_id == "healthy"] == [ReplicaState.READY]
    late = [r for r in again.reports if r.replica_id == "late"][-1]
    assert (late.state, late.reason) == (ReplicaState.FAILED, probe_failed)


async def test_a_state_file_that_is_not_even_text_is_set_aside(tmp_path: Path, runtime: FakeRuntime,
                                                                autojump_clock: trio.testing.MockClock) -> None:
    NodeStateDir(tmp_path).agent_state_file.write_bytes(b"\xff\xfe{\x00")
    h = Harness(tmp_path, runtime)
    await h.supervisor.reattach()  # must not raise: the agent comes up and recovers from the runtime
    assert NodeStateDir(tmp_path).corrupt_agent_state_file.exists()
    assert h.supervisor.state.applied_seq == 0


async def test_the_converge_fault_point_kills_the_supervisor_as_a_bug_would(
        tmp_path: Path, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock) -> None:
    # What the fault-injection test of the real agent relies on: outside any replica's run, so
    # nothing contains it, and raised only once there is something to start.
    supervisor = Supervisor(runtime, tmp_path, IDENTITY, lambda report: None, probe=runtime.probe,
                            faults=FaultPoints.parse("converge"))
    idle_survived = False
    with pytest.RaisesGroup(pytest.RaisesExc(InjectedFault, match="fault point 'converge' reached"),
                            flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            await trio.sleep(1)  # nothing desired yet: nothing happens
            idle_survived = True
            supervisor.apply_command(start(1))
            await trio.sleep(1)
    assert idle_survived and runtime.launches == []
    with pytest.raises(UserError, match="unknown VECTORLAY_NODE_FAULTS point"):
        FaultPoints.parse("converge,convergee")


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
async def test_a_replica_killed_for_its_memory_says_which_limit(tmp_path: Path, runtime: FakeRuntime,
                                                                autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(tmp_path, runtime)
    limited = dataclasses.replace(SPEC, resources=Resources(memory_mb=64))
    async with trio.open_nursery() as nursery:
        await nursery.start(h.supervisor.run)
        h.supervisor.apply_command(Command(1, "start", 1, "echo-a", Assignment("echo-a", "echo", 1, limited)))
        await trio.sleep(1)
        runtime.crash("echo-a", code=137, oom_killed=True)
        await trio.sleep(0.01)
        assert h.reports[-1].reason == ("killed for using more memory than `resources.memory` (64Mi): give it more "
                                        "in the manifest; restarting in 1s (restart 1)")
        nursery.cancel_scope.cancel()


async def test_secret_values_are_never_saved_and_a_restarted_agent_takes_them_from_the_server(
        tmp_path: Path, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock) -> None:
    secret_spec = dataclasses.replace(SPEC, env_from_secret={"HF_TOKEN": "hf-token"})
    with_secret = Assignment("echo-a", "echo", 1, secret_spec, secret_env={"HF_TOKEN": "hf_s3cr3t"})
    first = Harness(tmp_path, runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.supervisor.run)
        first.supervisor.apply_command(Command(1, "start", 1, "echo-a", with_secret))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()  # the agent stops; its replica keeps running
    assert runtime.launches[-1].env["HF_TOKEN"] == "hf_s3cr3t"
    saved = (tmp_path / "agent-state.json").read_text()
    assert "hf_s3cr3t" not in saved and '"HF_TOKEN": "hf-token"' in saved  # the name only

    # Restarted, not yet connected: the replica exits and cannot start again without its secret.
    second = Harness(tmp_path, runtime)
    await second.supervisor.reattach()
    async with trio.open_nursery() as nursery:
        await nursery.start(second.supervisor.run)
        runtime.crash("echo-a")
        await trio.sleep(2)
        assert second.reports[-1].state is ReplicaState.FAILED
        assert second.reports[-1].reason.startswith("the values of its secrets (HF_TOKEN) are not on this node")
        assert len(runtime.launches) == 1
        nursery.cancel_scope.cancel()

    # Restarted and connected: the server's desired state carries the values again.
    third = Harness(tmp_path, runtime)
    first_launch = await _relaunch_after_sync(third, runtime, with_secret)
    assert first_launch.env["HF_TOKEN"] == "hf_s3cr3t"


async def _relaunch_after_sync(h: Harness, runtime: FakeRuntime, assignment: Assignment) -> LaunchRequest:
    """Run a fresh agent on `runtime`: re-attach, receive the server's sync, then the replica exits."""
    runtime.launches.clear()
    old = await runtime.launch(LaunchRequest(assignment, "n-1", "n1", 1, {}, Path("/dev/null")))
    h.supervisor.state.running.clear()
    local_state.save(h.supervisor.files.agent_state_file, local_state.AgentState(
        1, 1, {"echo-a": local_state.RunningRecord(dataclasses.replace(assignment, secret_env={}), old, 1)}))
    runtime.launches.clear()
    await h.supervisor.reattach()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.supervisor.run)
        h.supervisor.apply_sync(Sync(1, 1, (assignment,)))
        runtime.crash("echo-a")
        while not runtime.launches:
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    return runtime.launches[0]
