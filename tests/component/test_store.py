"""The store on SQLite and on the real PostgreSQL: migrations, every op, token uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy

from vectorlay.core.model import Assignment, ClusterSpec, Gpu, GpuRequest, NodeState, Replica, ReplicaState, Role
from vectorlay.errors import StoreError, StoreUnavailable
from vectorlay.server.records import ClusterRecord, CommandRecord, NodeRecord, TokenRecord
from vectorlay.server.store import Store, open_store, ops, schema
from vectorlay.server.store.engine import sqlite_url

SPEC = ClusterSpec(name="echo", replicas=2, gpu=GpuRequest(("RTX 4090",), 1), command=("python3", "-m", "x"),
                   env={"A": "1"})
NODE = NodeRecord("n-1", "n1", "hash", (Gpu("GPU-1", "RTX 4090", 24.0, 0),), "10.0.0.1", ("process",), 1000.0)


async def test_migrations_are_idempotent_and_versioned(db_url: str) -> None:
    first = open_store(db_url)
    first.close()
    second = open_store(db_url)  # a second start finds the schema current and changes nothing
    try:
        version = second._run_sync(schema.current_version)
        assert version == schema.SCHEMA_VERSION
    finally:
        second.close()


async def test_a_newer_schema_is_refused(db_url: str) -> None:
    s = open_store(db_url)
    s._run_sync(lambda conn: conn.execute(
        schema.meta.update().where(schema.meta.c.key == "schema_version").values(value="999")))
    s.close()
    with pytest.raises(StoreError, match="newer than this vectorlay"):
        open_store(db_url)


async def test_every_op_round_trips_through_load(store: Store) -> None:
    replica = Replica("echo-abcde", "echo", "n-1", ("GPU-1",), ReplicaState.READY, "", "10.0.0.1:9000", 7,
                      False, "rev1")
    command = CommandRecord("n-1", 1, "start", replica.id, 7, Assignment(replica.id, "echo", 7, SPEC, ("GPU-1",)),
                            1001.0)
    await store.apply([
        ops.PutNode(NODE), ops.PutCluster(ClusterRecord(SPEC, 1000.0, 1000.0)),
        ops.PutReplica(replica, 1000.5), ops.PutCommand(command), ops.SetMeta("generation", "7"),
    ])
    snapshot = await store.load()
    assert snapshot.nodes == [NODE]
    assert [c.spec for c in snapshot.clusters] == [SPEC]
    assert snapshot.replicas == [(replica, 1000.5)]
    assert snapshot.commands == [command]
    assert snapshot.meta["generation"] == "7"

    # Upserts replace; deletes remove; acks drop commands up to the sequence.
    moved = Replica(replica.id, "echo", "n-1", ("GPU-1",), ReplicaState.UNREADY, "probe failing", None, 8,
                    True, "rev1")
    second = CommandRecord("n-1", 2, "stop", replica.id, 8, None, 1002.0)
    await store.apply([ops.PutReplica(moved, 1000.5), ops.PutCommand(second), ops.AckCommands("n-1", 1),
                       ops.PutNode(NodeRecord(**{**NODE.__dict__, "state": NodeState.READY, "next_seq": 3,
                                                 "data_plane": "tunnel"}))])
    snapshot = await store.load()
    assert snapshot.replicas == [(moved, 1000.5)]
    assert [c.seq for c in snapshot.commands] == [2]
    assert snapshot.nodes[0].next_seq == 3 and snapshot.nodes[0].state is NodeState.READY
    assert snapshot.nodes[0].data_plane == "tunnel"

    await store.apply([ops.DeleteReplica(replica.id), ops.DeleteCluster("echo"), ops.DeleteNode("n-1")])
    snapshot = await store.load()
    assert (snapshot.nodes, snapshot.clusters, snapshot.replicas, snapshot.commands) == ([], [], [], [])


async def test_a_large_batch_is_written_in_bulk_with_the_same_result_as_one_by_one(store: Store) -> None:
    replicas = [Replica(f"echo-{i:05d}", "echo", "n-1", (), ReplicaState.PENDING, "", None, 1, False, "rev1")
                for i in range(300)]
    commands = [CommandRecord("n-1", i + 1, "start", r.id, 1, None, 1.0) for i, r in enumerate(replicas)]
    ready = [Replica(r.id, "echo", "n-1", (), ReplicaState.READY, "", "10.0.0.1:9000", 1, False, "rev1")
             for r in replicas]
    await store.apply([ops.PutNode(NODE), *[ops.PutReplica(r, 1.0) for r in replicas],
                       *[ops.PutCommand(c) for c in commands]])
    # Two writes of one replica in a batch: the later wins. A delete between puts keeps its place:
    # the puts before it are written first, the one after it afterwards.
    gone, back = replicas[0].id, replicas[1].id
    await store.apply([*[ops.PutReplica(r, 1.0) for r in replicas], *[ops.PutReplica(r, 2.0) for r in ready],
                       ops.DeleteReplica(gone), ops.DeleteReplica(back), ops.PutReplica(ready[1], 3.0),
                       ops.AckCommands("n-1", 100)])
    snapshot = await store.load()
    expected = [(r, 3.0 if r.id == back else 2.0) for r in ready if r.id != gone]
    assert sorted(snapshot.replicas, key=lambda item: item[0].id) == expected
    assert [c.seq for c in snapshot.commands] == list(range(101, 301))


async def test_a_failed_batch_leaves_nothing_behind(store: Store) -> None:
    command = CommandRecord("n-1", 1, "stop", "r", 1, None, 1.0)
    await store.apply([ops.PutCommand(command)])
    with pytest.raises(StoreError):
        # The same (node, seq) twice violates the primary key: the whole batch must roll back.
        await store.apply([ops.PutNode(NODE), ops.PutCommand(command)])
    snapshot = await store.load()
    assert snapshot.nodes == []
    assert [c.seq for c in snapshot.commands] == [1]


async def test_token_uses_are_spent_atomically(store: Store) -> None:
    limited = TokenRecord("abcdef", "h", Role.NODE, 1.0, None, 2)
    unlimited = TokenRecord("ghijkl", "h", Role.NODE, 1.0, None, None)
    await store.apply([ops.PutToken(limited), ops.PutToken(unlimited)])
    assert [await store.consume_token_use("abcdef") for _ in range(3)] == [True, True, False]
    assert all([await store.consume_token_use("ghijkl") for _ in range(3)])
    assert not await store.consume_token_use("nosuch")
    assert (await store.get_token("abcdef")) == TokenRecord("abcdef", "h", Role.NODE, 1.0, None, 0)
    assert await store.get_token("nosuch") is None
    assert {t.id for t in await store.list_tokens()} == {"abcdef", "ghijkl"}


def test_bad_urls_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="invalid database URL"):
        open_store("not a url")
    with pytest.raises(StoreError, match="unsupported database 'mysql'"):
        open_store("mysql://root@127.0.0.1/test")
    with pytest.raises(StoreUnavailable, match="database unavailable"):  # weather: the server waits for it
        open_store("postgresql+psycopg://postgres@127.0.0.1:1/test")


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    s = open_store(sqlite_url(tmp_path))
    try:
        mode = s._run_sync(lambda conn: conn.execute(sqlalchemy.text("PRAGMA journal_mode")).scalar())
        assert mode == "wal"
    finally:
        s.close()


def test_two_servers_writing_a_new_row_at_once_both_succeed(postgres_url: str) -> None:
    """Several servers share PostgreSQL: both insert the same new row; the second waits for the
    first and updates it (an update-then-insert lost the second one's whole batch to a
    duplicate key)."""
    import threading

    from vectorlay.server.records import ClusterHealthRecord
    from vectorlay.server.store import engine as store_engine

    store = open_store(postgres_url)
    try:
        with store.engine.begin() as conn:
            conn.execute(sqlalchemy.delete(schema.cluster_health).where(schema.cluster_health.c.cluster == "raced"))

        def health(failures: int) -> ops.PutClusterHealth:
            return ops.PutClusterHealth(ClusterHealthRecord("raced", failures, 0.0, "", "", (), "", ""))

        errors: list[BaseException] = []
        first = store.engine.connect()
        transaction = first.begin()
        store_engine._apply(first, [health(1)])  # inserted, not committed yet

        def second() -> None:
            try:
                with store.engine.begin() as conn:
                    store_engine._apply(conn, [health(2)])  # blocks on the first's row, then updates it
            except BaseException as error:  # noqa: B036 - reported by the test
                errors.append(error)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting for the first transaction, as it should
        transaction.commit()
        first.close()
        thread.join(10)
        assert errors == []
        with store.engine.connect() as conn:
            failures = conn.execute(sqlalchemy.select(schema.cluster_health.c.failures)
                                    .where(schema.cluster_health.c.cluster == "raced")).scalar_one()
        assert failures == 2
    finally:
        store.close()
