"""core.balancer: weighted power of two choices on expected wait."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from core_strategies import CHEAP
from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core.balancer import (
    DEFAULT_LATENCY_S,
    Candidate,
    chance_first,
    cost,
    ejection_s,
    pick,
    stale_latency,
    update_latency,
)

PICKS = 10_000


def shares(candidates: Sequence[Candidate], seed: int = 1234, picks: int = PICKS) -> dict[str, float]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    for _ in range(picks):
        chosen = pick(candidates, rng)
        assert chosen is not None
        counts[chosen.key] += 1
    return {c.key: counts[c.key] / picks for c in candidates}


candidates_strategy = st.lists(
    st.builds(
        Candidate,
        key=st.text(max_size=4),
        outstanding=st.integers(min_value=0, max_value=1000),
        latency_s=st.none() | st.floats(min_value=0.0, max_value=60.0),
        ejected=st.booleans(),
    ),
    max_size=8,
)


@CHEAP
@given(candidates_strategy, st.integers())
def test_pick_returns_one_of_the_candidates(candidates: list[Candidate], seed: int) -> None:
    chosen = pick(candidates, random.Random(seed))
    if not candidates:
        assert chosen is None
    else:
        assert any(chosen is c for c in candidates)


def test_pick_of_nothing_is_none() -> None:
    assert pick([], random.Random(0)) is None


def test_a_single_candidate_is_always_picked() -> None:
    only = Candidate("a", 50, 9.0)
    assert all(pick([only], random.Random(seed)) is only for seed in range(20))


def test_pick_is_deterministic_for_a_seed() -> None:
    # All randomness comes from the rng passed in: the same seed gives the same sequence of picks.
    candidates = [Candidate(str(i), i % 3, 0.01 * (i + 1)) for i in range(6)]
    rng_a, rng_b = random.Random(99), random.Random(99)
    first = [pick(candidates, rng_a) for _ in range(200)]
    assert first == [pick(candidates, rng_b) for _ in range(200)]
    assert len({c.key for c in first if c is not None}) > 1


def test_equal_candidates_share_traffic_evenly() -> None:
    result = shares([Candidate("a", 0, 0.05), Candidate("b", 0, 0.05)])
    assert 0.45 < result["a"] < 0.55


def test_equal_candidates_share_evenly_among_many() -> None:
    candidates = [Candidate(str(i), 0, 0.02) for i in range(5)]
    for share in shares(candidates).values():
        assert 0.15 < share < 0.25


def test_a_five_times_slower_candidate_gets_almost_nothing_while_the_fast_one_is_free() -> None:
    # Round robin would send it half, and the p99 would be its latency.
    result = shares([Candidate("fast", 0, 0.1), Candidate("slow", 0, 0.5)])
    assert result["slow"] < 0.01


def test_a_slow_candidate_takes_overflow_once_the_fast_ones_queue_up() -> None:
    result = shares([Candidate("fast", 9, 0.1), Candidate("slow", 0, 0.5)])
    assert result["slow"] > 0.9


def test_a_five_times_busier_candidate_gets_clearly_less() -> None:
    result = shares([Candidate("idle", 0, 0.1), Candidate("busy", 4, 0.1)])
    assert result["busy"] < 0.30


def test_a_slightly_faster_candidate_does_not_take_everything() -> None:
    result = shares([Candidate("a", 0, 0.100), Candidate("b", 0, 0.101)])
    assert 0.40 < result["b"] < 0.60


def test_an_unmeasured_candidate_is_assumed_as_fast_as_the_fastest() -> None:
    result = shares([Candidate("fast", 0, 0.2), Candidate("new", 0, None), Candidate("slow", 0, 2.0)])
    assert result["new"] == pytest.approx(result["fast"], abs=0.05)
    assert result["slow"] < result["new"]


def test_all_unmeasured_share_evenly() -> None:
    result = shares([Candidate("a", 0, None), Candidate("b", 0, None)])
    assert 0.45 < result["a"] < 0.55


def test_zero_latency_candidates_do_not_break_pick() -> None:
    result = shares([Candidate("a", 0, 0.0), Candidate("b", 0, 0.0)], picks=2000)
    assert 0.4 < result["a"] < 0.6


def test_cost_is_expected_wait() -> None:
    assert cost(Candidate("a", 3, 0.2)) == pytest.approx(0.8)
    assert cost(Candidate("a", 0, None)) == pytest.approx(DEFAULT_LATENCY_S)
    assert cost(Candidate("a", 1, None), unmeasured_s=0.5) == pytest.approx(1.0)


def test_update_latency_first_sample_is_taken_as_is() -> None:
    assert update_latency(None, 0.25) == 0.25


@CHEAP
@given(st.floats(min_value=0, max_value=100), st.floats(min_value=0, max_value=100))
def test_update_latency_moves_toward_the_sample(previous: float, sample: float) -> None:
    updated = update_latency(previous, sample)
    assert min(previous, sample) - 1e-12 <= updated <= max(previous, sample) + 1e-12
    if abs(previous - sample) > 1e-9:
        assert abs(updated - sample) < abs(previous - sample)


def test_update_latency_converges_to_a_steady_sample() -> None:
    latency: float | None = None
    latency = update_latency(latency, 1.0)
    for _ in range(60):
        latency = update_latency(latency, 0.1)
    assert latency == pytest.approx(0.1, abs=1e-6)


@CHEAP
@given(candidates_strategy, st.integers())
def test_an_ejected_candidate_is_picked_only_when_all_are_ejected(candidates: list[Candidate], seed: int) -> None:
    chosen = pick(candidates, random.Random(seed))
    if any(not c.ejected for c in candidates):
        assert chosen is not None and not chosen.ejected


@CHEAP
@given(st.floats(min_value=0, max_value=1e6), st.floats(min_value=0, max_value=1e6))
def test_chances_of_two_sum_to_one_and_favour_the_cheaper(a: float, b: float) -> None:
    first, second = chance_first(a, b), chance_first(b, a)
    assert 0.0 <= first <= 1.0
    assert first + second == pytest.approx(1.0)
    if a < b:
        assert first >= 0.5
    if a == b:
        assert first == 0.5


@CHEAP
@given(st.floats(min_value=1e-3, max_value=10), st.floats(min_value=1e-3, max_value=10),
       st.floats(min_value=1e-3, max_value=10))
def test_a_dearer_rival_never_lowers_the_odds(a: float, b: float, more: float) -> None:
    assert chance_first(a, b + more) >= chance_first(a, b)


def test_pick_never_raises_on_extreme_costs() -> None:
    result = shares([Candidate("a", 1000, 60.0), Candidate("b", 0, 1e-9)], picks=200)
    assert result["b"] == 1.0


@CHEAP
@given(st.floats(min_value=0.001, max_value=10), st.floats(min_value=0.001, max_value=10),
       st.floats(min_value=0, max_value=1000))
def test_a_stale_latency_drifts_toward_the_fastest_and_never_past_it(latency: float, fastest: float,
                                                                     age: float) -> None:
    drifted = stale_latency(latency, fastest, age)
    assert drifted is not None
    assert min(latency, fastest) - 1e-9 <= drifted <= latency + 1e-9
    later = stale_latency(latency, fastest, age + 10)
    assert later is not None and later <= drifted + 1e-9


def test_a_stale_latency_halves_its_excess_every_half_life() -> None:
    assert stale_latency(0.5, 0.1, 0.0) == pytest.approx(0.5)
    assert stale_latency(0.5, 0.1, 10.0) == pytest.approx(0.3)
    assert stale_latency(0.5, 0.1, 20.0) == pytest.approx(0.2)
    assert stale_latency(None, 0.1, 20.0) is None


def test_a_long_ignored_slow_replica_gets_probed_again() -> None:
    # After a minute without a sample its cost is close to the fast one's: it wins now and then.
    slow = stale_latency(0.5, 0.1, 60.0)
    result = shares([Candidate("fast", 0, 0.1), Candidate("slow", 0, slow)])
    assert result["slow"] > 0.05


@CHEAP
@given(st.integers(min_value=0, max_value=10_000))
def test_ejection_doubles_and_is_capped(failures: int) -> None:
    duration = ejection_s(failures, 5.0, 60.0)
    assert 0.0 <= duration <= 60.0
    if failures == 0:
        assert duration == 0.0
    else:
        assert duration >= 5.0
        assert ejection_s(failures + 1, 5.0, 60.0) in (min(60.0, duration * 2), 60.0)


def test_three_equal_candidates_share_evenly() -> None:
    for share in shares([Candidate(str(i), 0, 0.02) for i in range(3)]).values():
        assert 0.28 < share < 0.39


def test_among_three_the_slow_one_is_left_out_while_a_fast_one_is_free() -> None:
    # Two fast replicas, one of them busy, and a slow one: the free fast one is always compared
    # (sampling two of three would leave it out a third of the time and send the slow one traffic).
    result = shares([Candidate("fast", 0, 0.01), Candidate("busy", 3, 0.01), Candidate("slow", 0, 0.05)])
    assert result["slow"] < 0.01
    assert result["fast"] > 0.9
