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
    """The cap applies only while `active`. The bucket outlives an episode, so a fleet flapping
    in and out of a mass failure does not get a fresh burst each time."""

    bucket: TokenBucket | None = None
    active: bool = False
    down: int = 0
    total: int = 0

    def available(self, now: float) -> int | None:
        """How many lost replicas may be given up on now; None: no cap."""
        return self.bucket.available(now) if self.active and self.bucket is not None else None

    def retry_after(self, now: float) -> float:
        return self.bucket.retry_after(now) if self.active and self.bucket is not None else 0.0


def per_minute(total_nodes: int) -> float:
    return max(1.0, total_nodes * REPLACED_PER_MINUTE_FRACTION)


def assess(budget: Budget, nodes: Mapping[str, Node], now: float) -> Budget:
    """Start, keep or end the mass-failure budget for the fleet as it is now."""
    down = sum(1 for node in nodes.values() if node.state is NodeState.DOWN)
    total = len(nodes)
    active = total >= MASS_FAILURE_MIN_NODES and down >= MASS_FAILURE_FRACTION * total
    rate = per_minute(total)
    bucket = budget.bucket
    if bucket is None or bucket.burst != rate:  # the first episode, or the fleet changed size
        tokens = rate if bucket is None else min(rate, bucket.refill(now).tokens)
        bucket = TokenBucket(rate / 60, rate, tokens, now)
    return Budget(bucket, active, down, total)


def spend(budget: Budget, now: float, replaced: int) -> Budget:
    """Take `replaced` tokens (never more than are there: the plan was capped by `available`)."""
    if not budget.active or budget.bucket is None or replaced <= 0:
        return budget
    _, bucket = budget.bucket.take(now, min(replaced, budget.bucket.available(now)))
    return Budget(bucket, True, budget.down, budget.total)
