"""`vectorlay logs` merges replicas' lines by the time they were written: tails first, held until
every replica's is complete, then live lines as they come."""

from __future__ import annotations

from vectorlay.client.log_merge import LogMerger


def texts(lines: list) -> list[str]:  # type: ignore[type-arg]
    return [f"{line.replica}:{line.text}" for line in lines]


def test_tails_are_merged_by_time_when_the_call_ends() -> None:
    merger = LogMerger(follow=False)
    merger.expect(["a", "b"])
    assert merger.add("a", ["a1", "a2", "a3"], [10.0, 20.0, 30.0], live=False, now=99.0) == []
    assert merger.add("b", ["b1", "b2"], [15.0, 20.0], live=False, now=99.0) == []
    # Equal times keep their arrival order (a2 came before b2).
    assert texts(merger.finish()) == ["a:a1", "b:b1", "a:a2", "b:b2", "a:a3"]


def test_following_prints_the_merged_tails_once_all_are_complete_then_lines_as_they_come() -> None:
    merger = LogMerger(follow=True)
    merger.expect(["a", "b", "c"])
    assert merger.add("a", ["a1"], [30.0], live=False, now=99.0) == []
    assert merger.add("a", [], [], live=True, now=99.0) == []  # a's tail is complete
    assert merger.add("b", ["b1"], [10.0], live=False, now=99.0) == []
    assert merger.ended("c") == []  # c's node is not connected: nothing to wait for
    assert texts(merger.add("b", ["b2"], [40.0], live=True, now=99.0)) == ["b:b1", "a:a1", "b:b2"]
    assert texts(merger.add("a", ["a2"], [41.0], live=True, now=99.0)) == ["a:a2"]
    assert merger.finish() == []


def test_lines_from_an_agent_that_sends_no_times_count_as_received_now() -> None:
    merger = LogMerger(follow=False)
    merger.expect(["a", "b"])
    merger.add("a", ["old agent"], [], live=False, now=50.0)
    merger.add("b", ["b1"], [40.0], live=False, now=51.0)
    assert texts(merger.finish()) == ["b:b1", "a:old agent"]
