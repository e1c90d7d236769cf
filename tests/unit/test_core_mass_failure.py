"""core.mass_failure: replacements are paced while a large part of the fleet is down."""

from __future__ import annotations

from core_strategies import CHEAP
from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core import mass_failure as mf
from vectorlay.core.model import Node, NodeState


def fleet(total: int, down: int) -> dict[str, Node]:
    return {f"n{i}": Node(f"n{i}", f"n{i}", (), "127.0.0.1", NodeState.DOWN if i < down else NodeState.READY)
            for i in range(total)}


def test_no_budget_while_less_than_a_third_is_down() -> None:
    budget = mf.assess(mf.Budget(), fleet(10, 2), 0.0)
    assert not budget.active and budget.available(0.0) is None


def test_small_fleets_are_never_paced() -> None:
    assert not mf.assess(mf.Budget(), fleet(2, 2), 0.0).active


def test_a_mass_failure_starts_a_budget_of_a_tenth_of_the_fleet_per_minute() -> None:
    budget = mf.assess(mf.Budget(), fleet(100, 40), 0.0)
    assert budget.active and budget.available(0.0) == 10
    budget = mf.spend(budget, 0.0, 10)
    assert budget.available(0.0) == 0
    assert budget.retry_after(0.0) == 6.0  # one token every 6 s
    assert mf.assess(budget, fleet(100, 40), 60.0).available(60.0) == 10  # kept, refilled


def test_the_budget_ends_when_the_nodes_come_back() -> None:
    budget = mf.spend(mf.assess(mf.Budget(), fleet(10, 5), 0.0), 0.0, 1)
    assert not mf.assess(budget, fleet(10, 1), 1.0).active


@CHEAP
@given(st.integers(min_value=3, max_value=400),
       st.lists(st.tuples(st.floats(min_value=0, max_value=30), st.integers(min_value=0, max_value=50),
                          st.floats(min_value=0, max_value=1)), min_size=1, max_size=80))
def test_replacements_per_minute_never_exceed_the_budget(total: int,
                                                         steps: list[tuple[float, int, float]]) -> None:
    """Whatever the sequence of reconciles, lost replicas given up on within any minute stay
    within what the bucket allows: its burst plus its refill over that minute."""
    budget = mf.Budget()
    now = 0.0
    spent: list[tuple[float, int]] = []
    for dt, lost, down_share in steps:
        now += dt
        budget = mf.assess(budget, fleet(total, int(total * down_share)), now)
        available = budget.available(now)
        replaced = lost if available is None else min(lost, available)
        if budget.active:
            spent.append((now, replaced))
        budget = mf.spend(budget, now, replaced)
    cap = mf.per_minute(total)
    for start, _ in spent:
        in_window = sum(n for t, n in spent if start <= t < start + 60)
        assert in_window <= cap * 2 + 1e-6  # burst (one minute's worth) + refill over the minute
