"""Several servers, one PostgreSQL: keep this server's memory in step with what the others store.

Every transaction a server commits notifies the others (`store/changes.py`) with the keys of
the rows it changed; here they are reloaded and applied to memory, then announced as if this
server had made the change: routes to its proxies, commands to the nodes it holds, a reconcile if
it leads. LISTEN/NOTIFY runs on one connection of its own, waited on with
`trio.lowlevel.wait_readable` (no thread per wait). Whenever that connection was lost, or a
notification says `full`, everything is reloaded from the tables: nothing said meanwhile is lost.

Liveness is judged where the heartbeats arrive: a node connected to another live server keeps the
state that server stores and is never judged here. A node no server holds (its link dropped, or
its server died) is judged by the leader on its own clock.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import replace
from functools import partial

import trio

from vectorlay.core.health import Liveness, LivenessPolicy
from vectorlay.core.model import NodeState
from vectorlay.errors import StoreError
from vectorlay.server.auth import Authenticator
from vectorlay.server.fleet import Fleet
from vectorlay.server.leadership import Leadership
from vectorlay.server.records import CommandRecord, NodeRecord, health_from_record
from vectorlay.server.sessions import Sessions
from vectorlay.server.signals import Signals
from vectorlay.server.store import Store
from vectorlay.server.store import changes as change_keys
from vectorlay.server.store import engine as store_engine
from vectorlay.server.store.changes import ChangeKeys
from vectorlay.server.store.listener import Listener
from vectorlay.server.write_behind import retry_delay
from vectorlay.server.writer import Writer
from vectorlay.wire import CLOSE_POLICY

log = logging.getLogger("vectorlay.server")

COALESCE_S = 0.01  # notifications arriving together are reloaded in one read
CHECK_EVERY_S = 5.0  # a listening connection silent this long is asked whether it still works
CHECK_TIMEOUT_S = 5.0
SERVER_DEAD_S = 6.0  # a server that has not beaten for this long is gone: its nodes are orphans


def judged_elsewhere(state: NodeState, now: float) -> Liveness:
    """A node another server judges: its stored state, never stepped here."""
    return Liveness(state, state is NodeState.READY, now, now, grace_until=math.inf)


class Replicator:
    def __init__(self, fleet: Fleet, store: Store, writer: Writer, signals: Signals, sessions: Sessions,
                 auth: Authenticator, leadership: Leadership, policy: LivenessPolicy, server_id: str) -> None:
        self.fleet = fleet
        self.store = store
        self.writer = writer
        self.signals = signals
        self.sessions = sessions
        self.auth = auth
        self.leadership = leadership
        self.policy = policy
        self.server_id = server_id
        self.live_servers: set[str] = {server_id}
        self._pending = ChangeKeys()
        self._arrived = trio.Event()
        self._rng = random.Random()

    @property
    def enabled(self) -> bool:
        return self.store.dialect == "postgresql"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.enabled:
            task_status.started()
            await trio.sleep_forever()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._apply_loop)
            await nursery.start(self._listen_loop)
            task_status.started()

    # --- listening --------------------------------------------------------------------------------

    async def _listen_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        attempt = 0
        started = False
        while True:
            try:
                listener = await trio.to_thread.run_sync(Listener.open, self.store.engine,
                                                         store_engine.CONNECT_TIMEOUT_S)
            except StoreError as error:
                delay = retry_delay(attempt, self._rng.random())
                attempt += 1
                log.warning("cannot listen for other servers' changes (%s); trying again in %.1fs", error, delay)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(delay)
                continue
            attempt = 0
            try:
                self._note(ChangeKeys(full=True))  # whatever happened while not listening
                if not started:
                    task_status.started()
                    started = True
                await self._listen(listener)
            except (StoreError, OSError, trio.TooSlowError) as error:
                log.warning("lost the connection that hears other servers' changes (%s); reconnecting", error)
            finally:
                listener.close()

    async def _listen(self, listener: Listener) -> None:
        while True:
            with trio.move_on_after(CHECK_EVERY_S) as idle:
                await trio.lowlevel.wait_readable(listener.fileno())
            if idle.cancelled_caught:
                with trio.fail_after(CHECK_TIMEOUT_S):  # a stalled link must not leave us deaf
                    await trio.to_thread.run_sync(listener.check, abandon_on_cancel=True)
            for payload in listener.notifications():
                sender, keys = change_keys.decode(payload)
                if sender != self.server_id:
                    self._note(keys)

    async def load_node(self, node_id: str) -> None:
        """Read one node's row now (a node that joined through another server says hello here
        before its notification arrived). StoreUnavailable if the database is away."""
        if self.enabled:
            await self.catch_up(ChangeKeys(nodes={node_id}))

    def reload_nodes(self, node_ids: set[str]) -> None:
        """Read these nodes' rows again: this server judged nodes it no longer holds (their links
        to it ended), and the store kept the state of the live server that holds them now."""
        if self.enabled and node_ids:
            self._note(ChangeKeys(nodes=set(node_ids)))

    def _note(self, keys: ChangeKeys) -> None:
        self._pending.merge(keys)
        self._arrived.set()

    # --- applying ---------------------------------------------------------------------------------

    async def _apply_loop(self) -> None:
        while True:
            await self._arrived.wait()
            await trio.sleep(COALESCE_S)
            self._arrived = trio.Event()
            keys, self._pending = self._pending, ChangeKeys()
            try:
                await self.catch_up(keys)
            except StoreError as error:
                log.warning("could not read what other servers changed (%s); reading everything again soon", error)
                self._pending.merge(ChangeKeys(full=True))
                await trio.sleep(1.0)
                self._arrived.set()

    async def catch_up(self, keys: ChangeKeys) -> None:
        if keys.full:
            snapshot = await self.store.load()
            async with self.writer.lock:
                self._apply_snapshot(snapshot)
            return
        rows = await self.store.run(partial(store_engine.load_rows, keys=keys))
        async with self.writer.lock:
            self._apply_rows(keys, rows)

    def _apply_snapshot(self, snapshot: store_engine.Snapshot) -> None:
        """Everything again, as stored: after a gap, or on becoming the leader."""
        keys = ChangeKeys(
            replicas=set(self.fleet.replicas) | {r.id for r, _ in snapshot.replicas},
            nodes=set(self.fleet.nodes) | {n.id for n in snapshot.nodes},
            clusters=set(self.fleet.clusters) | {c.spec.key for c in snapshot.clusters} | set(self.fleet.health),
            commands=set(self.fleet.outbox) | {c.node_id for c in snapshot.commands},
            api_keys={k.id for k in snapshot.api_keys} | set(self.fleet.api_keys),
            secrets=set(self.fleet.secrets) | {(s.project, s.name) for s in snapshot.secrets},
            meta={"generation"})
        commands: dict[str, list[CommandRecord]] = {node_id: [] for node_id in keys.commands}
        for command in snapshot.commands:
            commands[command.node_id].append(command)
        rows = store_engine.Rows(
            replicas={r.id: (r, created) for r, created in snapshot.replicas},
            nodes={n.id: n for n in snapshot.nodes},
            clusters={c.spec.key: c for c in snapshot.clusters},
            health={h.cluster: h for h in snapshot.health},
            commands=commands,
            api_keys={k.id: k for k in snapshot.api_keys},
            secrets={(s.project, s.name): s for s in snapshot.secrets},
            tokens={},
            generation=int(snapshot.meta.get("generation", "0")))
        self._apply_rows(keys, rows)

    def _apply_rows(self, keys: ChangeKeys, rows: store_engine.Rows) -> None:
        fleet = self.fleet
        now, wall = trio.current_time(), self.writer.wall_clock()
        touched: set[str] = set()
        for replica_id in keys.replicas:
            old = fleet.replicas.get(replica_id)
            if old is not None:
                touched.add(old.cluster)
            found = rows.replicas.get(replica_id)
            if found is not None:
                replica, created_at = found
                fleet.put_replica(replica, created_at)
                touched.add(replica.cluster)
            elif old is not None:
                fleet.remove_replica(replica_id)
        for node_id in keys.nodes:
            record = rows.nodes.get(node_id)
            if record is None:
                if node_id in fleet.nodes:
                    touched |= fleet.clusters_on_node(node_id)
                    fleet.remove_node(node_id)
                    self.sessions.close(node_id, "this node was removed from the fleet", CLOSE_POLICY)
                continue
            fleet.put_node(record)
            if node_id not in self.sessions:
                self._judge_from_row(record, now)
            touched |= fleet.clusters_on_node(node_id)
        for key in keys.clusters:
            stored = rows.clusters.get(key)
            if stored is not None:
                fleet.clusters[key] = stored
            else:
                fleet.clusters.pop(key, None)
            health = rows.health.get(key)
            if health is not None:
                fleet.health[key] = health_from_record(health, now, wall)
            else:
                fleet.health.pop(key, None)
            touched.add(key)
        for node_id, outbox in rows.commands.items():
            known = {c.seq for c in fleet.outbox.get(node_id, [])}
            fresh = [c for c in outbox if c.seq not in known]
            fleet.outbox[node_id] = outbox
            if not outbox:
                fleet.outbox.pop(node_id, None)
            self.sessions.deliver(fresh)
        for node_id, seq in keys.acks.items():
            if node_id in fleet.outbox:
                fleet.outbox[node_id] = [c for c in fleet.outbox[node_id] if c.seq > seq]
        for key_id in keys.api_keys:
            api_key = rows.api_keys.get(key_id)
            if api_key is not None:
                fleet.api_keys[key_id] = api_key
                touched.add(api_key.cluster)
        for secret_key in keys.secrets:
            secret = rows.secrets.get(secret_key)
            if secret is not None:
                fleet.secrets[secret_key] = secret
            else:
                fleet.secrets.pop(secret_key, None)
        for token in rows.tokens.values():
            if token.revoked or (token.expires_at is not None and wall >= token.expires_at):
                self.auth.sessions.close_all(token.id, "token has been revoked")
        if rows.generation is not None:
            fleet.generation = max(fleet.generation, rows.generation)
        for cluster in touched:
            self.signals.mark_route(cluster)
            if self.leadership.leading:
                self.signals.mark_dirty(cluster)
        self.signals.announce()

    def _judge_from_row(self, record: NodeRecord, now: float) -> None:
        """A node this server does not hold: judged by the server that holds it; by the leader
        when none does (a node that dropped its link, or whose server died)."""
        held_by = record.session_server
        current = self.fleet.liveness.get(record.id)
        if held_by and held_by in self.live_servers:
            self.fleet.liveness[record.id] = judged_elsewhere(record.state, now)
        elif self.leadership.leading:
            if current is None or current.grace_until == math.inf:
                state = record.state if record.state is not NodeState.READY else NodeState.SUSPECT
                self.fleet.liveness[record.id] = Liveness(state, False, now, now)
        else:
            self.fleet.liveness[record.id] = judged_elsewhere(record.state, now)

    # --- servers ----------------------------------------------------------------------------------

    def servers_seen(self, alive: set[str]) -> None:
        """The servers that beat lately. Nodes a newly seen server holds are judged there; on the
        leader, the nodes of a server that stopped beating are orphans now: judged here (suspect
        at once, down after the usual silence) until they reconnect somewhere."""
        previous = self.live_servers
        self.live_servers = alive | {self.server_id}
        appeared = self.live_servers - previous
        gone = previous - self.live_servers
        if not appeared and not gone:
            return
        now = trio.current_time()
        for record in list(self.fleet.nodes.values()):
            if record.id in self.sessions or not record.session_server:
                continue
            if record.session_server in appeared:
                self.fleet.liveness[record.id] = judged_elsewhere(record.state, now)
            elif record.session_server in gone and self.leadership.leading:
                log.warning("server %s is gone: node %s is judged here until it reconnects", record.session_server,
                            record.name)
                self.fleet.nodes[record.id] = replace(record, session_server="")
                self.fleet.liveness[record.id] = Liveness(NodeState.SUSPECT, False, now, now)
                for cluster in self.fleet.clusters_on_node(record.id):
                    self.signals.mark_route(cluster)
                    self.signals.mark_dirty(cluster)
        self.signals.announce()

    def took_lead(self) -> None:
        """Now leading: judge the orphans, and read everything again before deciding."""
        now = trio.current_time()
        for record in self.fleet.nodes.values():
            if record.id not in self.sessions and (not record.session_server
                                                   or record.session_server not in self.live_servers):
                live = self.fleet.liveness.get(record.id)
                if live is None or live.grace_until == math.inf:
                    state = NodeState.SUSPECT if record.state is NodeState.READY else record.state
                    self.fleet.liveness[record.id] = Liveness(state, False, now, now)
        if self.enabled:
            self._note(ChangeKeys(full=True))
