"""GPU utilisation, temperature and health for heartbeats, read through NVML.

Health comes from what NVML reports: a GPU it can no longer reach ("GPU is lost") and critical
XID errors, delivered as NVML events. XIDs that an application causes (a bad kernel, a page fault)
do not make a GPU unhealthy; any other critical XID does, until the agent restarts (they need a
GPU reset, which is the owner's job). An unhealthy GPU takes its node out of scheduling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio

from vectorlay.core.model import GpuStatus
from vectorlay.node.gpus import NoGpuDriver, load_nvml, optional, text

log = logging.getLogger("vectorlay.node")

SAMPLE_INTERVAL_S = 5.0

# Caused by the workload, not the hardware (the same list NVIDIA's Kubernetes device plugin skips).
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})
XID_MEANINGS = {
    48: "double-bit ECC error",
    63: "row remapping pending",
    64: "row remapping failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


def xid_reason(xid: int) -> str:
    meaning = XID_MEANINGS.get(xid)
    return f"XID {xid}" + (f" ({meaning})" if meaning else "")


class NvmlMonitor:
    """Samples the node's GPUs. `open` and `sample` block (NVML is synchronous): call them in a thread."""

    def __init__(self, uuids: Sequence[str], nvml: Any = None, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.uuids = list(uuids)
        self.interval_s = interval_s
        self._nvml_given = nvml
        self._nvml: Any = None
        self._events: Any = None
        self._faults: dict[str, str] = {}  # uuid -> why it is unhealthy (sticky)

    def open(self) -> None:
        nvml = load_nvml(self._nvml_given)
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            raise NoGpuDriver(f"NVML: {error}") from None
        self._nvml = nvml
        try:
            self._events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as error:
            log.info("NVML cannot deliver XID events here (%s); GPU health is limited to reachability", error)
            return
        for uuid in self.uuids:
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._events)
            except nvml.NVMLError as error:
                log.info("GPU %s: no XID events (%s)", uuid, error)

    def close(self) -> None:
        nvml = self._nvml
        if nvml is None:
            return
        try:
            if self._events is not None:
                nvml.nvmlEventSetFree(self._events)
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
        self._nvml = self._events = None

    def sample(self) -> list[GpuStatus]:
        nvml = self._nvml
        assert nvml is not None, "open() first"
        self._drain_events(nvml)
        return [self._status(nvml, uuid) for uuid in self.uuids]

    def _drain_events(self, nvml: Any) -> None:
        if self._events is None:
            return
        while True:
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError_Timeout:
                return  # nothing pending
            except nvml.NVMLError as error:
                log.warning("reading NVML events failed: %s", error)
                return
            xid = int(event.eventData)
            uuid = optional(nvml, partial(nvml.nvmlDeviceGetUUID, event.device))
            if xid in APPLICATION_XIDS or uuid is None:
                continue
            self._faults.setdefault(text(uuid), xid_reason(xid))

    def _status(self, nvml: Any, uuid: str) -> GpuStatus:
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        except nvml.NVMLError as error:
            return GpuStatus(uuid, healthy=False, reason=f"NVML cannot reach the GPU: {error}")
        utilization = optional(nvml, partial(nvml.nvmlDeviceGetUtilizationRates, handle))
        temperature = optional(nvml, partial(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU))
        memory = optional(nvml, partial(nvml.nvmlDeviceGetMemoryInfo, handle))
        fault = self._faults.get(uuid)
        return GpuStatus(
            uuid,
            utilization_pct=float(utilization.gpu) if utilization is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            memory_used_gb=round(memory.used / 1e9, 2) if memory is not None else None,
            healthy=fault is None,
            reason=fault or "",
        )


async def watch_gpus(monitor: NvmlMonitor, publish: Callable[[tuple[GpuStatus, ...]], None],
                     *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Sample every `monitor.interval_s` and hand each sample to `publish` (the agent's heartbeats)."""
    try:
        await trio.to_thread.run_sync(monitor.open)
    except NoGpuDriver as error:  # NVML failed after discovery worked: heartbeats go without GPU status
        log.warning("cannot watch GPU health: %s", error)
        task_status.started()
        return
    task_status.started()
    try:
        while True:
            publish(tuple(await trio.to_thread.run_sync(monitor.sample)))
            await trio.sleep(monitor.interval_s)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(monitor.close)
