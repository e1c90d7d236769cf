"""`rollout history` and `rollout undo` through the real server, in-process: revisions stored by
applies, undo through apply's path (audited, a new revision, a roll), read from the store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from controller_harness import ControlPlane, FakeNode, MemoryListener, manifest, open_link, wait_until

from vectorlay.client.api import handshake
from vectorlay.core import api
from vectorlay.core.model import Role
from vectorlay.core.protocol import Call, ClientHello, Failure, Ready
from vectorlay.errors import NotFoundError, PeerError, UserError
from vectorlay.server.store import ops
from vectorlay.server.writer import KEEP_REVISIONS
from vectorlay.wire import Link, serve


@asynccontextmanager
async def plane_with_node(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, FakeNode]]:
    async with trio.open_nursery() as nursery:
        plane = ControlPlane(tmp_path)
        await plane.start(nursery)
        node = await plane.join("n1")
        await nursery.start(node.run)
        yield plane, node
        nursery.cancel_scope.cancel()


def web(version: str, replicas: int = 1) -> str:
    return manifest("web", replicas, extra=f"  env: {{VERSION: '{version}'}}\n")


def running_versions(node: FakeNode) -> set[str]:
    return {a.spec.env["VERSION"] for a in node.running.values() if a.cluster == "web"}


async def test_history_lists_every_change_of_the_spec_and_undo_rolls_back_through_apply(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with plane_with_node(tmp_path) as (plane, node):
        await plane.apply(web("1"))
        await plane.apply(web("1"))  # unchanged: no revision
        await plane.apply(web("2"))
        await plane.apply(web("2", replicas=2))  # a change of the spec, though no roll
        history = (await plane.call(api.RolloutHistory("web"))).revisions
        assert [(r.revision, r.spec.env["VERSION"], r.spec.replicas, r.current) for r in history] == [
            (1, "1", 1, False), (2, "2", 1, False), (3, "2", 2, True)]
        assert history[0].actor.startswith("admin:") and history[0].cluster == "web" and history[0].project == "default"
        assert "spec.env.VERSION" in history[1].change and "rolling replacement" in history[1].change
        await wait_until(lambda: running_versions(node) == {"2"} and len(node.running) == 2)

        undone = await plane.call(api.RolloutUndo("web"))  # back to the one before the current: revision 2
        assert (undone.cluster, undone.to_revision, undone.change.action) == ("web", 2, "updated")
        assert (await plane.cluster("web")).replicas == 1
        undone = await plane.call(api.RolloutUndo("web", to_revision=1))
        assert (undone.to_revision, undone.change.action, undone.change.detail) == (1, "updated",
                                                                                    "rolling replacement")
        await wait_until(lambda: running_versions(node) == {"1"})  # rolled as an apply rolls

        history = (await plane.call(api.RolloutHistory("web"))).revisions
        assert [(r.revision, r.spec.env["VERSION"], r.spec.replicas) for r in history][-2:] == [(4, "2", 1),
                                                                                                 (5, "1", 1)]
        assert history[-1].change.startswith("rollback to revision 1; rolling replacement")
        again = await plane.call(api.RolloutUndo("web", to_revision=5))  # what runs already: nothing changes
        assert again.change.action == "unchanged"
        assert len((await plane.call(api.RolloutHistory("web"))).revisions) == 5
        audit = (await plane.call(api.Audit())).records
        assert [r.action for r in audit if r.target == "web"] == [
            "cluster.created", "cluster.updated", "cluster.updated", "cluster.rollback", "cluster.rollback"]


async def test_only_the_last_revisions_are_kept_and_delete_removes_them(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with plane_with_node(tmp_path) as (plane, node):
        for i in range(KEEP_REVISIONS + 3):
            await plane.apply(web(str(i)))
        history = (await plane.call(api.RolloutHistory("web"))).revisions
        assert [r.revision for r in history] == list(range(4, KEEP_REVISIONS + 4))
        await plane.call(api.Delete("web"))
        await plane.apply(web("again"))
        assert [r.revision for r in (await plane.call(api.RolloutHistory("web"))).revisions] == [1]


async def test_bad_undo_changes_nothing_and_says_why_in_one_line(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with plane_with_node(tmp_path) as (plane, node):
        await plane.apply(web("1"))
        deployer = (await plane.call(api.TokenCreate(Role.DEPLOYER, project="acme"))).token
        async with plane.api() as client:
            with pytest.raises(UserError, match="^cluster 'web' has no earlier revision to roll back to "
                                                r"\(only revision 1\)$"):
                await client.call(api.RolloutUndo("web"))
            with pytest.raises(UserError, match=r"^cluster 'web' has no revision 7 \(revision 1 is kept\)$"):
                await client.call(api.RolloutUndo("web", to_revision=7))
            with pytest.raises(UserError, match="to_revision must be a positive integer"):
                await client.call(api.RolloutUndo("web", to_revision=0))
            with pytest.raises(NotFoundError, match="^cluster 'nope' not found in project 'default'$"):
                await client.call(api.RolloutHistory("nope"))
        async with plane.api(deployer) as client:  # another project's cluster is not there
            with pytest.raises(NotFoundError):
                await client.call(api.RolloutHistory("web", "default"))
            with pytest.raises(NotFoundError):
                await client.call(api.RolloutUndo("web", "default"))
        assert [r.revision for r in (await plane.call(api.RolloutHistory("web"))).revisions] == [1]


async def test_history_is_read_from_the_store_so_every_server_answers_the_same(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with plane_with_node(tmp_path) as (plane, node):
        await plane.apply(web("1"))
        spec = (await plane.call(api.RolloutHistory("web"))).revisions[0].spec
        # Another server of the control plane stores a revision (its apply), straight into the
        # database: this one, whose memory never saw it, lists it too.
        await plane.store.apply([ops.AddRevision("web", 2.0, "admin:other", spec, "from another server", 10)])
        history = (await plane.call(api.RolloutHistory("web"))).revisions
        assert [(r.revision, r.actor, r.current) for r in history] == [(1, history[0].actor, False),
                                                                       (2, "admin:other", True)]


async def test_a_server_from_before_rollout_is_named_as_the_one_to_upgrade(
        autojump_clock: trio.testing.MockClock) -> None:
    async def old_server(path: str, link: Link) -> None:
        await link.receive_one(ClientHello)
        await link.send(Ready("admin"))
        call = await link.receive_one(Call)
        await link.send(Failure(call.id, "user", f"unknown method {call.method!r}"))  # as api.py answers
        await link.receive_one(Call)

    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(old_server, "", 0, frozenset({"/v1/api"}),
                                                      listeners=[listener], task_status=task_status))
        async with open_link(listener, "/v1/api") as (link, _):
            client = await handshake(link, "abcdef.0123456789abcdef01")
            with pytest.raises(PeerError, match="^this server does not know 'rollout_history' "
                                                r"\(it is older than this vectorlay\): upgrade the server$"):
                await client.call(api.RolloutHistory("web"))
        nursery.cancel_scope.cancel()
