"""A token bucket as an immutable value: refill with `now`, take tokens, know when to retry.

Used to pace replacements when much of the fleet is lost at once, and by the proxy's rate limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TokenBucket:
    rate_per_s: float  # tokens added per second
    burst: float  # the most tokens it can hold
    tokens: float
    updated: float  # the `now` of the last refill

    @classmethod
    def full(cls, rate_per_s: float, burst: float, now: float) -> TokenBucket:
        return cls(rate_per_s, burst, burst, now)

    def refill(self, now: float) -> TokenBucket:
        if now <= self.updated:
            return self
        tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        return replace(self, tokens=tokens, updated=now)

    def available(self, now: float) -> int:
        return int(math.floor(self.refill(now).tokens + 1e-9))

    def take(self, now: float, count: float = 1.0) -> tuple[bool, TokenBucket]:
        """Take `count` tokens if there are enough; the bucket is unchanged (but refilled) if not."""
        current = self.refill(now)
        if current.tokens + 1e-9 >= count:
            return True, replace(current, tokens=max(0.0, current.tokens - count))
        return False, current

    def retry_after(self, now: float, count: float = 1.0) -> float:
        """Seconds until `count` tokens will be there (0 if they are now; inf if never)."""
        current = self.refill(now)
        missing = count - current.tokens
        if missing <= 1e-9:
            return 0.0
        if self.rate_per_s <= 0 or count > self.burst:
            return math.inf
        return missing / self.rate_per_s
