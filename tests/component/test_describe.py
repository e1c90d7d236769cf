"""`describe node` and `describe replica` through the real server, in-process: what each shows,
who may see it, and the one line for a name that is not there."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from controller_harness import ControlPlane, FakeNode, manifest, wait_until

from vectorlay.client import output
from vectorlay.client.api import ApiClient
from vectorlay.core import api, codec
from vectorlay.core.api_views import (
    AuditView,
    EventView,
    GpuView,
    NodeDescription,
    NodeView,
    ReplicaDescription,
    ReplicaView,
)
from vectorlay.core.model import GpuStatus, ReplicaState, Role
from vectorlay.core.protocol import Heartbeat
from vectorlay.errors import AuthError, NotFoundError


@asynccontextmanager
async def plane_with_node(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, FakeNode]]:
    async with trio.open_nursery() as nursery:
        plane = ControlPlane(tmp_path)
        await plane.start(nursery)
        node = await plane.join("n1", gpus=2)
        await nursery.start(node.run)
        yield plane, node
        nursery.cancel_scope.cancel()


async def test_describe_node_shows_gpus_with_health_replicas_data_plane_and_changes(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with plane_with_node(tmp_path) as (plane, node):
        await plane.apply(manifest("web", extra="  gpu: {count: 1}\n"))
        await wait_until(lambda: any(r.state is ReplicaState.READY for r in node.reports.values()))
        await node._send(Heartbeat(gpus=(GpuStatus("n1-gpu1", healthy=False, reason="XID 79: fell off the bus"),)))
        async with plane.api() as client:
            await client.call(api.NodeCordon("n1"))
            info = await wait_until_described(client, lambda d: not d.node.gpus_healthy)
        assert info.node.name == "n1" and info.node.state == "ready" and info.node.connected
        assert info.node.data_plane == "direct" and info.node.last_seen_s is not None
        assert not info.node.schedulable and not info.draining
        health = {g.uuid: (g.healthy, g.health_reason, g.in_use) for g in info.node.gpus}
        assert health["n1-gpu1"] == (False, "XID 79: fell off the bus", False)
        assert health["n1-gpu0"][2] is True  # the replica holds it
        assert [r.cluster for r in info.replicas] == ["web"]
        replica_id = info.replicas[0].id
        assert any(e.replica == replica_id and e.message == "placed on n1" for e in info.events)
        assert [c.action for c in info.changes] == ["node.join", "node.cordon"]
        # What -o json prints: the view as JSON, fields by name.
        dumped = codec.dump(info)
        assert dumped["node"]["gpus"][1]["healthy"] is False and dumped["replicas"][0]["id"] == replica_id


async def wait_until_described(client: ApiClient,
                               predicate: Callable[[NodeDescription], bool]) -> NodeDescription:
    """Describe n1 until `predicate` holds (heartbeats reach the server in their own time)."""
    with trio.fail_after(30):
        while True:
            info = await client.call(api.DescribeNode("n1"))
            if predicate(info):
                return info
            await trio.sleep(0.5)


async def test_describe_replica_shows_where_it_runs_its_restarts_and_events(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with plane_with_node(tmp_path) as (plane, node):
        await plane.apply(manifest("web", extra="  port: 9000\n"))
        replica_id = await wait_until(lambda: next((r for r, rep in node.reports.items()
                                                    if rep.state is ReplicaState.READY), None))
        await node.report(replica_id, ReplicaState.STARTING, "exited with 1; restarting in 1s (restart 1)")
        await trio.sleep(1)
        await node.report(replica_id, ReplicaState.READY)
        await trio.sleep(1)
        await node.report(replica_id, ReplicaState.STARTING, "exited with 1; restarting in 2s (restart 2)")
        await trio.sleep(1)
        info = await plane.call(api.DescribeReplica(replica_id))
        assert info.replica.cluster == "web" and info.replica.node == "n1"
        assert info.replica.state == "starting" and "restart 2" in info.replica.reason
        assert info.port == 9000 and info.restarts == 2 and info.failures == 0
        assert info.replica.created_at is not None and info.replica.address is not None
        messages = [e.message for e in info.events]
        assert messages[0] == "placed on n1" and "starting: exited with 1; restarting in 2s (restart 2)" in messages


async def test_describe_refuses_unknown_names_and_other_projects_in_one_line(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with plane_with_node(tmp_path) as (plane, node):
        await plane.apply(manifest("web"))
        replica_id = await wait_until(lambda: next(iter(node.running), None))
        deployer = (await plane.call(api.TokenCreate(Role.DEPLOYER, project="acme"))).token
        async with plane.api() as admin:
            with pytest.raises(NotFoundError, match="^node 'nope' not found$"):
                await admin.call(api.DescribeNode("nope"))
            with pytest.raises(NotFoundError, match="^replica 'web-nope' not found$"):
                await admin.call(api.DescribeReplica("web-nope"))
        async with plane.api(deployer) as client:
            with pytest.raises(AuthError, match="needs an admin token"):  # nodes are the admin's, as in get nodes
                await client.call(api.DescribeNode("n1"))
            with pytest.raises(NotFoundError, match=f"^replica '{replica_id}' not found$"):  # another project's
                await client.call(api.DescribeReplica(replica_id))
        await plane.apply(manifest("api", extra="").replace("{name: api}", "{name: api, project: acme}"))
        acme_id = await wait_until(lambda: next((r for r, a in node.running.items() if a.cluster == "api.acme"),
                                                None))
        async with plane.api(deployer) as client:
            assert (await client.call(api.DescribeReplica(acme_id))).replica.project == "acme"


def test_descriptions_print_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    replica = ReplicaView("web-abcde", "web", "default", "n1", "id1", "ready", "", "127.0.0.1:20000", ("g0",), 3,
                          "rev1", None, False, 1_800_000_000.0)
    node = NodeView("id1", "n1", "ready", True, "127.0.0.1", (GpuView("g0", "RTX 4090", 24.0, 0, True, False, "XID 79"),),
                    False, ("process",), (), 1, 0.4, 1_800_000_000.0, False, "tunnel", 2)
    output.print_node_description(NodeDescription(node, True, None, None, (replica,),
                                                  (EventView(1_800_000_000.0, "web-abcde", "placed on n1"),),
                                                  (AuditView(1_800_000_000.0, "admin:x", "node.drain", "n1", None, ""),)))
    text = capsys.readouterr().out
    assert "State:         ready (cordoned, draining)" in text
    assert "Data plane:    tunnel (2 proxies)" in text
    assert "[0] RTX 4090, 24 GB, in use, UNHEALTHY: XID 79" in text
    assert "web-abcde  cluster=web  state=ready" in text and "node.drain by admin:x" in text
    output.print_replica_description(ReplicaDescription(replica, 8000, 2, 0, ()))
    text = capsys.readouterr().out
    assert "Node:          n1" in text and "Restarts:      2" in text
    assert "Port:          8000 (published at 127.0.0.1:20000)" in text
