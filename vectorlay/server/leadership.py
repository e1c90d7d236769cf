"""Which server leads: a lease in PostgreSQL with an epoch that only grows.

Every server serves nodes, proxies and the CLI; one of them, the leader, also decides (the
reconcile loop, scheduling, timers). The lease lives in one row (`vl_leader`), judged on the
database's clock so no two servers' clocks need agree. A leader renews it every third of its
length; any server takes it over once it has run out, with the epoch one higher. Every decision
the leader stores carries its epoch as a fence (`ops.Fence`): a leader that was paused or cut off
past its lease can no longer write, and steps down when told so. No home-made consensus: the
database's row lock and transaction decide who wins.

SQLite is one server only: it leads from the start, and there is nothing to fence against.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import trio

from vectorlay.errors import StoreError
from vectorlay.server.store import Store, ops
from vectorlay.server.store import engine as store_engine

log = logging.getLogger("vectorlay.server")

LEASE_S = 3.0  # a dead leader is replaced within this plus a poll: under the 5 s the issue asks
RENEW_EVERY_S = LEASE_S / 3
POLL_S = 0.5  # how often a follower tries to take over a lease that may have run out


class Leadership:
    def __init__(self, store: Store, server_id: str, single: bool,
                 on_change: Callable[[bool], None] = lambda leading: None) -> None:
        self.store = store
        self.server_id = server_id
        self.single = single  # SQLite: the only server, always the leader
        self.epoch = 0
        self.leading = single
        self.on_change = on_change
        self._lost = trio.Event()

    def fence(self) -> ops.Fence | None:
        """The fence a leader's transaction starts with (None for a single server)."""
        return None if self.single else ops.Fence(self.server_id, self.epoch)

    def deposed(self, why: str) -> None:
        """A write was refused by the fence, or the lease could not be renewed: stop deciding."""
        if self.leading and not self.single:
            log.warning("stepping down as leader (epoch %d): %s", self.epoch, why)
            self.leading = False
            self._lost.set()
            self.on_change(False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.single:
            await trio.sleep_forever()
        try:
            while True:
                await self._follow()
                await self._lead()
        finally:
            if self.leading:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await self.store.run(partial(store_engine.give_up_lead, server_id=self.server_id,
                                                     epoch=self.epoch))
                    except StoreError:
                        pass  # the lease runs out by itself

    async def _follow(self) -> None:
        """Until this server takes the lead."""
        while True:
            try:
                epoch = await self.store.run(partial(store_engine.take_lead, server_id=self.server_id,
                                                     lease_s=LEASE_S))
            except StoreError as error:
                log.debug("cannot try to lead: %s", error)
                epoch = None
            if epoch is not None:
                self.epoch = epoch
                self.leading = True
                self._lost = trio.Event()
                log.info("leading (epoch %d)", epoch)
                self.on_change(True)
                return
            await trio.sleep(POLL_S)

    async def _lead(self) -> None:
        """Renew the lease until it is lost (taken over, refused, or not renewable in time)."""
        renewed_at = trio.current_time()
        while self.leading:
            with trio.move_on_after(RENEW_EVERY_S):
                await self._lost.wait()
            if not self.leading:
                return
            try:
                kept = await self.store.run(partial(store_engine.renew_lead, server_id=self.server_id,
                                                    epoch=self.epoch, lease_s=LEASE_S))
            except StoreError as error:
                # The database is away: the lease runs out on its clock meanwhile. Stop deciding
                # before it does, rather than risk deciding beside a new leader.
                if trio.current_time() - renewed_at >= LEASE_S * 2 / 3:
                    self.deposed(f"the lease could not be renewed ({error})")
                continue
            if not kept:
                self.deposed("another server took over")
                return
            renewed_at = trio.current_time()
