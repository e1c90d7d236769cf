"""What failures do to a cluster: crash-loop backoff, poison-pill quarantine, degraded reconciles.

A pure state machine stepped with observations and the caller's `now`, like `core/health.py`.

- **Crash loop** (Kubernetes' CrashLoopBackOff): every replica that fails (could not start, or
  failed after starting) counts one failure. The first is replaced at once (one bad node or one
  unlucky start should cost nothing); from the second on, the next replacement waits
  `backoff_s(failures)`: 10 s doubling to 5 min, with no overflow at any count. The count resets
  once a replica of the current revision has been ready for `STABLE_S`, so a workload that
  crashes every few minutes after becoming ready is not punished like one that never starts.
- **Poison pill**: a node whose agent dies (its link drops without a goodbye, or it falls
  silent) shortly after receiving a cluster's replicas counts a strike against the cluster.
  Strikes on `POISON_NODES` different nodes (or `POISON_STRIKES` on any), with no replica of the
  cluster becoming ready in between, quarantine it: it is not placed anywhere until its manifest
  changes or an operator lifts it. One tenant's manifest must not walk through the fleet killing
  agents.
- **Degraded**: the server failed to reconcile the cluster (a bug, or a database error); the
  reason is shown and the cluster is retried with the same backoff, while every other cluster is
  served as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vectorlay.core.durations import format_duration

BACKOFF_FIRST_S = 10.0
BACKOFF_MAX_S = 300.0  # 5 minutes, as Kubernetes caps CrashLoopBackOff
STABLE_S = 120.0  # ready this long: the cluster runs fine, its failure count starts over
CRASH_LOOP_AFTER = 2  # failures in a row before a cluster is called crash-looping
POISON_NODES = 2  # distinct nodes whose agents died right after receiving its replicas, in a row
POISON_STRIKES = 3  # or this many deaths on any nodes (one agent restarted by systemd, dying again)
POISON_WINDOW_S = 60.0  # "right after": within this of the replica being delivered to the node


def backoff_s(failures: int) -> float:
    """How long the replacement after `failures` failures waits: 0, then 10 s doubling to the cap.

    Monotone and bounded for any count (the exponent is capped before it can overflow)."""
    if failures <= 1:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** min(failures - 2, 32))


@dataclass(frozen=True)
class ClusterHealth:
    failures: int = 0  # replica failures since the cluster last ran stably
    not_before: float = 0.0  # no replacement of a failed or lost replica before this
    reason: str = ""  # the latest failure's reason
    node: str = ""  # the node it happened on (a name)
    ready_since: float | None = None  # a replica of the current revision has been ready since then
    strikes: tuple[str, ...] = ()  # nodes whose agents died right after receiving its replicas
    quarantined: str = ""  # why it is not placed any more ("" when it is not quarantined)
    degraded: str = ""  # why the server could not reconcile it ("" when it can)

    @property
    def crash_looping(self) -> bool:
        return self.failures >= CRASH_LOOP_AFTER

    @property
    def healthy(self) -> bool:
        return self == HEALTHY


HEALTHY = ClusterHealth()


def on_failure(state: ClusterHealth, now: float, reason: str, node: str) -> ClusterHealth:
    """A replica failed. The cluster's next replacement waits according to the new count."""
    failures = state.failures + 1
    return replace(state, failures=failures, not_before=now + backoff_s(failures), reason=reason, node=node,
                   ready_since=None)


def on_ready(state: ClusterHealth, now: float) -> ClusterHealth:
    """A replica of the current revision is ready: it proves the manifest can run, so poison-pill
    strikes end; the failure count ends once it stays ready for STABLE_S (see `settle`)."""
    strikes = state.strikes if state.quarantined else ()  # a quarantine keeps what explains it
    return replace(state, ready_since=state.ready_since if state.ready_since is not None else now, strikes=strikes)


def on_none_ready(state: ClusterHealth) -> ClusterHealth:
    """No replica of the current revision is ready any more: the stable period starts over."""
    return replace(state, ready_since=None) if state.ready_since is not None else state


def settle(state: ClusterHealth, now: float) -> ClusterHealth:
    """Forget past failures once a replica has been ready for STABLE_S."""
    if state.failures and state.ready_since is not None and now - state.ready_since >= STABLE_S:
        return replace(state, failures=0, not_before=0.0, reason="", node="")
    return state


def settles_at(state: ClusterHealth) -> float | None:
    """When `settle` will reset the count (for a timer), or None if nothing is pending."""
    if state.failures and state.ready_since is not None:
        return state.ready_since + STABLE_S
    return None


def may_replace(state: ClusterHealth, now: float) -> bool:
    """Whether a failed or lost replica may be replaced now (backoff has passed)."""
    return now >= state.not_before


def on_agent_died(state: ClusterHealth, node: str) -> ClusterHealth:
    """A node's agent died right after receiving this cluster's replicas (none ready since)."""
    strikes = (*state.strikes, node)
    if state.quarantined or (len(set(strikes)) < POISON_NODES and len(strikes) < POISON_STRIKES):
        return replace(state, strikes=strikes)
    names = ", ".join(dict.fromkeys(strikes))
    why = (f"quarantined: the agents of {len(strikes)} node(s) ({names}) died within "
           f"{format_duration(POISON_WINDOW_S)} of receiving its replicas; fix the manifest and apply it again, "
           f"or lift it with `vectorlay cluster unquarantine`")
    return replace(state, strikes=strikes, quarantined=why)


def lift_quarantine(state: ClusterHealth) -> ClusterHealth:
    return replace(state, strikes=(), quarantined="", failures=0, not_before=0.0, reason="", node="")


def on_reconcile_error(state: ClusterHealth, now: float, error: str) -> ClusterHealth:
    """Reconciling the cluster raised: show why, and retry with the crash-loop backoff."""
    failures = state.failures + 1
    return replace(state, degraded=f"degraded: the server could not reconcile it ({error})", failures=failures,
                   not_before=now + max(1.0, backoff_s(failures)))


def on_reconciled(state: ClusterHealth) -> ClusterHealth:
    return replace(state, degraded="") if state.degraded else state


def describe(state: ClusterHealth, now: float) -> str:
    """One line for `get clusters`, `describe` and apply's progress; "" for a healthy cluster."""
    if state.quarantined:
        return state.quarantined
    if state.degraded:
        return state.degraded
    if not state.crash_looping:
        return ""
    where = f" on {state.node}" if state.node else ""
    wait = state.not_before - now
    when = f"next try in {format_duration(wait)}" if wait > 0.5 else "replacing it now"
    return f"crash-looping: {state.reason or 'failed'}{where}; {when} (failure {state.failures})"
