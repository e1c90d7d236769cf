"""server/cut_off.py: a server cut from the shared database hands over its links only when another
server says it has the database, and takes links again once its own database is back."""

from __future__ import annotations

import trio
import trio.testing

from vectorlay.server.cut_off import HAND_OVER_AFTER_S, Closer, CutOff, should_hand_over
from vectorlay.server.registry import ServerInfo, advertised_host

PEER = ServerInfo("s-peer", "127.0.0.1:1", started_at=0.0, seen_s_ago=0.5, nodes=0, proxies=0, clients=0)


class Beats:
    def __init__(self) -> None:
        self.silent_s = 0.0
        self.others = [PEER]

    def silent_for(self, now: float) -> float:
        return self.silent_s

    def peers(self) -> list[ServerInfo]:
        return self.others


class Links:
    """Node sessions (or proxy links) that close when asked."""

    def __init__(self, count: int) -> None:
        self.open = count
        self.reasons: list[str] = []

    def close_all(self, reason: str) -> None:
        self.reasons.append(reason)
        self.open = 0


def cut_off_with(beats: Beats, answer: bool | None, links: Links) -> tuple[CutOff, list[str]]:
    """`answer` None: the peer never answers (a probe that hangs)."""
    asked: list[str] = []

    async def probe(peer: ServerInfo) -> bool:
        asked.append(peer.id)
        if answer is None:
            await trio.sleep_forever()
        return bool(answer)

    return CutOff(beats, probe, [Closer("node", lambda: links.open, links.close_all)]), asked


def test_the_rule() -> None:
    assert not should_hand_over(HAND_OVER_AFTER_S - 0.1, True)
    assert not should_hand_over(HAND_OVER_AFTER_S + 10, False)
    assert should_hand_over(HAND_OVER_AFTER_S, True)


async def test_a_server_that_beats_keeps_its_links_and_asks_no_one() -> None:
    beats, links = Beats(), Links(3)
    cut_off, asked = cut_off_with(beats, True, links)
    beats.silent_s = HAND_OVER_AFTER_S - 0.5
    await cut_off.check()
    assert not cut_off.active and links.open == 3 and asked == []


async def test_cut_off_while_a_peer_has_the_database_hands_over_until_it_is_back() -> None:
    beats, links = Beats(), Links(3)
    cut_off, asked = cut_off_with(beats, True, links)
    beats.silent_s = HAND_OVER_AFTER_S + 1
    await cut_off.check()
    assert cut_off.active and links.open == 0 and asked == ["s-peer"]
    assert "database unavailable" in links.reasons[0]

    links.open = 1  # one got in before the refusals: handed over too, without asking again
    await cut_off.check()
    assert links.open == 0 and asked == ["s-peer"]

    beats.silent_s = 0.0
    await cut_off.check()
    assert not cut_off.active


async def test_nothing_is_handed_over_when_no_peer_has_the_database() -> None:
    beats, links = Beats(), Links(3)
    cut_off, _ = cut_off_with(beats, False, links)  # the database is down for everyone
    beats.silent_s = HAND_OVER_AFTER_S + 5
    await cut_off.check()
    assert not cut_off.active and links.open == 3

    beats.others = []  # or there is no other server at all
    await cut_off.check()
    assert not cut_off.active and links.open == 3


async def test_a_peer_that_does_not_answer_counts_as_not_having_it(autojump_clock: trio.testing.MockClock) -> None:
    beats, links = Beats(), Links(2)
    cut_off, asked = cut_off_with(beats, None, links)
    beats.silent_s = HAND_OVER_AFTER_S + 1
    await cut_off.check()  # the probe times out instead of hanging the check
    assert asked == ["s-peer"] and not cut_off.active and links.open == 2


def test_the_address_other_servers_dial() -> None:
    db = "postgresql+psycopg://vectorlay@127.0.0.1:5432/vectorlay"
    assert advertised_host("0.0.0.0", "cp1.example.com", db) == "cp1.example.com"
    assert advertised_host("10.1.2.3", None, db) == "10.1.2.3"
    # listening everywhere: the address on the way to the database (here: loopback, to a local one)
    assert advertised_host("0.0.0.0", None, db) == "127.0.0.1"


async def test_a_beat_while_asking_keeps_the_links() -> None:
    beats, links = Beats(), Links(2)
    asked: list[str] = []

    async def probe(peer: ServerInfo) -> bool:  # the database answers again meanwhile (a pause ended)
        asked.append(peer.id)
        beats.silent_s = 0.0
        return True

    cut_off = CutOff(beats, probe, [Closer("node", lambda: links.open, links.close_all)])
    beats.silent_s = HAND_OVER_AFTER_S + 30
    await cut_off.check()
    assert asked == ["s-peer"] and not cut_off.active and links.open == 2
