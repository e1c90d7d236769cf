"""The `container` runtime: a replica is an OCI container run by the podman (or docker) CLI.

Every call shells out with `trio.run_process` and reads JSON. Containers carry labels (node,
cluster, replica), so a restarted agent finds its own and never touches anyone else's. With
podman, the replica's log file is the container's stdout and stderr (the `passthrough` log
driver): output lands in the same bounded file as a process replica's, keeps landing there while
the agent is down, and nothing has to copy it. docker has no such driver: the agent follows
`docker logs` into the file while it watches the container.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from vectorlay.core.model import PullPolicy
from vectorlay.errors import RuntimeFailure
from vectorlay.node import container_args as args
from vectorlay.node.container_args import ContainerCli, Ulimits
from vectorlay.node.oci import runtime_for
from vectorlay.node.runtime import Exit, Handle, LaunchRequest

log = logging.getLogger("vectorlay.node")

CLI_TIMEOUT_S = 120.0  # any call but pull and wait; podman can hang on a stuck lock
PULL_TIMEOUT_S = 3600.0  # inference images are large
FOLLOW_DRAIN_S = 2.0
NPROC_CAP = 32768  # higher values are refused by runc on some hosts even where the agent has more
# What podman (4 and 5) and docker's CDI support say when no CDI spec on this node names a GPU the
# replica was given: the node's fault (its CDI spec is missing or stale), not the cluster's.
CDI_UNRESOLVABLE = "unresolvable cdi devices"
OOM_MARKER = "oom"  # the empty file conmon creates in its working directory when the container is OOM-killed


def host_ulimits() -> Ulimits:
    """The agent's own limits: a container may never raise its limits above what podman has."""
    nofile_soft, nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc_soft, nproc_hard = resource.getrlimit(resource.RLIMIT_NPROC)

    def cap(value: int, limit: int) -> int:
        return limit if value == resource.RLIM_INFINITY or value > limit else value

    return Ulimits(nofile=(cap(nofile_soft, 1 << 20), cap(nofile_hard, 1 << 20)),
                   nproc=(cap(nproc_soft, NPROC_CAP), cap(nproc_hard, NPROC_CAP)))


