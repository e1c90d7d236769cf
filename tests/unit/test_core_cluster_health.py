"""core.cluster_health: crash-loop backoff, poison-pill quarantine, degraded reconciles."""

from __future__ import annotations

import math

from core_strategies import CHEAP
from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core import cluster_health as ch
from vectorlay.core.cluster_health import HEALTHY, ClusterHealth


def test_the_first_failure_is_replaced_at_once_then_backoff_doubles_to_five_minutes() -> None:
    assert [ch.backoff_s(n) for n in range(0, 9)] == [0, 0, 10, 20, 40, 80, 160, 300, 300]


@CHEAP
@given(st.integers(min_value=-5, max_value=10**9))
def test_backoff_is_bounded_and_never_overflows(failures: int) -> None:
    delay = ch.backoff_s(failures)
    assert math.isfinite(delay) and 0 <= delay <= ch.BACKOFF_MAX_S


@CHEAP
@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=10**6))
def test_backoff_is_monotone(a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert ch.backoff_s(low) <= ch.backoff_s(high)


def test_a_thousand_failures_in_a_row_cost_nothing_but_the_capped_wait() -> None:
    state = HEALTHY
    for i in range(5_000):
        state = ch.on_failure(state, float(i), "image not found", "n1")
    assert state.failures == 5_000
    assert state.not_before == 4_999 + ch.BACKOFF_MAX_S
    assert state.crash_looping


def test_backoff_holds_replacements_until_it_has_passed() -> None:
    state = ch.on_failure(HEALTHY, 100.0, "boom", "n1")
    assert ch.may_replace(state, 100.0)  # the first one: at once
    state = ch.on_failure(state, 101.0, "boom", "n1")
    assert not ch.may_replace(state, 110.9)
    assert ch.may_replace(state, 111.0)


def test_the_count_resets_only_after_a_replica_stayed_ready_for_the_stable_period() -> None:
    state = ch.on_failure(ch.on_failure(HEALTHY, 0.0, "boom", "n1"), 1.0, "boom", "n1")
    state = ch.on_ready(state, 20.0)
    assert ch.settle(state, 20.0 + ch.STABLE_S - 0.1).failures == 2
    assert ch.settles_at(state) == 20.0 + ch.STABLE_S
    settled = ch.settle(state, 20.0 + ch.STABLE_S)
    assert settled.failures == 0 and settled.reason == "" and ch.may_replace(settled, 0.0)


def test_ready_then_nothing_ready_starts_the_stable_period_over() -> None:
    state = ch.on_ready(ch.on_failure(HEALTHY, 0.0, "boom", "n1"), 10.0)
    state = ch.on_none_ready(state)
    assert ch.settle(state, 10_000.0).failures == 1
    assert ch.on_ready(state, 50.0).ready_since == 50.0


def test_a_failure_after_ready_keeps_counting() -> None:
    state = ch.on_ready(ch.on_failure(HEALTHY, 0.0, "boom", "n1"), 5.0)
    state = ch.on_failure(state, 30.0, "crashed", "n2")
    assert state.failures == 2 and state.ready_since is None and state.node == "n2"


def test_describe_says_crash_looping_with_reason_node_and_wait() -> None:
    state = ch.on_failure(ch.on_failure(HEALTHY, 0.0, "image not found", "n1"), 0.0, "image not found", "n1")
    state = ch.on_failure(state, 0.0, "image not found", "n1")
    assert ch.describe(state, 0.0) == "crash-looping: image not found on n1; next try in 20s (failure 3)"
    assert ch.describe(HEALTHY, 0.0) == ""
    assert ch.describe(ch.on_failure(HEALTHY, 0.0, "x", "n1"), 0.0) == ""  # one failure is not a loop


def test_agents_dying_on_two_nodes_in_a_row_quarantine_the_cluster() -> None:
    state = ch.on_agent_died(HEALTHY, "a")
    assert not state.quarantined and state.strikes == ("a",)
    state = ch.on_agent_died(state, "b")
    assert state.quarantined.startswith("quarantined: the agents of 2 node(s) (a, b) died")
    assert ch.describe(state, 0.0) == state.quarantined


def test_one_agent_dying_again_and_again_quarantines_at_three() -> None:
    state = ch.on_agent_died(ch.on_agent_died(HEALTHY, "a"), "a")
    assert not state.quarantined
    assert ch.on_agent_died(state, "a").quarantined


def test_a_replica_becoming_ready_clears_the_strikes() -> None:
    state = ch.on_ready(ch.on_agent_died(HEALTHY, "a"), 1.0)
    assert state.strikes == ()
    assert not ch.on_agent_died(state, "b").quarantined


def test_lifting_a_quarantine_forgets_strikes_and_failures() -> None:
    state = ch.on_failure(ch.on_agent_died(ch.on_agent_died(HEALTHY, "a"), "b"), 0.0, "x", "b")
    lifted = ch.lift_quarantine(state)
    assert not lifted.quarantined and lifted.strikes == () and lifted.failures == 0


def test_a_reconcile_error_degrades_the_cluster_and_backs_off() -> None:
    state = ch.on_reconcile_error(HEALTHY, 10.0, "KeyError: 'x'")
    assert state.degraded == "degraded: the server could not reconcile it (KeyError: 'x')"
    assert not ch.may_replace(state, 10.5) and ch.may_replace(state, 11.0)
    again = ch.on_reconcile_error(state, 11.0, "KeyError: 'x'")
    assert again.not_before == 11.0 + ch.backoff_s(2)
    assert ch.on_reconciled(again).degraded == ""


@CHEAP
@given(st.lists(st.tuples(st.sampled_from(["fail", "ready", "none", "died", "settle"]),
                          st.floats(min_value=0, max_value=1000)), max_size=60))
def test_any_sequence_keeps_the_state_consistent(steps: list[tuple[str, float]]) -> None:
    state: ClusterHealth = HEALTHY
    now = 0.0
    for kind, dt in steps:
        now += dt
        before = state
        if kind == "fail":
            state = ch.on_failure(state, now, "x", "n")
            assert state.failures == before.failures + 1
            assert now <= state.not_before <= now + ch.BACKOFF_MAX_S
        elif kind == "ready":
            state = ch.on_ready(state, now)
        elif kind == "none":
            state = ch.on_none_ready(state)
        elif kind == "died":
            state = ch.on_agent_died(state, "n")
        else:
            state = ch.settle(state, now)
        assert state.failures >= 0
        if state.quarantined:
            assert len(state.strikes) >= 2
