"""Converge the replicas on this node to the desired set the server sends.

One task per replica launches it, probes it, restarts it with backoff when it exits, and stops it
when it is no longer wanted. Each change is reported as a `ReplicaReport`; the agent forwards
the latest report per replica to the server.

A replica's failure is that replica's: whatever goes wrong while launching, watching, probing or
stopping one (a runtime error, a bug, an assignment no process can take) fails that replica with
the reason, and the agent goes on serving the others. Only cancellation passes through.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vectorlay.core import health
from vectorlay.core.launch_inputs import encoding_problem, launch_problem, replica_id_problem
from vectorlay.core.model import Assignment, ReplicaState, Runtime
from vectorlay.core.protocol import TUNNEL, Command, ReplicaReport, Sync
from vectorlay.errors import RuntimeFailure, VectorlayError
from vectorlay.node import local_state, logs
from vectorlay.node.exits import describe_exit
from vectorlay.node.faults import POISON_ENV, FaultPoints
from vectorlay.node.local_state import AgentState, RunningRecord
from vectorlay.node.probe import http_probe
from vectorlay.node.runtime import Exit, Handle, LaunchRequest, ReplicaRuntime
from vectorlay.node.secret_values import launchable
from vectorlay.node.state_dir import NodeStateDir

log = logging.getLogger("vectorlay.node")

Probe = Callable[[str, int, str, float], Awaitable[tuple[bool, str]]]

STOP_GRACE_S = 10.0
RESTART_BACKOFF_INITIAL_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
STABLE_RUN_S = 60.0  # a replica up this long has its restart backoff reset
ROTATE_CHECK_S = 5.0
STOP_RETRY_INITIAL_S = 1.0  # a stop that failed is tried again: the workload may still hold its GPUs
STOP_RETRY_MAX_S = 30.0
# Longer than any runtime needs on its own (the container runtime allows the grace plus 120 s for
# `stop` and 120 s for `rm`): a stop that hangs past this counts as failed and is tried again.
STOP_ATTEMPT_TIMEOUT_S = STOP_GRACE_S + 300.0
MAX_REASON_CHARS = 500  # a reason is one line in `get replicas`, not an exception's whole repr


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    name: str
    address: str  # where replicas are reachable from the proxy
    probe_host: str = "127.0.0.1"
    publish_ip: str = "127.0.0.1"  # the local IP container ports are published on (the advertised one)
    data_plane: str = "direct"  # tunnel: replicas listen on loopback, reached only through the tunnels

    @property
    def listen_host(self) -> str:
        """Where a process replica should listen (VECTORLAY_HOST): loopback behind tunnels, every
        address when proxies dial the node directly."""
        return "127.0.0.1" if self.data_plane == TUNNEL else "0.0.0.0"


@dataclass
class _Runner:
    assignment: Assignment
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    handle: Handle | None = None
    host_port: int | None = None
    image_digest: str | None = None
    restart_requested: bool = False
    done: trio.Event = field(default_factory=trio.Event)


class _Failed(Exception):
    """Ends one replica's run: the reason it failed, as reported to the server."""

    def __init__(self, reason: str, node_fault: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.node_fault = node_fault


def describe(error: BaseException) -> str:
    """One line for a failure: a runtime's own reason as it is; anything else (a bug, an OS error)
    with its type, which is most of what it says."""
    if isinstance(error, VectorlayError):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _innermost(error: BaseException) -> BaseException:
    """The failure inside the exception groups a nursery wraps it in."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _clean_reason(reason: str) -> str:
    """A reason goes to the server and into its database: never a NUL or a lone surrogate (say an
    exception quoted the bad value), never a page of text."""
    if encoding_problem(reason) is not None:
        reason = reason.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\\0")
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 3] + "..."


def pick_free_port(host: str = "0.0.0.0") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def replica_env(assignment: Assignment, identity: NodeIdentity, port: int, cuda_devices: str | None) -> dict[str, str]:
    env = {
        **assignment.spec.env,
        **assignment.secret_env,  # decrypted by the server for this replica only
        "PORT": str(port),
        "VECTORLAY_CLUSTER": assignment.cluster,
        "VECTORLAY_REPLICA": assignment.replica_id,
        "VECTORLAY_NODE": identity.name,
        "VECTORLAY_NODE_ID": identity.node_id,
        "VECTORLAY_HOST": identity.listen_host,
    }
    if cuda_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_devices
    return env


def cuda_visible_devices(gpu_uuids: tuple[str, ...]) -> str:
    """Real NVML UUIDs pass through; declared GPUs (`declared-N`) become their index N."""
    return ",".join(u.removeprefix("declared-") for u in gpu_uuids)


class Supervisor:
    def __init__(self, runtime: ReplicaRuntime, state_dir: Path, identity: NodeIdentity,
                 on_report: Callable[[ReplicaReport], None], probe: Probe = http_probe,
                 faults: FaultPoints = FaultPoints()) -> None:
        self.runtime = runtime
        self.faults = faults
        self.probe = probe
        self.identity = identity
        self.files = NodeStateDir(state_dir)
        self.run_dir = self.files.run_dir  # the runtime's own files, per replica (see LaunchRequest.run_dir)
        self.on_report = on_report
        self.state = AgentState()
        self.desired: dict[str, Assignment] = {}
        self.runners: dict[str, _Runner] = {}
        self.reports: dict[str, ReplicaReport] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    # --- state from the server --------------------------------------------------------------

    def apply_command(self, command: Command) -> bool:
        """Apply one command; False if it was already applied or is stale (ack it anyway)."""
        if command.seq <= self.state.applied_seq or command.generation < self.state.generation:
            return False
        self.state.applied_seq = command.seq
        self.state.generation = max(self.state.generation, command.generation)
        if command.op == "start" and command.assignment is not None:
            current = self.desired.get(command.replica_id)
            if current is None or current.generation <= command.assignment.generation:
                self.desired[command.replica_id] = command.assignment
        elif command.op == "stop":
            self.desired.pop(command.replica_id, None)
        elif command.op == "restart":
            runner = self.runners.get(command.replica_id)
            if runner is not None:
                runner.restart_requested = True
        self._save()
        self._changed.set()
        return True

    def apply_sync(self, sync: Sync) -> bool:
        if sync.generation < self.state.generation:
            log.warning("ignoring a stale desired state (generation %d < %d)", sync.generation, self.state.generation)
            return False
        self.state.generation = sync.generation
        self.state.applied_seq = max(self.state.applied_seq, sync.through_seq)
        self.desired = {a.replica_id: a for a in sync.assignments}
        self._save()
        self._changed.set()
        return True

    def local_address(self, replica_id: str) -> tuple[str, int] | None:
        """Where a replica this node runs now listens on this machine (for the tunnels), or None
        if it is not one of ours, not running, or being stopped."""
        runner = self.runners.get(replica_id)
        if runner is None or runner.handle is None or runner.host_port is None or replica_id not in self.desired:
            return None
        return self._probe_host(runner), runner.host_port

    def current_reports(self) -> list[ReplicaReport]:
        return [r for r in self.reports.values() if r.state is not ReplicaState.STOPPED]

    # --- startup: find what already runs ----------------------------------------------------

    async def reattach(self) -> None:
        """Adopt replicas a previous agent left running; stop any we cannot account for."""
        try:
            self.state = local_state.load(self.files.agent_state_file)
        except local_state.CorruptState as error:
            moved = local_state.set_aside(self.files.agent_state_file, self.files.corrupt_agent_state_file)
            log.warning("local state is corrupt (%s); moved to %s and recovering from the runtime", error, moved)
            self.state = AgentState()
        adopted: set[str] = set()
        for replica_id, record in list(self.state.running.items()):
            try:
                alive = await self.runtime.is_alive(record.handle)
            except Exception as error:
                # Unknown is treated as alive: watching it will tell, and it never runs twice.
                log.warning("cannot tell whether replica %s still runs (%s); re-attaching", replica_id,
                            describe(error))
                log.debug("replica %s: is_alive failed", replica_id, exc_info=error)
                alive = True
            if alive:
                runner = _Runner(record.assignment, handle=record.handle, host_port=record.host_port,
                                 image_digest=record.handle.image_digest)
                self.runners[replica_id] = runner
                self.desired[replica_id] = record.assignment
                adopted.add(replica_id)
                self._report(runner, await self._first_probe(runner))
            else:
                del self.state.running[replica_id]
        try:
            leftovers = await self.runtime.list_owned(self.identity.node_id)
        except Exception as error:
            log.warning("cannot list the replicas left on this node: %s", describe(error))
            log.debug("list_owned failed", exc_info=error)
            leftovers = []
        for handle in leftovers:
            if handle.replica_id not in adopted:
                log.warning("stopping replica %s (%s): not in local state", handle.replica_id,
                            f"container {handle.container[:12]}" if handle.container else f"pid {handle.pid}")
                await self._stop_handle(handle)
        if adopted:
            log.info("re-attached to %d running replica(s): %s", len(adopted), ", ".join(sorted(adopted)))
        self._save()

    async def _first_probe(self, runner: _Runner) -> ReplicaReport:
        check = runner.assignment.spec.health
        port = runner.host_port or 0
        state = ReplicaState.READY
        reason = ""
        if check is not None:
            try:
                ok, reason = await self.probe(self._probe_host(runner), port, check.path, check.timeout_s)
            except Exception as error:  # its probe loop will meet this again and fail it
                ok, reason = False, f"health probe failed: {describe(error)}"
            state = ReplicaState.READY if ok else ReplicaState.STARTING
        return self._make_report(runner, state, reason)

    # --- the loop ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for runner in self.runners.values():
                nursery.start_soon(self._run_replica, runner)
            nursery.start_soon(self._rotate_logs)
            task_status.started()
            while True:
                if self.desired:
                    self.faults.hit("converge")
                if any(POISON_ENV in a.spec.env for a in self.desired.values()):
                    self.faults.hit("poison")
                self._converge(nursery)
                await self._changed.wait()
                self._changed = trio.Event()

    def _converge(self, nursery: trio.Nursery) -> None:
        for replica_id, runner in list(self.runners.items()):
            if replica_id not in self.desired:
                runner.scope.cancel()
            elif runner.restart_requested:
                runner.restart_requested = False
                runner.scope.cancel()  # the runner sees it is still desired and starts again
        for replica_id, assignment in self.desired.items():
            if replica_id not in self.runners:
                runner = _Runner(assignment)
                self.runners[replica_id] = runner
                nursery.start_soon(self._run_replica, runner)

    async def _run_replica(self, runner: _Runner) -> None:
        """Run one replica until it is unwanted; any failure fails it, never the agent. If the
        agent itself is shutting down, the cancellation is not our scope's: it propagates and the
        workload is left running."""
        replica_id = runner.assignment.replica_id
        while True:
            with runner.scope:
                try:
                    await self._keep_running(runner)
                except Exception as error:
                    self._fail(runner, error)
                    await trio.sleep_forever()  # the server replaces it and stops this copy
            await self._stop_until_stopped(runner)
            if self.desired.get(replica_id) is runner.assignment:
                runner.scope = trio.CancelScope()  # a restart was requested: launch a new copy
                continue
            break
        if self.runners.get(replica_id) is runner:
            del self.runners[replica_id]
        self._report(runner, self._make_report(runner, ReplicaState.STOPPED, "stopped"))
        self._changed.set()  # it may be wanted again under a newer assignment

    async def _keep_running(self, runner: _Runner) -> None:
        """Launch (unless re-attached), probe, and restart with backoff when it exits."""
        backoff = RESTART_BACKOFF_INITIAL_S
        restarts = 0
        while True:
            if runner.handle is None:
                await self._launch(runner)
            started = trio.current_time()
            exited = await self._watch(runner)
            runner.handle = None
            self._forget_handle(runner)
            restarts += 1
            if trio.current_time() - started >= STABLE_RUN_S:
                backoff = RESTART_BACKOFF_INITIAL_S
            how = describe_exit(exited, runner.assignment.spec)
            reason = f"{how}; restarting in {backoff:g}s (restart {restarts})"
            log.warning("replica %s %s", runner.assignment.replica_id, reason)
            self._report(runner, self._make_report(runner, ReplicaState.STARTING, reason))
            await trio.sleep(backoff)
            backoff = min(RESTART_BACKOFF_MAX_S, backoff * 2)

    async def _launch(self, runner: _Runner) -> None:
        """Start the workload, or raise `_Failed` with the reason it cannot start."""
        runner.assignment, missing = launchable(runner.assignment, self.desired.get(runner.assignment.replica_id))
        assignment = runner.assignment
        if missing is not None:
            raise _Failed(missing)
        # Checked again here, not only at `apply`: this may come from an older server, or from
        # a state file, and must fail this replica rather than crash the agent in the runtime.
        problem = launch_problem(assignment)
        if problem is not None:
            raise _Failed(f"cannot be launched: {problem}")
        if runner.host_port is None:
            runner.host_port = pick_free_port()
        env = replica_env(assignment, self.identity, runner.host_port, cuda_visible_devices(assignment.gpus))

        def progress(note: str) -> None:
            self._report(runner, self._make_report(runner, ReplicaState.STARTING, note))

        request = LaunchRequest(assignment, self.identity.node_id, self.identity.name, runner.host_port, env,
                                self.files.replica_log(assignment.replica_id), self.identity.publish_ip,
                                progress, run_dir=self.files.replica_run_dir(assignment.replica_id))
        self._report(runner, self._make_report(runner, ReplicaState.STARTING, "launching"))
        try:
            runner.handle = await self.runtime.launch(request)
        except RuntimeFailure as error:
            raise _Failed(str(error), error.node_fault) from error
        except Exception as error:
            raise _Failed(f"failed to start: {describe(error)}") from error
        runner.image_digest = runner.handle.image_digest
        self.state.running[assignment.replica_id] = RunningRecord(assignment, runner.handle, runner.host_port)
        self._save()
        log.info("replica %s started on port %d", assignment.replica_id, runner.host_port)

    async def _watch(self, runner: _Runner) -> Exit:
        """Probe until the workload exits; return how it exited."""
        assert runner.handle is not None
        handle = runner.handle
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe_loop, runner)
            try:
                exited = await self.runtime.wait(handle)
            except Exception as error:
                # Whether it still runs is unknown: failed, and stopped (not started twice).
                raise _Failed(f"lost track of it: {describe(error)}") from error
            nursery.cancel_scope.cancel()
        return exited

    async def _probe_loop(self, runner: _Runner) -> None:
        check = runner.assignment.spec.health
        if check is None:
            self._report(runner, self._make_report(runner, ReplicaState.READY, ""))
            return
        current = health.ProbeState(since=trio.current_time())
        last = self.reports.get(runner.assignment.replica_id)
        if last is not None and last.state is ReplicaState.READY:
            current = health.ProbeState(ReplicaState.READY, since=trio.current_time())  # re-attached, serving
        interval = check.interval_s
        while True:
            try:
                ok, detail = await self.probe(self._probe_host(runner), runner.host_port or 0, check.path,
                                              check.timeout_s)
            except Exception as error:
                raise _Failed(f"health probe failed: {describe(error)}") from error
            current = health.on_probe(current, ok, detail, check, trio.current_time())
            self._report(runner, self._make_report(runner, current.state, current.reason))
            if current.state is ReplicaState.FAILED:
                log.warning("replica %s failed: %s", runner.assignment.replica_id, current.reason)
                return  # the server replaces it and stops this copy
            # Probe fast until the first success so a new replica joins routing quickly.
            await trio.sleep(interval if current.state is ReplicaState.READY else min(interval, 0.25))

    def _probe_host(self, runner: _Runner) -> str:
        """Containers are reachable where their port is published; processes on loopback."""
        publish_ip = self.identity.publish_ip
        if runner.assignment.spec.runtime is Runtime.CONTAINER and publish_ip not in ("0.0.0.0", "::"):
            return publish_ip
        return self.identity.probe_host

    async def _stop_until_stopped(self, runner: _Runner) -> None:
        """Stop the workload, trying again with backoff until it is gone: until then it may still
        hold its GPUs and port, so it is not reported stopped (and the server keeps it as stopping)."""
        backoff = STOP_RETRY_INITIAL_S
        while True:
            with trio.CancelScope(shield=True):  # a stop once begun is finished, even by an agent shutting down
                try:
                    with trio.fail_after(STOP_ATTEMPT_TIMEOUT_S):
                        await self._stop(runner)
                    return
                except Exception as error:
                    reason = _clean_reason(f"stopping it failed: {describe(error)}; trying again in {backoff:g}s")
                    log.warning("replica %s: %s", runner.assignment.replica_id, reason)
                    log.debug("replica %s: stop failed", runner.assignment.replica_id, exc_info=error)
                    self._report(runner, self._make_report(runner, ReplicaState.FAILED, reason))
            await trio.sleep(backoff)
            backoff = min(STOP_RETRY_MAX_S, backoff * 2)

    async def _stop(self, runner: _Runner) -> None:
        if runner.handle is not None:
            await self.runtime.stop(runner.handle, STOP_GRACE_S)
            runner.handle = None
        self._forget_handle(runner)

    async def _stop_handle(self, handle: Handle) -> None:
        """Stop a workload no replica of ours accounts for; the next start tries again if this fails."""
        try:
            await self.runtime.stop(handle, STOP_GRACE_S)
        except Exception as error:
            log.warning("stopping replica %s failed: %s", handle.replica_id, describe(error))
            log.debug("replica %s: stop failed", handle.replica_id, exc_info=error)

    def _forget_handle(self, runner: _Runner) -> None:
        if self.state.running.pop(runner.assignment.replica_id, None) is not None:
            self._save()

    async def _rotate_logs(self) -> None:
        while True:
            await trio.sleep(ROTATE_CHECK_S)
            for replica_id in list(self.runners):
                if replica_id_problem(replica_id) is not None:
                    continue  # never launched (so no log), and not a name to build a path from
                try:
                    await trio.to_thread.run_sync(logs.rotate_if_large, self.files.replica_log(replica_id))
                except OSError as error:
                    log.warning("cannot rotate the log of replica %s: %s", replica_id, error)

    async def stop_all(self) -> None:
        """Stop every replica now; for `vectorlay dev`, whose replicas should not outlive it.
        One that cannot be stopped does not keep the others running."""
        for runner in list(self.runners.values()):
            try:
                with trio.fail_after(STOP_ATTEMPT_TIMEOUT_S):
                    await self._stop(runner)
            except Exception as error:
                log.warning("stopping replica %s failed: %s", runner.assignment.replica_id, describe(error))

    # --- reports ----------------------------------------------------------------------------

    def _fail(self, runner: _Runner, error: Exception) -> None:
        failure = _innermost(error)
        if isinstance(failure, _Failed):
            reason, node_fault = failure.reason, failure.node_fault
        else:
            reason, node_fault = describe(failure), False
        reason = _clean_reason(reason)
        replica_id = runner.assignment.replica_id
        log.warning("replica %s failed: %s", replica_id, reason)
        log.debug("replica %s failed here", replica_id, exc_info=failure)
        self._report(runner, self._make_report(runner, ReplicaState.FAILED, reason, node_fault))

    def _make_report(self, runner: _Runner, state: ReplicaState, reason: str,
                     node_fault: bool = False) -> ReplicaReport:
        address = f"{self.identity.address}:{runner.host_port}" if runner.host_port else None
        return ReplicaReport(runner.assignment.replica_id, runner.assignment.generation, state,
                             _clean_reason(reason), address, runner.image_digest, node_fault)

    def _report(self, runner: _Runner, report: ReplicaReport) -> None:
        if self.reports.get(report.replica_id) == report:
            return
        self.reports[report.replica_id] = report
        self.on_report(report)

    def report_sent(self, report: ReplicaReport) -> None:
        if report.state is ReplicaState.STOPPED and self.reports.get(report.replica_id) == report:
            del self.reports[report.replica_id]

    def _save(self) -> None:
        local_state.save(self.files.agent_state_file, self.state)
