"""Which connections the proxy takes: a share per client address, and at the cap the idlest
kept-alive connection makes room for a new client (a 503 only when every connection is busy)."""

from __future__ import annotations

from dataclasses import dataclass

from vectorlay.proxy.admission import Admitted, ConnectionAdmission


@dataclass(eq=False)
class Conn:
    name: str
    evicted: bool = False

    def evict(self) -> None:
        self.evicted = True


def test_one_address_gets_its_share_and_no_more_while_others_still_get_in() -> None:
    admission = ConnectionAdmission(max_connections=100, max_per_client=3)
    assert [admission.admit("10.0.0.1") for _ in range(4)] == [Admitted.YES] * 3 + [Admitted.CLIENT_FULL]
    assert admission.admit("10.0.0.2") is Admitted.YES
    admission.finished("10.0.0.1", evicted=False)
    assert admission.admit("10.0.0.1") is Admitted.YES  # a freed slot is that address's again
    assert admission.per_client == {"10.0.0.1": 3, "10.0.0.2": 1} and admission.open == 4


def test_at_the_cap_the_longest_idle_connection_is_closed_for_a_new_one() -> None:
    admission = ConnectionAdmission(max_connections=3, max_per_client=100)
    conns = [Conn(f"c{i}") for i in range(3)]
    for _ in conns:
        assert admission.admit("10.0.0.1") is Admitted.YES
    admission.waiting(conns[1])  # idle first
    admission.waiting(conns[2])
    admission.waiting(conns[0])
    admission.busy(conns[0])  # a request began on it: not idle any more
    assert admission.admit("10.0.0.9") is Admitted.YES
    assert [c.name for c in conns if c.evicted] == ["c1"]
    # The evicted connection is still open until its task ends, but its slot is already taken.
    assert admission.open == 4 and admission.closing == 1
    assert admission.admit("10.0.0.9") is Admitted.YES
    assert [c.name for c in conns if c.evicted] == ["c1", "c2"]
    assert admission.admit("10.0.0.9") is Admitted.FULL  # c0 is busy: nothing left to close
    admission.finished("10.0.0.1", evicted=True)
    admission.finished("10.0.0.1", evicted=True)
    assert (admission.open, admission.closing, admission.evicted) == (3, 0, 2)
    assert admission.per_client == {"10.0.0.1": 1, "10.0.0.9": 2}


def test_a_connection_that_stops_waiting_twice_or_never_waited_is_harmless() -> None:
    admission = ConnectionAdmission(max_connections=1, max_per_client=1)
    conn = Conn("c")
    assert admission.admit("a") is Admitted.YES
    admission.busy(conn)
    admission.waiting(conn)
    admission.busy(conn)
    admission.busy(conn)
    assert admission.admit("b") is Admitted.FULL and not conn.evicted
