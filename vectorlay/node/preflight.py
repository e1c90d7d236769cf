"""What this node needs, checked: `vectorlay node check` prints it, the agent decides from it.

Each item is present or missing, with a one-line fix. From the same checks the agent decides what
it offers the server: the container runtime only if podman (or docker) works, each isolation
level only if an OCI runtime giving it works (Kata also needs KVM), and only GPUs it can hand to a
replica. The host is reached through a small `Host` protocol so the decisions are tested without
installing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio
import yaml

from vectorlay.core.model import Gpu, Isolation
from vectorlay.node.container_args import ContainerCli, cdi_device, one_line
from vectorlay.node.gpus import GpuInventory, GpuReport, gpu_report
from vectorlay.node.oci import BINARIES, INSTALL_HINTS, OCI_RUNTIMES, isolation_levels

CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
CHECK_TIMEOUT_S = 20.0


class Host(Protocol):
    def which(self, name: str) -> str | None: ...

    async def run(self, argv: Sequence[str]) -> tuple[int, str]:
        """Exit code and output (stdout, then stderr); -1 when it cannot be run at all."""
        ...

    def usable_device(self, path: str) -> bool: ...

    def list_dir(self, path: str) -> list[str]: ...

    def read_text(self, path: str) -> str | None: ...


class RealHost:
    def which(self, name: str) -> str | None:
        return shutil.which(name)

    async def run(self, argv: Sequence[str]) -> tuple[int, str]:
        try:
            with trio.fail_after(CHECK_TIMEOUT_S):
                result = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False,
                                                stdin=subprocess.DEVNULL)
        except (OSError, trio.TooSlowError) as error:
            return -1, str(error) or "timed out"
        return result.returncode, (result.stdout + result.stderr).decode(errors="replace")

    def usable_device(self, path: str) -> bool:
        return os.path.exists(path) and os.access(path, os.R_OK | os.W_OK)

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []

    def read_text(self, path: str) -> str | None:
        try:
            return Path(path).read_text()
        except (OSError, UnicodeDecodeError):
            return None


@dataclass(frozen=True)
class Check:
    item: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        status = "present" if self.ok else "missing"
        text = f"{status:8} {self.item:24} {self.detail}"
        return text + (f"\n{'':8} {'':24} fix: {self.fix}" if not self.ok and self.fix else "")


@dataclass(frozen=True)
class Preflight:
    checks: tuple[Check, ...]
    container_ok: bool
    oci_runtimes: tuple[str, ...]  # those that work, preferred first
    isolation: tuple[str, ...]
    runtimes: tuple[str, ...]
    gpus: tuple[Gpu, ...]
    gpu_report: GpuReport | None = None
    gpu_note: str = ""
    notes: tuple[str, ...] = field(default=())  # decisions worth a log line

    def missing(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        return (f"offers runtimes: {', '.join(self.runtimes) or 'none'}; "
                f"isolation: {', '.join(self.isolation) or 'none'}; GPUs: {len(self.gpus)}")

    def offer_line(self) -> str:
        """What the node offers, in the one line it logs at startup. What is missing is not
        listed: a development machine lacks Kata, IOMMU and NVIDIA on purpose (`node check`)."""
        levels = [f"{level} ({', '.join(r for r in self.oci_runtimes if OCI_RUNTIMES[r].value == level)})"
                  for level in self.isolation]
        offered = [*levels, *(["process replicas (not isolated)"] if "process" in self.runtimes else [])]
        names = sorted({gpu.name for gpu in self.gpus})
        if self.gpus:
            gpus = f"{len(self.gpus)} GPU(s): {', '.join(names)}"
        elif self.gpu_report is None:
            gpus = "no GPUs (no NVIDIA driver; declare GPUs with --gpu TYPE[:MEMORY_GB])"
        else:
            gpus = "no GPUs"
        return (f"this node offers {', '.join(offered) or 'nothing it can run'}; {gpus}; "
                "`vectorlay node check` shows what else it could offer")


async def run_checks(
    cli: ContainerCli,
    requested_oci: Sequence[str] = (),
    allow_process: bool = False,
    gpu_declarations: Sequence[str] = (),
    host: Host | None = None,
    nvml: GpuInventory | None = None,
) -> Preflight:
    host = host or RealHost()
    checks: list[Check] = []
    notes: list[str] = []

    cli_check, info = await _check_container_cli(host, cli)
    checks.append(cli_check)
    kvm = _check_kvm(host)
    oci_ok: list[str] = []
    for name in requested_oci or tuple(OCI_RUNTIMES):
        check = await _check_oci_runtime(host, cli, name, info if cli_check.ok else None, kvm.ok)
        checks.append(check)
        if check.ok:
            oci_ok.append(name)
    container_ok = cli_check.ok and bool(oci_ok)
    if cli_check.ok and not oci_ok:
        notes.append("no working OCI runtime: container replicas are not offered")

    report, gpu_note = await trio.to_thread.run_sync(gpu_report, list(gpu_declarations), nvml)
    checks.append(_check_driver(report, gpu_note, bool(gpu_declarations)))
    gpus = list(report.gpus) if report is not None else []
    cdi_names = _cdi_gpu_names(host)
    checks.append(_check_cdi(gpus, cdi_names))
    checks.append(kvm)
    checks.append(_check_iommu(host))

    if not gpu_declarations and container_ok and not allow_process:
        # A GPU no runtime here can hand to a replica is not offered.
        usable = [g for g in gpus if cdi_device(g.uuid).split("=", 1)[1] in cdi_names]
        if len(usable) < len(gpus):
            notes.append(f"{len(gpus) - len(usable)} GPU(s) not offered: not in the CDI spec")
        gpus = usable

    runtimes = tuple(name for name, ok in (("container", container_ok), ("process", allow_process)) if ok)
    return Preflight(tuple(checks), container_ok, tuple(oci_ok) if container_ok else (),
                     isolation_levels(oci_ok) if container_ok else (), runtimes, tuple(gpus), report, gpu_note,
                     tuple(notes))


async def _check_container_cli(host: Host, cli: ContainerCli) -> tuple[Check, dict[str, Any]]:
    item = cli.executable.rsplit("/", 1)[-1]
    install = "apt-get install podman" if cli.dialect == "podman" else "install docker and start dockerd"
    if host.which(cli.executable) is None:
        return Check(item, False, "not found", install), {}
    code, output = await host.run([cli.executable, "info", "--format", "{{json .}}"])
    if code != 0:
        fix = f"run `{cli.executable} info` to see why" if cli.dialect == "podman" else "start dockerd"
        return Check(item, False, f"does not work: {one_line(output)}", fix), {}
    try:
        info = json.loads(output[output.index("{"):]) if "{" in output else {}
    except ValueError:
        info = {}
    version = (info.get("version") or {}).get("Version") or info.get("ServerVersion") or "version unknown"
    return Check(item, True, f"{item} {version}"), info if isinstance(info, dict) else {}


async def _check_oci_runtime(host: Host, cli: ContainerCli, name: str, info: dict[str, Any] | None,
                             kvm_ok: bool) -> Check:
    level = OCI_RUNTIMES[name]
    item = f"OCI runtime {name}"
    gives = f"for {level.value} isolation"
    if cli.dialect == "docker":
        if info is None:
            return Check(item, False, f"unknown: docker does not work ({gives})", "fix docker first")
        if name not in (info.get("Runtimes") or {}):
            return Check(item, False, f"not registered with dockerd ({gives})",
                         f"add {name} under \"runtimes\" in /etc/docker/daemon.json and restart dockerd")
        detail = f"registered with dockerd, {gives}"
    else:
        binary = BINARIES[name]
        if host.which(binary) is None:
            return Check(item, False, f"{binary} not found ({gives})", INSTALL_HINTS[name])
        code, output = await host.run([binary, "--version"])
        if code != 0:
            return Check(item, False, f"{binary} --version failed: {one_line(output)}", INSTALL_HINTS[name])
        detail = f"{output.strip().splitlines()[0] if output.strip() else binary}, {gives}"
    if level is Isolation.MICROVM and not kvm_ok:
        return Check(item, False, f"{detail}, but KVM is missing", "see the KVM item")
    return Check(item, True, detail)


def _check_driver(report: GpuReport | None, note: str, declared: bool) -> Check:
    if declared:
        return Check("GPUs", True, f"{note} (NVML not consulted)")
    if report is None:
        fix = ("pip install nvidia-ml-py" if "nvidia-ml-py" in note
               else "install the NVIDIA driver (Debian: apt-get install nvidia-driver), or declare GPUs with --gpu")
        return Check("NVIDIA driver and NVML", False, note.split(";")[0], fix)
    return Check("NVIDIA driver and NVML", True, note)


def _cdi_gpu_names(host: Host) -> set[str]:
    """Device names of kind nvidia.com/gpu in the CDI specs (by index, UUID, and `all`)."""
    names: set[str] = set()
    for directory in CDI_DIRS:
        for entry in host.list_dir(directory):
            if not entry.endswith((".yaml", ".yml", ".json")):
                continue
            content = host.read_text(f"{directory}/{entry}")
            try:
                spec = yaml.safe_load(content) if content else None
            except yaml.YAMLError:
                continue
            if isinstance(spec, dict) and spec.get("kind") == "nvidia.com/gpu":
                names |= {str(d.get("name")) for d in spec.get("devices") or [] if isinstance(d, dict)}
    return names


def _check_cdi(gpus: list[Gpu], names: set[str]) -> Check:
    item = "CDI spec for GPUs"
    fix = "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml (from nvidia-container-toolkit)"
    if not gpus:
        return Check(item, bool(names), f"{len(names)} GPU device(s) in {', '.join(CDI_DIRS)}" if names
                     else "none (only needed for GPUs in containers)", fix)
    missing = [g.uuid for g in gpus if cdi_device(g.uuid).split("=", 1)[1] not in names]
    if missing:
        return Check(item, False, f"no CDI device for {', '.join(missing)}", fix)
    return Check(item, True, f"all {len(gpus)} GPU(s) have a CDI device")


def _check_kvm(host: Host) -> Check:
    if host.usable_device("/dev/kvm"):
        return Check("KVM", True, "/dev/kvm is usable (for microvm isolation)")
    return Check("KVM", False, "/dev/kvm is missing or not accessible (needed for microvm isolation)",
                 "enable VT-x/AMD-V in the firmware and load kvm_intel or kvm_amd (on a VM: nested virtualization)")


def _check_iommu(host: Host) -> Check:
    groups = host.list_dir("/sys/kernel/iommu_groups")
    if groups:
        return Check("IOMMU groups", True, f"{len(groups)} group(s) (for GPUs in microvms via VFIO)")
    return Check("IOMMU groups", False, "none (needed to pass GPUs into microvms via VFIO)",
                 "enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on (or amd_iommu=on) iommu=pt")
