"""server/write_behind.py: what waits for the database is merged per row, and a decision that
reaches it by mistake is handed back instead of stopping the server."""

from __future__ import annotations

from vectorlay.core.model import NodeState
from vectorlay.server.store import ops
from vectorlay.server.write_behind import Journal


def test_a_nodes_status_waits_latest_wins() -> None:
    journal = Journal()
    refused = journal.add([ops.SetNodeStatus("n-1", (("GPU-1", "Xid 79"),), 2),
                           ops.SetNodeLiveness("n-1", NodeState.READY, 1.0, "s-a", ()),
                           ops.SetNodeStatus("n-1", (), 3),
                           ops.SetNodeSeq("n-1", 7, 2)])
    assert refused == []
    assert journal.changes() == [ops.SetNodeStatus("n-1", (), 3), ops.SetNodeLiveness("n-1", NodeState.READY, 1.0,
                                                                                       "s-a", ()),
                                 ops.SetNodeSeq("n-1", 7, 2)]


def test_a_decision_is_handed_back_and_the_rest_kept() -> None:
    journal = Journal()
    decision = ops.DeleteNode("n-2")
    refused = journal.add([decision, ops.AckCommands("n-1", 4), ops.AckCommands("n-1", 3)])
    assert refused == [decision]
    assert journal.changes() == [ops.AckCommands("n-1", 4)]
