"""The control plane's parts, wired together: one writer at the bottom, three peers on top.

- `writer.Writer`: the lock and the batch; store → memory → deliver → announce.
- `reconcile_loop.ReconcileLoop`: dirty clusters and timers → plans → commits.
- `node_intake.NodeIntake`: hellos, heartbeats, liveness, reports and acks.
- `admin.Admin`: what API callers change (clusters, keys, secrets, node flags).

They share the in-memory `Fleet` (read freely, changed only through the writer), `Signals` (who
needs to hear of a change) and `Sessions` (the connected nodes). None reaches into another's
fields.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from vectorlay.core.health import LivenessPolicy
from vectorlay.errors import StoreError
from vectorlay.server.admin import Admin
from vectorlay.server.fleet import Fleet
from vectorlay.server.node_intake import NodeIntake
from vectorlay.server.reconcile_loop import ReconcileLoop
from vectorlay.server.secrets_box import SecretBox
from vectorlay.server.sessions import Sessions
from vectorlay.server.signals import Signals
from vectorlay.server.store import Store
from vectorlay.server.writer import Writer

log = logging.getLogger("vectorlay.server")

EVENTS_KEPT_PER_CLUSTER = 500
EVENT_TRIM_INTERVAL_S = 300.0


class Controller:
    def __init__(
        self,
        fleet: Fleet,
        store: Store,
        policy: LivenessPolicy,
        wall_clock: Callable[[], float],
        crash_points: frozenset[str] = frozenset(),
        secret_box: SecretBox | None = None,
    ) -> None:
        box = secret_box or SecretBox(SecretBox.new_key())
        self.fleet = fleet
        self.store = store
        self.signals = Signals()
        self.sessions = Sessions(fleet, box)
        self.writer = Writer(fleet, store, self.signals, self.sessions, wall_clock, crash_points)
        self.loop = ReconcileLoop(self.writer, self.signals)
        self.intake = NodeIntake(self.writer, self.signals, self.sessions, policy)
        self.admin = Admin(self.writer, self.signals, box)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.writer.run)
            await nursery.start(self.intake.run)
            await nursery.start(self.loop.run)
            nursery.start_soon(self._trim_events)
            task_status.started()

    async def _trim_events(self) -> None:
        while True:
            await trio.sleep(EVENT_TRIM_INTERVAL_S)
            try:
                await self.store.trim_events(EVENTS_KEPT_PER_CLUSTER)
            except StoreError as error:  # only housekeeping: the next round tries again
                log.warning("trimming old events failed: %s", error)
