"""Health state machines, stepped with observations and the caller's `now`.

Node liveness runs on the server's monotonic clock only: a node's own timestamps are never
trusted, so a node whose clock is minutes off stays healthy as long as its beats arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vectorlay.core.model import NodeState, ReplicaState


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


def on_connect(now: float) -> Liveness:
    return Liveness(NodeState.READY, True, now, now)


def on_heartbeat(current: Liveness, now: float) -> Liveness:
    if current.state is NodeState.READY:
        return replace(current, connected=True, last_seen=now)
    return Liveness(NodeState.READY, True, now, now)


def on_disconnect(current: Liveness, now: float) -> Liveness:
    """A closed link is a strong sign: leave routing at once rather than wait for missed beats."""
    if current.state is NodeState.READY:
        return Liveness(NodeState.SUSPECT, False, current.last_seen, now)
    return replace(current, connected=False)


def on_tick(current: Liveness, now: float, policy: LivenessPolicy) -> Liveness:
    silent = now - current.last_seen
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


def on_probe(current: ProbeState, ok: bool, detail: str, failure_threshold: int) -> ProbeState:
    """One probe result. Ready after one success; unready after `failure_threshold` failures in a row."""
    if ok:
        return ProbeState(ReplicaState.READY, 0, "")
    failures = current.failures + 1
    if current.state is ReplicaState.READY and failures >= failure_threshold:
        return ProbeState(ReplicaState.UNREADY, failures, f"health check failing: {detail}")
    if current.state is ReplicaState.READY:
        return replace(current, failures=failures)
    return replace(current, failures=failures, reason=f"health check not passing yet: {detail}")
