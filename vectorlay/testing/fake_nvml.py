"""A fake `pynvml` module for unit tests: the calls vectorlay makes, answered from plain data.

Errors follow nvidia-ml-py's shapes: one `NVMLError` root with subclasses per error code, and a
field a GPU does not support raises `NVMLError_NotSupported`. XID errors are injected with `xid`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's own spelling
    def __str__(self) -> str:
        return "Not Supported"


class NVMLError_Timeout(NVMLError):  # noqa: N801
    def __str__(self) -> str:
        return "Timeout"


class NVMLError_GpuIsLost(NVMLError):  # noqa: N801
    def __str__(self) -> str:
        return "GPU is lost"


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA GeForce RTX 4090"
    memory_total: int | None = 25_757_220_864
    memory_used: int = 1_000_000_000
    utilization: int | None = 37
    temperature: int | None = 61
    lost: bool = False  # NVML can no longer reach it
    unsupported: set[str] = field(default_factory=set)  # "memory", "utilization", "temperature"


class FakeNvml:
    """Use as the `nvml` argument of `NvmlInventory` / `NvmlMonitor`."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVML_TEMPERATURE_GPU = 0
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, gpus: list[FakeGpu], driver: str | None = "550.54.15", cuda: int | None = 12040,
                 init_error: str | None = None, events_supported: bool = True) -> None:
        self.gpus = gpus
        self.driver = driver
        self.cuda = cuda
        self.init_error = init_error
        self.events_supported = events_supported
        self.initialised = 0
        self.registered: set[str] = set()
        self._pending: deque[SimpleNamespace] = deque()

    def xid(self, uuid: str, code: int) -> None:
        """The driver reports XID `code` on GPU `uuid` (delivered if events were registered)."""
        if uuid in self.registered:
            self._pending.append(SimpleNamespace(device=self._gpu(uuid), eventType=8, eventData=code))

    def _gpu(self, uuid: str) -> FakeGpu:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise NVMLError("Not Found")

    @staticmethod
    def _reachable(handle: FakeGpu) -> FakeGpu:
        if handle.lost:
            raise NVMLError_GpuIsLost()
        return handle

    # --- the pynvml calls ---

    def nvmlInit(self) -> None:
        if self.init_error:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        if self.driver is None:
            raise NVMLError_NotSupported()
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        if self.cuda is None:
            raise NVMLError_NotSupported()
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self._reachable(self.gpus[index])

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeGpu:
        return self._reachable(self._gpu(uuid.decode() if isinstance(uuid, bytes) else uuid))

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> bytes:
        return handle.uuid.encode()

    def nvmlDeviceGetName(self, handle: FakeGpu) -> bytes:
        return handle.name.encode()

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> Any:
        if "memory" in handle.unsupported or handle.memory_total is None:
            raise NVMLError_NotSupported()
        return SimpleNamespace(total=handle.memory_total, used=handle.memory_used,
                               free=handle.memory_total - handle.memory_used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> Any:
        if "utilization" in handle.unsupported or handle.utilization is None:
            raise NVMLError_NotSupported()
        return SimpleNamespace(gpu=handle.utilization, memory=10)

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        if "temperature" in handle.unsupported or handle.temperature is None:
            raise NVMLError_NotSupported()
        return handle.temperature

    def nvmlEventSetCreate(self) -> str:
        if not self.events_supported:
            raise NVMLError_NotSupported()
        return "event-set"

    def nvmlDeviceRegisterEvents(self, handle: FakeGpu, types: int, event_set: str) -> None:
        self.registered.add(handle.uuid)

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> SimpleNamespace:
        if not self._pending:
            raise NVMLError_Timeout()
        return self._pending.popleft()

    def nvmlEventSetFree(self, event_set: str) -> None:
        pass
