"""The process runtime with real processes: launch, env, logs, exit codes, stop, rediscovery."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from vectorlay.core.launch_inputs import MAX_ARG_BYTES
from vectorlay.core.model import Assignment, ClusterSpec
from vectorlay.errors import RuntimeFailure
from vectorlay.node.process_runtime import ProcessRuntime, expand_command, process_start_time
from vectorlay.node.runtime import LaunchRequest


def request(tmp_path: Path, command: tuple[str, ...], replica_id: str = "r-1", node_id: str = "n-test") -> LaunchRequest:
    spec = ClusterSpec(name="c", replicas=1, command=command)
    env = {"PORT": "4321", "VECTORLAY_REPLICA": replica_id, "VECTORLAY_NODE_ID": node_id, "GREETING": "hi"}
    return LaunchRequest(Assignment(replica_id, "c", 1, spec), node_id, "n", 4321, env, tmp_path / f"{replica_id}.log")


def test_command_expansion_uses_the_replica_env() -> None:
    assert expand_command(("serve", "--port", "${PORT}", "${MISSING}"), {"PORT": "80"}) == ["serve", "--port", "80",
                                                                                            "${MISSING}"]


async def test_launch_writes_output_to_the_log_and_reports_the_exit_code(tmp_path: Path) -> None:
    runtime = ProcessRuntime()
    script = "import os,sys; print('port', os.environ['PORT'], os.environ['GREETING']); " \
             "print('oops', file=sys.stderr); sys.exit(3)"
    handle = await runtime.launch(request(tmp_path, (sys.executable, "-c", script)))
    with trio.fail_after(10):
        exited = await runtime.wait(handle)
    assert exited.code == 3 and not exited.oom_killed
    log = (tmp_path / "r-1.log").read_text()
    assert "port 4321 hi" in log and "oops" in log
    assert not runtime.is_running(handle)


async def test_stop_terminates_the_whole_process_group(tmp_path: Path) -> None:
    runtime = ProcessRuntime()
    # The replica starts a child of its own; stopping the replica must take the child too.
    script = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']);" \
             " print('up', flush=True); time.sleep(60)"
    handle = await runtime.launch(request(tmp_path, (sys.executable, "-c", script)))
    while "up" not in (tmp_path / "r-1.log").read_text():
        await trio.sleep(0.05)
    assert runtime.is_running(handle)
    [found] = runtime.list_running("n-test")
    assert (found.replica_id, found.pid, found.start_time) == ("r-1", handle.pid, handle.start_time)
    with trio.fail_after(10):
        await runtime.stop(handle, grace_s=5)
    assert not runtime.is_running(handle)
    assert runtime.list_running("n-test") == []
    assert live_members_of_group(handle.pid or 0) == []


def live_members_of_group(pgid: int) -> list[int]:
    """Pids in the process group that are still running (zombies awaiting a reaper do not count)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


async def test_a_process_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    runtime = ProcessRuntime()
    script = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    handle = await runtime.launch(request(tmp_path, (sys.executable, "-c", script)))
    while "up" not in (tmp_path / "r-1.log").read_text():
        await trio.sleep(0.05)
    started = trio.current_time()
    with trio.fail_after(10):
        await runtime.stop(handle, grace_s=0.5)
    assert trio.current_time() - started >= 0.5
    assert not runtime.is_running(handle)


async def test_a_missing_command_is_a_runtime_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="cannot start '/no/such/binary'"):
        await ProcessRuntime().launch(request(tmp_path, ("/no/such/binary",)))


async def test_a_reused_pid_is_not_mistaken_for_the_replica(tmp_path: Path) -> None:
    runtime = ProcessRuntime()
    handle = await runtime.launch(request(tmp_path, (sys.executable, "-c", "import time; time.sleep(60)")))
    assert process_start_time(handle.pid or 0) == handle.start_time
    impostor = type(handle)(handle.replica_id, handle.runtime, pid=handle.pid, start_time=(handle.start_time or 0) + 1)
    assert not runtime.is_running(impostor)
    await runtime.stop(handle, grace_s=5)


async def test_the_longest_argument_the_manifest_allows_is_the_longest_linux_takes(tmp_path: Path) -> None:
    # core.launch_inputs.MAX_ARG_BYTES is Linux's own limit (MAX_ARG_STRLEN less the NUL): an
    # argument that long starts, one byte more is refused by execve (E2BIG).
    runtime = ProcessRuntime()
    handle = await runtime.launch(request(tmp_path, ("true", "x" * MAX_ARG_BYTES)))
    with trio.fail_after(10):
        assert (await runtime.wait(handle)).code == 0
    with pytest.raises(RuntimeFailure, match="Argument list too long"):
        await runtime.launch(request(tmp_path, ("true", "x" * (MAX_ARG_BYTES + 1))))
