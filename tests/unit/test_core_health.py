"""core.health: node liveness on the server's clock, and the replica probe state machine."""

from __future__ import annotations

import pytest
from core_strategies import CHEAP
from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core.health import (
    Liveness,
    LivenessPolicy,
    ProbeState,
    in_grace,
    on_connect,
    on_disconnect,
    on_goodbye,
    on_heartbeat,
    on_probe,
    on_tick,
)
from vectorlay.core.model import HealthCheck, NodeState, ReplicaState

POLICY = LivenessPolicy(heartbeat_interval_s=1.0, suspect_after_s=2.0, down_after_s=10.0)


# --- liveness examples ---------------------------------------------------------------------------


def test_connect_is_ready() -> None:
    live = on_connect(5.0)
    assert (live.state, live.connected, live.last_seen, live.since) == (NodeState.READY, True, 5.0, 5.0)


def test_ready_until_suspect_after_then_down_after() -> None:
    live = on_connect(100.0)
    assert on_tick(live, 101.999, POLICY).state is NodeState.READY
    suspect = on_tick(live, 102.0, POLICY)
    assert suspect.state is NodeState.SUSPECT and suspect.since == 102.0 and suspect.last_seen == 100.0
    assert on_tick(suspect, 109.999, POLICY) == suspect
    down = on_tick(suspect, 110.0, POLICY)
    assert down.state is NodeState.DOWN and down.since == 110.0 and down.last_seen == 100.0
    assert on_tick(down, 10_000.0, POLICY) == down  # stays down, `since` unchanged


def test_a_long_silence_goes_straight_to_down() -> None:
    live = on_connect(0.0)
    assert on_tick(live, 50.0, POLICY).state is NodeState.DOWN


def test_heartbeats_keep_a_node_ready_and_move_last_seen() -> None:
    live = on_connect(0.0)
    for t in range(1, 100):
        live = on_heartbeat(live, float(t))
        live = on_tick(live, t + 1.5, POLICY)
        assert live.state is NodeState.READY
    assert live.last_seen == 99.0 and live.since == 0.0  # still the same READY period


def test_disconnect_makes_a_ready_node_suspect_at_once() -> None:
    live = on_heartbeat(on_connect(0.0), 3.0)
    gone = on_disconnect(live, 3.5)
    assert (gone.state, gone.connected, gone.last_seen, gone.since) == (NodeState.SUSPECT, False, 3.0, 3.5)
    # Down is still measured from the last sign of life.
    assert on_tick(gone, 12.999, POLICY).state is NodeState.SUSPECT
    assert on_tick(gone, 13.0, POLICY).state is NodeState.DOWN


def test_disconnect_of_a_down_node_keeps_it_down() -> None:
    down = on_tick(on_connect(0.0), 20.0, POLICY)
    after = on_disconnect(down, 21.0)
    assert after.state is NodeState.DOWN and not after.connected and after.since == down.since


@pytest.mark.parametrize("state", [NodeState.SUSPECT, NodeState.DOWN])
def test_a_heartbeat_makes_any_node_ready_again(state: NodeState) -> None:
    live = Liveness(state, False, 1.0, 5.0)
    back = on_heartbeat(live, 42.0)
    assert (back.state, back.connected, back.last_seen, back.since) == (NodeState.READY, True, 42.0, 42.0)


def test_for_interval_scales_with_the_heartbeat() -> None:
    policy = LivenessPolicy.for_interval(4.0)
    assert policy.heartbeat_interval_s == 4.0
    assert policy.suspect_after_s > policy.heartbeat_interval_s  # one late beat is not yet suspect
    assert policy.down_after_s >= policy.suspect_after_s
    assert LivenessPolicy.for_interval(0.5).down_after_s == 10.0
    assert LivenessPolicy.for_interval(10.0).down_after_s == 50.0


def test_goodbye_keeps_a_ready_node_ready_through_its_restart_grace() -> None:
    live = on_goodbye(on_heartbeat(on_connect(0.0), 10.0), 11.0, grace_s=30.0)
    assert live.state is NodeState.READY and live.last_seen == 11.0
    live = on_disconnect(live, 11.5)  # the agent closes its link to restart
    assert live.state is NodeState.READY and not live.connected
    assert on_tick(live, 40.9, POLICY).state is NodeState.READY
    # Once the grace is over, silence is judged from its end.
    assert on_tick(live, 41.0 + POLICY.suspect_after_s, POLICY).state is NodeState.SUSPECT
    assert on_tick(live, 41.0 + POLICY.down_after_s, POLICY).state is NodeState.DOWN
    # Coming back within the grace: a plain heartbeat, still the same READY period.
    back = on_heartbeat(live, 25.0)
    assert back.state is NodeState.READY and back.connected and back.since == 0.0
    assert on_tick(back, 25.0 + POLICY.suspect_after_s, POLICY).state is NodeState.SUSPECT


