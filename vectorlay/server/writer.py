"""The one writer at the bottom of the control plane: every change goes through here, in order.

A change is collected in a `Batch` (store operations and the same changes for memory), then
`Writer.commit` applies it: **store → memory → deliver → announce**. The store is written first
and in one transaction, so a crash loses nothing that was acknowledged: commands wait in the
outbox and are redelivered when the node reconnects. Callers hold `Writer.lock` while they decide
and commit, so no decision is applied to a state it was not made from.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace

import trio

from vectorlay.core.cluster_health import HEALTHY, ClusterHealth
from vectorlay.core.model import Assignment, ClusterSpec, Replica
from vectorlay.errors import StoreError, StoreFenced, StoreInDoubt, StoreUnavailable
from vectorlay.server.fleet import Fleet
from vectorlay.server.records import (
    ApiKeyRecord,
    AuditRecord,
    ClusterRecord,
    CommandRecord,
    EventRecord,
    NodeRecord,
    SecretRecord,
    health_record,
)
from vectorlay.server.sessions import Sessions
from vectorlay.server.signals import Signals
from vectorlay.server.store import Store, ops
from vectorlay.server.store.engine import Outcome
from vectorlay.server.write_behind import DatabaseStatus, Journal, retry_delay

log = logging.getLogger("vectorlay.server")
KEEP_REVISIONS = 10  # per cluster, as kubectl's revisionHistoryLimit: enough to go back a few applies


class Batch:
    """Collects one decision's changes: store ops, then the same changes for memory."""

    def __init__(self, fleet: Fleet, now: float, wall: float) -> None:
        self.fleet = fleet
        self.now = now  # the server's monotonic clock
        self.wall = wall  # wall clock, for what is stored and shown
        self.replicas: dict[str, Replica] = {}
        self.forgotten: list[str] = []
        self.nodes: dict[str, NodeRecord] = {}
        self.node_aspects: dict[str, set[str]] = {}  # which columns of each node row changed
        self.removed_nodes: list[str] = []
        self.observed: set[str] = set()  # replicas changed by a node's report, not by a decision
        self.other_servers: tuple[str, ...] = ()  # live servers besides this one (several on PostgreSQL)
        self.commands: list[CommandRecord] = []
        self.events: list[EventRecord] = []
        self.clusters: dict[str, ClusterRecord] = {}
        self.revisions: list[ops.AddRevision] = []  # stored only: read back from the store
        self.deleted_clusters: list[str] = []
        self.api_keys: list[ApiKeyRecord] = []
        self.secrets: list[SecretRecord] = []
        self.deleted_secrets: list[tuple[str, str]] = []
        self.health: dict[str, ClusterHealth] = {}
        self.audits: list[AuditRecord] = []
        self.acks: dict[str, int] = {}  # node id -> commands applied through this seq
        self.touched_clusters: set[str] = set()  # their routes may have changed
        self.to_reconcile: set[str] = set()
        self.changes: list[ops.Op] = []
        self._generation = fleet.generation

    # --- reading through the batch ---

    def replica(self, replica_id: str) -> Replica | None:
        """The replica as this batch leaves it (None if forgotten or unknown)."""
        if replica_id in self.forgotten:
            return None
        return self.replicas.get(replica_id) or self.fleet.replicas.get(replica_id)

    def node(self, node_id: str) -> NodeRecord:
        return self.nodes.get(node_id) or self.fleet.nodes[node_id]

    def cluster_health(self, cluster: str) -> ClusterHealth:
        return self.health.get(cluster) or self.fleet.health.get(cluster, HEALTHY)

    def next_generation(self) -> int:
        self._generation += 1
        return self._generation

    # --- changes ---

    def put_node(self, record: NodeRecord, aspect: str = "all") -> None:
        """`aspect` says which columns changed, so a server writes only what it owns: "all" (a
        node joining), "liveness" (state, last seen, session server; never taking the node from
        another live server that holds it), "claim" (the same, for a session that just attached
        here: it always wins), "facts" (its hello),
        "status" (unhealthy GPUs and tunnels, from its heartbeats),
        "flags" (cordon, drain) or "seq" (the leader's command counter and generation)."""
        self.nodes[record.id] = record
        self.node_aspects.setdefault(record.id, set()).add(aspect)

    def remove_node(self, node_id: str) -> None:
        self.removed_nodes.append(node_id)

    def observe_replica(self, replica: Replica) -> None:
        """A node's report on `replica`: stored as its state columns only, for its generation."""
        self.put_replica(replica)
        self.observed.add(replica.id)

    def put_replica(self, replica: Replica) -> None:
        old = self.replicas.get(replica.id) or self.fleet.replicas.get(replica.id)
        if old is None or old.state is not replica.state or old.stopping != replica.stopping:
            change = _describe_change(old, replica, self)
            self.events.append(EventRecord(replica.cluster, replica.id, self.wall, change))
        self.replicas[replica.id] = replica
        self.touched_clusters.add(replica.cluster)

    def forget(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)
        self.forgotten.append(replica_id)
        replica = self.fleet.replicas.get(replica_id)
        if replica is not None:
            self.touched_clusters.add(replica.cluster)
            self.events.append(EventRecord(replica.cluster, replica_id, self.wall, "removed"))

    def command(self, node_id: str, op: str, replica_id: str, assignment: Assignment | None) -> None:
        node = self.node(node_id)
        generation = assignment.generation if assignment else self.next_generation()
        record = CommandRecord(node_id, node.next_seq, op, replica_id, generation, assignment, self.wall)
        self.commands.append(record)
        self.put_node(replace(node, next_seq=node.next_seq + 1, generation=max(node.generation, generation)), "seq")

    def put_cluster(self, record: ClusterRecord) -> None:
        self.clusters[record.spec.key] = record
        self.to_reconcile.add(record.spec.key)
        self.touched_clusters.add(record.spec.key)

    def revision(self, spec: ClusterSpec, actor: str, change: str) -> None:
        """Keep `spec` as the cluster's next revision (`rollout history`), with the last
        KEEP_REVISIONS of the cluster."""
        self.revisions.append(ops.AddRevision(spec.key, self.wall, actor or "server", spec, change, KEEP_REVISIONS))

    def delete_cluster(self, key: str) -> None:
        self.deleted_clusters.append(key)
        self.health[key] = HEALTHY  # its backoff and quarantine go with it
        self.to_reconcile.add(key)
        self.touched_clusters.add(key)

    def put_api_key(self, record: ApiKeyRecord) -> None:
        self.api_keys.append(record)
        self.touched_clusters.add(record.cluster)  # proxies learn the key set with the route

    def put_secret(self, record: SecretRecord) -> None:
        self.secrets.append(record)

    def delete_secret(self, project: str, name: str) -> None:
        self.deleted_secrets.append((project, name))

    def set_health(self, cluster: str, health: ClusterHealth) -> None:
        if health != self.cluster_health(cluster):
            self.health[cluster] = health

    def event(self, cluster: str, message: str, replica_id: str | None = None) -> None:
        self.events.append(EventRecord(cluster, replica_id, self.wall, message))

    def audit(self, actor: str, action: str, target: str, project: str = "", detail: str = "") -> None:
        self.audits.append(AuditRecord(self.wall, actor or "server", action, target, project, detail))

    def ack(self, node_id: str, through_seq: int) -> None:
        self.acks[node_id] = max(through_seq, self.acks.get(node_id, through_seq))

    def reconcile(self, cluster: str) -> None:
        self.to_reconcile.add(cluster)

    # --- applying ---

    def finish(self) -> None:
        created = self.fleet.replica_created
        self.changes = [
            *(ops.PutCluster(c) for c in self.clusters.values()),
            *self.revisions,  # after its cluster's row: that row orders two servers' revisions
            *(ops.PutReplica(r, created.get(r.id, self.wall)) for r in self.replicas.values()
              if r.id not in self.observed),
            *(ops.ObserveReplica(r.id, r.generation, r.state, r.reason, r.address, r.image_digest)
              for r in self.replicas.values() if r.id in self.observed),
            *(ops.DeleteReplica(i) for i in self.forgotten),
            *(op for n in self.nodes.values() if n.id not in self.removed_nodes
              for op in _node_ops(n, self.node_aspects.get(n.id, {"all"}), self.other_servers)),
            *(ops.DeleteNode(i) for i in self.removed_nodes),
            *(ops.PutCommand(c) for c in self.commands),
            *(ops.AckCommands(node_id, seq) for node_id, seq in self.acks.items()),
            *(ops.DeleteCluster(k) for k in self.deleted_clusters),
            *(ops.PutApiKey(k) for k in self.api_keys),
            *(ops.PutSecret(s) for s in self.secrets),
            *(ops.DeleteSecret(p, n) for p, n in self.deleted_secrets),
            *(ops.PutClusterHealth(health_record(k, h, self.now, self.wall)) if h != HEALTHY
              else ops.DeleteClusterHealth(k) for k, h in self.health.items()),
            *(ops.AddEvent(e) for e in self.events),
            *(ops.AddAudit(a) for a in self.audits),
        ]
        if self._generation != self.fleet.generation:
            self.changes.append(ops.SetMeta("generation", str(self._generation)))

    def apply_to_memory(self) -> None:
        fleet = self.fleet
        for key, cluster in self.clusters.items():
            fleet.clusters[key] = cluster
        for replica in self.replicas.values():
            fleet.put_replica(replica, self.wall)
        for replica_id in self.forgotten:
            fleet.remove_replica(replica_id)
        for record in self.nodes.values():
            if record.id not in self.removed_nodes:
                fleet.put_node(record)
        for node_id in self.removed_nodes:
            fleet.remove_node(node_id)
        for command in self.commands:
            fleet.outbox[command.node_id].append(command)
        for node_id, seq in self.acks.items():
            if node_id in fleet.outbox:
                fleet.outbox[node_id] = [c for c in fleet.outbox[node_id] if c.seq > seq]
        for key in self.deleted_clusters:
            fleet.clusters.pop(key, None)
            fleet.health.pop(key, None)
            fleet.avoid.pop(key, None)
        for api_key in self.api_keys:
            fleet.api_keys[api_key.id] = api_key
        for secret in self.secrets:
            fleet.secrets[(secret.project, secret.name)] = secret
        for project_and_name in self.deleted_secrets:
            fleet.secrets.pop(project_and_name, None)
        for key, health in self.health.items():
            if key in self.deleted_clusters:
                continue
            if health == HEALTHY:
                fleet.health.pop(key, None)
            else:
                fleet.health[key] = health
        fleet.generation = self._generation


