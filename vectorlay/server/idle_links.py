"""Closing API links that sit idle, as links that never say hello are closed.

A CLI's link is busy while a call is in flight (a streaming one, `logs -f` or `apply`'s wait, may
last as long as it likes) and idle otherwise. One left idle for `timeout_s` is closed, so clients
that open links and forget them cannot hold server resources (500 idle links stayed open before).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio

API_IDLE_TIMEOUT_S = 300.0  # a CLI command runs for seconds; a held-open idle link for 5 min is forgotten


class IdleTimer:
    def __init__(self, timeout_s: float = API_IDLE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.in_flight = 0
        self._waiting: trio.CancelScope | None = None

    def waiting(self) -> trio.CancelScope:
        """A scope for waiting on the link's next message: cancelled once the link has been idle
        (no call in flight) for the timeout."""
        self._waiting = trio.CancelScope(deadline=self._deadline())
        return self._waiting

    async def call(self, run: Callable[[], Awaitable[None]]) -> None:
        """Run one call; the link is busy until it ends. `started` was counted by `begin`."""
        try:
            await run()
        finally:
            self.in_flight -= 1
            self._rearm()

    def begin(self) -> None:
        self.in_flight += 1
        self._rearm()

    def _deadline(self) -> float:
        return math.inf if self.in_flight else trio.current_time() + self.timeout_s

    def _rearm(self) -> None:
        if self._waiting is not None:
            self._waiting.deadline = self._deadline()
