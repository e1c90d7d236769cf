"""The control plane in-process with fake nodes, on trio's autojump clock: one event, then the plan
and the commands the nodes received. (tests/integration covers the same with real processes.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from controller_harness import ControlPlane, FakeNode, Outcome, RouteWatcher, manifest, wait_until

from vectorlay.core import api
from vectorlay.core.api_views import ClusterView, ReplicaView
from vectorlay.core.model import Assignment, ReplicaState, Role
from vectorlay.core.protocol import ReplicaReport, ReplicaStatus

FAILED = (ReplicaState.STARTING, ReplicaState.FAILED)


async def ready_count(plane: ControlPlane, cluster: str) -> int:
    return sum(1 for r in await plane.replicas(cluster) if r.state == "ready" and not r.stopping)


async def test_a_cluster_is_placed_spread_and_served(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        plane = ControlPlane(tmp_path)
        await plane.start(nursery)
        nodes = [await plane.join(f"n{i}") for i in range(2)]
        for node in nodes:
            await nursery.start(node.run)
        watcher = RouteWatcher()
        proxy_token = (await plane.call(api.TokenCreate(Role.PROXY))).token
        await nursery.start(watcher.run, plane, proxy_token)
        await plane.apply(manifest("web", replicas=2))
        await wait_until(lambda: len(watcher.endpoints("web")) == 2)
        assert [n.started_for("web") for n in nodes] == [1, 1]  # spread, one each
        nursery.cancel_scope.cancel()


def always(outcome: Outcome) -> object:
    return lambda assignment: outcome


async def start_plane(nursery: trio.Nursery, tmp_path: Path, names: list[str], **node_kwargs: object
                      ) -> tuple[ControlPlane, list[FakeNode]]:
    plane = ControlPlane(tmp_path, faults=node_kwargs.pop("faults", frozenset()))  # type: ignore[arg-type]
    await plane.start(nursery)
    nodes = []
    for name in names:
        node = await plane.join(name, **node_kwargs)  # type: ignore[arg-type]
        await nursery.start(node.run)
        nodes.append(node)
    return plane, nodes


async def test_a_replica_that_cannot_start_is_replaced_with_capped_backoff_kept_across_a_restart(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """The issue's `image_pull: never` typo: without backoff it churned a new replica every 30 ms
    until an overflow killed the server."""
    bad = Outcome(FAILED, reason="image localhost/no-such-image:1 is not on this node")
    async with trio.open_nursery() as nursery:
        plane, (node,) = await start_plane(nursery, tmp_path, ["n0"], outcome=always(bad))
        await plane.apply(manifest("noimg", replicas=2))
        await trio.sleep(600)
        starts = node.started_for("noimg")
        # Backoff 0, 10, 20, 40, 80, 160, 300 s: about a dozen starts in ten minutes, not thousands.
        assert 6 <= starts <= 20, starts
        view = await plane.cluster("noimg")
        assert view.health.status == "crash-looping"
        message = view.health.message
        assert message.startswith("crash-looping: image localhost/no-such-image:1 is not on this node on n0; ")
        assert "next try in" in message or "replacing it now" in message

        failures = view.health.failures
        waiting = view.health.next_try_in_s
        await plane.restart()
        await wait_until(lambda: node.connected)
        after = await plane.cluster("noimg")
        assert after.health.failures == failures  # kept across the restart
        assert waiting is not None and after.health.next_try_in_s is not None
        assert after.health.next_try_in_s <= waiting + 1
        before_restart = node.started_for("noimg")
        await trio.sleep(5)
        assert node.started_for("noimg") == before_restart or waiting < 5  # no burst after a restart
        nursery.cancel_scope.cancel()


async def test_waiting_for_a_crash_looping_cluster_ends_early_with_the_reason(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    bad = Outcome(FAILED, reason="exec: serve: not found")
    async with trio.open_nursery() as nursery:
        plane, _ = await start_plane(nursery, tmp_path, ["n0"], outcome=always(bad))
        await plane.apply(manifest("broken", replicas=2))
        began = trio.current_time()
        result = await plane.call(api.WaitReady(("broken",), 300))
        assert trio.current_time() - began < 60  # not the 5-minute timeout
        assert result.ready is False
        assert result.failed[0].cluster == "broken"
        assert result.failed[0].reason.startswith("crash-looping: exec: serve: not found on n0")
        nursery.cancel_scope.cancel()


async def test_a_failure_tied_to_a_node_sends_the_next_copy_elsewhere(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    def outcome(assignment: Assignment) -> Outcome:
        return READY_OUTCOME

    missing_here = Outcome(FAILED, reason="image x:1 is not on this node and image_pull is never", node_fault=True)
    async with trio.open_nursery() as nursery:
        plane, (n0, n1) = await start_plane(nursery, tmp_path, ["n0", "n1"])
        n0.outcome = always(missing_here)  # type: ignore[assignment]
        n1.outcome = outcome
        await plane.apply(manifest("web", replicas=1))
        await wait_until(lambda: n1.started_for("web") == 1)
        await trio.sleep(30)
        assert n0.started_for("web") == 1  # tried there first (name order), never again
        assert await ready_count(plane, "web") == 1
        nursery.cancel_scope.cancel()


READY_OUTCOME = Outcome()


async def test_a_crashed_agent_is_suspect_at_once_and_a_goodbye_keeps_it_ready(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        plane, (n0,) = await start_plane(nursery, tmp_path, ["n0"])
        watcher = RouteWatcher()
        await nursery.start(watcher.run, plane, (await plane.call(api.TokenCreate(Role.PROXY))).token)
        await plane.apply(manifest("web", replicas=1))
        await wait_until(lambda: watcher.endpoints("web"))
        n0.crash(revive_after_s=None)
        began = trio.current_time()
        await wait_until(lambda: not watcher.endpoints("web"))
        assert trio.current_time() - began < 0.5  # out of routing before any heartbeat is missed
        assert (await plane.nodes())["n0"].state == "suspect"
        nursery.cancel_scope.cancel()


async def test_a_node_lost_and_found_leaves_exactly_the_desired_copies(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        plane, (n0, n1) = await start_plane(nursery, tmp_path, ["n0", "n1"])
        await plane.apply(manifest("web", replicas=2, reschedule_after="5s"))
        await wait_until(lambda: n0.running and n1.running)
        lost = set(n0.running)
        n0.crash(revive_after_s=None)
        # suspect at once, down after 10 s of silence, replaced 5 s (reschedule_after) later
        await wait_until(lambda: n1.started_for("web") == 2, timeout_s=40)
        assert await ready_count(plane, "web") == 2
        n0.revive_after_s = 0.1
        nursery.start_soon(n0.run)  # the agent comes back, still running its old copy
        await wait_until(lambda: n0.connected)
        await wait_until(lambda: not (set(n0.running) & lost))  # the replaced copy is stopped there

        async def settled() -> tuple[ReplicaView, ...] | None:
            replicas = await plane.replicas("web")
            live = [r for r in replicas if not r.stopping]
            done = len(replicas) == 2 and all(r.state == "ready" for r in live)
            return replicas if done else None

        with trio.fail_after(60):
            while (replicas := await settled()) is None:
                await trio.sleep(0.5)
        # Exactly two copies remain, and since n0 is back they are spread over both nodes again.
        assert sorted(str(r.node) for r in replicas) == ["n0", "n1"]
        nursery.cancel_scope.cancel()


async def test_reports_with_a_stale_generation_or_about_another_node_change_nothing(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    from controller_harness import open_link

    from vectorlay.core.protocol import PROTOCOL_VERSION, SERVER_TO_NODE, NodeHello, Welcome
    from vectorlay.wire import LinkClosed

    async with trio.open_nursery() as nursery:
        plane, (n0, n1) = await start_plane(nursery, tmp_path, ["n0", "n1"])
        await plane.apply(manifest("web", replicas=2))
        await wait_until(lambda: n0.running and n1.running)
        (mine,) = n0.running.values()
        (theirs,) = n1.running.values()
        before = {r.id: r for r in await plane.replicas("web")}
        n0.crash(revive_after_s=None)
        async with open_link(plane.listener, "/v1/node") as (link, _):
            # n0 comes back (this link speaks for it) and reports what is stale.
            await link.send(NodeHello(PROTOCOL_VERSION, n0.credential, (), "127.0.0.1", ("process",), (), 0,
                                      tuple(n0.reports.values())))
            await link.receive_one(Welcome)
            await wait_until(lambda: True, timeout_s=1)
            await trio.sleep(1)
            await link.send(ReplicaStatus(ReplicaReport(mine.replica_id, mine.generation - 1, ReplicaState.FAILED,
                                                        "from an older assignment")))
            await trio.sleep(1)
            after = {r.id: r for r in await plane.replicas("web")}
            assert after[mine.replica_id].state == "ready" == before[mine.replica_id].state
            await link.send(ReplicaStatus(ReplicaReport(theirs.replica_id, theirs.generation, ReplicaState.FAILED,
                                                        "not yours")))
            await trio.sleep(1)
            with pytest.raises(LinkClosed) as closed:
                while True:
                    await link.receive(SERVER_TO_NODE)  # what was queued for it, then the close
            assert closed.value.code == 1008 and "is not this node's" in closed.value.reason
        after = {r.id: r for r in await plane.replicas("web")}
        assert after[theirs.replica_id].state == "ready"
        nursery.cancel_scope.cancel()


async def test_a_mass_loss_is_replaced_at_the_budgeted_pace(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Half of 10 nodes vanish at once: lost replicas are given up on at most one per minute
    (a tenth of the fleet), not all at once."""
    async with trio.open_nursery() as nursery:
        plane, nodes = await start_plane(nursery, tmp_path, [f"n{i}" for i in range(10)])
        await plane.apply(manifest("web", replicas=10, reschedule_after="5s"))
        await wait_until(lambda: all(n.running for n in nodes))
        for node in nodes[:5]:
            node.crash(revive_after_s=None)
        survivors = nodes[5:]

        def replacements() -> int:
            return sum(n.started_for("web") for n in survivors) - len(survivors)

        await trio.sleep(16)  # down after 10 s, grace 5 s: the first replacement may go now
        timeline = []
        for _ in range(6):
            await trio.sleep(30)
            timeline.append(replacements())
        # burst of 1, then one per minute (6 s per token... a tenth of 10 nodes is 1 per minute)
        assert timeline[-1] <= 1 + 3, timeline  # about 3 minutes: never all 5 at once
        assert timeline[-1] >= 3, timeline  # but it does go on
        assert all(b - a <= 1 for a, b in zip([0, *timeline], timeline, strict=False)), timeline
        nursery.cancel_scope.cancel()