class Writer:
    """Two kinds of change, two rules, one order:

    - `commit` (decisions: plans, applied manifests, anything that sends a command) is stored
      first and applied only once stored; while the database is away it fails with
      StoreUnavailable and changes nothing.
    - `observe` (what nodes report) is applied to memory at once and stored as soon as the
      database answers (`write_behind.Journal` keeps it meanwhile); the data plane never waits
      for the database.

    Before any decision is stored, whatever waits (the journal, a decision in doubt) is stored
    first, so the store sees changes in the order memory did. `run` retries the database with
    capped backoff and jitter while it is away, and catches up by itself when it is back.
    """

    def __init__(self, fleet: Fleet, store: Store, signals: Signals, sessions: Sessions,
                 wall_clock: Callable[[], float], crash_points: frozenset[str] = frozenset(),
                 rng: random.Random | None = None) -> None:
        self.fleet = fleet
        self.store = store
        self.signals = signals
        self.sessions = sessions
        self.wall_clock = wall_clock
        self.crash_points = crash_points
        self.lock = trio.Lock()
        self.journal = Journal()
        self.database = DatabaseStatus()
        self._in_doubt: tuple[Batch, Outcome] | None = None
        self._trouble = trio.Event()  # set when the database failed: the retry task takes over
        self._rng = rng or random.Random()
        self.other_servers: Callable[[], tuple[str, ...]] = lambda: ()
        self.fence: Callable[[], ops.Fence | None] = lambda: None
        self.on_fenced: Callable[[str], None] = lambda why: None

    @property
    def available(self) -> bool:
        """Whether decisions can be stored now (nothing waits to be stored before them)."""
        return self.database.available and self._in_doubt is None and not len(self.journal)

    def batch(self) -> Batch:
        batch = Batch(self.fleet, trio.current_time(), self.wall_clock())
        batch.other_servers = self.other_servers()
        return batch

    async def commit(self, batch: Batch, fenced: bool = False) -> None:
        """A decision: store it, then apply it to memory and tell the world. The caller holds
        `lock`. StoreUnavailable (nothing changed) or StoreInDoubt (known later) if the
        database is away. `fenced`: a leader's decision, stored only while it still leads
        (StoreFenced otherwise, and it steps down)."""
        batch.finish()
        if not batch.changes and not batch.to_reconcile:
            return
        if batch.changes:
            await self._catch_up()
            fence = self.fence() if fenced else None
            try:
                await self.store.apply([fence, *batch.changes] if fence else batch.changes)
            except StoreFenced as error:
                self.on_fenced(str(error))
                raise
            except StoreInDoubt as error:
                assert isinstance(error.outcome, Outcome)
                self._in_doubt = (batch, error.outcome)
                self._failed(error)
                raise
            except StoreUnavailable as error:
                self._failed(error)
                raise
            self._recovered()
            if batch.commands:
                self.crash_point("after-commit")
        self._publish(batch)

    async def observe(self, batch: Batch) -> None:
        """An observation: into memory now, into the store now or as soon as it answers. The
        caller holds `lock`."""
        batch.finish()
        if batch.commands:
            raise ValueError("an observation cannot send commands; commit it as a decision")
        if batch.changes:
            if not self.available:
                self._keep_for_later(batch.changes)  # the retry task stores it, in order, later
            else:
                try:
                    await self.store.apply(batch.changes)
                    self._recovered()
                except StoreUnavailable as error:  # in doubt too: writing it again is harmless
                    self._keep_for_later(batch.changes)
                    self._failed(error)
                except StoreError as error:  # not weather: a bad row must not block every later one
                    dropped = await self._store_each(batch.changes)
                    log.error("could not store %d of %d observed change(s) (dropped; memory has them): %s",
                              dropped, len(batch.changes), error)
        self._publish(batch)

    def _keep_for_later(self, changes: Sequence[ops.Op]) -> None:
        refused = self.journal.add(changes)
        if refused:  # a decision in an observation: a bug, but no reason to stop the server
            log.error("could not keep %s for the database's return (dropped; memory has it)",
                      ", ".join(sorted({type(change).__name__ for change in refused})))

    async def _store_each(self, changes: list[ops.Op]) -> int:
        """A batch the database refused as a whole, one change at a time: only the bad ones are
        lost. Returns how many were."""
        dropped = 0
        for index, change in enumerate(changes):
            try:
                await self.store.apply([change])
            except StoreUnavailable as error:
                self._keep_for_later(changes[index:])
                self._failed(error)
                break
            except StoreError:
                dropped += 1
        return dropped

    def _publish(self, batch: Batch) -> None:
        batch.apply_to_memory()
        for cluster in batch.touched_clusters:
            self.signals.mark_route(cluster)
        for cluster in batch.to_reconcile:
            self.signals.mark_dirty(cluster)
        self.sessions.deliver(batch.commands)
        self.signals.announce()

    async def _catch_up(self) -> None:
        """Store what waits: first learn the fate of a decision in doubt, then the journal.
        StoreUnavailable if the database is still away."""
        if self._in_doubt is not None:
            batch, outcome = self._in_doubt
            with trio.move_on_after(self.store.timeout_s):
                await outcome.done.wait()
            if outcome.committed is None:
                raise StoreUnavailable(f"database unavailable ({self.database.reason or 'not answering'})")
            self._in_doubt = None
            if outcome.committed:
                log.warning("a change the database did not confirm in time was stored after all: applying it now")
                self._publish(self._rebase(batch))
        if len(self.journal):
            changes = self.journal.changes()
            try:
                await self.store.apply(changes)
            except StoreUnavailable as error:
                self._failed(error)
                raise
            if self.journal.events_dropped:
                log.warning("%d event(s) written while the database was away were dropped (history only)",
                            self.journal.events_dropped)
            self.journal.clear()
            self.journal.events_dropped = 0

    def _rebase(self, batch: Batch) -> Batch:
        """A decision stored late, on top of what was observed since it was made: a replica its
        node reported on keeps the reported state (the journal stores it as state columns, on
        top of the decision's row); one its node said stopped stays forgotten."""
        waiting = {change.replica_id: change for change in self.journal.changes()
                   if isinstance(change, ops.ObserveReplica)}
        gone = {change.replica_id for change in self.journal.changes() if isinstance(change, ops.DeleteReplica)}
        for replica_id in list(batch.replicas):
            if replica_id in gone:
                del batch.replicas[replica_id]
                continue
            observed = waiting.get(replica_id)
            decided = batch.replicas[replica_id]
            if observed is not None and observed.generation == decided.generation:
                batch.replicas[replica_id] = replace(
                    decided, state=observed.state, reason=observed.reason, address=observed.address or decided.address,
                    image_digest=observed.image_digest or decided.image_digest)
        return batch

    def _failed(self, error: StoreError) -> None:
        if self.database.failed(str(error), self.wall_clock()):
            log.error("%s; serving from memory, storing what nodes report once it is back", error)
        self._trouble.set()

    def _recovered(self) -> None:
        if self.database.recovered(self.wall_clock()):
            log.info("the database is back: caught up, deciding again")
            for cluster in self.fleet.all_cluster_names():
                self.signals.mark_dirty(cluster)  # whatever failed to be decided meanwhile
            self.signals.announce()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """While the database is away, try again with capped backoff and jitter until what
        waits is stored; then the server decides again as if nothing happened."""
        task_status.started()
        while True:
            await self._trouble.wait()
            attempt = 0
            while not self.available:
                await trio.sleep(retry_delay(attempt, self._rng.random()))
                attempt += 1
                try:
                    async with self.lock:
                        await self._catch_up()
                        if not self.database.available:
                            await self.store.ping()
                except StoreUnavailable as error:
                    self.database.failed(str(error), self.wall_clock())
                    continue
                async with self.lock:
                    if not len(self.journal) and self._in_doubt is None:
                        self._recovered()
            self._trouble = trio.Event()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Batch]:
        """Hold the lock, collect a decision, and commit it when the block ends without an error."""
        async with self.lock:
            batch = self.batch()
            yield batch
            await self.commit(batch)

    def crash_point(self, name: str) -> None:
        """Die here as if by kill -9, when a fault-injection test asks for it (VECTORLAY_FAULTS)."""
        if name in self.crash_points:
            log.warning("crash point %r reached: killing the server", name)
            os.kill(os.getpid(), signal.SIGKILL)


