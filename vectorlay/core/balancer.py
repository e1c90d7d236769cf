"""Pick the replica for the next request: power of two choices on expected wait.

Each candidate's cost is (outstanding requests + 1) times its moving-average latency, so a replica
that is busy or slow (a 3090 among 4090s) is picked less often than round robin would, without
the herd effect of always choosing the single best. `random` is passed in to keep this pure.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_LATENCY_S = 0.05  # assumed for a replica with no measurement yet
EWMA_WEIGHT = 0.3  # weight of the newest latency sample


@dataclass(frozen=True)
class Candidate:
    key: str
    outstanding: int
    latency_s: float | None  # moving average; None until measured


def cost(candidate: Candidate, unmeasured_s: float = DEFAULT_LATENCY_S) -> float:
    latency = candidate.latency_s if candidate.latency_s is not None else unmeasured_s
    return (candidate.outstanding + 1) * latency


def pick(candidates: Sequence[Candidate], rng: _random.Random) -> Candidate | None:
    """Two random candidates; each wins with probability inversely proportional to its cost.

    Always taking the cheaper of the two would send all sequential traffic to whichever replica
    measured a hair faster; weighting keeps equal replicas at 50/50 while a replica five times
    slower (or five times busier) gets about a sixth. A replica with no measurement yet is
    assumed as fast as the fastest measured one, so it gets traffic and a measurement.
    """
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    measured = [c.latency_s for c in candidates if c.latency_s is not None]
    unmeasured = min(measured) if measured else DEFAULT_LATENCY_S
    first, second = rng.sample(range(len(candidates)), 2)
    a, b = candidates[first], candidates[second]
    cost_a, cost_b = cost(a, unmeasured), cost(b, unmeasured)
    total = cost_a + cost_b
    chance_a = 0.5 if total <= 0 else cost_b / total
    return a if rng.random() < chance_a else b


def update_latency(previous: float | None, sample_s: float) -> float:
    if previous is None:
        return sample_s
    return (1 - EWMA_WEIGHT) * previous + EWMA_WEIGHT * sample_s
