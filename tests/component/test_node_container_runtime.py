"""The container runtime against real podman and runc (and gVisor's runsc), with a busybox image
built locally: what a replica gets (port, env, limits, labels, logs), how it ends, and how every
failure becomes one readable reason instead of a crash."""

from __future__ import annotations

import dataclasses
import json
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from tests_support import missing_service

from testsupport.images import build_image, container_prerequisites
from testsupport.processes import remove_containers
from vectorlay.core.model import Assignment, ClusterSpec, HealthCheck, Isolation, PullPolicy, Resources, Runtime
from vectorlay.errors import RuntimeFailure
from vectorlay.node.container_args import ContainerCli, Ulimits
from vectorlay.node.container_runtime import ContainerRuntime, host_ulimits
from vectorlay.node.process_runtime import ProcessRuntime
from vectorlay.node.runtime import Exit, Handle, LaunchRequest
from vectorlay.node.supervisor import pick_free_port

IMAGE = "localhost/vectorlay/busybox-httpd:test"


@pytest.fixture(scope="module")
def image() -> str:
    reason = container_prerequisites("runc")
    if reason:
        missing_service(reason)
    build_image(IMAGE)
    return IMAGE


@pytest.fixture
def node_id() -> Iterator[str]:
    node = f"n-test-{secrets.token_hex(4)}"
    yield node
    remove_containers(node)


def request(tmp_path: Path, node_id: str, image: str | None = IMAGE, *, command: tuple[str, ...] = (),
            isolation: Isolation = Isolation.CONTAINER, pull: PullPolicy = PullPolicy.IF_NOT_PRESENT,
            resources: Resources = Resources(), gpus: tuple[str, ...] = (), progress: list[str] | None = None
            ) -> LaunchRequest:
    replica = f"web-{secrets.token_hex(3)}"
    spec = ClusterSpec(name="web", replicas=1, runtime=Runtime.CONTAINER, image=image, command=command,
                       env={"GREETING": "hello there"}, port=8000, health=HealthCheck(), isolation=isolation,
                       image_pull=pull, resources=resources)
    port = pick_free_port()
    env = {"GREETING": "hello there", "PORT": str(port), "VECTORLAY_REPLICA": replica, "VECTORLAY_NODE_ID": node_id}
    notes = progress if progress is not None else []
    return LaunchRequest(Assignment(replica, "web", 1, spec, gpus), node_id, "node-a", port, env,
                         tmp_path / "logs" / f"{replica}.log", "127.0.0.1", notes.append)


def runtime(*oci: str) -> ContainerRuntime:
    return ContainerRuntime(ContainerCli("podman"), oci or ("runc",))


async def podman(*args: str, check: bool = False) -> str:
    result = await trio.run_process(["podman", *args], capture_stdout=True, capture_stderr=True, check=check)
    return result.stdout.decode()


async def inspect(container: str) -> dict[str, Any]:
    found = json.loads(await podman("container", "inspect", container) or "[]")
    return found[0] if found else {}


