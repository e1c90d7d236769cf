"""Health state machines, stepped with observations and the caller's `now`.

Node liveness runs on the server's monotonic clock only: a node's own timestamps are never
trusted, so a node whose clock is minutes off stays healthy as long as its beats arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vectorlay.core.durations import format_duration
from vectorlay.core.model import HealthCheck, NodeState, ReplicaState


@dataclass(frozen=True)
class LivenessPolicy:
    heartbeat_interval_s: float = 1.0
    suspect_after_s: float = 1.6  # just over one missed beat: out of routing fast
    down_after_s: float = 10.0  # long enough that a flickering link is not "down"

    @classmethod
    def for_interval(cls, interval_s: float) -> LivenessPolicy:
        return cls(interval_s, suspect_after_s=1.6 * interval_s, down_after_s=max(10.0, 5 * interval_s))


@dataclass(frozen=True)
class Liveness:
    state: NodeState
    connected: bool
    last_seen: float  # server monotonic time of the last sign of life
    since: float  # when `state` was entered
    grace_until: float = 0.0  # silence is not judged before this (after a restart or a goodbye)


def on_connect(now: float) -> Liveness:
    return Liveness(NodeState.READY, True, now, now)


def in_grace(now: float, grace_s: float, state: NodeState = NodeState.READY) -> Liveness:
    """A node we have not heard from yet but expect back within `grace_s`: after the server
    restarts (Nomad's failover heartbeat grace), or after an agent said goodbye to restart."""
    return Liveness(state, False, now, now, grace_until=now + grace_s)


def on_heartbeat(current: Liveness, now: float) -> Liveness:
    if current.state is NodeState.READY:
        return replace(current, connected=True, last_seen=now, grace_until=0.0)
    return Liveness(NodeState.READY, True, now, now)


def on_disconnect(current: Liveness, now: float) -> Liveness:
    """A link that drops without a goodbye is a strong sign: leave routing at once rather than
    wait for missed beats."""
    if current.state is NodeState.READY and now >= current.grace_until:
        return Liveness(NodeState.SUSPECT, False, current.last_seen, now)
    return replace(current, connected=False)


def on_goodbye(current: Liveness, now: float, grace_s: float) -> Liveness:
    """The agent is restarting on purpose and its replicas keep running: keep routing to them
    for `grace_s` while it comes back."""
    if current.state is not NodeState.READY:
        return current
    return replace(current, last_seen=now, grace_until=now + grace_s)


def on_tick(current: Liveness, now: float, policy: LivenessPolicy) -> Liveness:
    if now < current.grace_until:
        return current
    silent = now - max(current.last_seen, current.grace_until)
    if silent >= policy.down_after_s and current.state is not NodeState.DOWN:
        return Liveness(NodeState.DOWN, current.connected, current.last_seen, now)
    if silent >= policy.suspect_after_s and current.state is NodeState.READY:
        return Liveness(NodeState.SUSPECT, current.connected, current.last_seen, now)
    return current


@dataclass(frozen=True)
class ProbeState:
    """A replica's health as its node's prober sees it."""

    state: ReplicaState = ReplicaState.STARTING
    failures: int = 0  # consecutive failed probes
    reason: str = ""
    since: float = 0.0  # when the current run of failures (or the launch) began


def on_probe(current: ProbeState, ok: bool, detail: str, check: HealthCheck, now: float) -> ProbeState:
    """One probe result. Ready after one success; unready after `failure_threshold` failures in a
    row; failed when it never became ready within the startup timeout, or stayed unready too long."""
    if current.state is ReplicaState.FAILED:
        return current
    if ok:
        return ProbeState(ReplicaState.READY, 0, "", now)
    failures = current.failures + 1
    if current.state is ReplicaState.STARTING:
        if now - current.since >= check.startup_timeout_s:
            return ProbeState(ReplicaState.FAILED, failures,
                              f"not healthy within {format_duration(check.startup_timeout_s)}: {detail}", now)
        return replace(current, failures=failures, reason=f"health check not passing yet: {detail}")
    if current.state is ReplicaState.READY:
        if failures >= check.failure_threshold:
            return ProbeState(ReplicaState.UNREADY, failures, f"health check failing: {detail}", now)
        return replace(current, failures=failures)
    if now - current.since >= check.unready_timeout_s:  # UNREADY for too long
        return ProbeState(ReplicaState.FAILED, failures,
                          f"health check failing for {format_duration(check.unready_timeout_s)}: {detail}", now)
    return replace(current, failures=failures, reason=f"health check failing: {detail}")
