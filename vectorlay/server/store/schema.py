"""The tables as the code queries them (the latest schema), and the migration runner.

The tables here always describe the newest schema; `migrations.py` holds the frozen steps that
build it, so an old database is brought forward one step at a time.
"""

from __future__ import annotations

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
    select,
    text,
)

from vectorlay.server.store.migrations import MIGRATIONS  # noqa: E402 - after the docstring on purpose

metadata = MetaData()

meta = Table(
    "vl_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

tokens = Table(
    "vl_tokens", metadata,
    Column("id", String(64), primary_key=True),
    Column("secret_hash", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("uses_left", Integer, nullable=True),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("description", Text, nullable=False, default=""),
    Column("project", String(63), nullable=False, default=""),  # migration 4
)

nodes = Table(
    "vl_nodes", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("credential_hash", String(64), nullable=False),
    Column("gpus", Text, nullable=False),
    Column("address", String(255), nullable=False),
    Column("runtimes", Text, nullable=False),
    Column("joined_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=True),
    Column("state", String(16), nullable=False),
    Column("schedulable", Boolean, nullable=False),
    Column("next_seq", Integer, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("draining", Boolean, nullable=False, default=False),  # migration 2
    Column("isolation", Text, nullable=False, default="[]"),  # migration 3
    Column("data_plane", String(16), nullable=False, default="direct"),  # migration 6
    Column("session_server", String(64), nullable=False, default=""),  # migration 7
    Column("unhealthy_gpus", Text, nullable=False, default="[]"),  # migration 7
    Column("tunnels", Integer, nullable=True),  # migration 7
)

clusters = Table(
    "vl_clusters", metadata,
    Column("name", String(128), primary_key=True),  # the cluster key, name.project
    Column("spec", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

replicas = Table(
    "vl_replicas", metadata,
    Column("id", String(96), primary_key=True),
    Column("cluster", String(63), nullable=False, index=True),
    Column("node_id", String(64), nullable=True, index=True),
    Column("gpus", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("address", String(255), nullable=True),
    Column("generation", Integer, nullable=False),
    Column("stopping", Boolean, nullable=False),
    Column("revision", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("image_digest", String(100), nullable=True),  # migration 3
)

commands = Table(
    "vl_commands", metadata,
    Column("node_id", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("op", String(16), nullable=False),
    Column("replica_id", String(96), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("assignment", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    PrimaryKeyConstraint("node_id", "seq"),
)


api_keys = Table(
    "vl_api_keys", metadata,
    Column("id", String(32), primary_key=True),
    Column("cluster", String(63), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

events = Table(
    "vl_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("cluster", String(63), nullable=False, index=True),
    Column("replica_id", String(96), nullable=True),
    Column("at", Float, nullable=False),
    Column("message", Text, nullable=False),
)

audit = Table(
    "vl_audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(255), nullable=False),
    Column("project", String(63), nullable=False, index=True),
    Column("detail", Text, nullable=False),
)

secrets = Table(
    "vl_secrets", metadata,
    Column("project", String(63), primary_key=True),
    Column("name", String(63), primary_key=True),
    Column("ciphertext", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

cluster_health = Table(
    "vl_cluster_health", metadata,
    Column("cluster", String(128), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("not_before", Float, nullable=False),  # wall clock
    Column("reason", Text, nullable=False),
    Column("node", String(128), nullable=False),
    Column("strikes", Text, nullable=False),  # JSON list of node names
    Column("quarantined", Text, nullable=False),
    Column("degraded", Text, nullable=False),
)

servers = Table(
    "vl_servers", metadata,
    Column("id", String(64), primary_key=True),
    Column("address", String(255), nullable=False),
    Column("started_at", Float, nullable=False),  # the database's clock (epoch seconds)
    Column("seen_at", Float, nullable=False),  # the database's clock at its last heartbeat
    Column("nodes", Integer, nullable=False),
    Column("proxies", Integer, nullable=False),
    Column("clients", Integer, nullable=False),
    # The proxies connected to this server that accept tunnels ([[id, address], ...]): nodes
    # connected to any server dial every proxy of the control plane.
    Column("tunnel_proxies", Text, nullable=False, default="[]"),
)

leader = Table(
    "vl_leader", metadata,
    Column("id", Integer, primary_key=True),  # one row: id 1
    Column("holder", String(64), nullable=False),
    Column("epoch", Integer, nullable=False),  # grows with every change of leader: the fence
    Column("lease_until", Float, nullable=False),  # the database's clock
)

revisions = Table(
    "vl_revisions", metadata,
    Column("cluster", String(128), nullable=False),  # the cluster key; its rows go with the cluster
    Column("revision", Integer, nullable=False),  # 1, 2, ... per cluster, given in the storing transaction
    Column("at", Float, nullable=False),  # wall clock
    Column("actor", String(128), nullable=False),
    Column("spec", Text, nullable=False),  # the ClusterSpec as applied, JSON
    Column("change", Text, nullable=False),  # what the apply changed, one line
    PrimaryKeyConstraint("cluster", "revision"),
)  # migration 8

SCHEMA_VERSION = len(MIGRATIONS)


def current_version(conn: Connection) -> int:
    if not conn.dialect.has_table(conn, meta.name):
        return 0
    row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
    return int(row[0]) if row else 0


def migrate(conn: Connection) -> int:
    """Bring the schema up to date; return the version found before."""
    if conn.dialect.name == "postgresql":
        # Two servers starting at once must not both migrate.
        conn.execute(text("SELECT pg_advisory_xact_lock(7070)"))
    found = current_version(conn)
    if found > SCHEMA_VERSION:
        from vectorlay.errors import StoreFatal

        raise StoreFatal(
            f"the database schema is version {found}, newer than this vectorlay ({SCHEMA_VERSION}); upgrade vectorlay"
        )
    for version in range(found, SCHEMA_VERSION):
        MIGRATIONS[version](conn)
        if version == 0:
            conn.execute(meta.insert().values(key="schema_version", value="1"))
        else:
            conn.execute(
                meta.update().where(meta.c.key == "schema_version").values(value=str(version + 1))
            )
    return found
