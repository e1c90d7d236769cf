"""GPU inventory against a fake pynvml module: real GPUs, no driver, unsupported fields."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from vectorlay.core.model import Gpu
from vectorlay.errors import UserError
from vectorlay.node.gpus import NoGpuDriver, NvmlInventory, inventory, parse_gpu_declarations


class NVMLError(Exception):
    pass


def fake_nvml(devices: list[dict[str, Any]], init_error: str | None = None) -> Any:
    def init() -> None:
        if init_error:
            raise NVMLError(init_error)

    def memory(handle: dict[str, Any]) -> Any:
        if handle.get("memory") is None:
            raise NVMLError("Not Supported")
        return SimpleNamespace(total=handle["memory"])

    return SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=init, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(devices), nvmlDeviceGetHandleByIndex=lambda i: devices[i],
        nvmlDeviceGetUUID=lambda h: h["uuid"], nvmlDeviceGetName=lambda h: h["name"],
        nvmlDeviceGetMemoryInfo=memory,
    )


def test_nvml_reports_real_gpus() -> None:
    nvml = fake_nvml([
        {"uuid": b"GPU-aaa", "name": b"NVIDIA GeForce RTX 4090", "memory": 25_757_220_864},
        {"uuid": "GPU-bbb", "name": "NVIDIA GeForce RTX 4090", "memory": None},  # field not supported
    ])
    gpus = NvmlInventory(nvml).discover()
    assert gpus == [Gpu("GPU-aaa", "NVIDIA GeForce RTX 4090", 25.8, 0), Gpu("GPU-bbb", "NVIDIA GeForce RTX 4090", None, 1)]


def test_no_driver_is_one_clear_line_and_no_gpus() -> None:
    nvml = fake_nvml([], init_error="Driver Not Loaded")
    with pytest.raises(NoGpuDriver, match="no NVIDIA driver found"):
        NvmlInventory(nvml).discover()
    gpus, note = inventory([], NvmlInventory(nvml))
    assert gpus == []
    assert note.startswith("no NVIDIA driver found (NVML: Driver Not Loaded)") and "\n" not in note


def test_declarations_override_nvml() -> None:
    nvml = fake_nvml([{"uuid": "GPU-x", "name": "H100", "memory": 80e9}])
    gpus, note = inventory(["RTX 4090:24", "RTX 3090"], NvmlInventory(nvml))
    assert gpus == [Gpu("declared-0", "RTX 4090", 24.0, 0), Gpu("declared-1", "RTX 3090", None, 1)]
    assert note == "2 GPU(s) declared with --gpu"


def test_bad_declarations_are_user_errors() -> None:
    with pytest.raises(UserError, match="expected TYPE\\[:MEMORY_GB\\]"):
        parse_gpu_declarations([":24"])
    assert parse_gpu_declarations(["A100: 80GB"]) == [Gpu("declared-0", "A100", 80.0, 0)]
