"""The token bucket: refill over time, burst cap, retry hints; properties with hypothesis."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core.token_bucket import TokenBucket


def test_takes_up_to_the_burst_then_refills_at_the_rate() -> None:
    bucket = TokenBucket.full(rate_per_s=2.0, burst=3.0, now=0.0)
    results = []
    for _ in range(4):
        ok, bucket = bucket.take(0.0)
        results.append(ok)
    assert results == [True, True, True, False]
    assert bucket.retry_after(0.0) == 0.5
    ok, bucket = bucket.take(0.49)
    assert not ok
    ok, bucket = bucket.take(0.5)
    assert ok
    assert bucket.available(100.0) == 3  # never above the burst


def test_impossible_requests_never_succeed() -> None:
    bucket = TokenBucket.full(rate_per_s=1.0, burst=2.0, now=0.0)
    assert bucket.retry_after(0.0, count=3) == math.inf
    assert TokenBucket.full(0.0, 1.0, 0.0).take(0.0)[1].retry_after(0.0) == math.inf


@given(
    rate=st.floats(0.1, 100), burst=st.floats(1, 100),
    steps=st.lists(st.tuples(st.floats(0, 10), st.floats(0.1, 5)), max_size=50),
)
def test_never_grants_more_than_burst_plus_rate_times_elapsed(rate: float, burst: float,
                                                               steps: list[tuple[float, float]]) -> None:
    bucket = TokenBucket.full(rate, burst, 0.0)
    now = 0.0
    granted = 0.0
    for advance, count in steps:
        now += advance
        ok, bucket = bucket.take(now, count)
        if ok:
            granted += count
        assert 0.0 <= bucket.tokens <= burst + 1e-9
    assert granted <= burst + rate * now + 1e-6


@given(rate=st.floats(0.1, 100), burst=st.floats(1, 100), drain=st.floats(0, 100), count=st.floats(0.1, 1))
def test_retry_after_is_exactly_when_the_tokens_are_there(rate: float, burst: float, drain: float,
                                                          count: float) -> None:
    _, bucket = TokenBucket.full(rate, burst, 0.0).take(0.0, min(drain, burst))
    wait = bucket.retry_after(0.0, count)
    assert bucket.take(wait + 1e-6, count)[0]
    if wait > 1e-3:
        assert not bucket.take(wait * 0.9, count)[0]
