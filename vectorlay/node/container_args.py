"""The command lines the container runtime runs, built without I/O so they can be read and tested.

podman and docker take the same flags for everything here except two: the OCI runtime's own
flags (podman `--runtime-flag`; docker reads them from its daemon.json) and logs (podman's
`passthrough` log driver hands the replica's log file to the container as its stdout and stderr;
docker has no such driver, so its logs are bounded json files the agent follows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vectorlay.node.oci import PIDS_LIMITS, RUNTIME_FLAGS
from vectorlay.node.process_runtime import expand_command
from vectorlay.node.runtime import LaunchRequest

LABEL_NODE = "vectorlay.node"
LABEL_NODE_NAME = "vectorlay.node-name"
LABEL_CLUSTER = "vectorlay.cluster"
LABEL_REPLICA = "vectorlay.replica"
LABEL_GENERATION = "vectorlay.generation"
LABEL_IMAGE = "vectorlay.image"
LABEL_LOG = "vectorlay.log"  # the replica's log file, for docker's log follower
LABEL_RUN_DIR = "vectorlay.run-dir"  # where `run` ran: conmon leaves its `oom` marker there

DOCKER_LOG_OPTS = ("--log-opt", "max-size=10m", "--log-opt", "max-file=2")


@dataclass(frozen=True)
class ContainerCli:
    """Which CLI to run (`podman`, `docker`, or a path to either) and which dialect it speaks."""

    executable: str = "podman"
    dialect: str = "podman"  # "podman" | "docker"

    @property
    def passthrough_logs(self) -> bool:
        return self.dialect == "podman"

    @classmethod
    def named(cls, name: str) -> ContainerCli:
        dialect = "docker" if name.rsplit("/", 1)[-1].startswith("docker") else "podman"
        return cls(name, dialect)


@dataclass(frozen=True)
class Ulimits:
    """Explicit limits for the container's processes, as (soft, hard). Passing them is not optional:
    podman's defaults (1048576 open files) exceed what many hosts let a container raise to, and
    runc then refuses to start the container at all."""

    nofile: tuple[int, int]
    nproc: tuple[int, int]


def container_name(replica_id: str) -> str:
    return f"vectorlay-{replica_id}"


def cdi_device(gpu_uuid: str) -> str:
    """The CDI name of a GPU: by UUID for NVML's GPUs, by index for `--gpu` declarations."""
    if gpu_uuid.startswith("declared-"):
        return f"nvidia.com/gpu={gpu_uuid.removeprefix('declared-')}"
    return f"nvidia.com/gpu={gpu_uuid}"


def container_env(request: LaunchRequest) -> dict[str, str]:
    """The replica's environment as seen inside its container: it listens on `spec.port` there
    (the host port is the agent's business), and sees only its own GPUs, numbered from 0."""
    spec = request.assignment.spec
    env = {**request.env, "PORT": str(spec.port)}
    gpus = request.assignment.gpus
    if any(uuid.startswith("declared-") for uuid in gpus):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(gpus)))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def labels(request: LaunchRequest) -> dict[str, str]:
    assignment = request.assignment
    return {
        LABEL_NODE: request.node_id,
        LABEL_NODE_NAME: request.node_name,
        LABEL_CLUSTER: assignment.cluster,
        LABEL_REPLICA: assignment.replica_id,
        LABEL_GENERATION: str(assignment.generation),
        LABEL_IMAGE: assignment.spec.image or "",
        LABEL_LOG: str(request.log_path),
        LABEL_RUN_DIR: str(request.runtime_dir),
    }


@dataclass(frozen=True)
class SecretEnv:
    """How a replica's secrets reach the container CLI without appearing on its command line,
    which every user of the node can read (`ps`): in an env file only the CLI reads (`--env-file`),
    or, for a value an env file cannot hold (one with a line break), in the CLI's own environment
    (`--env NAME` takes the value from there; /proc/PID/environ is readable by its owner only)."""

    file_text: str  # KEY=VALUE lines for --env-file; "" if none
    cli_env: dict[str, str]  # for the CLI process's environment

    @classmethod
    def of(cls, request: LaunchRequest) -> SecretEnv:
        names = request.assignment.spec.env_from_secret
        env = container_env(request)
        in_file = {k: v for k, v in env.items() if k in names and "\n" not in v and "\r" not in v}
        return cls("".join(f"{k}={v}\n" for k, v in sorted(in_file.items())),
                   {k: v for k, v in env.items() if k in names and k not in in_file})


