"""Restart and failure counts read back from a replica's reasons and events."""

from __future__ import annotations

from vectorlay.core.replica_history import failure_count, restart_count


def test_restarts_are_the_highest_count_the_node_reported() -> None:
    events = ["placed on n1", "starting", "ready", "starting: exited with 1; restarting in 1s (restart 1)",
              "ready", "starting: killed (out of memory); restarting in 2s (restart 2)", "ready"]
    assert restart_count("", events) == 2
    assert restart_count("exited with 1; restarting in 4s (restart 3)", events) == 3
    assert restart_count("", events[:3]) == 0
    # Trimmed history: the latest number still says how many there were.
    assert restart_count("", events[-2:]) == 2


def test_failures_count_failed_events_only() -> None:
    assert failure_count(["placed on n1", "failed: image not found", "failed", "starting: failed to bind"]) == 2
    assert failure_count([]) == 0