class ContainerRuntime:
    name = "container"

    def __init__(self, cli: ContainerCli, oci_runtimes: tuple[str, ...], ulimits: Ulimits | None = None) -> None:
        self.cli = cli
        self.oci_runtimes = oci_runtimes  # the ones that passed the node's checks, preferred first
        self.ulimits = ulimits or host_ulimits()

    # --- running the CLI ----------------------------------------------------------------------

    async def _run(self, *argv: str, timeout_s: float = CLI_TIMEOUT_S, cwd: Path | None = None,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        command = [self.cli.executable, *argv]
        try:
            with trio.fail_after(timeout_s):
                return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False,
                                              stdin=b"", cwd=cwd, env={**os.environ, **env} if env else None)
        except FileNotFoundError:
            raise RuntimeFailure(f"{self.cli.executable} is not installed on this node", node_fault=True) from None
        except OSError as error:
            raise RuntimeFailure(f"cannot run {self.cli.executable}: {error.strerror or error}") from None
        except trio.TooSlowError:
            raise RuntimeFailure(f"`{self.cli.executable} {argv[0]}` did not finish within {timeout_s:g}s") from None

    async def _inspect(self, kind: str, *refs: str) -> tuple[list[dict[str, Any]], str]:
        """`podman KIND inspect REFS` as JSON objects, and the error output (for refs not found)."""
        result = await self._run(kind, "inspect", *refs)
        try:
            found = json.loads(result.stdout or b"[]")
        except ValueError:
            raise RuntimeFailure(f"{self.cli.executable} {kind} inspect printed something that is not JSON") from None
        return [item for item in found if isinstance(item, dict)], result.stderr.decode(errors="replace")

    # --- images ---------------------------------------------------------------------------------

    async def resolve_image(self, ref: str, policy: PullPolicy, progress: Callable[[str], None] | None = None
                            ) -> tuple[str, str | None]:
        """Pull `ref` as its policy says; return the local image id and the digest it resolved to."""
        if policy is PullPolicy.ALWAYS:
            await self._pull(ref, progress)
        found, error = await self._inspect("image", ref)
        if not found:
            if policy is PullPolicy.NEVER:
                raise RuntimeFailure(f"image {ref} is not on this node and image_pull is never "
                                     f"({args.one_line(error)})", node_fault=True)
            await self._pull(ref, progress)
            found, error = await self._inspect("image", ref)
            if not found:
                raise RuntimeFailure(f"image {ref} was pulled but cannot be inspected: {args.one_line(error)}")
        image = found[0]
        return str(image["Id"]), args.image_digest(ref, image)

    async def _pull(self, ref: str, progress: Callable[[str], None] | None) -> None:
        if progress is not None:
            progress(f"pulling image {ref}")
        log.info("pulling image %s", ref)
        result = await self._run("pull", ref, timeout_s=PULL_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeFailure(f"pulling image {ref} failed: {_error(result)}")

    # --- the ReplicaRuntime protocol ------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> Handle:
        spec = request.assignment.spec
        if spec.image is None:
            raise RuntimeFailure("a container replica needs an image")
        oci_runtime = runtime_for(spec.isolation, self.oci_runtimes)
        if oci_runtime is None:
            raise RuntimeFailure(f"this node offers no {spec.isolation.value} isolation "
                                 f"(its OCI runtimes: {', '.join(self.oci_runtimes) or 'none'})", node_fault=True)
        image_id, digest = await self.resolve_image(spec.image, spec.image_pull, request.progress)
        name = args.container_name(request.assignment.replica_id)
        await self._remove_leftover(name, request.node_id)
        run_dir = request.runtime_dir
        await trio.to_thread.run_sync(_fresh_run_dir, run_dir)
        secret_env = args.SecretEnv.of(request)
        env_file = None
        if secret_env.file_text:
            env_file = await trio.to_thread.run_sync(_write_env_file, secret_env.file_text)
        try:
            argv = args.run_args(self.cli, request, image_id, oci_runtime, self.ulimits,
                                 str(env_file) if env_file else None)
            error = await self._start(argv[1:], request.log_path, run_dir, secret_env.cli_env)
        finally:
            if env_file is not None:
                env_file.unlink(missing_ok=True)  # read by `run`, which has returned: the container has it
        if error is not None:
            await self._remove(name)  # it may exist in state "created"
            raise RuntimeFailure(f"starting the container failed: {error}",
                                 node_fault=CDI_UNRESOLVABLE in error.lower())
        found, inspect_error = await self._inspect("container", name)
        if not found:
            raise RuntimeFailure(f"the container vanished right after it started: {args.one_line(inspect_error)}")
        container_id = str(found[0]["Id"])
        log.info("replica %s runs in container %s (%s, %s, image %s)", request.assignment.replica_id,
                 container_id[:12], oci_runtime, spec.image, digest or image_id[:19])
        return Handle(request.assignment.replica_id, self.name, container=container_id, image_digest=digest)

    async def _start(self, argv: list[str], log_path: Path, run_dir: Path, secret_env: dict[str, str]) -> str | None:
        """Run `run --detach` in `run_dir`; the error line if it failed. podman's conmon, which
        watches the container from then on, inherits that working directory and writes its
        `oom` marker there when the kernel kills the container for memory (see `wait`)."""
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        except OSError as error:
            raise RuntimeFailure(f"cannot open the log file {log_path}: {error.strerror or error}") from None
        if not self.cli.passthrough_logs:
            os.close(log_fd)  # docker's output reaches it through the log follower
            result = await self._run(*argv, cwd=run_dir, env=secret_env)
            return None if result.returncode == 0 else _error(result)
        # The log file is the container's stdout and stderr, and so podman's own stderr too: its
        # error is read back from what it appended there (where the user sees it as well).
        try:
            offset = os.fstat(log_fd).st_size
            with trio.fail_after(CLI_TIMEOUT_S):
                done = await trio.run_process([self.cli.executable, *argv], stdin=subprocess.DEVNULL,
                                              stdout=log_fd, stderr=log_fd, check=False, cwd=run_dir,
                                              env={**os.environ, **secret_env} if secret_env else None)
        except FileNotFoundError:
            raise RuntimeFailure(f"{self.cli.executable} is not installed on this node", node_fault=True) from None
        except OSError as error:
            raise RuntimeFailure(f"cannot run {self.cli.executable}: {error.strerror or error}") from None
        except trio.TooSlowError:
            raise RuntimeFailure(f"`{self.cli.executable} run` did not finish within {CLI_TIMEOUT_S:g}s") from None
        finally:
            os.close(log_fd)
        if done.returncode == 0:
            return None
        return args.one_line(await trio.to_thread.run_sync(_read_after, log_path, offset))

    async def wait(self, handle: Handle) -> Exit:
        assert handle.container is not None
        async with trio.open_nursery() as nursery:
            if not self.cli.passthrough_logs:
                nursery.start_soon(self._follow_logs, handle.container)
            result = await self._run("wait", handle.container, timeout_s=math.inf)
            # `logs --follow` ends by itself once the container stopped: let it copy the last lines.
            nursery.cancel_scope.deadline = trio.current_time() + FOLLOW_DRAIN_S
        exit_code = _exit_code(result.stdout) if result.returncode == 0 else None
        found, _ = await self._inspect("container", handle.container)
        oom_killed = bool(found) and await trio.to_thread.run_sync(_oom_killed, found[0])
        if oom_killed:
            log.warning("replica %s was killed for using more memory than its limit", handle.replica_id)
        await self._remove(handle.container)  # its output is in the log file; the next start is new
        return Exit(exit_code, oom_killed)

    async def _follow_logs(self, container: str) -> None:
        """docker only: copy the container's output into the replica's log file (named by a label).
        `--since` the file's last write, so a restarted agent continues where it stopped: a line
        may repeat, none is lost."""
        found, _ = await self._inspect("container", container)
        if not found or not _labels(found[0]).get(args.LABEL_LOG):
            return
        path = Path(_labels(found[0])[args.LABEL_LOG])
        since = await trio.to_thread.run_sync(_since, path)
        try:
            log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        except OSError as error:
            log.warning("cannot follow the logs of container %s: %s", container[:12], error)
            return
        try:
            await trio.run_process([self.cli.executable, "logs", "--follow", *since, container],
                                   stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, check=False)
        except OSError as error:
            log.warning("cannot follow the logs of container %s: %s", container[:12], error)
        finally:
            os.close(log_fd)

    async def stop(self, handle: Handle, grace_s: float) -> None:
        if handle.container is None:
            return
        result = await self._run("stop", "--time", str(max(0, round(grace_s))), handle.container,
                                 timeout_s=grace_s + CLI_TIMEOUT_S)
        if result.returncode != 0 and not _no_such(result.stderr):
            log.warning("stopping container %s failed: %s", handle.container[:12], _error(result))
        await self._remove(handle.container)

    async def _remove(self, ref: str) -> None:
        result = await self._run("rm", "--force", ref)
        if result.returncode != 0 and not _no_such(result.stderr):
            log.warning("removing container %s failed: %s", ref[:24], _error(result))

    async def _remove_leftover(self, name: str, node_id: str) -> None:
        """A container by this replica's name from an earlier start: ours to remove; anyone
        else's is left alone and the launch fails."""
        found, _ = await self._inspect("container", name)
        if not found:
            return
        if _labels(found[0]).get(args.LABEL_NODE) != node_id:
            raise RuntimeFailure(f"a container named {name} exists and was not created by this node")
        await self._remove(str(found[0]["Id"]))

    async def is_alive(self, handle: Handle) -> bool:
        if handle.container is None:
            return False
        found, error = await self._inspect("container", handle.container)
        if not found:
            if "no such" in error.lower() or "not known" in error.lower():
                return False
            raise RuntimeFailure(f"cannot inspect container {handle.container[:12]}: {args.one_line(error)}")
        running = bool((found[0].get("State") or {}).get("Running"))
        return running and _labels(found[0]).get(args.LABEL_REPLICA) == handle.replica_id

    async def list_owned(self, node_id: str) -> list[Handle]:
        result = await self._run("ps", "--all", "--quiet", "--no-trunc",
                                 "--filter", f"label={args.LABEL_NODE}={node_id}")
        if result.returncode != 0:
            raise RuntimeFailure(f"listing containers failed: {_error(result)}")
        ids = result.stdout.decode().split()
        if not ids:
            return []
        found, _ = await self._inspect("container", *ids)
        handles = []
        for container in found:
            labels = _labels(container)
            if labels.get(args.LABEL_NODE) == node_id and labels.get(args.LABEL_REPLICA):
                handles.append(Handle(labels[args.LABEL_REPLICA], self.name, container=str(container["Id"])))
        return handles


def secrets_dir() -> Path:
    """Where env files with secrets live for the moment `run` reads them: memory (tmpfs), never a
    disk, in a directory only this user can enter."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime_dir) if runtime_dir and Path(runtime_dir).is_dir() else Path("/dev/shm")
    return base / f"vectorlay-secrets-{os.getuid()}"


def _write_env_file(text: str) -> Path:
    directory = secrets_dir()
    directory.mkdir(mode=0o700, exist_ok=True)
    if directory.stat().st_uid != os.getuid() or directory.stat().st_mode & 0o077:
        raise RuntimeFailure(f"{directory} is not private to this user: refusing to write secrets there")
    path = directory / f"{secrets.token_hex(8)}.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def _fresh_run_dir(run_dir: Path) -> None:
    """The replica's run directory, private to the node, without an `oom` marker of a previous run."""
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (run_dir / OOM_MARKER).unlink(missing_ok=True)


def _oom_killed(container: dict[str, Any]) -> bool:
    """Whether the kernel killed the container for memory. podman says so in `State.OOMKilled`
    where it can tell; where it cannot (cgroup v1, gVisor's runsc), conmon still leaves its `oom`
    marker in the directory `run` ran in, named by our label."""
    if (container.get("State") or {}).get("OOMKilled"):
        return True
    run_dir = _labels(container).get(args.LABEL_RUN_DIR)
    if not run_dir:
        return False
    marker = Path(run_dir) / OOM_MARKER
    found = marker.exists()
    marker.unlink(missing_ok=True)
    return found


def _read_after(path: Path, offset: int) -> str:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(64 * 1024).decode(errors="replace")


def _exit_code(stdout: bytes) -> int | None:
    try:
        return int(stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _no_such(stderr: bytes) -> bool:
    text = stderr.decode(errors="replace").lower()
    return "no such container" in text or "no container with name or id" in text


def _labels(container: dict[str, Any]) -> dict[str, str]:
    labels = (container.get("Config") or {}).get("Labels") or {}
    return labels if isinstance(labels, dict) else {}


def _error(result: subprocess.CompletedProcess[bytes]) -> str:
    return args.one_line(result.stderr.decode(errors="replace"))


def _since(path: Path) -> list[str]:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return []
    return ["--since", f"{stat.st_mtime:.3f}"] if stat.st_size else []
