"""Deadlines for many client connections, kept by one task instead of a cancel scope per wait.

Every request that does not arrive back to back waits for the client with a deadline (idle
timeout, then the header timeout). A trio cancel scope with a deadline costs 6.5 µs to enter and
leave on the benchmark machine; here, arming a deadline is a heap push and disarming it one
assignment (0.55 µs together), and a single keeper task sleeps until the earliest deadline and
calls `expire()` on whoever is still armed with it. At moderate load, where nearly every request
waits, that is a few per cent of the proxy's CPU per request (BENCHMARKS.md).

Stale heap entries (disarmed or re-armed since) are skipped when they come up, and dropped all at
once when they outnumber the live ones, so the heap stays proportional to the connections
waiting, as trio does for its own deadlines. The keeper runs as a trio system task while anything
is armed and ends when nothing is, so a Proxy needs no nursery of its own.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Protocol

import trio

PRUNE_ABOVE = 64  # stale entries tolerated before a rebuild is considered
# The keeper wakes at least this far apart while waiting on a later deadline, so timeouts set in
# milliseconds do not make it spin; such a short deadline armed meanwhile may fire this late.
MIN_WAKE_INTERVAL_S = 0.05


class Expirable(Protocol):
    deadline: float  # math.inf while disarmed; only DeadlineKeeper sets it

    def expire(self) -> None:
        """The deadline passed while armed. Called from the keeper task: must not block or raise."""


class DeadlineKeeper:
    def __init__(self, shortest_s: float) -> None:
        """`shortest_s`: the shortest delay anyone will arm (the smallest timeout). The keeper
        never sleeps longer than that (or MIN_WAKE_INTERVAL_S), so a deadline armed while it
        sleeps is not late."""
        self.max_sleep_s = max(shortest_s, MIN_WAKE_INTERVAL_S)
        self._heap: list[tuple[float, int, Expirable]] = []
        self._order = itertools.count()  # ties broken by arming order; Expirables need no ordering
        self.armed = 0
        self._running = False

    def arm(self, who: Expirable, deadline: float) -> None:
        """`who.expire()` at `deadline` (trio time) unless disarmed or re-armed before."""
        if who.deadline == math.inf:
            self.armed += 1
        who.deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), who))
        if len(self._heap) > 2 * self.armed + PRUNE_ABOVE:
            self._prune()
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._keep, name="vectorlay.proxy.deadlines")

    def disarm(self, who: Expirable) -> None:
        if who.deadline != math.inf:
            who.deadline = math.inf
            self.armed -= 1

    def _prune(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2].deadline == entry[0]]
        heapq.heapify(self._heap)

    def expire_due(self, now: float) -> None:
        """Expire everyone armed with a deadline at or before `now`."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, who = heapq.heappop(heap)
            if who.deadline == deadline:  # else disarmed or re-armed since: a stale entry
                self.disarm(who)
                who.expire()

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
