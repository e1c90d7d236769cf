"""GPU inventory: NVML when a driver is present, `--gpu TYPE[:MEMORY_GB]` declarations otherwise.

NVML sits behind the small `GpuInventory` protocol so tests run against a fake `pynvml`. What NVML
cannot read on a GPU is None, never a made-up zero; a GPU NVML cannot read at all is left out
(with the reason), so the node never offers a GPU it cannot hand to a replica.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import Any, Protocol

from vectorlay.core.model import Gpu
from vectorlay.errors import UserError


class NoGpuDriver(Exception):
    """No usable NVIDIA driver: the message says why in one line."""


class GpuInventory(Protocol):
    def discover(self) -> list[Gpu]: ...


@dataclass(frozen=True)
class GpuReport:
    """What NVML says about the machine: its GPUs, the driver, and GPUs it could not read."""

    gpus: list[Gpu]
    driver_version: str | None = None
    cuda_version: str | None = None  # the newest CUDA the driver supports, e.g. "12.4"
    skipped: list[str] = field(default_factory=list)  # one line per GPU left out, with the reason

    def summary(self) -> str:
        versions = [f"driver {self.driver_version}" if self.driver_version else "",
                    f"CUDA {self.cuda_version}" if self.cuda_version else ""]
        detail = ", ".join(v for v in versions if v)
        note = f"{len(self.gpus)} GPU(s) found through NVML" + (f" ({detail})" if detail else "")
        if self.skipped:
            note += f"; left out: {'; '.join(self.skipped)}"
        return note


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


def load_nvml(nvml: ModuleType | Any | None = None) -> Any:
    """The `pynvml` module (from nvidia-ml-py), or the one given (a fake, in tests)."""
    if nvml is not None:
        return nvml
    try:
        import pynvml
    except ImportError as error:
        raise NoGpuDriver(f"nvidia-ml-py is not installed ({error})") from None
    return pynvml


class NvmlInventory:
    """Reads the real GPUs through NVML (`nvidia-ml-py`, imported as `pynvml`)."""

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        self._nvml = nvml

    def discover(self) -> list[Gpu]:
        return self.report().gpus

    def report(self) -> GpuReport:
        nvml = load_nvml(self._nvml)
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            raise NoGpuDriver(f"no NVIDIA driver found (NVML: {error})") from None
        try:
            try:
                count = nvml.nvmlDeviceGetCount()
            except nvml.NVMLError as error:
                raise NoGpuDriver(f"NVML failed while listing GPUs: {error}") from None
            gpus: list[Gpu] = []
            skipped: list[str] = []
            for index in range(count):
                try:
                    gpus.append(_read_gpu(nvml, index))
                except nvml.NVMLError as error:
                    skipped.append(f"GPU {index} ({error})")
            driver = optional(nvml, getattr(nvml, "nvmlSystemGetDriverVersion", None))
            cuda = optional(nvml, getattr(nvml, "nvmlSystemGetCudaDriverVersion", None))
            return GpuReport(gpus, driver_version=text(driver) if driver is not None else None,
                             cuda_version=_cuda_version(cuda), skipped=skipped)
        finally:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError:
                pass


def _read_gpu(nvml: Any, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = optional(nvml, partial(nvml.nvmlDeviceGetMemoryInfo, handle))
    return Gpu(
        uuid=text(nvml.nvmlDeviceGetUUID(handle)),
        name=text(nvml.nvmlDeviceGetName(handle)),
        memory_gb=round(memory.total / 1e9, 1) if memory is not None else None,
        index=index,
    )


def _cuda_version(value: int | None) -> str | None:
    """NVML's 12040 -> "12.4"."""
    if value is None:
        return None
    return f"{value // 1000}.{value % 1000 // 10}"


def optional(nvml: Any, read: Any) -> Any:
    """A field NVML may not support on this GPU (or an older NVML lacks): None, not a made-up zero."""
    if read is None:
        return None
    try:
        return read()
    except nvml.NVMLError:
        return None


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpu_report(declarations: Sequence[str], nvml: GpuInventory | None = None) -> tuple[GpuReport | None, str]:
    """The node's GPUs (None when there is no driver and none declared) and a one-line note."""
    if declarations:
        return GpuReport(parse_gpu_declarations(declarations)), f"{len(declarations)} GPU(s) declared with --gpu"
    source = nvml or NvmlInventory()
    try:
        report = source.report() if isinstance(source, NvmlInventory) else GpuReport(source.discover())
    except NoGpuDriver as error:
        return None, f"{error}; no GPUs reported (declare them with --gpu TYPE[:MEMORY_GB])"
    return report, report.summary()


def inventory(declarations: Sequence[str], nvml: GpuInventory | None = None) -> tuple[list[Gpu], str]:
    """The node's GPUs and a one-line note on where they came from."""
    report, note = gpu_report(declarations, nvml)
    return (report.gpus if report is not None else []), note
