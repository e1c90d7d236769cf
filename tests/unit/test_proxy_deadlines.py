"""DeadlineKeeper: one task expiring many connections' deadlines, on trio's autojump clock."""

from __future__ import annotations

import math

import pytest
import trio
import trio.lowlevel
import trio.testing

from vectorlay.proxy.deadlines import MIN_WAKE_INTERVAL_S, PRUNE_ABOVE, DeadlineKeeper


class Waiter:
    def __init__(self) -> None:
        self.armed_with: object | None = None
        self.expired_at: list[float] = []

    def expire(self) -> None:
        self.expired_at.append(trio.current_time())


async def test_an_armed_waiter_expires_exactly_at_its_deadline_and_only_once(
        autojump_clock: trio.testing.MockClock) -> None:
    keeper = DeadlineKeeper(shortest_s=10)
    waiter = Waiter()
    start = trio.current_time()
    keeper.arm(waiter, start + 60)
    await trio.sleep(59.9)
    assert waiter.expired_at == []
    await trio.sleep(100)
    assert waiter.expired_at == [pytest.approx(start + 60)]
    assert waiter.armed_with is None and keeper.armed == 0


async def test_disarming_cancels_and_rearming_replaces_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    keeper = DeadlineKeeper(shortest_s=10)
    kept, moved = Waiter(), Waiter()
    start = trio.current_time()
    keeper.arm(kept, start + 10)
    keeper.arm(moved, start + 10)
    keeper.disarm(kept)
    keeper.arm(moved, start + 30)  # e.g. a request's first byte: idle deadline replaced by the header one
    await trio.sleep(100)
    assert kept.expired_at == []
    assert moved.expired_at == [pytest.approx(start + 30)]


async def test_a_deadline_armed_while_the_keeper_sleeps_toward_a_later_one_is_not_late(
        autojump_clock: trio.testing.MockClock) -> None:
    keeper = DeadlineKeeper(shortest_s=10)  # nobody arms less than 10 s ahead
    idle, heading = Waiter(), Waiter()
    start = trio.current_time()
    keeper.arm(idle, start + 60)
    await trio.sleep(5)
    keeper.arm(heading, start + 15)
    await trio.sleep(100)
    assert heading.expired_at == [pytest.approx(start + 15)]
    assert idle.expired_at == [pytest.approx(start + 60)]


async def test_stale_entries_are_pruned_so_the_heap_follows_the_armed_count(
        autojump_clock: trio.testing.MockClock) -> None:
    keeper = DeadlineKeeper(shortest_s=10)
    waiters = [Waiter() for _ in range(10)]
    now = trio.current_time()
    for round_ in range(1000):  # every request re-arms and disarms: one stale entry each time
        waiter = waiters[round_ % 10]
        keeper.arm(waiter, now + 60 + round_ * 1e-3)
        assert len(keeper._heap) <= 2 * keeper.armed + PRUNE_ABOVE
        keeper.disarm(waiter)
    keeper.arm(waiters[0], now + 60)
    await trio.sleep(100)
    assert [len(w.expired_at) for w in waiters] == [1] + [0] * 9


async def test_the_keeper_task_runs_only_while_something_is_armed(autojump_clock: trio.testing.MockClock) -> None:
    keeper = DeadlineKeeper(shortest_s=1)
    waiter = Waiter()
    keeper.arm(waiter, trio.current_time() + 1)
    await trio.lowlevel.checkpoint()
    assert keeper._running
    keeper.disarm(waiter)
    await trio.sleep(2)  # it wakes within shortest_s, finds nothing armed and ends
    assert not keeper._running and keeper._heap == []
    keeper.arm(waiter, trio.current_time() + 1)  # and starts again when needed
    await trio.sleep(2)
    assert len(waiter.expired_at) == 1


async def test_tiny_timeouts_do_not_make_the_keeper_spin(autojump_clock: trio.testing.MockClock) -> None:
    keeper = DeadlineKeeper(shortest_s=0.001)  # e.g. --header-timeout 1ms
    waiter = Waiter()
    start = trio.current_time()
    keeper.arm(waiter, start + 60)
    wakes = 0
    real_expire_due = keeper.expire_due

    def counting(now: float) -> None:
        nonlocal wakes
        wakes += 1
        real_expire_due(now)

    keeper.expire_due = counting  # type: ignore[method-assign]
    await trio.sleep(61)
    assert waiter.expired_at == [pytest.approx(start + 60)]
    assert wakes <= 60 / MIN_WAKE_INTERVAL_S + 2


async def test_an_infinite_deadline_is_armed_but_costs_the_keeper_nothing(
        autojump_clock: trio.testing.MockClock) -> None:
    keeper = DeadlineKeeper(shortest_s=10)
    forever = Waiter()
    keeper.arm(forever, math.inf)  # e.g. ProxyLimits(idle_timeout_s=math.inf)
    assert forever.armed_with is not None and keeper.armed == 0 and not keeper._running
    keeper.disarm(forever)
    assert forever.armed_with is None and keeper.armed == 0
    for _ in range(100):  # waits that end: nothing accumulates
        keeper.arm(forever, math.inf)
        keeper.disarm(forever)
    assert keeper.armed == 0 and keeper._heap == []
    keeper.arm(forever, math.inf)
    keeper.arm(forever, trio.current_time() + 10)  # re-armed with a finite deadline: kept again
    await trio.sleep(20)
    assert len(forever.expired_at) == 1 and keeper.armed == 0


async def test_rearming_with_the_same_deadline_does_not_revive_stale_entries(
        autojump_clock: trio.testing.MockClock) -> None:
    keeper = DeadlineKeeper(shortest_s=10)
    waiter = Waiter()
    deadline = trio.current_time() + 60  # the clock does not move between these arms
    for _ in range(1000):
        keeper.arm(waiter, deadline)
        keeper.disarm(waiter)
    keeper.arm(waiter, deadline)
    assert len(keeper._heap) <= 2 * keeper.armed + PRUNE_ABOVE
    await trio.sleep(100)
    assert len(waiter.expired_at) == 1


class Broken(Waiter):
    def expire(self) -> None:
        raise RuntimeError("a bug in one connection")


async def test_a_failing_expire_is_logged_and_the_others_still_expire(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    keeper = DeadlineKeeper(shortest_s=10)
    broken, fine = Broken(), Waiter()
    start = trio.current_time()
    keeper.arm(broken, start + 10)
    keeper.arm(fine, start + 10)
    await trio.sleep(20)
    assert fine.expired_at == [pytest.approx(start + 10)]
    assert "expiring a deadline failed" in caplog.text
