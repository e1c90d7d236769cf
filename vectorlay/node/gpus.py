"""GPU inventory: NVML when a driver is present, `--gpu TYPE[:MEMORY_GB]` declarations otherwise.

NVML sits behind the small `GpuInventory` protocol so tests run against a fake `pynvml`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from types import ModuleType
from typing import Any, Protocol

from vectorlay.core.model import Gpu
from vectorlay.errors import UserError


class NoGpuDriver(Exception):
    """No usable NVIDIA driver: the message says why in one line."""


class GpuInventory(Protocol):
    def discover(self) -> list[Gpu]: ...


_DECLARATION = re.compile(r"^\s*([^:]+?)\s*(?::\s*(\d+(?:\.\d+)?)\s*(?:gb|GB|g|G)?)?\s*$")


def parse_gpu_declarations(declarations: Sequence[str]) -> list[Gpu]:
    """`["RTX 4090:24", "RTX 4090:24"]` -> two GPUs with stable made-up UUIDs (`declared-0`, ...)."""
    gpus = []
    for index, text in enumerate(declarations):
        match = _DECLARATION.match(text)
        if match is None or not match.group(1):
            raise UserError(f"invalid --gpu {text!r}: expected TYPE[:MEMORY_GB], for example 'RTX 4090:24'")
        memory = float(match.group(2)) if match.group(2) else None
        gpus.append(Gpu(uuid=f"declared-{index}", name=match.group(1), memory_gb=memory, index=index))
    return gpus


class NvmlInventory:
    """Reads the real GPUs through NVML (`nvidia-ml-py`, imported as `pynvml`)."""

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml = nvml

    def _module(self) -> Any:
        if self._nvml is not None:
            return self._nvml
        try:
            import pynvml
        except ImportError as error:
            raise NoGpuDriver(f"nvidia-ml-py is not installed ({error})") from None
        return pynvml

    def discover(self) -> list[Gpu]:
        nvml = self._module()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            raise NoGpuDriver(f"no NVIDIA driver found (NVML: {error})") from None
        try:
            gpus = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = _optional(nvml, partial(nvml.nvmlDeviceGetMemoryInfo, handle))
                gpus.append(Gpu(
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_gb=round(memory.total / 1e9, 1) if memory is not None else None,
                    index=index,
                ))
            return gpus
        except nvml.NVMLError as error:
            raise NoGpuDriver(f"NVML failed while listing GPUs: {error}") from None
        finally:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError:
                pass


def _optional(nvml: Any, read: Any) -> Any:
    """A field NVML may not support on this GPU: None rather than a made-up zero."""
    try:
        return read()
    except nvml.NVMLError:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def inventory(declarations: Sequence[str], nvml: GpuInventory | None = None) -> tuple[list[Gpu], str]:
    """The node's GPUs and a one-line note on where they came from."""
    if declarations:
        return parse_gpu_declarations(declarations), f"{len(declarations)} GPU(s) declared with --gpu"
    try:
        gpus = (nvml or NvmlInventory()).discover()
    except NoGpuDriver as error:
        return [], f"{error}; no GPUs reported (declare them with --gpu TYPE[:MEMORY_GB])"
    return gpus, f"{len(gpus)} GPU(s) found through NVML"
