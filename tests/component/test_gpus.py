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


# --- discovery and health against the fuller fake (vectorlay.testing.fake_nvml) ---------------

from vectorlay.core.model import GpuStatus  # noqa: E402
from vectorlay.node.gpu_health import NvmlMonitor, watch_gpus  # noqa: E402
from vectorlay.testing.fake_nvml import FakeGpu, FakeNvml  # noqa: E402


def test_discovery_reads_driver_and_cuda_versions_and_leaves_out_unreadable_gpus() -> None:
    nvml = FakeNvml([FakeGpu("GPU-a", memory_total=80_000_000_000, name="NVIDIA H100 80GB HBM3"),
                     FakeGpu("GPU-b", lost=True)], driver="550.54.15", cuda=12040)
    report = NvmlInventory(nvml).report()
    assert report.gpus == [Gpu("GPU-a", "NVIDIA H100 80GB HBM3", 80.0, 0)]
    assert (report.driver_version, report.cuda_version) == ("550.54.15", "12.4")
    assert report.skipped == ["GPU 1 (GPU is lost)"]
    assert report.summary() == ("1 GPU(s) found through NVML (driver 550.54.15, CUDA 12.4); "
                                "left out: GPU 1 (GPU is lost)")
    assert nvml.initialised == 0  # shut down again


def test_versions_nvml_cannot_read_are_none() -> None:
    report = NvmlInventory(FakeNvml([FakeGpu("GPU-a")], driver=None, cuda=None)).report()
    assert (report.driver_version, report.cuda_version) == (None, None)
    assert report.summary() == "1 GPU(s) found through NVML"


def test_status_reads_utilisation_temperature_memory_and_none_when_unsupported() -> None:
    nvml = FakeNvml([FakeGpu("GPU-a", utilization=42, temperature=70, memory_used=3_500_000_000),
                     FakeGpu("GPU-b", unsupported={"utilization", "temperature", "memory"})])
    monitor = NvmlMonitor(["GPU-a", "GPU-b"], nvml)
    monitor.open()
    try:
        assert monitor.sample() == [
            GpuStatus("GPU-a", utilization_pct=42.0, temperature_c=70.0, memory_used_gb=3.5),
            GpuStatus("GPU-b", utilization_pct=None, temperature_c=None, memory_used_gb=None),
        ]
    finally:
        monitor.close()
    assert nvml.initialised == 0


def test_a_critical_xid_or_a_lost_gpu_is_unhealthy_an_application_xid_is_not() -> None:
    nvml = FakeNvml([FakeGpu("GPU-a"), FakeGpu("GPU-b"), FakeGpu("GPU-c")])
    monitor = NvmlMonitor(["GPU-a", "GPU-b", "GPU-c"], nvml)
    monitor.open()
    assert nvml.registered == {"GPU-a", "GPU-b", "GPU-c"}
    nvml.xid("GPU-a", 13)  # a graphics engine exception: the application's fault
    nvml.xid("GPU-b", 79)  # fallen off the bus
    nvml.gpus[2].lost = True
    first = {s.uuid: s for s in monitor.sample()}
    assert first["GPU-a"].healthy
    assert (first["GPU-b"].healthy, first["GPU-b"].reason) == (False, "XID 79 (GPU has fallen off the bus)")
    assert not first["GPU-c"].healthy and first["GPU-c"].reason == "NVML cannot reach the GPU: GPU is lost"
    assert first["GPU-c"].utilization_pct is None
    # An XID fault lasts until the GPU is reset (the agent restarts), not just one sample.
    assert not {s.uuid: s for s in monitor.sample()}["GPU-b"].healthy
    monitor.close()


def test_without_nvml_events_health_is_reachability() -> None:
    nvml = FakeNvml([FakeGpu("GPU-a")], events_supported=False)
    monitor = NvmlMonitor(["GPU-a"], nvml)
    monitor.open()
    nvml.xid("GPU-a", 79)  # not delivered: nothing registered
    assert [s.healthy for s in monitor.sample()] == [True]
    monitor.close()


async def test_the_monitor_publishes_each_sample_and_shuts_nvml_down() -> None:
    import trio

    # Real time (NVML is read in a thread, which an autojump clock would race past); no timing asserted.
    nvml = FakeNvml([FakeGpu("GPU-a", utilization=10)])
    published: list[tuple[GpuStatus, ...]] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_gpus, NvmlMonitor(["GPU-a"], nvml, interval_s=0.01), published.append)
            while not published:
                await trio.sleep(0.01)
            nvml.gpus[0].utilization = 90
            nvml.xid("GPU-a", 48)
            while published[-1][0].healthy:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert (published[0][0].utilization_pct, published[0][0].healthy) == (10.0, True)
    assert published[-1][0] == GpuStatus("GPU-a", 90.0, 61.0, 1.0, healthy=False, reason="XID 48 (double-bit ECC error)")
    assert nvml.initialised == 0  # NVML shut down when the monitor stopped


async def test_no_driver_at_monitor_start_means_heartbeats_without_gpu_status(autojump_clock: Any) -> None:
    import trio

    published: list[tuple[GpuStatus, ...]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_gpus, NvmlMonitor(["GPU-a"], FakeNvml([], init_error="Driver Not Loaded")),
                            published.append)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert published == []