async def test_a_server_restart_reschedules_nothing_and_nodes_come_back(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        plane, nodes = await start_plane(nursery, tmp_path, ["n0", "n1", "n2"])
        await plane.apply(manifest("web", replicas=3))
        await wait_until(lambda: all(n.running for n in nodes))
        before = sorted(r.id for r in await plane.replicas("web"))
        await plane.restart()
        await wait_until(lambda: all(n.connected for n in nodes), timeout_s=30)
        await trio.sleep(90)  # past the reconnect grace: everything reconciled again
        after = await plane.replicas("web")
        assert sorted(r.id for r in after) == before
        assert all(r.state == "ready" for r in after)
        assert [n.started_for("web") for n in nodes] == [1, 1, 1]
        assert {s.state for s in (await plane.nodes()).values()} == {"ready"}
        nursery.cancel_scope.cancel()


async def test_a_cluster_whose_replicas_kill_agents_is_quarantined_and_the_fleet_keeps_serving(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """The issue's NUL byte that killed every agent it reached, one after another."""

    def outcome(assignment: Assignment) -> Outcome:
        return Outcome(die=True) if assignment.cluster == "poison" else Outcome()

    async with trio.open_nursery() as nursery:
        plane, nodes = await start_plane(nursery, tmp_path, ["n0", "n1", "n2"], outcome=outcome)
        await plane.apply(manifest("good", replicas=1))
        await wait_until(lambda: sum(n.started_for("good") for n in nodes) == 1)
        await plane.apply(manifest("poison", replicas=1, reschedule_after="2s"))
        view = await wait_until_cluster(plane, "poison", lambda v: v.health.status == "quarantined")
        assert "quarantined: the agents of" in view.health.message
        deaths = sum(n.deaths for n in nodes)
        assert 2 <= deaths <= 3
        await trio.sleep(120)
        assert sum(n.deaths for n in nodes) == deaths  # not placed anywhere any more
        assert all(n.connected for n in nodes)  # the agents are back
        await plane.apply(manifest("other", replicas=2))  # the rest of the fleet works as usual
        await wait_until(lambda: sum(n.started_for("other") for n in nodes) == 2)
        assert await ready_count(plane, "other") == 2
        replicas = await plane.replicas("poison")
        assert all(r.node is None for r in replicas if not r.stopping)

        lifted = await plane.call(api.Unquarantine("poison"))
        assert lifted.lifted is True
        await wait_until(lambda: sum(n.deaths for n in nodes) > deaths)  # placed again (and it kills again)
        nursery.cancel_scope.cancel()


async def wait_until_cluster(plane: ControlPlane, name: str, predicate: Callable[[ClusterView], bool],
                             timeout_s: float = 120.0) -> ClusterView:
    with trio.fail_after(timeout_s):
        while True:
            view = await plane.cluster(name)
            if predicate(view):
                return view
            await trio.sleep(0.5)


async def test_an_error_while_reconciling_one_cluster_degrades_it_and_spares_the_others(
        tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    async with trio.open_nursery() as nursery:
        plane, nodes = await start_plane(nursery, tmp_path, ["n0", "n1"],
                                         faults=frozenset({"reconcile-raise:broken"}))
        await plane.apply(manifest("broken", replicas=1) + "---\n" + manifest("fine", replicas=2))
        await wait_until(lambda: sum(n.started_for("fine") for n in nodes) == 2)
        view = await wait_until_cluster(plane, "broken", lambda v: v.health.status == "degraded")
        assert view.health.message.startswith("degraded: the server could not reconcile it (RuntimeError")
        assert "reconciling cluster broken failed" in caplog.text
        assert await ready_count(plane, "fine") == 2
        await plane.apply(manifest("later", replicas=1))  # and the loop goes on for new work
        await wait_until(lambda: sum(n.started_for("later") for n in nodes) == 1)
        nursery.cancel_scope.cancel()


GPU_1 = '  gpu: {type: "RTX 4090", count: 1}\n'


async def test_a_roll_on_a_full_gpu_fleet_finishes_one_copy_at_a_time(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Two nodes with one GPU each, two replicas of one GPU, then an env change: it used to wait
    forever ("all 2 node(s) ... are fully used"); now it replaces one copy at a time and never
    serves fewer than replicas - 1."""
    async with trio.open_nursery() as nursery:
        plane, nodes = await start_plane(nursery, tmp_path, ["n0", "n1"], gpus=1,
                                         outcome=always(Outcome(ready_after_s=3)))
        watcher = RouteWatcher()
        await nursery.start(watcher.run, plane, (await plane.call(api.TokenCreate(Role.PROXY))).token)
        await plane.apply(manifest("web", replicas=2, extra=GPU_1))
        await wait_until(lambda: len(watcher.endpoints("web")) == 2)
        await plane.apply(manifest("web", replicas=2, extra=GPU_1 + "  env: {MODEL: v2}\n"))
        lowest = 2
        began = trio.current_time()
        while True:
            lowest = min(lowest, len(watcher.endpoints("web")))
            view = await plane.cluster("web")
            if view.up_to_date == 2 and view.ready == 2 and not view.stopping:
                break
            assert trio.current_time() - began < 60, view
            await trio.sleep(0.2)
        assert lowest >= 1  # never below replicas - 1 serving
        assert sorted(str(r.node) for r in await plane.replicas("web")) == ["n0", "n1"]
        nursery.cancel_scope.cancel()


async def test_a_packed_cluster_spreads_again_when_a_node_is_uncordoned(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        plane, nodes = await start_plane(nursery, tmp_path, ["n0", "n1"], outcome=always(Outcome(ready_after_s=2)))
        watcher = RouteWatcher()
        await nursery.start(watcher.run, plane, (await plane.call(api.TokenCreate(Role.PROXY))).token)
        await plane.call(api.NodeCordon("n1"))
        await plane.apply(manifest("web", replicas=2))
        await wait_until(lambda: len(watcher.endpoints("web")) == 2)
        assert {r.node for r in await plane.replicas("web")} == {"n0"}  # packed: n1 is cordoned
        await plane.call(api.NodeUncordon("n1"))
        lowest = 2
        with trio.fail_after(60):
            while sorted(str(r.node) for r in await plane.replicas("web")) != ["n0", "n1"]:
                lowest = min(lowest, len(watcher.endpoints("web")))
                await trio.sleep(0.2)
        assert lowest == 2  # the new copy was ready before the old one stopped
        await trio.sleep(30)
        assert nodes[1].started_for("web") == 1 and nodes[0].started_for("web") == 2  # one move, no churn
        nursery.cancel_scope.cancel()


async def test_a_replica_whose_node_is_not_ready_is_never_shown_ready(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        plane, (n0, n1) = await start_plane(nursery, tmp_path, ["n0", "n1"])
        await plane.apply(manifest("web", replicas=2, reschedule_after="10m"))
        await wait_until(lambda: n0.running and n1.running)
        n0.crash(revive_after_s=None)
        await trio.sleep(15)  # down, and not replaced yet (reschedule_after is long)
        replicas = {r.node: r for r in await plane.replicas("web")}
        assert replicas["n0"].state == "unknown" and replicas["n0"].reason == "its node n0 is down"
        assert replicas["n1"].state == "ready"
        view = await plane.cluster("web")
        assert view.ready == 1 and view.states == {"ready": 1, "unknown": 1}
        summary = await plane.call(api.GetFleetSummary())
        assert summary.replicas == {"ready": 1, "unknown": 1}  # the table and the summary agree
        nursery.cancel_scope.cancel()


async def test_after_a_server_restart_a_node_not_back_yet_is_reconnecting_not_ready(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        plane, (n0, n1) = await start_plane(nursery, tmp_path, ["n0", "n1"])
        await trio.sleep(1)  # both known as ready (node states are stored in batches, every tick)
        n1.crash(revive_after_s=None)
        await plane.restart()
        await wait_until(lambda: n0.connected)
        await trio.sleep(1)
        nodes = await plane.nodes()
        assert nodes["n0"].state == "ready" and nodes["n1"].state == "reconnecting"
        assert (await plane.call(api.GetFleetSummary())).nodes == {"ready": 1, "reconnecting": 1}
        await trio.sleep(70)  # the reconnect grace is over: judged on silence now
        assert (await plane.nodes())["n1"].state == "down"
        nursery.cancel_scope.cancel()


async def test_waiting_for_a_cluster_no_node_can_run_ends_early_with_the_reason(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        plane, _ = await start_plane(nursery, tmp_path, ["n0"])
        await plane.apply(manifest("web", replicas=1, extra='  gpu: {type: "H100", count: 1}\n'))
        began = trio.current_time()
        result = await plane.call(api.WaitReady(("web",), 300))
        assert trio.current_time() - began < 5
        assert result.failed == (api.Blocked("web", "cannot be placed: no ready node has 1 GPU(s) of 'H100'"),)
        nursery.cancel_scope.cancel()
