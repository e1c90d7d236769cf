"""The `process` runtime: a replica is a plain process on the node's host (no isolation).

Processes run in their own session, with stdout and stderr appended straight to the replica's log
file, so they outlive an agent restart; the agent finds them again by pid and kernel start time,
or by scanning /proc for the node id in their environment when its local state is lost.
"""

from __future__ import annotations

import errno
import os
import signal
import string
import subprocess
from functools import partial
from pathlib import Path

import trio

from vectorlay.errors import RuntimeFailure
from vectorlay.node.runtime import Exit, Handle, LaunchRequest

PROC = Path("/proc")


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: start time in clock ticks since boot (None if gone)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None  # a zombie is as good as gone
    return int(fields[19])


def expand_command(command: tuple[str, ...], env: dict[str, str]) -> list[str]:
    """Replace ${VAR} from the replica's environment; unknown names stay as written."""
    return [string.Template(part).safe_substitute(env) for part in command]


class ProcessRuntime:
    name = "process"

    def __init__(self, base_env: dict[str, str] | None = None) -> None:
        self.base_env = dict(os.environ if base_env is None else base_env)

    async def launch(self, request: LaunchRequest) -> Handle:
        spec = request.assignment.spec
        env = {**self.base_env, **request.env}
        argv = expand_command(spec.command, env)
        request.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(request.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            process = await trio.to_thread.run_sync(partial(
                subprocess.Popen, argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=env,
                cwd=spec.workdir or None, start_new_session=True, close_fds=True,
            ))
        except OSError as error:
            raise RuntimeFailure(f"cannot start {argv[0]!r}: {error.strerror or error}") from None
        finally:
            os.close(log_fd)
        start_time = process_start_time(process.pid)
        # Popen would reap the child itself when collected; we reap it in `wait` instead.
        process.returncode = 0
        return Handle(request.assignment.replica_id, self.name, pid=process.pid, start_time=start_time)

    def is_running(self, handle: Handle) -> bool:
        return handle.pid is not None and process_start_time(handle.pid) == handle.start_time

    async def is_alive(self, handle: Handle) -> bool:
        return self.is_running(handle)

    async def wait(self, handle: Handle) -> Exit:
        assert handle.pid is not None
        try:
            pidfd = os.pidfd_open(handle.pid)
        except ProcessLookupError:
            return Exit(self._reap(handle.pid))
        try:
            if self.is_running(handle):
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return Exit(self._reap(handle.pid))

    @staticmethod
    def _reap(pid: int) -> int | None:
        """Exit code of our own child; None for a process we re-attached to (not our child)."""
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        return os.waitstatus_to_exitcode(status) if reaped else None

    async def stop(self, handle: Handle, grace_s: float) -> None:
        if handle.pid is None:
            return
        if not self.is_running(handle):
            self._reap(handle.pid)
            return
        _signal_group(handle.pid, signal.SIGTERM)
        with trio.move_on_after(grace_s):
            await self.wait(handle)
            return
        _signal_group(handle.pid, signal.SIGKILL)
        with trio.move_on_after(5):
            await self.wait(handle)

    async def list_owned(self, node_id: str) -> list[Handle]:
        return await trio.to_thread.run_sync(self.list_running, node_id)

    def list_running(self, node_id: str) -> list[Handle]:
        found = []
        own_namespace = _pid_namespace(PROC / "self")
        for entry in PROC.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if _pid_namespace(entry) != own_namespace:
                continue  # a container replica's process: it carries the same variables, but is not ours
            values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if values.get(b"VECTORLAY_NODE_ID") != node_id.encode():
                continue
            replica = values.get(b"VECTORLAY_REPLICA", b"").decode()
            pid = int(entry.name)
            try:
                leader = os.getpgid(pid) == pid  # the replica itself, not its children
            except ProcessLookupError:
                continue
            start_time = process_start_time(pid)
            if replica and leader and start_time is not None:
                found.append(Handle(replica, self.name, pid=pid, start_time=start_time))
        return found


def _pid_namespace(entry: Path) -> str | None:
    try:
        return os.readlink(entry / "ns" / "pid")
    except OSError:
        return None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except OSError as error:
        if error.errno != errno.ESRCH:
            raise
