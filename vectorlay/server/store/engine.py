"""The store: a SQLAlchemy engine driven from trio through worker threads.

Each call is one unit of work (connection → transaction → commit) in `trio.to_thread.run_sync`,
limited to the pool size so threads never wait on the pool. SQLite runs in WAL mode with one
writer at a time; PostgreSQL gets a small pool.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy
import trio
from sqlalchemy import Connection, Engine, bindparam, delete, event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as SqlTimeoutError

from vectorlay.core import codec
from vectorlay.core.model import Assignment, ClusterSpec, Gpu, NodeState, Replica, ReplicaState, Role
from vectorlay.errors import StoreError, StoreFenced, StoreInDoubt, StoreUnavailable
from vectorlay.server.records import (
    ApiKeyRecord,
    AuditRecord,
    ClusterHealthRecord,
    ClusterRecord,
    CommandRecord,
    EventRecord,
    NodeRecord,
    RevisionRecord,
    SecretRecord,
    TokenRecord,
)
from vectorlay.server.store import changes as change_keys
from vectorlay.server.store import ops, schema

T = TypeVar("T")

# Every unit of work answers within this, or the caller is told the database is unavailable: a
# stalled database must turn into a clear, fast error, never a hang (the server keeps serving
# from memory meanwhile). Also PostgreSQL's own statement_timeout and SQLite's busy timeout.
STATEMENT_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5


@dataclass(frozen=True)
class Snapshot:
    """Everything the server keeps in memory, as loaded at start."""

    nodes: list[NodeRecord]
    clusters: list[ClusterRecord]
    replicas: list[tuple[Replica, float]]
    commands: list[CommandRecord]
    meta: dict[str, str]
    api_keys: list[ApiKeyRecord]
    secrets: list[SecretRecord]
    health: list[ClusterHealthRecord]


def sqlite_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'vectorlay.db'}"


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL; None for any other database (or an in-memory one)."""
    try:
        parsed = sqlalchemy.make_url(url)
    except SQLAlchemyError:
        return None
    return parsed.database if parsed.get_backend_name() == "sqlite" and parsed.database else None


def describe_url(url: str) -> str:
    """The URL without its password, for logs."""
    try:
        return sqlalchemy.make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return "<invalid database URL>"


class _TooLate(Exception):
    pass