async def get(port: int, path: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return str(response.read().decode())

    last: Exception | None = None
    for _ in range(100):
        try:
            return await trio.to_thread.run_sync(fetch)
        except OSError as error:
            last = error
            await trio.sleep(0.1)
    raise AssertionError(f"GET {path} on port {port} never answered: {last}")


async def test_a_replica_gets_its_port_env_limits_labels_and_log(tmp_path: Path, image: str, node_id: str) -> None:
    rt = runtime()
    req = request(tmp_path, node_id, resources=Resources(cpus=0.5, memory_mb=64))
    handle = await rt.launch(req)
    try:
        assert handle.runtime == "container" and handle.container
        assert await rt.is_alive(handle)

        env = await get(req.host_port, "/cgi-bin/env")
        assert "GREETING=hello there" in env
        assert "PORT=8000" in env  # the port inside its container, not the host's
        assert f"VECTORLAY_REPLICA={req.assignment.replica_id}" in env

        details = await inspect(handle.container)
        host = details["HostConfig"]
        assert host["Memory"] == 64 * 2**20 and host["NanoCpus"] == 500_000_000
        limits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]}
        expected = host_ulimits()
        assert limits["RLIMIT_NOFILE"] == expected.nofile and limits["RLIMIT_NPROC"] == expected.nproc
        assert details["OCIRuntime"] == "runc"
        labels = details["Config"]["Labels"]
        assert labels["vectorlay.node"] == node_id and labels["vectorlay.replica"] == req.assignment.replica_id
        assert labels["vectorlay.cluster"] == "web"

        # The digest is what podman resolved the tag to.
        image_info = json.loads(await podman("image", "inspect", image))[0]
        assert handle.image_digest == image_info["Digest"] and (handle.image_digest or "").startswith("sha256:")

        # Output lands in the replica's log file, like a process replica's.
        assert await get(req.host_port, "/") == "hello from vectorlay busybox httpd\n"
        with trio.fail_after(10):
            while "response:200" not in req.log_path.read_text():
                await trio.sleep(0.1)
        assert f"busybox httpd on port 8000 (replica {req.assignment.replica_id})" in req.log_path.read_text()

        # Found by its labels, for this node only.
        assert [(h.replica_id, h.container) for h in await rt.list_owned(node_id)] == \
            [(req.assignment.replica_id, handle.container)]
        assert await rt.list_owned(node_id + "-other") == []
        # Its processes carry the replica's variables, yet the process runtime never claims them.
        assert await ProcessRuntime().list_owned(node_id) == []
    finally:
        await rt.stop(handle, 5)
    assert not await rt.is_alive(handle)
    assert await inspect(handle.container) == {}  # removed, not just stopped
    await rt.stop(handle, 5)  # stopping what is gone is harmless


async def test_an_exit_gives_its_code_and_leaves_nothing_behind(tmp_path: Path, image: str, node_id: str) -> None:
    rt = runtime()
    req = request(tmp_path, node_id, command=("sh", "-c", "echo bye from $VECTORLAY_REPLICA; exit 3"))
    handle = await rt.launch(req)
    with trio.fail_after(60):
        assert await rt.wait(handle) == Exit(3)
    assert f"bye from {req.assignment.replica_id}" in req.log_path.read_text()
    assert await rt.list_owned(node_id) == []


async def test_secrets_reach_the_container_but_never_the_cli_command_line(
        tmp_path: Path, image: str, node_id: str) -> None:
    """`ps` shows every process's command line to every user of the node: secrets go to podman in
    an env file on tmpfs that only this user can read, removed once the container runs (a value
    with a line break, which an env file cannot hold, in podman's own environment)."""
    seen = tmp_path / "seen"
    wrapper = tmp_path / "podman"
    wrapper.write_text(f"""#!/bin/sh
printf '%s\\n' "$@" >> {seen}/argv
prev=
for arg in "$@"; do
  if [ "$prev" = --env-file ]; then stat -c '%a' "$arg" >> {seen}/mode; stat -f -c '%T' "$arg" >> {seen}/fs; echo "$arg" >> {seen}/path; fi
  prev=$arg
done
exec podman "$@"
""")
    wrapper.chmod(0o755)
    seen.mkdir()
    base = request(tmp_path, node_id)
    token, pem = "hf_s3cr3t_value_42", "-----BEGIN KEY-----\nline two\n-----END KEY-----"
    spec = dataclasses.replace(base.assignment.spec, env_from_secret={"HF_TOKEN": "hf-token", "PEM": "pem"})
    assignment = dataclasses.replace(base.assignment, spec=spec, secret_env={"HF_TOKEN": token, "PEM": pem})
    req = dataclasses.replace(base, assignment=assignment, env={**base.env, "HF_TOKEN": token, "PEM": pem})
    rt = ContainerRuntime(ContainerCli(str(wrapper)), ("runc",))
    handle = await rt.launch(req)
    try:
        env = await get(req.host_port, "/cgi-bin/env")
        lines = env.splitlines()  # `env | sort`: the value's other lines are sorted apart
        assert f"HF_TOKEN={token}" in lines
        assert {"PEM=-----BEGIN KEY-----", "line two", "-----END KEY-----"} <= set(lines)
        argv = (seen / "argv").read_text()
        assert token not in argv and "line two" not in argv and "GREETING=hello there" in argv
        assert (seen / "mode").read_text().split() == ["600"]
        assert (seen / "fs").read_text().split() == ["tmpfs"]
        assert not await trio.Path((seen / "path").read_text().strip()).exists()  # removed once the container ran
    finally:
        await rt.stop(handle, 5)


MEMORY_HOG = ("sh", "-c", "x=0123456789abcdef; while true; do x=$x$x; done")


