"""`vectorlay logs`: the lines of several replicas in the order they were written.

Each replica's node sends its tail with the time each line was written (about a second's
precision, see node/log_times.py), then, when following, new lines as they come. The tails are
held until every replica's is complete (it says so with its first live batch, or ends), then
printed merged by time; live lines are printed as they arrive, which is already their order.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from itertools import count


@dataclass(frozen=True, order=True)
class LogLine:
    time: float
    seq: int  # arrival order: lines of one replica with the same time keep theirs
    replica: str
    text: str


class LogMerger:
    def __init__(self, follow: bool) -> None:
        self.follow = follow
        self.held: list[LogLine] = []
        self.waiting: set[str] | None = None  # replicas whose tail is not complete yet (None: not told)
        self.streaming = False
        self._seq = count()

    def expect(self, replicas: list[str]) -> None:
        self.waiting = set(replicas)

    def add(self, replica: str, lines: list[str], times: list[float], live: bool, now: float) -> list[LogLine]:
        """Lines of one batch; returns what can be printed now, in order. A batch without times
        (an older agent) counts as written `now`."""
        stamped = [LogLine(times[i] if i < len(times) else now, next(self._seq), replica, text)
                   for i, text in enumerate(lines)]
        if self.streaming:
            return stamped
        self.held.extend(stamped)
        if live and self.follow:
            return self.ended(replica)
        return []

    def ended(self, replica: str) -> list[LogLine]:
        """`replica`'s tail is complete (its live lines began, or its stream ended)."""
        if self.waiting is None or self.streaming:
            return []
        self.waiting.discard(replica)
        if self.waiting or not self.follow:
            return []
        self.streaming = True
        return self._drain()

    def finish(self) -> list[LogLine]:
        """The call ended: whatever is held, in order."""
        return self._drain()

    def _drain(self) -> list[LogLine]:
        held, self.held = self.held, []
        heapq.heapify(held)
        return [heapq.heappop(held) for _ in range(len(held))]
