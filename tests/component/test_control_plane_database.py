"""The control plane while its database is away, on the autojump clock: weather, not death.

(tests/integration/test_database_faults.py does the same with a real PostgreSQL behind a
fault relay and a real SQLite on a full disk.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from controller_harness import ControlPlane, FakeNode, RouteWatcher, manifest, wait_until

from vectorlay.core import api
from vectorlay.core.model import ReplicaState, Role
from vectorlay.errors import PeerError


async def start(nursery: trio.Nursery, tmp_path: Path, names: list[str]) -> tuple[ControlPlane, list[FakeNode],
                                                                                 RouteWatcher]:
    plane = ControlPlane(tmp_path)
    await plane.start(nursery)
    nodes = []
    for name in names:
        node = await plane.join(name)
        await nursery.start(node.run)
        nodes.append(node)
    watcher = RouteWatcher()
    await nursery.start(watcher.run, plane, (await plane.call(api.TokenCreate(Role.PROXY))).token)
    return plane, nodes, watcher


async def test_while_the_database_is_away_routes_follow_the_nodes_and_decisions_wait(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        plane, (n0, n1), watcher = await start(nursery, tmp_path, ["n0", "n1"])
        await plane.apply(manifest("web", replicas=2))
        await wait_until(lambda: len(watcher.endpoints("web")) == 2)
        (victim,) = n0.running

        plane.store.down = True
        await n0.report(victim, ReplicaState.FAILED, "exited with code 137")
        await wait_until(lambda: victim not in watcher.endpoints("web"))  # out of routing at once
        with pytest.raises(PeerError, match=r"database unavailable \(connection refused\); nothing was changed"):
            await plane.apply(manifest("other", replicas=1))
        status = await plane.call(api.GetStatus())
        assert status.database.available is False
        assert status.database.reason == "database unavailable (connection refused)"
        assert status.database.pending_writes > 0
        assert (await plane.replicas("web"))  # reads are served from memory

        await trio.sleep(60)  # a long outage: the server stays up, and decides nothing
        assert n0.started_for("web") + n1.started_for("web") == 2
        assert (await plane.call(api.GetStatus())).database.failures_total > 5  # it kept trying

        plane.store.down = False
        await wait_until(lambda: n0.started_for("web") + n1.started_for("web") == 3, timeout_s=15)
        await wait_until(lambda: len(watcher.endpoints("web")) == 2)
        status = await plane.call(api.GetStatus())
        assert status.database.available and status.database.pending_writes == 0
        assert status.database.outages_total == 1
        await plane.apply(manifest("other", replicas=1))  # and decisions are made again

        # What memory knew was stored: a restarted server finds the same replicas.
        before = sorted((r.id, r.state) for r in await plane.replicas("web") if not r.stopping)
        await plane.restart()
        after = sorted((r.id, r.state) for r in await plane.replicas("web") if not r.stopping)
        assert victim not in {i for i, _ in after}
        assert [i for i, _ in after] == [i for i, _ in before]
        nursery.cancel_scope.cancel()


async def test_a_decision_whose_commit_went_unanswered_is_applied_once_its_fate_is_known(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        plane, (n0,), _ = await start(nursery, tmp_path, ["n0"])
        plane.store.doubt_next_commands = True  # the reconcile's commit (a start command) goes unanswered
        await plane.apply(manifest("web", replicas=1))
        await wait_until(lambda: not plane.store.doubt_next_commands)
        await trio.sleep(5)
        assert n0.started_for("web") == 0  # not delivered while its fate is unknown
        assert (await plane.call(api.GetStatus())).database.available is False
        plane.store.resolve_doubt()  # it did commit
        await wait_until(lambda: n0.started_for("web") == 1)
        await trio.sleep(30)
        assert n0.started_for("web") == 1  # delivered once, not decided twice
        replicas = await plane.replicas("web")
        assert len(replicas) == 1 and replicas[0].state == "ready"
        await plane.apply(manifest("more", replicas=1))  # later commands get fresh sequence numbers
        await wait_until(lambda: n0.started_for("more") == 1)
        nursery.cancel_scope.cancel()
