"""A retry budget per cluster, so that a dead or overloaded cluster does not get its load multiplied.

Every request earns `ratio` of a retry (capped, so a long quiet spell does not bank a storm), and
`min_per_s` retries a second are always allowed so that a cluster with little traffic still fails
over. When both are spent a failed request gets its error instead of another attempt (the same
idea as Finagle's RetryBudget and Envoy's retry budgets).
"""

from __future__ import annotations

from vectorlay.core.token_bucket import TokenBucket

MAX_BANKED = 100.0  # retries earned from requests that may be saved up


class RetryBudget:
    def __init__(self, ratio: float, min_per_s: float, now: float, max_banked: float = MAX_BANKED) -> None:
        self.ratio = ratio
        self.max_banked = max_banked
        self.banked = 0.0
        self._floor = TokenBucket.full(min_per_s, max(1.0, min_per_s), now)

    def on_request(self) -> None:
        self.banked = min(self.max_banked, self.banked + self.ratio)

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget has one."""
        if self.banked >= 1.0:
            self.banked -= 1.0
            return True
        ok, self._floor = self._floor.take(now)
        return ok
