"""What a node's word does to the replicas the server knows: pure rules for reports and hellos.

- **Fencing**: a report carries the generation of the assignment it is about; one whose
  generation is not the replica's current one is stale (a node partitioned or paused) and
  changes nothing.
- **Foreign replicas**: replica ids never move between nodes, so a node reporting on a replica
  placed on another node is broken or hostile: its link is cut and nothing changes.
- **Stop confirmation**: a replica the server is stopping is forgotten only when its node says
  it stopped (or, at a hello, no longer runs it); anything else said about it is stale.
- **Hellos**: a (re)connecting node lists what it really runs; replicas it should run but does
  not are pending again (it gets its full desired state next), and what it runs is adopted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from vectorlay.core.model import Replica, ReplicaState
from vectorlay.core.protocol import ReplicaReport


class Verdict(Enum):
    UPDATE = "update"  # store `replica`
    UNCHANGED = "unchanged"  # the report says what is already known
    STOPPED = "stopped"  # a replica being stopped has stopped: forget it
    STALE = "stale"  # fenced off: an old generation, an unknown replica, or news of a replica being stopped
    FOREIGN = "foreign"  # about another node's replica: cut the reporting node off


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    replica: Replica | None = None  # the replica as it now is, for UPDATE


def with_report(replica: Replica, report: ReplicaReport) -> Replica:
    """The replica as the report describes it (address and digest are kept when not reported)."""
    return replace(replica, state=report.state, reason=report.reason,
                   address=report.address if report.address else replica.address,
                   image_digest=report.image_digest or replica.image_digest)


def judge_report(replica: Replica | None, node_id: str, report: ReplicaReport) -> Judgement:
    """What one report from `node_id` does to `replica` (None: the server does not know it)."""
    if replica is not None and replica.node_id != node_id:
        return Judgement(Verdict.FOREIGN)
    if replica is None or report.generation != replica.generation:
        return Judgement(Verdict.STALE)
    if replica.stopping:
        return Judgement(Verdict.STOPPED if report.state is ReplicaState.STOPPED else Verdict.STALE)
    updated = with_report(replica, report)
    if updated == replica:
        return Judgement(Verdict.UNCHANGED)
    return Judgement(Verdict.UPDATE, updated)


@dataclass(frozen=True)
class Adoption:
    """What a hello changes: replicas to store as they now are, and ids to forget."""

    put: tuple[Replica, ...] = ()
    forget: tuple[str, ...] = ()

    @property
    def clusters(self) -> set[str]:
        """Clusters touched: all of them need a reconcile (level-triggered after a restart)."""
        return {r.cluster for r in self.put}


def adopt_hello(on_node: Sequence[Replica], reports: Sequence[ReplicaReport]) -> Adoption:
    """Compare what the server has placed on a node with what the node says it runs."""
    reported = {report.replica_id: report for report in reports}
    put: list[Replica] = []
    forget: list[str] = []
    for replica in on_node:
        report = reported.get(replica.id)
        if replica.stopping:
            if report is None or report.state is ReplicaState.STOPPED:
                forget.append(replica.id)  # it is not running there any more
            continue
        if report is None:
            if replica.state is not ReplicaState.PENDING:
                put.append(replace(replica, state=ReplicaState.PENDING,
                                   reason="node restarted without it; starting again", address=None))
            continue
        if report.generation == replica.generation:
            updated = with_report(replica, report)
            if updated != replica:
                put.append(updated)
    return Adoption(tuple(put), tuple(forget))
