"""Pick the replica for the next request: power of two choices on expected wait.

Each candidate's cost is (outstanding requests + 1) times its moving-average latency, so a replica
that is busy or slow (a 3090 among 4090s) is picked less often than round robin would, without
the herd effect of always choosing the single best. Replicas ejected for failing are skipped while
any other is left (outlier detection). `random` is passed in to keep this pure.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from typing import NamedTuple

DEFAULT_LATENCY_S = 0.05  # assumed for a replica with no measurement yet
EWMA_WEIGHT = 0.3  # weight of the newest latency sample
# How sharply the cheaper of the two wins: its odds are (cost ratio) ** SHARPNESS. Equal replicas
# split 50/50 and a 1% difference barely matters, but one 1.5 times dearer loses 650 to 1: a slow
# replica only takes overflow once the fast ones are queued up, so it does not set the p99.
SHARPNESS = 16
SAMPLE_ABOVE = 3  # larger pools sample two candidates (power of two choices); smaller compare all
STALE_HALF_LIFE_S = 10.0  # an unsampled latency drifts halfway back to the fastest every this long
_MAX_RATIO = 1e30 ** (1 / SHARPNESS)


class Candidate(NamedTuple):
    """Immutable, and a NamedTuple rather than a frozen dataclass: the proxy makes one per replica
    per request, and a frozen dataclass costs several times as much to build."""

    key: str
    outstanding: int
    latency_s: float | None  # moving average; None until measured
    ejected: bool = False  # failed recently: only used when nothing else is left


def cost(candidate: Candidate, unmeasured_s: float = DEFAULT_LATENCY_S) -> float:
    latency = candidate.latency_s if candidate.latency_s is not None else unmeasured_s
    return (candidate.outstanding + 1) * latency


def chance_first(cost_a: float, cost_b: float) -> float:
    """The probability that the candidate costing `cost_a` wins over the one costing `cost_b`."""
    if cost_a <= 0 and cost_b <= 0:
        return 0.5
    if cost_a <= 0:
        return 1.0
    if cost_b <= 0:
        return 0.0
    ratio = cost_a / cost_b
    if ratio > _MAX_RATIO:
        return 0.0  # the power would overflow; the odds are nil anyway
    return 1.0 / (1.0 + ratio**SHARPNESS)


def pick(candidates: Sequence[Candidate], rng: _random.Random) -> Candidate | None:
    """Two random candidates (not ejected, if any is not); the cheaper wins with odds that grow
    sharply with the cost ratio. With three or fewer all are compared: sampling two of three would
    leave the best one out a third of the time, and this proxy knows all three anyway.

    Weighting rather than always taking the cheaper keeps equal replicas at 50/50 under sequential
    traffic (with a strict choice, one a hair faster would take everything). A replica with no
    measurement yet is assumed as fast as the fastest measured one, so it gets traffic and a
    measurement.
    """
    pool = [c for c in candidates if not c.ejected] or list(candidates)
    if not pool:
        return None
    if len(pool) == 1:
        return pool[0]
    measured = [c.latency_s for c in pool if c.latency_s is not None]
    unmeasured = min(measured) if measured else DEFAULT_LATENCY_S
    if len(pool) > SAMPLE_ABOVE:
        first, second = rng.sample(range(len(pool)), 2)
        pool = [pool[first], pool[second]]
    if len(pool) == 2:
        a, b = pool
        return a if rng.random() < chance_first(cost(a, unmeasured), cost(b, unmeasured)) else b
    return _weighted(pool, [cost(c, unmeasured) for c in pool], rng)


def _weighted(pool: Sequence[Candidate], costs: Sequence[float], rng: _random.Random) -> Candidate:
    """Each candidate with weight (cheapest cost / its cost) ** SHARPNESS: `chance_first` for many."""
    free = [c for c, k in zip(pool, costs, strict=True) if k <= 0]
    if free:
        return free[int(rng.random() * len(free))]
    cheapest = min(costs)
    weights = [0.0 if k / cheapest > _MAX_RATIO else (cheapest / k) ** SHARPNESS for k in costs]
    point = rng.random() * sum(weights)
    for candidate, weight in zip(pool, weights, strict=True):
        point -= weight
        if point < 0:
            return candidate
    return pool[-1]


def update_latency(previous: float | None, sample_s: float) -> float:
    if previous is None:
        return sample_s
    return (1 - EWMA_WEIGHT) * previous + EWMA_WEIGHT * sample_s


def stale_latency(latency_s: float | None, fastest_s: float | None, age_s: float,
                  half_life_s: float = STALE_HALF_LIFE_S) -> float | None:
    """A latency not re-measured for `age_s` drifts toward the fastest replica's.

    A slow replica gets almost no traffic, so its average would never learn that it recovered;
    drifting lets it win a request now and then, and that request measures it again.
    """
    if latency_s is None or fastest_s is None or latency_s <= fastest_s or age_s <= 0:
        return latency_s
    keep = float(0.5 ** (age_s / half_life_s))
    return fastest_s + (latency_s - fastest_s) * keep


def ejection_s(failures: int, base_s: float, max_s: float) -> float:
    """How long a replica stays ejected after `failures` consecutive failures: doubling, capped."""
    if failures <= 0:
        return 0.0
    return min(max_s, base_s * float(2 ** min(failures - 1, 32)))