def _node_ops(record: NodeRecord, aspects: set[str], batch_others: tuple[str, ...]) -> list[ops.Op]:
    if "all" in aspects:
        return [ops.PutNode(record)]
    found: list[ops.Op] = []
    if "liveness" in aspects or "claim" in aspects:
        # A session that just attached here claims the node whoever held it; any other judgement
        # (a stale session's included) never takes it from a live server that holds it.
        others = () if "claim" in aspects else batch_others
        found.append(ops.SetNodeLiveness(record.id, record.state, record.last_seen_at, record.session_server, others))
    if "facts" in aspects:
        found.append(ops.SetNodeFacts(record.id, record.gpus, record.address, record.runtimes, record.isolation,
                                      record.data_plane))
    if "status" in aspects:
        found.append(ops.SetNodeStatus(record.id, record.unhealthy_gpus, record.tunnels))
    if "flags" in aspects:
        found.append(ops.SetNodeFlags(record.id, record.schedulable, record.draining))
    if "seq" in aspects:
        found.append(ops.SetNodeSeq(record.id, record.next_seq, record.generation))
    return found


def _describe_change(old: Replica | None, new: Replica, batch: Batch) -> str:
    """One line for `describe`: what happened to the replica, with its reason."""
    node = batch.node(new.node_id).name if new.node_id and new.node_id in batch.fleet.nodes else None
    if new.stopping and (old is None or not old.stopping):
        text = "stopping"
    elif old is None or (old.node_id is None and new.node_id is not None):
        if node:
            return f"placed on {node}"
        text = "pending"
    else:
        text = new.state.value
    return f"{text}: {new.reason}" if new.reason else text