@pytest.mark.parametrize(("oci", "memory_mb"), [("runc", 16), ("runsc", 64)])
async def test_a_container_killed_for_its_memory_says_so_and_leaves_no_file_behind(
        tmp_path: Path, image: str, node_id: str, monkeypatch: pytest.MonkeyPatch, oci: str, memory_mb: int) -> None:
    """podman cannot always tell (cgroup v1, gVisor): conmon's `oom` marker, written in podman's
    working directory, is read from the replica's run dir in the node's state, not the user's."""
    reason = container_prerequisites(oci)
    if reason:
        missing_service(reason)
    where_the_user_is = tmp_path / "cwd"
    where_the_user_is.mkdir()
    monkeypatch.chdir(where_the_user_is)
    rt = runtime("runc", oci)
    isolation = Isolation.SANDBOX if oci == "runsc" else Isolation.CONTAINER
    req = request(tmp_path, node_id, command=MEMORY_HOG, isolation=isolation,
                  resources=Resources(memory_mb=memory_mb))
    handle = await rt.launch(req)
    with trio.fail_after(120):
        exited = await rt.wait(handle)
    assert exited == Exit(137, oom_killed=True)
    assert list(where_the_user_is.iterdir()) == []
    assert req.runtime_dir == req.log_path.with_name(f"{req.assignment.replica_id}.run")
    assert not (req.runtime_dir / "oom").exists()  # read and removed: the next run starts clean
    # The same exit code without the kernel's kill is not taken for one.
    again = await rt.launch(request(tmp_path, node_id, command=("sh", "-c", "exit 137")))
    with trio.fail_after(60):
        assert await rt.wait(again) == Exit(137)


async def test_pull_policies_and_pull_failures_give_reasons(tmp_path: Path, image: str, node_id: str) -> None:
    rt = runtime()
    # `never` with an image that is not here: this node's fault, another node may have it.
    with pytest.raises(RuntimeFailure, match=r"image localhost/vectorlay/absent:1 is not on this node and "
                                             r"image_pull is never") as missing:
        await rt.launch(request(tmp_path, node_id, "localhost/vectorlay/absent:1", pull=PullPolicy.NEVER))
    assert missing.value.node_fault
    # A registry that is not there (a closed port on loopback): the pull fails, with podman's reason.
    notes: list[str] = []
    with pytest.raises(RuntimeFailure, match=r"pulling image 127\.0\.0\.1:9/vectorlay/absent:1 failed: .+") as failed:
        await rt.launch(request(tmp_path, node_id, "127.0.0.1:9/vectorlay/absent:1", progress=notes))
    assert "\n" not in str(failed.value)
    assert not failed.value.node_fault  # the same registry is as far from every node
    assert notes == ["pulling image 127.0.0.1:9/vectorlay/absent:1"]
    # `always` pulls even a local image: the locally built one has no registry behind it.
    with pytest.raises(RuntimeFailure, match="pulling image localhost/vectorlay/busybox-httpd:test failed"):
        await rt.launch(request(tmp_path, node_id, image, pull=PullPolicy.ALWAYS))
    # A digest pin is honoured: the right digest runs, a wrong one is refused.
    digest = (await rt.resolve_image(image, PullPolicy.NEVER))[1]
    assert digest is not None
    pinned = f"localhost/vectorlay/busybox-httpd@{digest}"
    assert (await rt.resolve_image(pinned, PullPolicy.NEVER))[1] == digest
    with pytest.raises(RuntimeFailure, match="is not on this node"):
        await rt.resolve_image("localhost/vectorlay/busybox-httpd@sha256:" + "0" * 64, PullPolicy.NEVER)
    assert await rt.list_owned(node_id) == []


async def test_a_start_failure_is_podmans_reason_in_one_line(tmp_path: Path, image: str, node_id: str) -> None:
    rt = runtime()
    # No CDI spec names this GPU, so podman refuses to start the container.
    req = request(tmp_path, node_id, gpus=("GPU-00000000-0000-0000-0000-000000000000",))
    with pytest.raises(RuntimeFailure, match=r"starting the container failed: .*nvidia\.com/gpu="
                                             r"GPU-00000000-0000-0000-0000-000000000000") as failed:
        await rt.launch(req)
    assert "\n" not in str(failed.value)
    assert failed.value.node_fault  # a GPU this node's CDI spec does not map: another node may
    assert await rt.list_owned(node_id) == []  # the half-created container was removed


