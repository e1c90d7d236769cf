"""Schema migrations, oldest first. Each is frozen once released: a change is a new step.

Migration 1 spells out the first schema on its own rather than reusing `schema.py`'s tables,
which always describe the latest shape.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    text,
)


def _migration_1(conn: Connection) -> None:
    """The first schema: tokens, nodes, clusters, replicas, the command outbox and meta."""
    v1 = MetaData()
    Table("vl_meta", v1, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))
    Table("vl_tokens", v1,
          Column("id", String(64), primary_key=True), Column("secret_hash", String(64), nullable=False),
          Column("role", String(16), nullable=False), Column("created_at", Float, nullable=False),
          Column("expires_at", Float, nullable=True), Column("uses_left", Integer, nullable=True),
          Column("revoked", Boolean, nullable=False), Column("description", Text, nullable=False))
    Table("vl_nodes", v1,
          Column("id", String(64), primary_key=True), Column("name", String(128), nullable=False, unique=True),
          Column("credential_hash", String(64), nullable=False), Column("gpus", Text, nullable=False),
          Column("address", String(255), nullable=False), Column("runtimes", Text, nullable=False),
          Column("joined_at", Float, nullable=False), Column("last_seen_at", Float, nullable=True),
          Column("state", String(16), nullable=False), Column("schedulable", Boolean, nullable=False),
          Column("next_seq", Integer, nullable=False), Column("generation", Integer, nullable=False))
    Table("vl_clusters", v1,
          Column("name", String(63), primary_key=True), Column("spec", Text, nullable=False),
          Column("created_at", Float, nullable=False), Column("updated_at", Float, nullable=False))
    Table("vl_replicas", v1,
          Column("id", String(96), primary_key=True), Column("cluster", String(63), nullable=False, index=True),
          Column("node_id", String(64), nullable=True, index=True), Column("gpus", Text, nullable=False),
          Column("state", String(16), nullable=False), Column("reason", Text, nullable=False),
          Column("address", String(255), nullable=True), Column("generation", Integer, nullable=False),
          Column("stopping", Boolean, nullable=False), Column("revision", String(32), nullable=False),
          Column("created_at", Float, nullable=False))
    Table("vl_commands", v1,
          Column("node_id", String(64), nullable=False), Column("seq", Integer, nullable=False),
          Column("op", String(16), nullable=False), Column("replica_id", String(96), nullable=False),
          Column("generation", Integer, nullable=False), Column("assignment", Text, nullable=True),
          Column("created_at", Float, nullable=False), PrimaryKeyConstraint("node_id", "seq"))
    v1.create_all(conn)


def _migration_2(conn: Connection) -> None:
    """Nodes can be drained: their replicas move elsewhere before the owner takes the machine."""
    conn.execute(text("ALTER TABLE vl_nodes ADD COLUMN draining BOOLEAN NOT NULL DEFAULT FALSE"))


def _migration_3(conn: Connection) -> None:
    """Containers and the edge: image digests and isolation levels, API keys, replica events."""
    conn.execute(text("ALTER TABLE vl_replicas ADD COLUMN image_digest VARCHAR(100)"))
    conn.execute(text("ALTER TABLE vl_nodes ADD COLUMN isolation TEXT NOT NULL DEFAULT '[]'"))
    v3 = MetaData()
    Table("vl_api_keys", v3,
          Column("id", String(32), primary_key=True), Column("cluster", String(63), nullable=False, index=True),
          Column("name", String(128), nullable=False), Column("secret_hash", String(64), nullable=False),
          Column("created_at", Float, nullable=False), Column("revoked_at", Float, nullable=True))
    Table("vl_events", v3,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("cluster", String(63), nullable=False, index=True), Column("replica_id", String(96), nullable=True),
          Column("at", Float, nullable=False), Column("message", Text, nullable=False))
    v3.create_all(conn)


def _migration_4(conn: Connection) -> None:
    """Tenants and a record of changes: deployer tokens scoped to a project, an audit log,
    encrypted secrets; cluster keys (`name.project`) need longer columns."""
    conn.execute(text("ALTER TABLE vl_tokens ADD COLUMN project VARCHAR(63) NOT NULL DEFAULT ''"))
    if conn.dialect.name == "postgresql":  # SQLite does not enforce VARCHAR lengths
        for table, column in (("vl_clusters", "name"), ("vl_replicas", "cluster"), ("vl_api_keys", "cluster"),
                              ("vl_events", "cluster")):
            conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE VARCHAR(128)"))
    v4 = MetaData()
    Table("vl_audit", v4,
          Column("id", Integer, primary_key=True, autoincrement=True), Column("at", Float, nullable=False),
          Column("actor", String(128), nullable=False), Column("action", String(64), nullable=False),
          Column("target", String(255), nullable=False), Column("project", String(63), nullable=False, index=True),
          Column("detail", Text, nullable=False))
    Table("vl_secrets", v4,
          Column("project", String(63), primary_key=True), Column("name", String(63), primary_key=True),
          Column("ciphertext", Text, nullable=False), Column("updated_at", Float, nullable=False))
    v4.create_all(conn)


def _migration_5(conn: Connection) -> None:
    """Blast radius: a cluster's crash-loop backoff and quarantine survive a server restart."""
    v5 = MetaData()
    Table("vl_cluster_health", v5,
          Column("cluster", String(128), primary_key=True), Column("failures", Integer, nullable=False),
          Column("not_before", Float, nullable=False), Column("reason", Text, nullable=False),
          Column("node", String(128), nullable=False), Column("strikes", Text, nullable=False),
          Column("quarantined", Text, nullable=False), Column("degraded", Text, nullable=False))
    v5.create_all(conn)