def test_goodbye_does_not_revive_a_node_that_is_not_ready() -> None:
    suspect = on_disconnect(on_connect(0.0), 1.0)
    assert on_goodbye(suspect, 2.0, grace_s=30.0) == suspect


def test_in_grace_after_a_server_restart() -> None:
    live = in_grace(100.0, 20.0)
    assert live.state is NodeState.READY and not live.connected
    assert on_tick(live, 119.9, POLICY).state is NodeState.READY
    assert on_tick(live, 120.0 + POLICY.suspect_after_s, POLICY).state is NodeState.SUSPECT
    assert on_heartbeat(live, 105.0).connected
    assert in_grace(100.0, 20.0, NodeState.DOWN).state is NodeState.DOWN


# --- liveness properties -------------------------------------------------------------------------

EVENTS = ("heartbeat", "disconnect", "tick", "tick", "connect", "goodbye")
GOODBYE_GRACE_S = 5.0
BASE = 10**6  # monotonic clocks in use (trio's, MockClock) are never negative


@st.composite
def timelines(draw: st.DrawFn) -> list[tuple[str, float]]:
    """Events at non-decreasing, integer-valued server times (so float arithmetic is exact)."""
    t = BASE + draw(st.integers(min_value=0, max_value=10**6))
    events = []
    for _ in range(draw(st.integers(min_value=0, max_value=25))):
        t += draw(st.integers(min_value=0, max_value=15))
        events.append((draw(st.sampled_from(EVENTS)), float(t)))
    return events


def step(live: Liveness, kind: str, now: float, policy: LivenessPolicy = POLICY) -> Liveness:
    if kind == "heartbeat":
        return on_heartbeat(live, now)
    if kind == "disconnect":
        return on_disconnect(live, now)
    if kind == "connect":
        return on_connect(now)
    if kind == "goodbye":
        return on_goodbye(live, now, GOODBYE_GRACE_S)
    return on_tick(live, now, policy)


def run(start: float, events: list[tuple[str, float]]) -> list[Liveness]:
    states = [on_connect(start)]
    for kind, now in events:
        states.append(step(states[-1], kind, now))
    return states


@CHEAP
@given(timelines(), st.integers(min_value=-BASE, max_value=BASE))
def test_liveness_depends_only_on_server_time_differences(events: list[tuple[str, float]], offset: int) -> None:
    # Shifting every server time by the same amount (another monotonic clock origin) shifts the
    # timestamps and changes nothing else: no absolute time and no node clock is consulted.
    start = events[0][1] if events else float(BASE)
    original = run(start, events)
    shifted = run(start + offset, [(kind, t + offset) for kind, t in events])
    for a, b in zip(original, shifted, strict=True):
        assert (b.state, b.connected) == (a.state, a.connected)
        assert (b.last_seen, b.since) == (a.last_seen + offset, a.since + offset)


@CHEAP
@given(timelines())
def test_liveness_invariants(events: list[tuple[str, float]]) -> None:
    start = events[0][1] if events else float(BASE)
    states = run(start, events)
    for (kind, now), before, after in zip(events, states[:-1], states[1:], strict=True):
        if kind in ("heartbeat", "connect"):
            assert after.state is NodeState.READY and after.connected and after.last_seen == now
        elif kind == "goodbye":
            assert after.state is before.state
        else:
            assert after.last_seen == before.last_seen  # only a sign of life moves last_seen
        if kind == "disconnect":
            assert not after.connected
            if before.state is NodeState.READY and now >= before.grace_until:
                assert after.state is NodeState.SUSPECT
        if kind == "tick":
            assert after.connected == before.connected
            assert before.state is not NodeState.READY or after.state is not NodeState.DOWN or \
                now - max(before.last_seen, before.grace_until) >= POLICY.down_after_s
            if after.state is not before.state:
                assert after.state is not NodeState.READY  # ticks never heal a node
            if now >= before.grace_until and now - max(before.last_seen, before.grace_until) >= POLICY.down_after_s:
                assert after.state is NodeState.DOWN
            if now < before.grace_until:
                assert after == before  # silence is not judged during a grace
        if after.state is not before.state:
            assert after.since == now
        elif kind in ("tick", "disconnect", "goodbye"):
            assert after.since == before.since
        assert after.since <= now and after.last_seen <= now


