"""Node intake: what nodes say (hellos, heartbeats, goodbyes, replica reports, acks) and what
their silence means (liveness, on the server's own clock).

The rules are pure (`core/health.py` for liveness, `core/reports.py` for fencing and hellos,
`core/cluster_health.py` for crash loops and poison pills); this module feeds them observations
and `now`, and commits what they decide through the writer. Reports and acks are queued and
stored in batches, one transaction for however many arrived meanwhile, so a thousand replicas
turning ready is not a thousand commits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import trio

from vectorlay.core import cluster_health, health
from vectorlay.core.cluster_health import HEALTHY, POISON_WINDOW_S
from vectorlay.core.health import Liveness, LivenessPolicy
from vectorlay.core.model import GpuStatus, NodeState, Replica, ReplicaState
from vectorlay.core.protocol import Message, ReplicaReport, Sync
from vectorlay.core.reports import Verdict, adopt_hello, judge_report
from vectorlay.server.fleet import Fleet
from vectorlay.server.records import ClusterRecord, NodeRecord
from vectorlay.server.sessions import NodeSession, Sessions
from vectorlay.server.signals import Signals
from vectorlay.server.writer import Batch, Writer
from vectorlay.wire import CLOSE_POLICY

log = logging.getLogger("vectorlay.server")

REPORT_QUEUE = 10_000  # replica reports waiting to be stored; node readers wait when it is full
REPORT_BATCH = 1_000  # at most this many reports per transaction


class NodeIntake:
    def __init__(self, writer: Writer, signals: Signals, sessions: Sessions, policy: LivenessPolicy,
                 server_id: str = "") -> None:
        self.writer = writer
        self.server_id = server_id  # written with the node states this server observes
        self.fleet: Fleet = writer.fleet
        self.signals = signals
        self.sessions = sessions
        self.policy = policy
        self.restart_grace_s = policy.down_after_s  # how long a restarting agent keeps its routes
        self._reports_in, self._reports_out = trio.open_memory_channel[tuple[str, ReplicaReport]](REPORT_QUEUE)
        self._acks_in, self._acks_out = trio.open_memory_channel[tuple[str, int]](REPORT_QUEUE)
        self._states_to_persist: set[str] = set()
        self._status_to_persist: set[str] = set()  # unhealthy GPUs or tunnels changed
        self._claims: set[str] = set()  # nodes whose session attached here since the last write
        # Told which nodes this server judged without holding their session (several servers:
        # another may hold it now, and the store keeps that server's word; replication.py).
        self.on_judged_unheld: Callable[[set[str]], None] = lambda node_ids: None
        self._reconnect_grace_until: float | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._liveness_loop)
            nursery.start_soon(self._apply_reports)
            nursery.start_soon(self._apply_acks)
            task_status.started()

    # --- after a server restart -----------------------------------------------------------------

    def restore_liveness(self, grace_s: float) -> None:
        """Give every known node `grace_s` to reconnect before judging it; when the grace ends,
        every cluster is reconciled again, whatever the nodes said in their hellos."""
        now = trio.current_time()
        for node_id, record in self.fleet.nodes.items():
            if record.state is NodeState.DOWN:
                # How long it has been down is unknown (the old monotonic clock is gone): count
                # its replicas' grace from now, which errs on the side of less churn.
                self.fleet.liveness[node_id] = Liveness(NodeState.DOWN, False, now - self.policy.down_after_s, now)
            else:
                self.fleet.liveness[node_id] = health.in_grace(now, grace_s)
        self._reconnect_grace_until = now + grace_s

    # --- hellos and goodbyes --------------------------------------------------------------------

    async def node_connected(self, record: NodeRecord, session: NodeSession, welcome: Message,
                             reports: Sequence[ReplicaReport], generation_seen: int) -> None:
        """A node said hello: adopt its facts and reports, then queue its redelivery and full state.

        Queued under the lock so no newer command can overtake the redelivered ones.
        """
        fleet = self.fleet
        async with self.writer.lock:
            old_session = self.sessions.attach(record.id, session)
            if old_session is not None:
                old_session.close_soon("replaced by a newer connection from the same node")
            now = trio.current_time()
            was = fleet.node_state(record.id)
            fleet.liveness[record.id] = health.on_connect(now)
            batch = self.writer.batch()
            known = fleet.nodes[record.id]
            if (record.gpus, record.address, record.runtimes, record.isolation, record.data_plane) != (
                    known.gpus, known.address, known.runtimes, known.isolation, known.data_plane):
                batch.put_node(replace(known, gpus=record.gpus, address=record.address, runtimes=record.runtimes,
                                       isolation=record.isolation, data_plane=record.data_plane), "facts")
            # Otherwise nothing to write now: the state change is persisted with the next batch,
            # which keeps a reconnect storm of thousands of nodes from being thousands of commits.
            on_node = fleet.replicas_on_node(record.id)
            adoption = adopt_hello(on_node, reports)
            for replica in adoption.put:
                batch.observe_replica(replica)
            for replica_id in adoption.forget:
                batch.forget(replica_id)
            for replica in on_node:
                batch.reconcile(replica.cluster)  # level-triggered: whatever it ran, look again
            await self.writer.observe(batch)
            if was is not NodeState.READY:
                self._node_state_changed(record.id, was)  # back in routing and in scheduling
            # Its session is here now: say so in the store (with several servers, the one that
            # held it before may not know yet; replication.py).
            self._claims.add(record.id)
            self._states_to_persist.add(record.id)
            node = fleet.nodes[record.id]
            session.send_nowait(welcome)
            for command in fleet.outbox.get(record.id, []):
                session.send_nowait(self.sessions.outgoing(command))
            desired = fleet.desired_on_node(record.id)
            for assignment in desired:
                wanted = fleet.replicas.get(assignment.replica_id)
                if wanted is not None and wanted.state is not ReplicaState.READY:
                    fleet.delivered_at[assignment.replica_id] = now
            session.send_nowait(Sync(max(node.generation, generation_seen), node.next_seq - 1,
                                     tuple(self.sessions.with_secrets(a) for a in desired)))

    async def node_disconnected(self, node_id: str, session: NodeSession, closed_by_server: bool = False) -> None:
        """The node's link ended. If the node dropped it without a goodbye (its agent died, or
        its link broke) rather than the server closing it, clusters whose replicas it had just
        received are suspects (poison pills)."""
        if not self.sessions.detach(node_id, session):
            return  # a newer session took over
        live = self.fleet.liveness.get(node_id)
        if live is not None:
            self.fleet.liveness[node_id] = health.on_disconnect(live, trio.current_time())
            dropped = live.state is NodeState.READY and self.fleet.node_state(node_id) is not NodeState.READY
            self._node_state_changed(node_id, live.state)
            if dropped and not closed_by_server:
                self._suspect_poison(node_id)

    def goodbye(self, node_id: str) -> None:
        live = self.fleet.liveness.get(node_id)
        if live is not None:
            self.fleet.liveness[node_id] = health.on_goodbye(live, trio.current_time(), self.restart_grace_s)

    def heartbeat(self, node_id: str) -> None:
        live = self.fleet.liveness.get(node_id)
        if live is None:
            return
        updated = health.on_heartbeat(live, trio.current_time())
        self.fleet.liveness[node_id] = updated
        if updated.state is not live.state:
            self._node_state_changed(node_id, live.state)

    def gpu_status(self, node_id: str, statuses: Sequence[GpuStatus]) -> None:
        """Latest GPU readings from a heartbeat; a GPU turning unhealthy (or healthy again)
        changes whether new replicas may land on this node."""
        fleet = self.fleet
        record = fleet.nodes.get(node_id)
        if record is None:
            return
        known = {g.uuid for g in record.gpus}
        statuses = tuple(s for s in statuses if s.uuid in known)  # never trust uuids it does not own
        was_healthy = fleet.gpus_healthy(node_id)
        fleet.gpu_status[node_id] = statuses
        unhealthy = tuple((s.uuid, s.reason or "unhealthy") for s in statuses if not s.healthy)
        if unhealthy != record.unhealthy_gpus:  # every server must know: the leader schedules by it
            fleet.nodes[node_id] = replace(record, unhealthy_gpus=unhealthy)
            self._status_to_persist.add(node_id)
        if fleet.gpus_healthy(node_id) != was_healthy:
            name = fleet.nodes[node_id].name
            if was_healthy:
                bad = ", ".join(f"{s.uuid} ({s.reason or 'unhealthy'})" for s in statuses if not s.healthy)
                log.warning("node %s has an unhealthy GPU: %s; no new replicas there", name, bad)
            else:
                log.info("node %s GPUs are healthy again", name)
            self._capacity_freed()
            self.signals.announce()

    def tunnels(self, node_id: str, count: int | None) -> None:
        """How many proxies a tunnel node has a tunnel to, from its heartbeat (`get nodes`)."""
        record = self.fleet.nodes.get(node_id)
        if count is None or record is None or record.tunnels == count:
            return
        self.fleet.nodes[node_id] = replace(record, tunnels=count)
        self._status_to_persist.add(node_id)

    def _node_state_changed(self, node_id: str, was: NodeState) -> None:
        self._states_to_persist.add(node_id)
        now_state = self.fleet.node_state(node_id)
        for cluster in self.fleet.clusters_on_node(node_id):
            self.signals.mark_route(cluster)
            self.signals.mark_dirty(cluster)
        if now_state is NodeState.READY:
            self._capacity_freed()
        self.signals.announce()

    def _holder(self, node_id: str) -> str:
        return self.server_id if node_id in self.sessions else ""

    def _capacity_freed(self) -> None:
        """GPUs or a node came free: clusters waiting for room, and clusters packed tighter than
        they need to be, get another look."""
        for cluster in self.fleet.clusters_waiting() | self.fleet.clusters_to_spread():
            self.signals.mark_dirty(cluster)

    def _suspect_poison(self, node_id: str) -> None:
        """The node's agent dropped its link without a goodbye: clusters whose replicas reached it
        just before (and never became ready there) get a strike (core/cluster_health.py). Silence
        alone (late heartbeats from a loaded machine) is not a strike: a dying agent's link drops."""
        fleet = self.fleet
        now = trio.current_time()
        suspects = sorted({
            r.cluster for r in fleet.replicas_on_node(node_id)
            if not r.stopping and r.state is not ReplicaState.READY
            and now - fleet.delivered_at.get(r.id, -POISON_WINDOW_S * 2) <= POISON_WINDOW_S
        })
        if not suspects:
            return
        name = fleet.nodes[node_id].name if node_id in fleet.nodes else node_id
        for cluster in suspects:
            before = fleet.health.get(cluster, HEALTHY)
            after = cluster_health.on_agent_died(before, name)
            fleet.health[cluster] = after  # stored with the cluster's next reconcile (marked dirty above)
            if after.quarantined and not before.quarantined:
                log.warning("cluster %s is quarantined: %s", cluster, after.quarantined)
            else:
                log.warning("node %s dropped right after receiving replicas of %s (strike %d)", name, cluster,
                            len(after.strikes))

    # --- liveness -------------------------------------------------------------------------------

    async def _liveness_loop(self) -> None:
        tick = max(0.05, min(1.0, self.policy.heartbeat_interval_s / 5))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for node_id, live in list(self.fleet.liveness.items()):
                stepped = health.on_tick(live, now, self.policy)
                if stepped is not live:
                    self.fleet.liveness[node_id] = stepped
                    if stepped.state is not live.state:
                        name = self.fleet.nodes[node_id].name if node_id in self.fleet.nodes else node_id
                        log.info("node %s is %s (silent for %.1fs)", name, stepped.state, now - stepped.last_seen)
                        self._node_state_changed(node_id, live.state)
            if self._reconnect_grace_until is not None and now >= self._reconnect_grace_until:
                self._reconnect_grace_until = None
                for cluster in self.fleet.all_cluster_names():
                    self.signals.mark_dirty(cluster)
            if self._states_to_persist or self._status_to_persist:
                await self._persist_node_states()

    async def _persist_node_states(self) -> None:
        """Write node state changes in one batch (not per heartbeat): they survive a restart,
        and the other servers learn them."""
        async with self.writer.lock:
            ids, self._states_to_persist = self._states_to_persist, set()
            status_ids, self._status_to_persist = self._status_to_persist, set()
            claims, self._claims = self._claims, set()
            batch = self.writer.batch()
            for node_id in ids:
                if node_id in self.fleet.nodes:
                    holder = self._holder(node_id)
                    # Only a fresh session claims a node from another server; a stale one (this
                    # server was paused while the node moved on) must not take it back.
                    aspect = "claim" if node_id in claims and holder else "liveness"
                    batch.put_node(replace(self.fleet.nodes[node_id], state=self.fleet.node_state(node_id),
                                           last_seen_at=batch.wall, session_server=holder), aspect)
            for node_id in status_ids:
                if node_id in self.fleet.nodes:
                    batch.put_node(batch.nodes.get(node_id) or self.fleet.nodes[node_id], "status")
            await self.writer.observe(batch)
        # Nodes judged here whose write another server's claim may have refused: read them again.
        self.on_judged_unheld({node_id for node_id in ids if node_id not in claims})

    # --- reports and acks -----------------------------------------------------------------------

    async def replica_status(self, node_id: str, report: ReplicaReport) -> None:
        """Queue a node's report; reports keep their arrival order."""
        await self._reports_in.send((node_id, report))

    async def _apply_reports(self) -> None:
        async for first in self._reports_out:
            items = [first]
            while len(items) < REPORT_BATCH:
                try:
                    items.append(self._reports_out.receive_nowait())
                except trio.WouldBlock:
                    break
            async with self.writer.lock:
                batch = self.writer.batch()
                freed = False
                for node_id, report in items:
                    freed |= self._fold_report(batch, node_id, report)
                await self.writer.observe(batch)
                if freed:
                    self._capacity_freed()

    def _fold_report(self, batch: Batch, node_id: str, report: ReplicaReport) -> bool:
        """Add one report to `batch`; return whether it freed GPUs."""
        known = report.replica_id in self.fleet.replicas or report.replica_id in batch.replicas
        replica = batch.replica(report.replica_id)
        if known and replica is None:
            return False  # forgotten earlier in this batch
        judgement = judge_report(replica, node_id, report)
        if judgement.verdict is Verdict.FOREIGN:
            # Replica ids are never moved between nodes: this node reports on one it was never
            # given. A bug or a hostile agent either way; drop the link, change nothing.
            assert replica is not None
            log.warning("node %s reported on replica %s of another node; disconnecting it", node_id, replica.id)
            self.sessions.close(node_id, f"reported on replica {replica.id}, which is not this node's", CLOSE_POLICY)
            return False
        if judgement.verdict is Verdict.STOPPED:
            assert replica is not None
            batch.forget(replica.id)
            batch.reconcile(replica.cluster)
            return True
        if judgement.verdict is not Verdict.UPDATE or judgement.replica is None or replica is None:
            return False
        updated = judgement.replica
        batch.observe_replica(updated)
        self._note_cluster_health(batch, replica, updated, report, node_id)
        return False

    def _note_cluster_health(self, batch: Batch, before: Replica, updated: Replica, report: ReplicaReport,
                             node_id: str) -> None:
        """A failure counts toward the cluster's crash loop (and, when the node is to blame,
        steers its next copy elsewhere); a ready replica of the current revision starts the
        stable period after which the count is forgotten."""
        fleet = self.fleet
        cluster = updated.cluster
        record = fleet.clusters.get(cluster)
        current = record is not None and updated.revision == record.revision
        state = batch.cluster_health(cluster)
        if updated.state is ReplicaState.FAILED and before.state is not ReplicaState.FAILED:
            node = fleet.nodes.get(node_id)
            state = cluster_health.on_failure(state, batch.now, updated.reason, node.name if node else node_id)
            if report.node_fault:
                fleet.avoid.setdefault(cluster, set()).add(node_id)
            batch.reconcile(cluster)  # replace it (when its backoff allows)
        elif updated.state is ReplicaState.READY and current:
            state = cluster_health.on_ready(state, batch.now)
            if state.failures:
                batch.reconcile(cluster)  # so the loop sets a timer for when it is stable
        elif before.state is ReplicaState.READY and not self._any_ready(batch, cluster, record):
            state = cluster_health.on_none_ready(state)
        if updated.state is ReplicaState.READY and before.state is not ReplicaState.READY and (
                cluster in fleet.rolling or fleet.is_packed(cluster)):
            batch.reconcile(cluster)  # let the roll take its next step, or the cluster spread again
        batch.set_health(cluster, state)

    def _any_ready(self, batch: Batch, cluster: str, record: ClusterRecord | None) -> bool:
        if record is None:
            return False
        for replica_id in self.fleet.by_cluster.get(cluster, ()):
            replica = batch.replica(replica_id)
            if replica is not None and replica.state is ReplicaState.READY and replica.revision == record.revision:
                return True
        return False

    async def ack(self, node_id: str, seq: int) -> None:
        """Queue a node's ack; stored in batches like reports. An ack stored late only means a
        command may be delivered again, which nodes already expect."""
        await self._acks_in.send((node_id, seq))

    async def _apply_acks(self) -> None:
        async for first in self._acks_out:
            through = {first[0]: first[1]}
            while len(through) < REPORT_BATCH:
                try:
                    node_id, seq = self._acks_out.receive_nowait()
                except trio.WouldBlock:
                    break
                through[node_id] = max(seq, through.get(node_id, seq))
            async with self.writer.lock:
                acked = {node_id: seq for node_id, seq in through.items()
                         if (queue := self.fleet.outbox.get(node_id)) and queue[0].seq <= seq}
                if not acked:
                    continue
                self.writer.crash_point("before-ack-stored")
                batch = self.writer.batch()
                for node_id, seq in acked.items():
                    batch.ack(node_id, seq)
                await self.writer.observe(batch)
