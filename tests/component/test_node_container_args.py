"""The exact container command lines, for podman and docker and every isolation level (Kata's
included, which cannot run on a machine without KVM), and how CLI answers are read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vectorlay.core.model import Assignment, ClusterSpec, Isolation, Resources, Runtime
from vectorlay.errors import UserError
from vectorlay.node.container_args import ContainerCli, SecretEnv, Ulimits, image_digest, one_line, run_args
from vectorlay.node.oci import isolation_levels, parse_oci_runtimes, runtime_for
from vectorlay.node.runtime import LaunchRequest

LIMITS = Ulimits(nofile=(1024, 20000), nproc=(32768, 32768))


def launch(gpus: tuple[str, ...] = (), host_ip: str = "10.0.0.5", **spec_fields: object) -> LaunchRequest:
    spec = ClusterSpec(name="qwen", replicas=2, runtime=Runtime.CONTAINER, image="docker.io/vllm/vllm-openai:v0.6.3",
                       command=("--port", "${PORT}", "--model", "${MODEL}"), env={"MODEL": "tiny"}, port=8000,
                       **spec_fields)  # type: ignore[arg-type]
    env = {"MODEL": "tiny", "PORT": "31000", "VECTORLAY_REPLICA": "qwen-1", "CUDA_VISIBLE_DEVICES": "x"}
    return LaunchRequest(Assignment("qwen-1", "qwen", 7, spec, gpus), "n-1", "gpu-box", 31000, env,
                         Path("/var/lib/vectorlay/logs/qwen-1.log"), host_ip)


def test_podman_run_for_a_gpu_replica() -> None:
    argv = run_args(ContainerCli("podman"), launch(("GPU-abc",), resources=Resources(cpus=1.5, memory_mb=4096)),
                    "sha256:1234", "runc", LIMITS)
    assert argv == [
        "podman", "run", "--detach", "--name", "vectorlay-qwen-1", "--runtime", "runc", "--init",
        "--security-opt", "no-new-privileges", "--publish", "10.0.0.5:31000:8000/tcp",
        "--ulimit", "nofile=1024:20000", "--ulimit", "nproc=32768:32768", "--pull", "never",
        "--log-driver", "passthrough",
        "--label", "vectorlay.cluster=qwen", "--label", "vectorlay.generation=7",
        "--label", "vectorlay.image=docker.io/vllm/vllm-openai:v0.6.3",
        "--label", "vectorlay.log=/var/lib/vectorlay/logs/qwen-1.log", "--label", "vectorlay.node=n-1",
        "--label", "vectorlay.node-name=gpu-box", "--label", "vectorlay.replica=qwen-1",
        "--label", "vectorlay.run-dir=/var/lib/vectorlay/logs/qwen-1.run",
        "--cpus", "1.5", "--memory", "4096m",
        "--device", "nvidia.com/gpu=GPU-abc",
        "--env", "CUDA_VISIBLE_DEVICES=GPU-abc", "--env", "MODEL=tiny", "--env", "PORT=8000",
        "--env", "VECTORLAY_REPLICA=qwen-1",
        "sha256:1234", "--port", "8000", "--model", "tiny",
    ]


def test_gvisor_runs_with_its_own_network_stack_off_and_kata_by_name() -> None:
    sandbox = run_args(ContainerCli("podman"), launch(isolation=Isolation.SANDBOX), "img", "runsc", LIMITS)
    assert sandbox[:4] == ["podman", "--runtime-flag", "network=host", "run"]
    assert sandbox[sandbox.index("--runtime") + 1] == "runsc"
    assert sandbox[sandbox.index("--pids-limit") + 1] == "32768"  # gVisor's own threads count too
    microvm = run_args(ContainerCli("podman"), launch(isolation=Isolation.MICROVM), "img", "kata", LIMITS)
    assert microvm[:2] == ["podman", "run"] and microvm[microvm.index("--runtime") + 1] == "kata"


def test_docker_takes_the_same_flags_but_logs_to_bounded_json_files() -> None:
    cli = ContainerCli.named("/usr/local/bin/docker")
    assert cli.dialect == "docker" and not cli.passthrough_logs
    argv = run_args(cli, launch(isolation=Isolation.SANDBOX), "img", "runsc", LIMITS)
    assert argv[:2] == ["/usr/local/bin/docker", "run"]  # runsc's flags live in daemon.json for docker
    at = argv.index("--log-driver")
    assert argv[at:at + 6] == ["--log-driver", "json-file", "--log-opt", "max-size=10m", "--log-opt", "max-file=2"]
    podman = run_args(ContainerCli.named("podman"), launch(isolation=Isolation.SANDBOX), "img", "runsc", LIMITS)
    differing = {a for a in podman if a not in argv}
    assert differing == {"podman", "--runtime-flag", "network=host", "passthrough"}


def test_declared_gpus_are_cdi_indexes_and_ipv6_is_bracketed() -> None:
    argv = run_args(ContainerCli(), launch(("declared-1", "declared-3"), host_ip="fd00::5"), "img", "runc", LIMITS)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--device"] == ["nvidia.com/gpu=1", "nvidia.com/gpu=3"]
    assert "CUDA_VISIBLE_DEVICES=0,1" in argv  # numbered from 0 inside the container
    assert argv[argv.index("--publish") + 1] == "[fd00::5]:31000:8000/tcp"
    no_gpu = run_args(ContainerCli(), launch(), "img", "runc", LIMITS)
    assert "--device" not in no_gpu and "CUDA_VISIBLE_DEVICES=" in no_gpu


def test_image_digests_from_pins_podman_and_docker() -> None:
    digest = "sha256:" + "a" * 64
    assert image_digest(f"ghcr.io/x/y@{digest}", {"Digest": "sha256:" + "b" * 64}) == digest
    assert image_digest("localhost/x:1", {"Digest": digest, "RepoDigests": []}) == digest
    docker = {"RepoDigests": [f"other/repo@sha256:{'c' * 64}", f"registry:5000/team/model@{digest}"]}
    assert image_digest("registry:5000/team/model:v1", docker) == digest
    assert image_digest("built/locally:1", {"RepoDigests": []}) is None


def test_one_line_picks_the_error() -> None:
    output = "Trying to pull x...\nError: initializing source docker://x: pinging container registry\n"
    assert one_line(output) == "initializing source docker://x: pinging container registry"
    assert one_line("") == "no error output"
    assert one_line("Error response from daemon: No such image: x") == "No such image: x"
    assert len(one_line("Error: " + "x" * 1000)) == 300


def test_oci_runtime_names_and_isolation_levels() -> None:
    assert parse_oci_runtimes(["runsc", "runc", "runsc"]) == ("runsc", "runc")
    with pytest.raises(UserError, match="unknown --oci-runtime 'youki'"):
        parse_oci_runtimes(["youki"])
    assert isolation_levels(["kata", "runc"]) == ("container", "microvm")
    assert runtime_for(Isolation.CONTAINER, ["runsc", "crun", "runc"]) == "crun"
    assert runtime_for(Isolation.MICROVM, ["runc", "runsc"]) is None


def test_secrets_go_to_an_env_file_or_by_name_never_on_the_command_line() -> None:
    base = launch()
    spec = dataclasses.replace(base.assignment.spec, env_from_secret={"HF_TOKEN": "hf-token", "PEM": "pem"},
                               command=("--token", "${HF_TOKEN}", "--model", "${MODEL}"))
    secrets = {"HF_TOKEN": "hf_abc", "PEM": "a\nb"}
    request = dataclasses.replace(base, assignment=dataclasses.replace(base.assignment, spec=spec, secret_env=secrets),
                                  env={**base.env, **secrets})
    env = SecretEnv.of(request)
    assert (env.file_text, env.cli_env) == ("HF_TOKEN=hf_abc\n", {"PEM": "a\nb"})
    argv = run_args(ContainerCli("podman"), request, "img", "runc", LIMITS, "/dev/shm/x.env")
    assert not [a for a in argv if "hf_abc" in a or "a\nb" in a]
    assert argv[argv.index("--env-file") + 1] == "/dev/shm/x.env"
    assert "PEM" in argv and argv[argv.index("PEM") - 1] == "--env"  # the value comes from podman's environment
    assert argv[-4:] == ["--token", "${HF_TOKEN}", "--model", "tiny"]  # never expanded into a command line
