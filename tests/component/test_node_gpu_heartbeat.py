"""GPU status travels in heartbeats: the real server and the real agent in one process, the GPU
read through a fake `pynvml`. A GPU that reports a critical XID takes its node out of scheduling."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio

from vectorlay.client.api import ApiClient, open_api
from vectorlay.core.api import Apply, GetReplicas, TokenCreate
from vectorlay.core.api_views import ReplicaView
from vectorlay.core.model import Gpu, Role
from vectorlay.node.agent import join, run_node
from vectorlay.node.gpu_health import NvmlMonitor
from vectorlay.server.app import ServerConfig, run_server
from vectorlay.testing.fake_nvml import FakeGpu, FakeNvml
from vectorlay.testing.fakes import FakeRuntime

MANIFEST = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {{name: {name}}}
spec:
  runtime: process
  command: ["serve"]
  gpu: {{type: "RTX 4090", count: 1}}
  health: null
"""


async def replicas(api: ApiClient, cluster: str) -> list[ReplicaView]:
    return [r for r in (await api.call(GetReplicas())).replicas if r.cluster == cluster]


async def test_an_xid_on_the_nodes_gpu_stops_new_replicas_landing_there(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([FakeGpu("GPU-a"), FakeGpu("GPU-b")])
    gpus = [Gpu("GPU-a", "NVIDIA GeForce RTX 4090", 25.8, 0), Gpu("GPU-b", "NVIDIA GeForce RTX 4090", 25.8, 1)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_server, ServerConfig(tmp_path / "server", port=0,
                                                                  heartbeat_interval_s=0.2))
            url = f"ws://127.0.0.1:{server.port}"
            async with open_api(url, server.admin_token) as api:
                token = (await api.call(TokenCreate(Role.NODE))).token
                creds = await join(url, token, "gpu-node", gpus, "127.0.0.1", ("process",), tmp_path / "node")
                agent = await nursery.start(partial(
                    run_node, creds, tmp_path / "node", FakeRuntime(), gpus, ("process",),
                    gpu_monitor=NvmlMonitor(["GPU-a", "GPU-b"], nvml, interval_s=0.05)))

                await api.call(Apply(MANIFEST.format(name="first")))
                while [r.state for r in await replicas(api, "first")] != ["ready"]:
                    await trio.sleep(0.05)
                assert agent.gpu_status and all(s.healthy and s.utilization_pct == 37.0 for s in agent.gpu_status)

                nvml.xid("GPU-b", 79)  # the GPU fell off the bus
                while all(s.healthy for s in agent.gpu_status):
                    await trio.sleep(0.05)
                assert [s.reason for s in agent.gpu_status] == ["", "XID 79 (GPU has fallen off the bus)"]
                # The next heartbeat carries it to the server.
                while "node gpu-node has an unhealthy GPU: GPU-b (XID 79" not in caplog.text:
                    await trio.sleep(0.05)

                # GPU-b is free, yet nothing new lands on this node while it is unhealthy.
                await api.call(Apply(MANIFEST.format(name="second")))
                await trio.sleep(1)
                [second] = await replicas(api, "second")
                assert (second.state, second.node) == ("pending", None)
                assert second.reason == "no ready node to run it"
                [first] = await replicas(api, "first")
                assert first.state == "ready"  # what runs keeps running
            nursery.cancel_scope.cancel()
