"""What a node offers, decided from its preflight checks: runtimes, isolation levels (Kata only
with KVM), GPUs (only ones a replica can get), with a fix for every missing item. The host is a
fake here; `test_the_real_check_command_runs_here` runs the real one on this machine."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from vectorlay.core.model import Gpu
from vectorlay.node.container_args import ContainerCli
from vectorlay.node.gpus import NvmlInventory
from vectorlay.node.preflight import run_checks
from vectorlay.testing.fake_nvml import FakeGpu, FakeNvml

PODMAN_INFO = json.dumps({"version": {"Version": "4.3.1"}, "host": {"ociRuntime": {"name": "crun"}}})


@dataclass
class FakeHost:
    binaries: set[str] = field(default_factory=lambda: {"podman", "runc", "crun", "runsc"})
    outputs: dict[str, tuple[int, str]] = field(default_factory=dict)  # argv[0] -> (code, output)
    kvm: bool = False
    files: dict[str, str] = field(default_factory=dict)
    iommu_groups: int = 0
    ran: list[list[str]] = field(default_factory=list)

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name in self.binaries else None

    async def run(self, argv: Sequence[str]) -> tuple[int, str]:
        self.ran.append(list(argv))
        if argv[0] in self.outputs:
            return self.outputs[argv[0]]
        if argv[1:] == ["info", "--format", "{{json .}}"]:
            return 0, PODMAN_INFO
        return 0, f"{argv[0]} version 1.0\n"

    def usable_device(self, path: str) -> bool:
        return self.kvm and path == "/dev/kvm"

    def list_dir(self, path: str) -> list[str]:
        if path == "/sys/kernel/iommu_groups":
            return [str(i) for i in range(self.iommu_groups)]
        prefix = path.rstrip("/") + "/"
        return sorted(name.removeprefix(prefix) for name in self.files if name.startswith(prefix))

    def read_text(self, path: str) -> str | None:
        return self.files.get(path)


NO_DRIVER = NvmlInventory(FakeNvml([], init_error="Driver Not Loaded"))
PODMAN = ContainerCli("podman")


async def test_found_runtimes_give_their_isolation_levels_and_kata_needs_kvm() -> None:
    host = FakeHost(binaries={"podman", "runc", "crun", "runsc", "kata-runtime"})
    checked = await run_checks(PODMAN, host=host, nvml=NO_DRIVER)
    assert checked.runtimes == ("container",)
    assert checked.oci_runtimes == ("runc", "crun", "runsc")
    assert checked.isolation == ("container", "sandbox")
    kata = next(c for c in checked.checks if c.item == "OCI runtime kata")
    assert not kata.ok and "KVM is missing" in kata.detail
    kvm = next(c for c in checked.checks if c.item == "KVM")
    assert not kvm.ok and "kvm_intel" in kvm.fix

    with_kvm = await run_checks(PODMAN, host=FakeHost(binaries=host.binaries, kvm=True), nvml=NO_DRIVER)
    assert with_kvm.isolation == ("container", "sandbox", "microvm")
    assert with_kvm.oci_runtimes[-1] == "kata"


async def test_oci_runtimes_asked_for_are_the_only_ones_checked_in_that_order() -> None:
    host = FakeHost()
    checked = await run_checks(PODMAN, requested_oci=("runsc", "crun"), host=host, nvml=NO_DRIVER)
    assert checked.oci_runtimes == ("runsc", "crun")
    assert checked.isolation == ("container", "sandbox")
    assert not any(argv[0] == "runc" for argv in host.ran)


async def test_a_broken_or_missing_runtime_is_not_offered_and_says_how_to_fix_it() -> None:
    host = FakeHost(binaries={"podman", "runc"}, outputs={"runc": (1, "runc: error while loading shared libraries")})
    checked = await run_checks(PODMAN, host=host, nvml=NO_DRIVER)
    assert checked.runtimes == () and checked.isolation == ()
    by_item = {c.item: c for c in checked.checks}
    assert not by_item["OCI runtime runc"].ok
    assert "error while loading shared libraries" in by_item["OCI runtime runc"].detail
    assert by_item["OCI runtime runsc"].fix == "apt-get install runsc (gVisor)"
    assert "kata-runtime" in by_item["OCI runtime kata"].fix
    assert checked.notes == ("no working OCI runtime: container replicas are not offered",)
    for check in checked.missing():
        assert check.fix and "\n" not in check.fix
        assert check.line().startswith("missing")


async def test_without_podman_only_process_replicas_when_allowed() -> None:
    no_podman = FakeHost(binaries={"runc"})
    checked = await run_checks(PODMAN, host=no_podman, nvml=NO_DRIVER)
    assert checked.runtimes == ()
    podman = next(c for c in checked.checks if c.item == "podman")
    assert (podman.ok, podman.detail, podman.fix) == (False, "not found", "apt-get install podman")
    allowed = await run_checks(PODMAN, allow_process=True, host=no_podman, nvml=NO_DRIVER)
    assert allowed.runtimes == ("process",)

    broken = FakeHost(outputs={"podman": (125, "Error: cannot open database: permission denied")})
    checked = await run_checks(PODMAN, host=broken, nvml=NO_DRIVER)
    podman = next(c for c in checked.checks if c.item == "podman")
    assert not podman.ok and podman.detail == "does not work: cannot open database: permission denied"
    assert checked.runtimes == ()


async def test_docker_offers_the_runtimes_its_daemon_has_registered() -> None:
    info = json.dumps({"ServerVersion": "28.2.2", "Runtimes": {"runc": {}, "runsc": {"path": "/usr/bin/runsc"}}})
    host = FakeHost(binaries={"docker"}, outputs={"docker": (0, info)})
    checked = await run_checks(ContainerCli.named("docker"), host=host, nvml=NO_DRIVER)
    assert checked.oci_runtimes == ("runc", "runsc") and checked.isolation == ("container", "sandbox")
    crun = next(c for c in checked.checks if c.item == "OCI runtime crun")
    assert "daemon.json" in crun.fix


async def test_gpus_need_a_cdi_device_unless_process_replicas_may_use_them() -> None:
    nvml = NvmlInventory(FakeNvml([FakeGpu("GPU-aaa"), FakeGpu("GPU-bbb")]))
    cdi = "kind: nvidia.com/gpu\ndevices:\n- name: '0'\n- name: GPU-aaa\n- name: all\n"
    host = FakeHost(files={"/etc/cdi/nvidia.yaml": cdi, "/etc/cdi/notes.txt": "ignored"})
    checked = await run_checks(PODMAN, host=host, nvml=nvml)
    assert [g.uuid for g in checked.gpus] == ["GPU-aaa"]
    assert checked.notes == ("1 GPU(s) not offered: not in the CDI spec",)
    cdi_check = next(c for c in checked.checks if c.item == "CDI spec for GPUs")
    assert not cdi_check.ok and "GPU-bbb" in cdi_check.detail and "nvidia-ctk cdi generate" in cdi_check.fix
    driver = next(c for c in checked.checks if c.item == "NVIDIA driver and NVML")
    assert driver.ok and driver.detail == "2 GPU(s) found through NVML (driver 550.54.15, CUDA 12.4)"

    # A process replica gets its GPU through CUDA_VISIBLE_DEVICES: no CDI needed.
    allowed = await run_checks(PODMAN, allow_process=True, host=host, nvml=nvml)
    assert [g.uuid for g in allowed.gpus] == ["GPU-aaa", "GPU-bbb"]


async def test_declared_gpus_skip_nvml_and_no_driver_is_one_line_with_a_fix() -> None:
    checked = await run_checks(PODMAN, gpu_declarations=("RTX 4090:24",), host=FakeHost(), nvml=NO_DRIVER)
    assert checked.gpus == (Gpu("declared-0", "RTX 4090", 24.0, 0),)
    assert next(c for c in checked.checks if c.item == "GPUs").ok

    checked = await run_checks(PODMAN, host=FakeHost(), nvml=NO_DRIVER)
    driver = next(c for c in checked.checks if c.item == "NVIDIA driver and NVML")
    assert driver.detail == "no NVIDIA driver found (NVML: Driver Not Loaded)"
    assert driver.fix.startswith("install the NVIDIA driver")
    assert checked.gpus == ()


async def test_iommu_groups_are_reported() -> None:
    checked = await run_checks(PODMAN, host=FakeHost(iommu_groups=12), nvml=NO_DRIVER)
    iommu = next(c for c in checked.checks if c.item == "IOMMU groups")
    assert iommu.ok and iommu.detail.startswith("12 group(s)")


def test_the_real_check_command_runs_here() -> None:
    result = subprocess.run([sys.executable, "-m", "vectorlay", "node", "check", "--oci-runtime", "kata"],
                            capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    items = ("podman", "OCI runtime kata", "NVIDIA driver and NVML", "CDI spec for GPUs", "KVM", "IOMMU groups")
    for item in items:
        assert any(line.split()[1:] and item in line and line.split()[0] in ("present", "missing") for line in lines), \
            (item, result.stdout)
    kata = next(line for line in lines if "OCI runtime kata" in line)
    if kata.startswith("missing"):
        assert lines[lines.index(kata) + 1].strip().startswith("fix: ")
        # Kata is all it may use, so it offers no container runtime, hence exit 1.
        assert result.returncode == 1 and "offers runtimes: none" in result.stdout
