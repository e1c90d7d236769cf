"""Leadership on the real PostgreSQL: one leader at a time, an epoch that only grows, and a fence
that refuses a deposed leader's writes (a paused or cut-off leader cannot write after another
took over)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pytest
import sqlalchemy
import trio

from vectorlay.errors import StoreFenced
from vectorlay.server.store import engine, ops, schema
from vectorlay.server.store.engine import Store, open_store

pytestmark = pytest.mark.postgres


@pytest.fixture
def store(postgres_url: str) -> Iterator[Store]:
    s = open_store(postgres_url)
    yield s
    s.close()


def expire_lease(store: Store) -> None:
    """As if the leader had been paused past its lease."""
    store._run_sync(lambda conn: conn.execute(sqlalchemy.update(schema.leader).values(lease_until=0.0)))


async def test_one_leader_at_a_time_with_an_epoch_that_only_grows(store: Store) -> None:
    assert await store.run(partial(engine.take_lead, server_id="a", lease_s=30)) == 1
    assert await store.run(partial(engine.take_lead, server_id="b", lease_s=30)) is None  # a's lease runs
    assert await store.run(partial(engine.renew_lead, server_id="a", epoch=1, lease_s=30))
    expire_lease(store)
    assert await store.run(partial(engine.take_lead, server_id="b", lease_s=30)) == 2
    assert not await store.run(partial(engine.renew_lead, server_id="a", epoch=1, lease_s=30))  # a lost it
    holder, epoch, _, _ = await store.run(engine.leader_row)
    assert (holder, epoch) == ("b", 2)
    await store.run(partial(engine.give_up_lead, server_id="b", epoch=2))
    assert await store.run(partial(engine.take_lead, server_id="c", lease_s=30)) == 3  # no wait after a clean stop


async def test_a_deposed_leaders_writes_are_refused_by_the_fence(store: Store) -> None:
    assert await store.run(partial(engine.take_lead, server_id="a", lease_s=30)) == 1
    await store.apply([ops.Fence("a", 1), ops.SetMeta("written-by", "a")])  # while it leads: stored
    expire_lease(store)
    with pytest.raises(StoreFenced):  # its lease ran out: even with nobody else leading yet
        await store.apply([ops.Fence("a", 1), ops.SetMeta("written-by", "a-late")])
    assert await store.run(partial(engine.take_lead, server_id="b", lease_s=30)) == 2
    with pytest.raises(StoreFenced):  # and once another leads, never again
        await store.apply([ops.Fence("a", 1), ops.SetMeta("written-by", "a-paused")])
    await store.apply([ops.Fence("b", 2), ops.SetMeta("written-by", "b")])
    meta = (await store.load()).meta
    assert meta["written-by"] == "b"  # nothing of the refused writes was stored


async def test_changes_are_announced_to_the_other_servers_only_when_they_commit(store: Store,
                                                                                  postgres_url: str) -> None:
    from vectorlay.server.store.listener import Listener

    listener = Listener.open(store.engine, 5)
    try:
        store.notify_as = "a"
        await store.apply([ops.SetMeta("x", "1")])
        assert await store.run(partial(engine.take_lead, server_id="a", lease_s=30)) == 1
        expire_lease(store)
        assert await store.run(partial(engine.take_lead, server_id="b", lease_s=30)) == 2
        with pytest.raises(StoreFenced):
            await store.apply([ops.Fence("a", 1), ops.SetMeta("y", "1")])
        await trio.sleep(0.2)
        payloads = list(listener.notifications())
        assert payloads == ['{"from":"a","m":["x"]}']  # the refused write announced nothing
    finally:
        listener.close()


async def test_what_a_nodes_heartbeats_say_that_every_server_needs_is_stored_and_announced(store: Store) -> None:
    """Heartbeats stay with the server holding the session; an unhealthy GPU (which the leader
    schedules by) and the node's tunnel count reach the others as one stored change."""
    from vectorlay.server.records import NodeRecord
    from vectorlay.server.store.changes import keys_of
    from vectorlay.server.store.listener import Listener

    await store.apply([ops.PutNode(NodeRecord("n-1", "n1", "hash", (), "127.0.0.1", ("process",), 0.0,
                                              data_plane="tunnel"))])
    listener = Listener.open(store.engine, 5)
    try:
        store.notify_as = "b"
        change = ops.SetNodeStatus("n-1", (("GPU-1", "XID 79: fallen off the bus"),), 2)
        assert keys_of([change]).nodes == {"n-1"}
        await store.apply([change])
        [node] = (await store.load()).nodes
        assert node.unhealthy_gpus == (("GPU-1", "XID 79: fallen off the bus"),) and node.tunnels == 2
        await trio.sleep(0.2)
        assert any('"n-1"' in payload for payload in listener.notifications())
    finally:
        listener.close()
