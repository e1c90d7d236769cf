"""core.reports: fencing by generation, foreign replicas, stop confirmation, hellos."""

from __future__ import annotations

from dataclasses import replace

from core_strategies import CHEAP
from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core.model import Replica, ReplicaState
from vectorlay.core.protocol import ReplicaReport
from vectorlay.core.reports import Verdict, adopt_hello, judge_report, with_report

REPLICA = Replica("web-aaaaa", "web", "n1", (), ReplicaState.STARTING, "launching", None, 7)


def report(state: ReplicaState = ReplicaState.READY, generation: int = 7, replica_id: str = "web-aaaaa",
           address: str | None = "10.0.0.1:9000") -> ReplicaReport:
    return ReplicaReport(replica_id, generation, state, "", address)


def test_a_current_report_updates_the_replica() -> None:
    judgement = judge_report(REPLICA, "n1", report())
    assert judgement.verdict is Verdict.UPDATE
    assert judgement.replica == replace(REPLICA, state=ReplicaState.READY, reason="", address="10.0.0.1:9000")


def test_a_report_that_says_nothing_new_is_unchanged() -> None:
    ready = with_report(REPLICA, report())
    assert judge_report(ready, "n1", report()).verdict is Verdict.UNCHANGED


def test_a_report_on_another_nodes_replica_is_foreign() -> None:
    assert judge_report(REPLICA, "n2", report()).verdict is Verdict.FOREIGN


def test_an_unknown_replica_is_stale() -> None:
    assert judge_report(None, "n1", report()).verdict is Verdict.STALE


def test_a_stopping_replica_is_forgotten_only_when_its_node_says_it_stopped() -> None:
    stopping = replace(REPLICA, stopping=True)
    assert judge_report(stopping, "n1", report(ReplicaState.STOPPED)).verdict is Verdict.STOPPED
    assert judge_report(stopping, "n1", report(ReplicaState.READY)).verdict is Verdict.STALE


def test_address_and_digest_are_kept_when_a_report_omits_them() -> None:
    known = replace(REPLICA, address="10.0.0.1:9000", image_digest="sha256:abc")
    updated = with_report(known, ReplicaReport("web-aaaaa", 7, ReplicaState.UNREADY, "probe failing"))
    assert (updated.address, updated.image_digest) == ("10.0.0.1:9000", "sha256:abc")


@CHEAP
@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(list(ReplicaState)), st.booleans())
def test_a_stale_generation_never_changes_state(generation: int, state: ReplicaState, stopping: bool) -> None:
    replica = replace(REPLICA, stopping=stopping)
    if generation == replica.generation:
        generation += 1
    judgement = judge_report(replica, "n1", report(state, generation))
    assert judgement.verdict is Verdict.STALE and judgement.replica is None


def test_a_hello_adopts_what_the_node_runs() -> None:
    adoption = adopt_hello([REPLICA], [report()])
    assert adoption.put == (with_report(REPLICA, report()),) and adoption.forget == ()
    assert adoption.clusters == {"web"}


def test_a_hello_without_a_replica_makes_it_pending_again() -> None:
    adoption = adopt_hello([replace(REPLICA, state=ReplicaState.READY, address="x:1")], [])
    assert adoption.put[0].state is ReplicaState.PENDING and adoption.put[0].address is None


def test_a_hello_confirms_stops() -> None:
    stopping = replace(REPLICA, stopping=True)
    assert adopt_hello([stopping], []).forget == (REPLICA.id,)
    assert adopt_hello([stopping], [report(ReplicaState.STOPPED)]).forget == (REPLICA.id,)
    assert adopt_hello([stopping], [report(ReplicaState.READY)]) == adopt_hello([], [])


def test_a_hello_ignores_reports_of_another_generation() -> None:
    assert adopt_hello([REPLICA], [report(generation=6)]).put == ()
