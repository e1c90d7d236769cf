"""`scripts/gpu-check`: on a machine with an NVIDIA GPU, show what vectorlay discovers and prove a
replica gets its GPU.

1. The inventory through NVML: driver, CUDA, each GPU's name, UUID, memory, and a health sample
   (`vectorlay/node/gpu_check.py`, which an installed vectorlay runs on its own).
2. A real stack (server, one node allowing process replicas, proxy) runs a process replica with
   one GPU; through the proxy it reports the devices CUDA shows it, which must be exactly the
   GPU the scheduler assigned (by UUID).
3. Where podman and a CDI spec for the GPU exist, the same with a container (`--device
   nvidia.com/gpu=UUID`): the only GPU device node inside it must be its GPU's (/dev/nvidiaN,
   N its NVML minor number). The busybox test image has no libc for nvidia-smi to run on.

Exit status: 0 all checks passed, 1 a check failed, 2 no NVIDIA GPU here (nothing to check).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from vectorlay.node.gpu_check import NO_GPU, print_inventory

PROBE_MANIFEST = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {name: gpu-probe}
spec:
  runtime: process
  gpu: {count: 1}
  command: ["python3", "examples/gpu-probe/serve.py", "--port", "${PORT}"]
  health: {path: /healthz, interval: 1s, timeout: 1s}
"""

CONTAINER_MANIFEST = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {{name: gpu-container}}
spec:
  image: {image}
  gpu: {{count: 1}}
  command: ["sh", "-c", "for d in /dev/nvidia*; do echo device $d; done; exec /bin/start"]
  health: {{path: /healthz, interval: 1s, timeout: 1s}}
"""


def say(ok: bool, text: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {text}", flush=True)
    return ok


def check_process_replica(root: Path) -> bool:
    from testsupport.processes import Stack, http_request

    stack = Stack(root / "process")
    stack.root.mkdir(parents=True)
    try:
        stack.start_server()
        stack.join_node("gpu-check")  # no --gpu: NVML's GPUs
        _, proxy_port = stack.start_proxy()
        stack.cli("apply", "-", "--timeout", "120s", input_text=PROBE_MANIFEST)
        [replica] = stack.cli_json("get", "replicas")
        answer = http_request(proxy_port, "gpu-probe.localhost", "/gpus").json()
        print(f"  assigned {replica['gpus']}; the replica got CUDA_VISIBLE_DEVICES="
              f"{answer['cuda_visible_devices']} and CUDA shows it {answer['cuda_devices']}")
        if answer["cuda_error"]:
            print(f"  CUDA: {answer['cuda_error']}")
        return say(answer["cuda_devices"] == replica["gpus"], "a process replica sees exactly its assigned GPU")
    finally:
        stack.close()


def check_container_replica(root: Path, minors: dict[str, int]) -> bool | None:
    """None when containers cannot be tried here (no podman, no CDI spec)."""
    import trio

    from testsupport.images import DEFAULT_TAG, build_image, container_prerequisites
    from testsupport.processes import Stack
    from vectorlay.node.container_args import ContainerCli
    from vectorlay.node.preflight import run_checks

    checked = trio.run(run_checks, ContainerCli(), ("runc",))
    if container_prerequisites("runc") or not checked.container_ok or not checked.gpus:
        missing = "; ".join(f"{c.item}: {c.detail}" for c in checked.missing()[:3])
        print(f"SKIP  containers with GPUs: {missing or 'podman, runc or busybox-static missing'}")
        return None
    build_image(DEFAULT_TAG)
    stack = Stack(root / "container")
    stack.root.mkdir(parents=True)
    try:
        stack.start_server()
        stack.join_node("gpu-check-c", allow_process=False, extra=["--oci-runtime", "runc"])
        stack.cli("apply", "-", "--timeout", "120s", input_text=CONTAINER_MANIFEST.format(image=DEFAULT_TAG))
        [replica] = stack.cli_json("get", "replicas")
        logs = stack.cli("logs", "gpu-container", "--tail", "50", "--no-prefix").stdout
        seen = sorted(set(re.findall(r"^device /dev/nvidia(\d+)$", logs, re.MULTILINE)), key=int)
        expected = [str(minors[u]) for u in replica["gpus"]]
        print(f"  assigned {replica['gpus']} (/dev/nvidia{','.join(expected)}); the container has "
              f"{['/dev/nvidia' + n for n in seen]}")
        return say(seen == expected, "a container replica gets exactly its assigned GPU (CDI)")
    finally:
        stack.close()


def main() -> int:
    minors = print_inventory()
    if not minors:
        print(NO_GPU)
        return 2
    with tempfile.TemporaryDirectory(prefix="vectorlay-gpu-check-") as tmp:
        results = [check_process_replica(Path(tmp))]
        container = check_container_replica(Path(tmp), minors)
        if container is not None:
            results.append(container)
    return 0 if all(results) else 1


if __name__ == "__main__":
    if shutil.which("python3") is None:
        print("python3 is needed on PATH to run the probe replica", file=sys.stderr)
        sys.exit(1)
    sys.exit(main())