class Outcome:
    """Whether a transaction abandoned by its caller committed after all; resolved by its thread."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self.done = trio.Event()
        self.committed: bool | None = None

    def resolve(self, committed: bool) -> None:  # called in the worker thread
        self.committed = committed
        try:
            self._token.run_sync_soon(self.done.set)
        except trio.RunFinishedError:
            pass


class Store:
    def __init__(self, engine: Engine, limiter: trio.CapacityLimiter, timeout_s: float = STATEMENT_TIMEOUT_S) -> None:
        self.engine = engine
        self._limiter = limiter
        self.timeout_s = timeout_s
        self.notify_as = ""  # this server's id: PostgreSQL tells the others what each transaction changed

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def run(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in one transaction on a worker thread, within `timeout_s`.

        A database that does not answer in time raises StoreInDoubt at once; the thread is left
        to finish on its own (a stalled socket cannot be interrupted), and the error's `outcome`
        says later whether the transaction committed. The thread checks the deadline again just
        before it commits, so a statement released after the deadline rolls back: only a stall
        during the commit itself leaves the outcome unknown for a while."""
        outcome = Outcome(trio.lowlevel.current_trio_token())
        deadline = time.monotonic() + self.timeout_s

        def in_thread() -> T:
            try:
                result = self._run_sync(work, deadline)
            except BaseException:
                outcome.resolve(False)
                raise
            outcome.resolve(True)
            return result

        with trio.move_on_after(self.timeout_s) as scope:
            return await trio.to_thread.run_sync(in_thread, limiter=self._limiter, abandon_on_cancel=True)
        assert scope.cancelled_caught
        raise StoreInDoubt(f"database unavailable (timed out after {self.timeout_s:g}s)", outcome)

    def _run_sync(self, work: Callable[[Connection], T], deadline: float = math.inf) -> T:
        try:
            with self.engine.begin() as conn:
                result = work(conn)
                if time.monotonic() > deadline:
                    raise _TooLate()  # the caller gave up on it: roll back rather than commit late
                return result
        except _TooLate:
            raise StoreUnavailable(f"database unavailable (timed out after {self.timeout_s:g}s)") from None
        except (OperationalError, InterfaceError, DisconnectionError, SqlTimeoutError) as error:
            raise StoreUnavailable(f"database unavailable ({_first_line(error)})") from error
        except SQLAlchemyError as error:
            raise StoreError(f"database error: {_first_line(error)}") from error

    async def apply(self, changes: Sequence[ops.Op]) -> None:
        if changes:
            await self.run(lambda conn: self._apply_and_notify(conn, changes))

    def _apply_and_notify(self, conn: Connection, changes: Sequence[ops.Op]) -> None:
        _apply(conn, changes)
        if self.notify_as and conn.dialect.name == "postgresql":
            keys = change_keys.keys_of(changes)
            if keys:  # delivered to the other servers only if this transaction commits
                conn.execute(sqlalchemy.text("SELECT pg_notify(:channel, :payload)"),
                             {"channel": change_keys.CHANNEL, "payload": change_keys.encode(self.notify_as, keys)})

    async def ping(self) -> None:
        """StoreUnavailable unless the database answers a trivial query."""
        await self.run(lambda conn: conn.execute(sqlalchemy.text("SELECT 1")).scalar())

    async def load(self) -> Snapshot:
        return await self.run(_load)

    async def events(self, cluster: str, limit: int) -> list[EventRecord]:
        """The cluster's newest `limit` events, oldest first."""
        def work(conn: Connection) -> list[EventRecord]:
            table = schema.events
            rows = conn.execute(select(table).where(table.c.cluster == cluster)
                                .order_by(table.c.id.desc()).limit(limit)).all()
            return [EventRecord(r.cluster, r.replica_id, r.at, r.message) for r in reversed(rows)]
        return await self.run(work)

    async def revisions(self, cluster: str) -> list[RevisionRecord]:
        """The cluster's stored revisions, oldest first (read from the store, so every server of
        the control plane answers the same)."""
        def work(conn: Connection) -> list[RevisionRecord]:
            table = schema.revisions
            rows = conn.execute(select(table).where(table.c.cluster == cluster).order_by(table.c.revision)).all()
            return [RevisionRecord(r.cluster, r.revision, r.at, r.actor,
                                   codec.load(ClusterSpec, json.loads(r.spec)), r.change) for r in rows]
        return await self.run(work)

    async def trim_events(self, keep_per_cluster: int) -> None:
        def work(conn: Connection) -> None:
            table = schema.events
            for (cluster,) in conn.execute(select(table.c.cluster).distinct()).all():
                cutoff = conn.execute(select(table.c.id).where(table.c.cluster == cluster)
                                      .order_by(table.c.id.desc()).offset(keep_per_cluster).limit(1)).scalar()
                if cutoff is not None:
                    conn.execute(delete(table).where(table.c.cluster == cluster, table.c.id <= cutoff))
        await self.run(work)

    async def audit(self, limit: int, project: str | None = None, target: str | None = None,
                    action_prefix: str | None = None) -> list[AuditRecord]:
        """The newest `limit` audit records (of one project, about one target, of actions that
        start with `action_prefix`, if given), oldest first."""
        def work(conn: Connection) -> list[AuditRecord]:
            table = schema.audit
            query = select(table).order_by(table.c.id.desc()).limit(limit)
            if project is not None:
                query = query.where(table.c.project == project)
            if target is not None:
                query = query.where(table.c.target == target)
            if action_prefix is not None:
                query = query.where(table.c.action.startswith(action_prefix, autoescape=True))
            return [AuditRecord(r.at, r.actor, r.action, r.target, r.project, r.detail)
                    for r in reversed(conn.execute(query).all())]
        return await self.run(work)

    async def get_token(self, token_id: str) -> TokenRecord | None:
        return await self.run(lambda conn: _get_token(conn, token_id))

    async def list_tokens(self) -> list[TokenRecord]:
        return await self.run(lambda conn: [_token(row) for row in conn.execute(select(schema.tokens))])

    async def consume_token_use(self, token_id: str) -> bool:
        """Spend one use of a limited token atomically; False when none is left."""
        return await self.run(lambda conn: _consume_use(conn, token_id))

    def close(self) -> None:
        self.engine.dispose()


