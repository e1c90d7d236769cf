"""A server cut off from the shared database hands its nodes and proxies to servers that have it.

Several servers share one PostgreSQL. One that cannot reach it (its link to the database cut, the
rest of the control plane fine) stops beating in the registry, so the others soon count it gone
and judge its nodes as orphans, while the commands the leader stores for those nodes never reach
it. Holding on to them would leave them unmanaged; so once it has been unable to beat for
`HAND_OVER_AFTER_S`, it asks the servers it last saw alive whether they reach the database
(`/v1/health`). If one does, it closes its node and proxy links with "try again" (they move to the
next server of their list at once) and refuses new ones, the CLI's too (its memory is no longer
the truth), until its own database is back.

If no other server answers that it has the database (the database is down for everyone, or they
cannot be reached) nothing is handed over: moving would gain nothing, and staying keeps the
nodes' sessions (write-behind) until the database returns.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from vectorlay.core.protocol import DatabaseHealth
from vectorlay.errors import ConnectError, ProtocolError
from vectorlay.server.registry import ServerInfo
from vectorlay.tls import client_context
from vectorlay.wire import LinkClosed, connect

log = logging.getLogger("vectorlay.server")

HAND_OVER_AFTER_S = 3.0  # half the time after which the others count this server gone
CHECK_EVERY_S = 1.0
PROBE_TIMEOUT_S = 2.0
REASON = "database unavailable on this server; another server of the control plane has it: use that one"


def should_hand_over(silent_for_s: float, a_peer_has_the_database: bool, after_s: float = HAND_OVER_AFTER_S) -> bool:
    return silent_for_s >= after_s and a_peer_has_the_database


class Beats(Protocol):
    """What is known of this server's beats in the registry (`registry.Registry`)."""

    def silent_for(self, now: float) -> float: ...

    def peers(self) -> list[ServerInfo]: ...


class Closer:
    """What is handed over: every node session or every proxy link this server holds."""

    def __init__(self, what: str, count: Callable[[], int], close_all: Callable[[str], None]) -> None:
        self.what = what  # "node", "proxy"
        self.count = count
        self.close_all = close_all


class CutOff:
    def __init__(self, registry: Beats, probe: Callable[[ServerInfo], Awaitable[bool]],
                 closers: Sequence[Closer], clock: Callable[[], float] = trio.current_time) -> None:
        self.registry = registry
        self.probe = probe  # True: that server reaches the database now
        self.closers = closers
        self.clock = clock
        self.active = False  # handing over: node and proxy hellos are refused

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(CHECK_EVERY_S)
            await self.check()

    async def check(self) -> None:
        silent_for = self.registry.silent_for(self.clock())
        if silent_for < HAND_OVER_AFTER_S:
            if self.active:
                self.active = False
                log.info("database back: taking nodes and proxies again")
            return
        if not self.active:
            peers = self.registry.peers()
            if not should_hand_over(silent_for, await self._any_has_database(peers)):
                return
            if self.registry.silent_for(self.clock()) < HAND_OVER_AFTER_S:
                return  # it beat again while we asked (a pause that ended, say): nothing to hand over
            self.active = True
            log.warning(
                "cut off from the database for %.0fs while another server has it: handing %s over",
                silent_for,
                " and ".join(f"{c.count()} {c.what} link(s)" for c in self.closers) or "nothing",
            )
        for closer in self.closers:
            if closer.count():
                closer.close_all(REASON)

    async def _any_has_database(self, peers: Sequence[ServerInfo]) -> bool:
        found = False

        async def ask(peer: ServerInfo) -> None:
            nonlocal found
            with trio.move_on_after(PROBE_TIMEOUT_S):
                if await self.probe(peer):
                    found = True

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        return found


def peer_context(ca_pem: bytes | None) -> ssl.SSLContext | None:
    """Servers of one control plane share their TLS CA (`shared_state.py`): a peer is verified
    against it. Its registry address may be an IP its certificate does not name, so the name is
    not checked; a health answer is all that crosses, and nothing secret is sent."""
    if ca_pem is None:
        return None
    context = client_context(ca_pem)
    context.check_hostname = False
    return context


async def probe_database(peer: ServerInfo, context: ssl.SSLContext | None) -> bool:
    """True if the server at `peer.address` says it reaches the database now."""
    host, _, port = peer.address.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        return False  # it listens everywhere: its registry address names no host to dial
    url = f"{'wss' if context else 'ws'}://{host}:{port}/v1/health"
    try:
        async with connect(url, context, PROBE_TIMEOUT_S) as link:
            return (await link.receive_one(DatabaseHealth)).available
    except (ConnectError, LinkClosed, ProtocolError, OSError):
        return False
