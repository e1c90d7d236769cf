"""Capped exponential backoff with jitter, shared by every role that reconnects."""

from __future__ import annotations

import random

BACKOFF_INITIAL_S = 0.5
# Capped low on purpose: a restarted server must get its nodes and proxies back in seconds, not in
# the tens of seconds a long cap lets the delays grow to while it was down. The jitter (each
# delay drawn from [cap/2, cap]) still spreads a fleet's reconnects over a few seconds.
BACKOFF_MAX_S = 5.0


class Backoff:
    """Delays grow 2x per attempt up to a cap; each is drawn from [ceiling/2, ceiling] so a
    fleet that lost its server does not come back in lockstep."""

    def __init__(self, initial_s: float = BACKOFF_INITIAL_S, max_s: float = BACKOFF_MAX_S,
                 rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.initial_s * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