def open_store(url: str) -> Store:
    """Create the engine and bring the schema up to date (blocking; call before serving)."""
    try:
        parsed = sqlalchemy.make_url(url)
    except SQLAlchemyError:
        raise StoreError(f"invalid database URL {url!r}") from None
    if parsed.get_backend_name() == "sqlite":
        engine = sqlalchemy.create_engine(url, connect_args={"timeout": STATEMENT_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_pragmas)
        limiter = trio.CapacityLimiter(1)
    elif parsed.get_backend_name() == "postgresql":
        if parsed.get_driver_name() not in ("psycopg", ""):
            raise StoreError("use the psycopg 3 driver: postgresql+psycopg://USER@HOST:PORT/DB")
        engine = sqlalchemy.create_engine(
            parsed.set(drivername="postgresql+psycopg"), pool_size=4, max_overflow=0, pool_pre_ping=True,
            pool_timeout=STATEMENT_TIMEOUT_S,
            # libpq's own bounds: connecting, and unacknowledged bytes on a dead path (ms).
            connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "tcp_user_timeout": int(STATEMENT_TIMEOUT_S * 1000),
                          "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2},
        )
        event.listen(engine, "connect", _postgres_session)
        limiter = trio.CapacityLimiter(4)
    else:
        raise StoreError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql+psycopg://")
    store = Store(engine, limiter)
    try:
        store._run_sync(schema.migrate, time.monotonic() + 60)  # a long migration may take a while
    except StoreError:
        engine.dispose()
        raise
    return store


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
    cursor.execute(f"PRAGMA busy_timeout={int(STATEMENT_TIMEOUT_S * 1000)}")
    cursor.close()


def _postgres_session(dbapi_connection: Any, _record: Any) -> None:
    """The server side of the bound: a statement PostgreSQL itself works on too long is cancelled."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    with dbapi_connection.cursor() as cursor:
        cursor.execute(f"SET statement_timeout = {int(STATEMENT_TIMEOUT_S * 1000)}")
    dbapi_connection.autocommit = autocommit


def _first_line(error: BaseException) -> str:
    message = str(getattr(error, "orig", None) or error)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__


# --- reading ----------------------------------------------------------------------------------


def _load(conn: Connection) -> Snapshot:
    return Snapshot(
        nodes=[_node(row) for row in conn.execute(select(schema.nodes))],
        clusters=[_cluster(row) for row in conn.execute(select(schema.clusters))],
        replicas=[(_replica(row), row.created_at) for row in conn.execute(select(schema.replicas))],
        commands=[
            _command(row)
            for row in conn.execute(select(schema.commands).order_by(schema.commands.c.node_id, schema.commands.c.seq))
        ],
        meta={row.key: row.value for row in conn.execute(select(schema.meta))},
        api_keys=[ApiKeyRecord(row.id, row.cluster, row.name, row.secret_hash, row.created_at, row.revoked_at)
                  for row in conn.execute(select(schema.api_keys))],
        secrets=[SecretRecord(row.project, row.name, row.ciphertext, row.updated_at)
                 for row in conn.execute(select(schema.secrets))],
        health=[ClusterHealthRecord(row.cluster, row.failures, row.not_before, row.reason, row.node,
                                    tuple(json.loads(row.strikes)), row.quarantined, row.degraded)
                for row in conn.execute(select(schema.cluster_health))],
    )


def _get_token(conn: Connection, token_id: str) -> TokenRecord | None:
    row = conn.execute(select(schema.tokens).where(schema.tokens.c.id == token_id)).first()
    return _token(row) if row else None


def _consume_use(conn: Connection, token_id: str) -> bool:
    table = schema.tokens
    result = conn.execute(
        update(table)
        .where(table.c.id == token_id, table.c.uses_left.is_not(None), table.c.uses_left > 0)
        .values(uses_left=table.c.uses_left - 1)
    )
    if result.rowcount == 1:
        return True
    row = conn.execute(select(table.c.uses_left).where(table.c.id == token_id)).first()
    return row is not None and row.uses_left is None


def _token(row: Any) -> TokenRecord:
    return TokenRecord(row.id, row.secret_hash, Role(row.role), row.created_at, row.expires_at, row.uses_left,
                       bool(row.revoked), row.description, row.project)


def _node(row: Any) -> NodeRecord:
    return NodeRecord(
        id=row.id, name=row.name, credential_hash=row.credential_hash,
        gpus=codec.load(tuple[Gpu, ...], json.loads(row.gpus)), address=row.address,
        runtimes=tuple(json.loads(row.runtimes)), joined_at=row.joined_at, last_seen_at=row.last_seen_at,
        state=NodeState(row.state), schedulable=bool(row.schedulable), next_seq=row.next_seq,
        generation=row.generation, draining=bool(row.draining), isolation=tuple(json.loads(row.isolation)),
        data_plane=row.data_plane,
        session_server=row.session_server,
        unhealthy_gpus=_unhealthy_gpus(row.unhealthy_gpus),
        tunnels=row.tunnels,
    )


def _unhealthy_gpus(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(uuid), str(reason)) for uuid, reason in json.loads(text))


def _cluster(row: Any) -> ClusterRecord:
    return ClusterRecord(codec.load(ClusterSpec, json.loads(row.spec)), row.created_at, row.updated_at)


def _replica(row: Any) -> Replica:
    return Replica(
        id=row.id, cluster=row.cluster, node_id=row.node_id, gpus=tuple(json.loads(row.gpus)),
        state=ReplicaState(row.state), reason=row.reason, address=row.address, generation=row.generation,
        stopping=bool(row.stopping), revision=row.revision, image_digest=row.image_digest,
    )


def _command(row: Any) -> CommandRecord:
    assignment = codec.load(Assignment, json.loads(row.assignment)) if row.assignment else None
    return CommandRecord(row.node_id, row.seq, row.op, row.replica_id, row.generation, assignment, row.created_at)


# --- writing ----------------------------------------------------------------------------------


def _apply(conn: Connection, changes: Sequence[ops.Op]) -> None:
    """Apply `changes` in order, except that runs of the row-writing kinds in `_APPLY_MANY` are
    gathered and written with one executemany per kind: a thousand replicas turning ready is one
    statement sent in bulk, not a thousand round trips. Those kinds each write their own table
    and nothing else, so gathering them between two other changes reorders nothing that matters."""
    gathered: dict[type, list[Any]] = {}
    for change in changes:
        kind = type(change)
        if kind in _APPLY_MANY:
            gathered.setdefault(kind, []).append(change)
            continue
        _flush_gathered(conn, gathered)
        _APPLY[kind](conn, change)
    _flush_gathered(conn, gathered)


def _flush_gathered(conn: Connection, gathered: dict[type, list[Any]]) -> None:
    for kind, changes in gathered.items():
        if len(changes) == 1:
            _APPLY[kind](conn, changes[0])
        else:
            _APPLY_MANY[kind](conn, changes)
    gathered.clear()


def _upsert(conn: Connection, table: sqlalchemy.Table, key: dict[str, Any], values: dict[str, Any]) -> None:
    """Insert or update by the key (the table's primary key) in one statement, INSERT .. ON
    CONFLICT DO UPDATE: several servers may write the same row at once, and an update-then-
    insert would let two of them both insert (a duplicate key that loses the whole batch)."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = insert(table).values(**key, **values)
    if values:
        statement = statement.on_conflict_do_update(index_elements=[table.c[name] for name in key],
                                                    set_={name: statement.excluded[name] for name in values})
    else:
        statement = statement.on_conflict_do_nothing(index_elements=[table.c[name] for name in key])
    conn.execute(statement)


def _upsert_many(conn: Connection, table: sqlalchemy.Table, key: str, rows: list[dict[str, Any]]) -> None:
    """Upsert many rows in one executemany, with INSERT .. ON CONFLICT DO UPDATE (SQLite and
    PostgreSQL both speak it). The last row for a key wins, as it would row by row."""
    latest = list({row[key]: row for row in rows}.values())  # a statement may touch a row only once
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = insert(table)
    statement = statement.on_conflict_do_update(
        index_elements=[table.c[key]], set_={name: statement.excluded[name] for name in latest[0] if name != key})
    conn.execute(statement, latest)


def _dumps(value: Any) -> str:
    return json.dumps(codec.dump(value), separators=(",", ":"))


def _put_token(conn: Connection, op: ops.PutToken) -> None:
    t = op.token
    _upsert(conn, schema.tokens, {"id": t.id}, {
        "secret_hash": t.secret_hash, "role": t.role.value, "created_at": t.created_at,
        "expires_at": t.expires_at, "uses_left": t.uses_left, "revoked": t.revoked, "description": t.description,
        "project": t.project,
    })


def _node_row(op: ops.PutNode) -> dict[str, Any]:
    n = op.node
    return {
        "id": n.id, "name": n.name, "credential_hash": n.credential_hash, "gpus": _dumps(n.gpus),
        "address": n.address, "runtimes": json.dumps(list(n.runtimes)), "joined_at": n.joined_at,
        "last_seen_at": n.last_seen_at, "state": n.state.value, "schedulable": n.schedulable,
        "next_seq": n.next_seq, "generation": n.generation, "draining": n.draining,
        "isolation": json.dumps(list(n.isolation)), "data_plane": n.data_plane, "session_server": n.session_server,
        "unhealthy_gpus": json.dumps([list(g) for g in n.unhealthy_gpus]), "tunnels": n.tunnels,
    }


def _put_node(conn: Connection, op: ops.PutNode) -> None:
    row = _node_row(op)
    _upsert(conn, schema.nodes, {"id": row.pop("id")}, row)


def _put_nodes(conn: Connection, changes: list[ops.PutNode]) -> None:
    _upsert_many(conn, schema.nodes, "id", [_node_row(op) for op in changes])


def _set_node_liveness(conn: Connection, op: ops.SetNodeLiveness) -> None:
    _set_nodes_liveness(conn, [op])


def _set_nodes_liveness(conn: Connection, changes: list[ops.SetNodeLiveness]) -> None:
    """A node's state as its session's server saw it. A write that would take a node from
    another live server (it moved there while this one still judged it) is skipped."""
    table = schema.nodes
    latest = {op.node_id: op for op in changes}
    groups: dict[tuple[str, ...], list[ops.SetNodeLiveness]] = {}
    for op in latest.values():
        groups.setdefault(op.unless_held_by, []).append(op)
    for others, group in groups.items():
        where = [table.c.id == bindparam("node_id")]
        where += [table.c.session_server != sqlalchemy.literal(other) for other in others]
        conn.execute(update(table).where(*where).values(
            state=bindparam("state"), last_seen_at=bindparam("last_seen_at"), session_server=bindparam("server")),
            [{"node_id": op.node_id, "state": op.state.value, "last_seen_at": op.last_seen_at,
              "server": op.session_server} for op in group])


def _set_node_facts(conn: Connection, op: ops.SetNodeFacts) -> None:
    table = schema.nodes
    conn.execute(update(table).where(table.c.id == op.node_id).values(
        gpus=_dumps(op.gpus), address=op.address, runtimes=json.dumps(list(op.runtimes)),
        isolation=json.dumps(list(op.isolation)), data_plane=op.data_plane))


def _set_node_status(conn: Connection, op: ops.SetNodeStatus) -> None:
    table = schema.nodes
    conn.execute(update(table).where(table.c.id == op.node_id).values(
        unhealthy_gpus=json.dumps([list(g) for g in op.unhealthy_gpus]), tunnels=op.tunnels))


def _set_node_flags(conn: Connection, op: ops.SetNodeFlags) -> None:
    table = schema.nodes
    conn.execute(update(table).where(table.c.id == op.node_id).values(schedulable=op.schedulable,
                                                                       draining=op.draining))


def _set_node_seq(conn: Connection, op: ops.SetNodeSeq) -> None:
    _set_nodes_seq(conn, [op])


def _set_nodes_seq(conn: Connection, changes: list[ops.SetNodeSeq]) -> None:
    table = schema.nodes
    latest = {op.node_id: op for op in changes}
    conn.execute(update(table).where(table.c.id == bindparam("node_id")).values(
        next_seq=bindparam("next_seq"), generation=bindparam("gen")),
        [{"node_id": op.node_id, "next_seq": op.next_seq, "gen": op.generation} for op in latest.values()])


def _observe_replica(conn: Connection, op: ops.ObserveReplica) -> None:
    _observe_replicas(conn, [op])


def _observe_replicas(conn: Connection, changes: list[ops.ObserveReplica]) -> None:
    table = schema.replicas
    latest = {op.replica_id: op for op in changes}
    conn.execute(update(table).where(table.c.id == bindparam("replica_id"), table.c.generation == bindparam("gen"))
                 .values(state=bindparam("state"), reason=bindparam("reason"),
                         address=func.coalesce(bindparam("address"), table.c.address),
                         image_digest=func.coalesce(bindparam("digest"), table.c.image_digest)),
                 [{"replica_id": op.replica_id, "gen": op.generation, "state": op.state.value, "reason": op.reason,
                   "address": op.address, "digest": op.image_digest} for op in latest.values()])


def _delete_node(conn: Connection, op: ops.DeleteNode) -> None:
    conn.execute(delete(schema.commands).where(schema.commands.c.node_id == op.node_id))
    conn.execute(delete(schema.nodes).where(schema.nodes.c.id == op.node_id))


def _put_cluster(conn: Connection, op: ops.PutCluster) -> None:
    c = op.cluster
    _upsert(conn, schema.clusters, {"name": c.spec.key}, {
        "spec": _dumps(c.spec), "created_at": c.created_at, "updated_at": c.updated_at,
    })


def _delete_cluster(conn: Connection, op: ops.DeleteCluster) -> None:
    conn.execute(delete(schema.clusters).where(schema.clusters.c.name == op.name))
    conn.execute(delete(schema.revisions).where(schema.revisions.c.cluster == op.name))


def _add_revision(conn: Connection, op: ops.AddRevision) -> None:
    """Numbered here, in the transaction that stores the spec: its PutCluster came first and
    holds the cluster's row, so a second server applying the same cluster waits for this
    commit and then reads this number."""
    table = schema.revisions
    newest = conn.execute(select(func.max(table.c.revision)).where(table.c.cluster == op.cluster)).scalar()
    number = int(newest or 0) + 1
    conn.execute(table.insert().values(cluster=op.cluster, revision=number, at=op.at, actor=op.actor,
                                       spec=_dumps(op.spec), change=op.change))
    conn.execute(delete(table).where(table.c.cluster == op.cluster, table.c.revision <= number - op.keep))


def _replica_row(op: ops.PutReplica) -> dict[str, Any]:
    r = op.replica
    return {
        "id": r.id, "cluster": r.cluster, "node_id": r.node_id, "gpus": json.dumps(list(r.gpus)),
        "state": r.state.value, "reason": r.reason, "address": r.address, "generation": r.generation,
        "stopping": r.stopping, "revision": r.revision, "created_at": op.created_at, "image_digest": r.image_digest,
    }


def _put_replica(conn: Connection, op: ops.PutReplica) -> None:
    row = _replica_row(op)
    _upsert(conn, schema.replicas, {"id": row.pop("id")}, row)


def _put_replicas(conn: Connection, changes: list[ops.PutReplica]) -> None:
    _upsert_many(conn, schema.replicas, "id", [_replica_row(op) for op in changes])


def _delete_replica(conn: Connection, op: ops.DeleteReplica) -> None:
    conn.execute(delete(schema.replicas).where(schema.replicas.c.id == op.replica_id))


def _command_row(op: ops.PutCommand) -> dict[str, Any]:
    c = op.command
    return {"node_id": c.node_id, "seq": c.seq, "op": c.op, "replica_id": c.replica_id, "generation": c.generation,
            "assignment": _dumps(c.assignment) if c.assignment else None, "created_at": c.created_at}


def _put_command(conn: Connection, op: ops.PutCommand) -> None:
    conn.execute(schema.commands.insert().values(**_command_row(op)))


def _put_commands(conn: Connection, changes: list[ops.PutCommand]) -> None:
    conn.execute(schema.commands.insert(), [_command_row(op) for op in changes])


def _ack_commands(conn: Connection, op: ops.AckCommands) -> None:
    table = schema.commands
    conn.execute(delete(table).where(table.c.node_id == op.node_id, table.c.seq <= op.through_seq))


def _put_api_key(conn: Connection, op: ops.PutApiKey) -> None:
    k = op.key
    _upsert(conn, schema.api_keys, {"id": k.id}, {
        "cluster": k.cluster, "name": k.name, "secret_hash": k.secret_hash, "created_at": k.created_at,
        "revoked_at": k.revoked_at,
    })


def _event_row(op: ops.AddEvent) -> dict[str, Any]:
    e = op.event
    return {"cluster": e.cluster, "replica_id": e.replica_id, "at": e.at, "message": e.message}


def _add_event(conn: Connection, op: ops.AddEvent) -> None:
    conn.execute(schema.events.insert().values(**_event_row(op)))


def _add_events(conn: Connection, changes: list[ops.AddEvent]) -> None:
    conn.execute(schema.events.insert(), [_event_row(op) for op in changes])


def _add_audit(conn: Connection, op: ops.AddAudit) -> None:
    a = op.record
    conn.execute(schema.audit.insert().values(at=a.at, actor=a.actor, action=a.action, target=a.target,
                                              project=a.project, detail=a.detail))


def _put_secret(conn: Connection, op: ops.PutSecret) -> None:
    s = op.secret
    _upsert(conn, schema.secrets, {"project": s.project, "name": s.name},
            {"ciphertext": s.ciphertext, "updated_at": s.updated_at})


def _delete_secret(conn: Connection, op: ops.DeleteSecret) -> None:
    table = schema.secrets
    conn.execute(delete(table).where(table.c.project == op.project, table.c.name == op.name))


def _put_cluster_health(conn: Connection, op: ops.PutClusterHealth) -> None:
    h = op.record
    _upsert(conn, schema.cluster_health, {"cluster": h.cluster}, {
        "failures": h.failures, "not_before": h.not_before_wall, "reason": h.reason, "node": h.node,
        "strikes": json.dumps(list(h.strikes)), "quarantined": h.quarantined, "degraded": h.degraded,
    })


def _delete_cluster_health(conn: Connection, op: ops.DeleteClusterHealth) -> None:
    conn.execute(delete(schema.cluster_health).where(schema.cluster_health.c.cluster == op.cluster))


def _fence(conn: Connection, op: ops.Fence) -> None:
    """Lock the leader row for this transaction, and go on only if `op` still describes it."""
    table = schema.leader
    result = conn.execute(update(table).where(table.c.id == 1, table.c.holder == op.holder,
                                              table.c.epoch == op.epoch, table.c.lease_until >= _db_now(conn))
                          .values(holder=table.c.holder))
    if result.rowcount != 1:
        raise StoreFenced(f"this server no longer leads (epoch {op.epoch}): another took over, or its lease ran out")


def _db_now(conn: Connection) -> Any:
    """The database's clock as epoch seconds, as an SQL expression: leases are judged on one
    clock for every server."""
    if conn.dialect.name == "postgresql":
        return sqlalchemy.literal_column("extract(epoch from clock_timestamp())")
    return sqlalchemy.literal(time.time())


def db_time(conn: Connection) -> float:
    """The database's clock now, as epoch seconds."""
    return float(conn.execute(select(_db_now(conn))).scalar_one())


# --- reading what other servers changed -------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """The rows behind a set of change keys, as they are now (absent: deleted)."""

    replicas: dict[str, tuple[Replica, float]]
    nodes: dict[str, NodeRecord]
    clusters: dict[str, ClusterRecord]
    health: dict[str, ClusterHealthRecord]
    commands: dict[str, list[CommandRecord]]  # node id -> its outbox, in order
    api_keys: dict[str, ApiKeyRecord]
    secrets: dict[tuple[str, str], SecretRecord]
    tokens: dict[str, TokenRecord]
    generation: int | None


def load_rows(conn: Connection, keys: change_keys.ChangeKeys) -> Rows:
    def chunks(values: set[Any]) -> list[list[Any]]:
        ordered = sorted(values)
        return [ordered[i:i + 500] for i in range(0, len(ordered), 500)]

    replicas: dict[str, tuple[Replica, float]] = {}
    for chunk in chunks(keys.replicas):
        for row in conn.execute(select(schema.replicas).where(schema.replicas.c.id.in_(chunk))):
            replicas[row.id] = (_replica(row), row.created_at)
    nodes: dict[str, NodeRecord] = {}
    for chunk in chunks(keys.nodes):
        for row in conn.execute(select(schema.nodes).where(schema.nodes.c.id.in_(chunk))):
            nodes[row.id] = _node(row)
    clusters: dict[str, ClusterRecord] = {}
    health: dict[str, ClusterHealthRecord] = {}
    for chunk in chunks(keys.clusters):
        for row in conn.execute(select(schema.clusters).where(schema.clusters.c.name.in_(chunk))):
            clusters[row.name] = _cluster(row)
        for row in conn.execute(select(schema.cluster_health).where(schema.cluster_health.c.cluster.in_(chunk))):
            health[row.cluster] = ClusterHealthRecord(row.cluster, row.failures, row.not_before, row.reason, row.node,
                                                      tuple(json.loads(row.strikes)), row.quarantined, row.degraded)
    commands: dict[str, list[CommandRecord]] = {node_id: [] for node_id in keys.commands}
    for chunk in chunks(keys.commands):
        table = schema.commands
        for row in conn.execute(select(table).where(table.c.node_id.in_(chunk)).order_by(table.c.node_id,
                                                                                           table.c.seq)):
            commands[row.node_id].append(_command(row))
    api_keys = {}
    for chunk in chunks(keys.api_keys):
        for row in conn.execute(select(schema.api_keys).where(schema.api_keys.c.id.in_(chunk))):
            api_keys[row.id] = ApiKeyRecord(row.id, row.cluster, row.name, row.secret_hash, row.created_at,
                                            row.revoked_at)
    secrets = {}
    for project, name in keys.secrets:
        found = conn.execute(select(schema.secrets).where(schema.secrets.c.project == project,
                                                          schema.secrets.c.name == name)).first()
        if found is not None:
            secrets[(project, name)] = SecretRecord(found.project, found.name, found.ciphertext, found.updated_at)
    tokens = {}
    for chunk in chunks(keys.tokens):
        for row in conn.execute(select(schema.tokens).where(schema.tokens.c.id.in_(chunk))):
            tokens[row.id] = _token(row)
    generation = None
    if "generation" in keys.meta:
        value = conn.execute(select(schema.meta.c.value).where(schema.meta.c.key == "generation")).scalar()
        generation = int(value) if value is not None else None
    return Rows(replicas, nodes, clusters, health, commands, api_keys, secrets, tokens, generation)


# --- leadership and the servers ---------------------------------------------------------------


def take_lead(conn: Connection, server_id: str, lease_s: float) -> int | None:
    """Lead if nobody does (no holder, or its lease ran out): the new epoch, else None."""
    table = schema.leader
    now = db_time(conn)
    row = conn.execute(select(table).where(table.c.id == 1).with_for_update()).first()
    if row is None:
        conn.execute(table.insert().values(id=1, holder=server_id, epoch=1, lease_until=now + lease_s))
        return 1
    if row.holder and row.lease_until >= now:
        return None
    epoch = int(row.epoch) + 1
    conn.execute(update(table).where(table.c.id == 1).values(holder=server_id, epoch=epoch, lease_until=now + lease_s))
    return epoch


def renew_lead(conn: Connection, server_id: str, epoch: int, lease_s: float) -> bool:
    """Extend the lease; False if another server took over meanwhile (the epoch moved on)."""
    table = schema.leader
    result = conn.execute(update(table).where(table.c.id == 1, table.c.holder == server_id, table.c.epoch == epoch)
                          .values(lease_until=_db_now(conn) + lease_s))
    return result.rowcount == 1


def give_up_lead(conn: Connection, server_id: str, epoch: int) -> None:
    """Step down on purpose (a clean stop): the next server need not wait for the lease to end."""
    table = schema.leader
    conn.execute(update(table).where(table.c.id == 1, table.c.holder == server_id, table.c.epoch == epoch)
                 .values(holder="", lease_until=0.0))


def leader_row(conn: Connection) -> tuple[str, int, float, float]:
    """(holder, epoch, lease_until, now) on the database's clock."""
    table = schema.leader
    now = db_time(conn)
    row = conn.execute(select(table).where(table.c.id == 1)).first()
    return (row.holder, int(row.epoch), float(row.lease_until), now) if row else ("", 0, 0.0, now)


def beat(conn: Connection, server_id: str, address: str, started_at: float | None, counts: tuple[int, int, int],
         tunnel_proxies: Sequence[tuple[str, str]] = ()) -> float:
    """Record that this server is alive, with its session counts and the tunnel proxies connected
    to it; return the database's time."""
    now = db_time(conn)
    values = {"address": address, "seen_at": now, "nodes": counts[0], "proxies": counts[1], "clients": counts[2],
              "tunnel_proxies": json.dumps([list(p) for p in tunnel_proxies])}
    table = schema.servers
    if conn.execute(update(table).where(table.c.id == server_id).values(**values)).rowcount == 0:
        conn.execute(table.insert().values(id=server_id, started_at=started_at or now, **values))
    return now


def list_servers(conn: Connection) -> tuple[list[Any], float]:
    return list(conn.execute(select(schema.servers).order_by(schema.servers.c.started_at)).all()), db_time(conn)


def forget_server(conn: Connection, server_id: str) -> None:
    conn.execute(delete(schema.servers).where(schema.servers.c.id == server_id))


def _set_meta(conn: Connection, op: ops.SetMeta) -> None:
    _upsert(conn, schema.meta, {"key": op.key}, {"value": op.value})


_APPLY: dict[type, Callable[[Connection, Any], None]] = {
    ops.PutToken: _put_token, ops.PutNode: _put_node, ops.DeleteNode: _delete_node,
    ops.SetNodeLiveness: _set_node_liveness, ops.SetNodeFacts: _set_node_facts, ops.SetNodeFlags: _set_node_flags,
    ops.SetNodeStatus: _set_node_status,
    ops.SetNodeSeq: _set_node_seq, ops.ObserveReplica: _observe_replica,
    ops.PutCluster: _put_cluster, ops.DeleteCluster: _delete_cluster, ops.AddRevision: _add_revision,
    ops.PutReplica: _put_replica,
    ops.DeleteReplica: _delete_replica, ops.PutCommand: _put_command, ops.AckCommands: _ack_commands,
    ops.SetMeta: _set_meta, ops.PutApiKey: _put_api_key, ops.AddEvent: _add_event, ops.AddAudit: _add_audit,
    ops.PutSecret: _put_secret, ops.DeleteSecret: _delete_secret, ops.PutClusterHealth: _put_cluster_health,
    ops.DeleteClusterHealth: _delete_cluster_health, ops.Fence: _fence,
}
# Kinds written in bulk by `_apply`: each writes only its own table.
_APPLY_MANY: dict[type, Callable[[Connection, list[Any]], None]] = {
    ops.PutReplica: _put_replicas, ops.PutNode: _put_nodes, ops.PutCommand: _put_commands, ops.AddEvent: _add_events,
    ops.SetNodeLiveness: _set_nodes_liveness, ops.SetNodeSeq: _set_nodes_seq, ops.ObserveReplica: _observe_replicas,
}
