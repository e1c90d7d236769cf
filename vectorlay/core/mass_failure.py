"""Pacing replacements when much of the fleet is lost at once.

When a third or more of the nodes (and at least three) are down together, the likelier cause is
the server's own link or a regional outage, not the nodes: replacing every lost replica at once,
and again when the nodes come back, would churn the whole fleet twice. During such a mass failure
lost replicas are replaced from a token bucket that holds and refills a tenth of the fleet per
minute; otherwise there is no budget at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vectorlay.core.model import Node, NodeState
from vectorlay.core.token_bucket import TokenBucket

MASS_FAILURE_FRACTION = 0.3
MASS_FAILURE_MIN_NODES = 3
REPLACED_PER_MINUTE_FRACTION = 0.1


@dataclass(frozen=True)
class Budget:
    """`bucket` is None outside a mass failure (no cap)."""

    bucket: TokenBucket | None = None
    down: int = 0
    total: int = 0

    @property
    def active(self) -> bool:
        return self.bucket is not None

    def available(self, now: float) -> int | None:
        """How many lost replicas may be given up on now; None: no cap."""
        return None if self.bucket is None else self.bucket.available(now)

    def retry_after(self, now: float) -> float:
        return 0.0 if self.bucket is None else self.bucket.retry_after(now)


def per_minute(total_nodes: int) -> float:
    return max(1.0, total_nodes * REPLACED_PER_MINUTE_FRACTION)


def assess(budget: Budget, nodes: Mapping[str, Node], now: float) -> Budget:
    """Start, keep or end the mass-failure budget for the fleet as it is now."""
    down = sum(1 for node in nodes.values() if node.state is NodeState.DOWN)
    total = len(nodes)
    if total < MASS_FAILURE_MIN_NODES or down < MASS_FAILURE_FRACTION * total:
        return Budget(None, down, total)
    bucket = budget.bucket
    if bucket is None:
        rate = per_minute(total)
        bucket = TokenBucket.full(rate / 60, rate, now)
    return Budget(bucket, down, total)


def spend(budget: Budget, now: float, replaced: int) -> Budget:
    """Take `replaced` tokens (never more than are there: the plan was capped by `available`)."""
    if budget.bucket is None or replaced <= 0:
        return budget
    _, bucket = budget.bucket.take(now, min(replaced, budget.bucket.available(now)))
    return Budget(bucket, budget.down, budget.total)