def run_args(cli: ContainerCli, request: LaunchRequest, image_id: str, oci_runtime: str, ulimits: Ulimits,
             env_file: str | None = None) -> list[str]:
    """`podman run --detach ...` for one replica, running the already resolved `image_id`.
    Secrets (`spec.env_from_secret`) are not in it: they come from `env_file`, where `SecretEnv`
    put them, and by name from the CLI's environment."""
    spec = request.assignment.spec
    argv = [cli.executable]
    if cli.dialect == "podman":
        for flag in RUNTIME_FLAGS.get(oci_runtime, ()):
            argv += ["--runtime-flag", flag]
    argv += [
        "run", "--detach",
        "--name", container_name(request.assignment.replica_id),
        "--runtime", oci_runtime,
        # PID 1 that forwards signals and reaps zombies: `stop` works for any image's workload.
        "--init",
        "--security-opt", "no-new-privileges",
        "--publish", f"{_bracketed(request.host_ip)}:{request.host_port}:{spec.port}/tcp",
        "--ulimit", f"nofile={ulimits.nofile[0]}:{ulimits.nofile[1]}",
        "--ulimit", f"nproc={ulimits.nproc[0]}:{ulimits.nproc[1]}",
        "--pull", "never",  # pulled (or not) by policy before this
    ]
    if cli.passthrough_logs:
        argv += ["--log-driver", "passthrough"]
    else:
        argv += ["--log-driver", "json-file", *DOCKER_LOG_OPTS]
    for key, value in sorted(labels(request).items()):
        argv += ["--label", f"{key}={value}"]
    if spec.resources.cpus is not None:
        argv += ["--cpus", f"{spec.resources.cpus:g}"]
    if spec.resources.memory_mb is not None:
        argv += ["--memory", f"{spec.resources.memory_mb}m"]
    if oci_runtime in PIDS_LIMITS:
        argv += ["--pids-limit", str(PIDS_LIMITS[oci_runtime])]
    for uuid in request.assignment.gpus:
        argv += ["--device", cdi_device(uuid)]
    env = container_env(request)
    secrets = spec.env_from_secret
    if env_file is not None:
        argv += ["--env-file", env_file]
    for key, value in sorted(env.items()):
        if key not in secrets:
            argv += ["--env", f"{key}={value}"]
        elif "\n" in value or "\r" in value:
            argv += ["--env", key]  # the value is in the CLI's environment (SecretEnv.cli_env)
    argv.append(image_id)
    # The manifest refuses ${SECRET} in a command (a command line is public on the node); should
    # one get here, it stays unexpanded rather than leak.
    argv += expand_command(spec.command, {k: v for k, v in env.items() if k not in secrets})
    return argv


def _bracketed(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


# --- reading what the CLI answers ---------------------------------------------------------------


def image_digest(image_ref: str, inspected: dict[str, Any]) -> str | None:
    """The manifest digest an image reference resolved to (`sha256:...`), or None if unknown
    (an image built locally with docker has none)."""
    if "@sha256:" in image_ref:
        return image_ref.rsplit("@", 1)[1]
    digest = inspected.get("Digest")
    if isinstance(digest, str) and digest.startswith("sha256:"):
        return digest  # podman
    repo = _repository(image_ref)
    repo_digests = [d for d in inspected.get("RepoDigests") or [] if isinstance(d, str) and "@" in d]
    for entry in repo_digests:
        if entry.rsplit("@", 1)[0].endswith(repo):
            return entry.rsplit("@", 1)[1]
    return repo_digests[0].rsplit("@", 1)[1] if repo_digests else None


def _repository(image_ref: str) -> str:
    """`registry:5000/team/model:v1` -> `registry:5000/team/model`."""
    name = image_ref.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def one_line(text: str, limit: int = 300) -> str:
    """The most telling line of a CLI's error output: its last `Error:` line, else its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "no error output"
    errors = [line for line in lines if line.lower().startswith("error")]
    line = (errors or lines)[-1]
    line = line.removeprefix("Error: ").removeprefix("Error response from daemon: ")
    return line if len(line) <= limit else line[:limit - 3] + "..."
