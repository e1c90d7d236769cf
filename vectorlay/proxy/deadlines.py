"""Deadlines for many client connections, kept by one task instead of a cancel scope per wait.

Every request that does not arrive back to back waits for the client with a deadline (idle
timeout, then the header timeout). A trio cancel scope with a deadline costs 6.5 µs to enter and
leave on the benchmark machine; here, arming a deadline is a heap push and disarming it a few
assignments (0.6 µs together), and a single keeper task sleeps until the earliest deadline and
calls `expire()` on whoever is still armed with it. At moderate load, where nearly every request
waits, that is a few per cent of the proxy's CPU per request (BENCHMARKS.md).

Stale heap entries (disarmed or re-armed since) are skipped when they come up, and dropped all at
once when they outnumber the live ones, so the heap stays proportional to the connections
waiting, as trio does for its own deadlines. The keeper runs as a trio system task while anything
is armed and ends when nothing is, so a Proxy needs no nursery of its own. An infinite deadline
(no timeout configured) marks the connection as waiting but is not kept at all.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from typing import Protocol

import trio

PRUNE_ABOVE = 64  # stale entries tolerated before a rebuild is considered
# The keeper wakes at least this far apart while waiting on a later deadline, so timeouts set in
# milliseconds do not make it spin; such a short deadline armed meanwhile may fire this late.
MIN_WAKE_INTERVAL_S = 0.05
NEVER = ("never",)  # what an Expirable is armed with for an infinite deadline: nothing to keep

log = logging.getLogger("vectorlay.proxy")

_Entry = tuple[float, int, "Expirable"]


class Expirable(Protocol):
    # None while disarmed; else its heap entry (or NEVER). Set by DeadlineKeeper only: the entry's
    # identity, not the deadline's value, tells a live entry from a stale one.
    armed_with: object | None

    def expire(self) -> None:
        """The deadline passed while armed. Called from the keeper task: must not block."""


class DeadlineKeeper:
    def __init__(self, shortest_s: float) -> None:
        """`shortest_s`: the shortest delay anyone will arm (the smallest timeout). The keeper
        never sleeps longer than that (nor less than MIN_WAKE_INTERVAL_S), so a deadline armed
        while it sleeps is not late, unless shorter than MIN_WAKE_INTERVAL_S."""
        self.max_sleep_s = max(shortest_s, MIN_WAKE_INTERVAL_S)
        self._heap: list[_Entry] = []
        self._order = itertools.count()  # ties broken by arming order; Expirables need no ordering
        self.armed = 0  # Expirables armed with a finite deadline
        self._running = False

    def arm(self, who: Expirable, deadline: float) -> None:
        """`who.expire()` at `deadline` (trio time) unless disarmed or re-armed before."""
        self.disarm(who)
        if deadline == math.inf:
            who.armed_with = NEVER
            return
        entry = (deadline, next(self._order), who)
        who.armed_with = entry
        self.armed += 1
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * self.armed + PRUNE_ABOVE:
            self._prune()
        if not self._running:
            trio.lowlevel.spawn_system_task(self._keep, name="vectorlay.proxy.deadlines")
            self._running = True

    def disarm(self, who: Expirable) -> None:
        armed_with = who.armed_with
        if armed_with is not None:
            who.armed_with = None
            if armed_with is not NEVER:
                self.armed -= 1

    def _prune(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2].armed_with is entry]
        heapq.heapify(self._heap)

    def expire_due(self, now: float) -> None:
        """Expire everyone armed with a deadline at or before `now`."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            who = entry[2]
            if who.armed_with is entry:  # else disarmed or re-armed since: a stale entry
                self.disarm(who)
                try:
                    who.expire()
                except Exception:  # one connection's bug must not end the proxy (a system task's error would)
                    log.exception("expiring a deadline failed")

    async def _keep(self) -> None:
        try:
            while self.armed:
                now = trio.current_time()
                self.expire_due(now)
                if not self.armed:
                    break
                await trio.sleep_until(min(self._heap[0][0], now + self.max_sleep_s))
        finally:
            self._running = False
            if not self.armed:
                self._heap.clear()  # only stale entries are left
