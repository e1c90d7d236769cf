"""Who needs to hear about a change, without anyone reaching into anyone else's fields.

Three kinds of news leave the writer: a cluster needs reconciling (the reconcile loop), a
cluster's routes may have changed (the route feed), and something changed at all (`apply --wait`,
`drain`, any watcher). Each is a set or an event behind methods, so producers and consumers only
agree on this small interface.
"""

from __future__ import annotations

import math

import trio


class Signals:
    def __init__(self) -> None:
        self._dirty: set[str] = set()
        self._wake = trio.Event()
        self._routes: set[str] = set()
        self._routes_changed = trio.Event()
        self._changed = trio.Event()

    # --- clusters to reconcile ----------------------------------------------------------------

    def mark_dirty(self, cluster: str) -> None:
        self._dirty.add(cluster)
        self._wake.set()

    def take_dirty(self) -> set[str]:
        dirty, self._dirty = self._dirty, set()
        return dirty

    def wake(self) -> None:
        """A timer was added: the reconcile loop recomputes its next deadline."""
        self._wake.set()

    async def wait_dirty(self, deadline: float = math.inf) -> None:
        """Return when a cluster is marked dirty (or woken), or at `deadline`."""
        if self._dirty:
            return
        self._wake = trio.Event()
        with trio.move_on_at(deadline):
            await self._wake.wait()

    # --- routes --------------------------------------------------------------------------------

    def mark_route(self, cluster: str) -> None:
        self._routes.add(cluster)
        self._routes_changed.set()

    async def next_routes(self, coalesce_s: float = 0.0) -> set[str]:
        """Wait for route marks; after `coalesce_s` more (so a burst lands as one), take them all."""
        while not self._routes:
            await self._routes_changed.wait()
            self._routes_changed = trio.Event()
        if coalesce_s:
            await trio.sleep(coalesce_s)
        routes, self._routes = self._routes, set()
        self._routes_changed = trio.Event()
        return routes

    # --- anything changed ----------------------------------------------------------------------

    def announce(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()
