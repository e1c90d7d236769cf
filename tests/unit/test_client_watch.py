"""`get -w`: which rows changed between two listings, ignoring what ticks with the clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vectorlay.client import commands
from vectorlay.client.watch import Differ, identity
from vectorlay.core.api_views import NodeView, ReplicaView


def replica(replica_id: str, state: str = "ready") -> ReplicaView:
    return ReplicaView(replica_id, "web", "default", "n1", "id1", state, "", "127.0.0.1:1", (), 1, "r", None, False,
                       1.0)


def node(last_seen_s: float) -> NodeView:
    return NodeView("id1", "n1", "ready", True, "127.0.0.1", (), True, ("process",), (), 1, last_seen_s, 1.0, True)


def test_new_changed_and_gone_rows_are_told_apart() -> None:
    differ = Differ()
    first = differ.update([replica("web-a"), replica("web-b", "starting")])
    assert [identity(r) for r in first.changed] == ["web-a", "web-b"] and not first.removed
    assert not differ.update([replica("web-a"), replica("web-b", "starting")])  # nothing changed: nothing said
    later = differ.update([replica("web-b", "ready"), replica("web-c", "pending")])
    assert [identity(r) for r in later.changed] == ["web-b", "web-c"] and later.removed == ("web-a",)


def test_fields_that_tick_with_the_clock_are_no_change() -> None:
    differ = Differ()
    differ.update([node(0.2)])
    assert not differ.update([node(0.9)])
    assert differ.update([replace(node(0.3), schedulable=False)]).changed
    assert identity(node(0.1)) == "n1"  # nodes by name, as users name them


def test_changes_print_as_rows_without_the_header_and_json_as_one_line_each(
        capsys: pytest.CaptureFixture[str]) -> None:
    differ = Differ()
    items = [replica("web-a", "starting")]
    commands._print_changes("replicas", differ.update(items), items, "ID ...\nweb-a ...\n", None, True, False)
    assert capsys.readouterr().out == "ID ...\nweb-a ...\n"
    items = [replica("web-a", "ready")]
    commands._print_changes("replicas", differ.update(items), items, "", None, False, False)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("web-a") and "ready" in out[0]
    commands._print_changes("replicas", differ.update([]), [], "", None, False, False)
    assert capsys.readouterr().out == "replica/web-a deleted\n"
    commands._print_changes("replicas", differ.update(items), items, "", None, False, True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith('[{"id":"web-a"')