def _migration_6(conn: Connection) -> None:
    """Nodes reached through their own tunnels: each node's data plane (nodes that joined before
    it were all dialled directly)."""
    conn.execute(text("ALTER TABLE vl_nodes ADD COLUMN data_plane VARCHAR(16) NOT NULL DEFAULT 'direct'"))


def _migration_7(conn: Connection) -> None:
    """Several servers on one PostgreSQL: which server holds each node's session and what its
    heartbeats said that every server must know (unhealthy GPUs, tunnels), the servers
    themselves (for `get servers` and for noticing one that died) and the leader's lease."""
    conn.execute(text("ALTER TABLE vl_nodes ADD COLUMN session_server VARCHAR(64) NOT NULL DEFAULT ''"))
    conn.execute(text("ALTER TABLE vl_nodes ADD COLUMN unhealthy_gpus TEXT NOT NULL DEFAULT '[]'"))
    conn.execute(text("ALTER TABLE vl_nodes ADD COLUMN tunnels INTEGER"))
    v7 = MetaData()
    Table("vl_servers", v7,
          Column("id", String(64), primary_key=True), Column("address", String(255), nullable=False),
          Column("started_at", Float, nullable=False), Column("seen_at", Float, nullable=False),
          Column("nodes", Integer, nullable=False), Column("proxies", Integer, nullable=False),
          Column("clients", Integer, nullable=False),
          Column("tunnel_proxies", Text, nullable=False, server_default="[]"))
    Table("vl_leader", v7,
          Column("id", Integer, primary_key=True), Column("holder", String(64), nullable=False),
          Column("epoch", Integer, nullable=False), Column("lease_until", Float, nullable=False))
    v7.create_all(conn)


def _migration_8(conn: Connection) -> None:
    """Revisions of each cluster's spec, for `rollout history` and `rollout undo`. A cluster
    stored before them gets its current spec as revision 1, so it can be rolled back to."""
    v8 = MetaData()
    Table("vl_revisions", v8,
          Column("cluster", String(128), nullable=False), Column("revision", Integer, nullable=False),
          Column("at", Float, nullable=False), Column("actor", String(128), nullable=False),
          Column("spec", Text, nullable=False), Column("change", Text, nullable=False),
          PrimaryKeyConstraint("cluster", "revision"))
    v8.create_all(conn)
    conn.execute(text("INSERT INTO vl_revisions (cluster, revision, at, actor, spec, change) "
                      "SELECT name, 1, updated_at, '', spec, 'stored before revisions were kept' FROM vl_clusters"))


MIGRATIONS: list[Callable[[Connection], None]] = [_migration_1, _migration_2, _migration_3, _migration_4,
                                                  _migration_5, _migration_6, _migration_7, _migration_8]