# --- probes --------------------------------------------------------------------------------------

CHECK = HealthCheck(failure_threshold=3, startup_timeout_s=60.0, unready_timeout_s=30.0)


def test_one_success_makes_a_starting_replica_ready() -> None:
    assert on_probe(ProbeState(since=0.0), True, "", CHECK, 5.0) == ProbeState(ReplicaState.READY, 0, "", 5.0)


def test_failures_while_starting_stay_starting_with_a_reason() -> None:
    state = ProbeState(since=100.0)
    for i in range(1, 10):
        state = on_probe(state, False, "connection refused", CHECK, 100.0 + i)
        assert state.state is ReplicaState.STARTING and state.failures == i
        assert "connection refused" in state.reason


def test_never_ready_within_the_startup_timeout_is_failed() -> None:
    state = on_probe(ProbeState(since=100.0), False, "refused", CHECK, 159.9)
    assert state.state is ReplicaState.STARTING
    state = on_probe(state, False, "refused", CHECK, 160.0)
    assert state.state is ReplicaState.FAILED and "refused" in state.reason and "1m" in state.reason
    assert on_probe(state, True, "", CHECK, 161.0) == state  # failed is final: it gets replaced


def test_a_ready_replica_turns_unready_only_after_threshold_failures_in_a_row() -> None:
    state = on_probe(ProbeState(), True, "", CHECK, 1.0)
    state = on_probe(state, False, "timeout", CHECK, 2.0)
    state = on_probe(state, False, "timeout", CHECK, 3.0)
    assert state.state is ReplicaState.READY and state.failures == 2
    state = on_probe(state, True, "", CHECK, 4.0)  # a success resets the count
    assert state.state is ReplicaState.READY and state.failures == 0
    for t in (5.0, 6.0):
        state = on_probe(state, False, "timeout", CHECK, t)
        assert state.state is ReplicaState.READY
    state = on_probe(state, False, "HTTP 503", CHECK, 7.0)
    assert state.state is ReplicaState.UNREADY and state.failures == 3 and "HTTP 503" in state.reason
    state = on_probe(state, False, "HTTP 503", CHECK, 8.0)
    assert state.state is ReplicaState.UNREADY
    assert on_probe(state, True, "", CHECK, 9.0).state is ReplicaState.READY


def test_unready_for_too_long_is_failed() -> None:
    ready = on_probe(ProbeState(), True, "", CHECK, 0.0)
    state = ready
    for t in (1.0, 2.0, 3.0):
        state = on_probe(state, False, "503", CHECK, t)
    assert state.state is ReplicaState.UNREADY and state.since == 3.0
    assert on_probe(state, False, "503", CHECK, 32.9).state is ReplicaState.UNREADY
    failed = on_probe(state, False, "503", CHECK, 33.0)
    assert failed.state is ReplicaState.FAILED and "503" in failed.reason


def test_threshold_one_turns_unready_on_the_first_failure() -> None:
    check = HealthCheck(failure_threshold=1)
    ready = on_probe(ProbeState(), True, "", check, 0.0)
    assert on_probe(ready, False, "x", check, 1.0).state is ReplicaState.UNREADY


@CHEAP
@given(
    st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=20)), max_size=40),
    st.integers(min_value=1, max_value=6),
)
def test_probe_state_follows_its_definition(results: list[tuple[bool, int]], threshold: int) -> None:
    # A reference model of the documented rules, stepped alongside on_probe.
    check = HealthCheck(failure_threshold=threshold, startup_timeout_s=50.0, unready_timeout_s=25.0)
    state = ProbeState(since=0.0)
    model, failures, since, now = ReplicaState.STARTING, 0, 0.0, 0.0
    for ok, gap in results:
        now += gap
        state = on_probe(state, ok, "detail", check, now)
        if model is ReplicaState.FAILED:
            pass
        elif ok:
            model, failures, since = ReplicaState.READY, 0, now
        else:
            failures += 1
            if model is ReplicaState.STARTING and now - since >= check.startup_timeout_s:
                model = ReplicaState.FAILED
            elif model is ReplicaState.READY and failures >= threshold:
                model, since = ReplicaState.UNREADY, now
            elif model is ReplicaState.UNREADY and now - since >= check.unready_timeout_s:
                model = ReplicaState.FAILED
        assert state.state is model
        assert state.failures == failures
        assert (state.reason == "") == (state.state is ReplicaState.READY)