async def test_ulimits_the_host_refuses_are_a_reason_not_a_crash(tmp_path: Path, image: str, node_id: str) -> None:
    # More open files than the kernel allows anyone (fs.nr_open): what podman's defaults run into.
    rt = ContainerRuntime(ContainerCli("podman"), ("runc",), Ulimits(nofile=(1 << 30, 1 << 30), nproc=(64, 64)))
    with pytest.raises(RuntimeFailure, match="starting the container failed: .*rlimit"):
        await rt.launch(request(tmp_path, node_id))


async def test_missing_podman_and_missing_isolation_are_clear_failures(tmp_path: Path, node_id: str) -> None:
    absent = ContainerRuntime(ContainerCli("/nonexistent/podman"), ("runc",))
    with pytest.raises(RuntimeFailure, match="/nonexistent/podman is not installed on this node") as no_podman:
        await absent.launch(request(tmp_path, node_id))
    assert no_podman.value.node_fault
    with pytest.raises(RuntimeFailure, match="is not installed"):
        await absent.list_owned(node_id)
    with pytest.raises(RuntimeFailure, match=r"this node offers no microvm isolation \(its OCI runtimes: runc\)") as no_vm:
        await runtime("runc").launch(request(tmp_path, node_id, isolation=Isolation.MICROVM))
    assert no_vm.value.node_fault


async def test_a_container_someone_else_made_is_never_touched(tmp_path: Path, image: str, node_id: str) -> None:
    req = request(tmp_path, node_id)
    name = f"vectorlay-{req.assignment.replica_id}"
    await podman("create", "--name", name, image, check=True)
    try:
        with pytest.raises(RuntimeFailure, match=f"a container named {name} exists and was not created by this node"):
            await runtime().launch(req)
        assert await inspect(name) != {}
        assert await runtime().list_owned(node_id) == []
        assert not await runtime().is_alive(Handle(req.assignment.replica_id, "container", container=name))
    finally:
        await podman("rm", "--force", name)


async def test_a_sandbox_replica_runs_under_gvisor(tmp_path: Path, image: str, node_id: str) -> None:
    reason = container_prerequisites("runsc")
    if reason:
        missing_service(reason)
    rt = runtime("runc", "runsc")
    req = request(tmp_path, node_id, isolation=Isolation.SANDBOX)
    handle = await rt.launch(req)
    try:
        assert handle.container
        assert (await inspect(handle.container))["OCIRuntime"] == "runsc"
        assert "GREETING=hello there" in await get(req.host_port, "/cgi-bin/env")
    finally:
        await rt.stop(handle, 5)
    assert await inspect(handle.container) == {}


def docker_daemon() -> bool:
    import shutil
    import subprocess

    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


async def test_docker_runs_a_replica_with_the_same_flags(tmp_path: Path, node_id: str) -> None:
    # podman is what nodes use by default; scripts/system-deps installs and starts docker for this.
    if container_prerequisites("runc") or not await trio.to_thread.run_sync(docker_daemon):
        missing_service("a docker daemon (`docker info` fails)")
    await trio.to_thread.run_sync(build_image, IMAGE, "docker")
    rt = ContainerRuntime(ContainerCli.named("docker"), ("runc",))
    req = request(tmp_path, node_id)
    handle = await rt.launch(req)
    try:
        assert handle.container and await rt.is_alive(handle)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rt.wait, handle)  # follows `docker logs` into the replica's log file
            assert "GREETING=hello there" in await get(req.host_port, "/cgi-bin/env")
            assert await get(req.host_port, "/") == "hello from vectorlay busybox httpd\n"
            with trio.fail_after(10):
                while "response:200" not in req.log_path.read_text():
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        assert [h.container for h in await rt.list_owned(node_id)] == [handle.container]
    finally:
        await rt.stop(handle, 2)
    assert await rt.list_owned(node_id) == []

    ending = request(tmp_path, node_id, command=("sh", "-c", "echo bye from docker; exit 4"))
    handle = await rt.launch(ending)
    with trio.fail_after(60):
        assert await rt.wait(handle) == Exit(4)
    assert "bye from docker" in ending.log_path.read_text()
    assert await rt.list_owned(node_id) == []
