"""What this machine's NVIDIA GPUs look like to vectorlay, for an operator setting up a node.

    python -m vectorlay.node.gpu_check

Prints what NVML reports (driver, CUDA, each GPU's name, UUID and memory) and a health sample of
each (utilisation, temperature, memory in use, XID errors). Exit status 0 with a GPU, 2 without
one. `scripts/gpu-check` in a checkout goes further: it runs a real stack and proves a replica gets
exactly its GPU.
"""

from __future__ import annotations

import sys

from vectorlay.node.gpu_health import NvmlMonitor
from vectorlay.node.gpus import gpu_report, load_nvml


def print_inventory() -> dict[str, int]:
    """Print what NVML reports; return each GPU's device minor number (/dev/nvidiaN) by UUID."""
    report, note = gpu_report([])
    print(note)
    if report is None or not report.gpus:
        return {}
    minors = {g.uuid: _minor(g.uuid) for g in report.gpus}
    monitor = NvmlMonitor([g.uuid for g in report.gpus])
    monitor.open()
    try:
        statuses = {s.uuid: s for s in monitor.sample()}
    finally:
        monitor.close()
    for gpu in report.gpus:
        status = statuses[gpu.uuid]
        memory = f"{gpu.memory_gb:g} GB" if gpu.memory_gb is not None else "memory unknown"
        health = "healthy" if status.healthy else f"UNHEALTHY ({status.reason})"
        print(f"  GPU {gpu.index}: {gpu.name}, {memory}, {gpu.uuid}; utilisation {status.utilization_pct}%, "
              f"{status.temperature_c} C, {status.memory_used_gb} GB used, {health}")
    return minors


def _minor(uuid: str) -> int:
    nvml = load_nvml()
    nvml.nvmlInit()
    try:
        return int(nvml.nvmlDeviceGetMinorNumber(nvml.nvmlDeviceGetHandleByUUID(uuid)))
    finally:
        nvml.nvmlShutdown()


NO_GPU = "no NVIDIA GPU here: nothing to check (run this on a machine with one)"


def main() -> int:
    if not print_inventory():
        print(NO_GPU)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
