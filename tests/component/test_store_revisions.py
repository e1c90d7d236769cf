"""Cluster revisions in the store, on SQLite and on the real PostgreSQL: numbered in the storing
transaction, the last few kept, gone with their cluster, and migration 8 on an older database."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import sqlalchemy

from vectorlay.core import codec
from vectorlay.core.model import ClusterSpec
from vectorlay.errors import StoreError
from vectorlay.server.records import ClusterRecord, CommandRecord
from vectorlay.server.store import Store, open_store, ops, schema
from vectorlay.server.store.migrations import MIGRATIONS

SPEC = ClusterSpec(name="echo", replicas=1, command=("serve",), env={"V": "1"})


def revision(spec: ClusterSpec, at: float, keep: int = 10) -> list[ops.Op]:
    """What an apply stores: the cluster's row, then its revision."""
    return [ops.PutCluster(ClusterRecord(spec, 1.0, at)), ops.AddRevision(spec.key, at, "admin:t1", spec,
                                                                           f"spec.env.V: {spec.env['V']}", keep)]


async def test_revisions_are_numbered_per_cluster_kept_to_the_last_few_and_go_with_the_cluster(store: Store) -> None:
    other = replace(SPEC, name="other")
    for i in range(1, 5):
        await store.apply(revision(replace(SPEC, env={"V": str(i)}), float(i), keep=3))
    await store.apply(revision(replace(other, env={"V": "x"}), 9.0))
    kept = await store.revisions("echo")
    assert [(r.revision, r.spec.env["V"], r.at, r.actor) for r in kept] == [
        (2, "2", 2.0, "admin:t1"), (3, "3", 3.0, "admin:t1"), (4, "4", 4.0, "admin:t1")]
    assert kept[-1].spec == replace(SPEC, env={"V": "4"}) and kept[-1].change == "spec.env.V: 4"
    assert [r.revision for r in await store.revisions("other")] == [1]

    await store.apply([ops.DeleteCluster("echo")])
    assert await store.revisions("echo") == []
    assert [r.revision for r in await store.revisions("other")] == [1]
    await store.apply(revision(SPEC, 10.0))  # a cluster made again starts its history over
    assert [r.revision for r in await store.revisions("echo")] == [1]


async def test_a_failed_apply_stores_no_revision(store: Store) -> None:
    await store.apply(revision(SPEC, 1.0))
    command = CommandRecord("n-1", 1, "stop", "r", 1, None, 1.0)
    with pytest.raises(StoreError):  # the same (node, seq) twice: the whole transaction rolls back
        await store.apply([*revision(replace(SPEC, env={"V": "2"}), 2.0), ops.PutCommand(command),
                           ops.PutCommand(command)])
    assert [(r.revision, r.spec) for r in await store.revisions("echo")] == [(1, SPEC)]


async def test_migration_8_gives_clusters_stored_before_it_their_spec_as_revision_1(db_url: str) -> None:
    engine = sqlalchemy.create_engine(db_url)
    try:
        with engine.begin() as conn:
            for step in MIGRATIONS[:7]:
                step(conn)
            conn.execute(schema.meta.insert().values(key="schema_version", value="7"))
            conn.execute(sqlalchemy.text("INSERT INTO vl_clusters (name, spec, created_at, updated_at) "
                                         "VALUES ('echo', :spec, 1.0, 5.0)"),
                         {"spec": json.dumps(codec.dump(SPEC))})
    finally:
        engine.dispose()
    s = open_store(db_url)
    try:
        assert s._run_sync(schema.current_version) == schema.SCHEMA_VERSION == 8
        found = await s.revisions("echo")
        assert [(r.revision, r.spec, r.at) for r in found] == [(1, SPEC, 5.0)]
    finally:
        s.close()
