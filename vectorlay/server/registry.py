"""The servers sharing one database: each says every second that it is alive, with how many
sessions it holds (`vectorlay get servers`), and learns which others are; a server that stopped
saying so is gone, and the leader judges the nodes it held."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

import trio

from vectorlay.errors import StoreError
from vectorlay.server.store import Store
from vectorlay.server.store import engine as store_engine

log = logging.getLogger("vectorlay.server")

BEAT_EVERY_S = 1.0
GONE_AFTER_S = 6.0  # no beat for this long: the server is gone (longer than the leader's lease)


@dataclass(frozen=True)
class ServerInfo:
    id: str
    address: str
    started_at: float
    seen_s_ago: float
    nodes: int
    proxies: int
    clients: int
    tunnel_proxies: tuple[tuple[str, str], ...] = ()  # (id, address) of its proxies that accept tunnels

    @property
    def alive(self) -> bool:
        return self.seen_s_ago <= GONE_AFTER_S


class Registry:
    def __init__(self, store: Store, server_id: str, address: str, counts: Callable[[], tuple[int, int, int]],
                 on_alive: Callable[[set[str]], None],
                 tunnel_proxies: Callable[[], Sequence[tuple[str, str]]] = tuple,
                 on_tunnel_proxies: Callable[[tuple[tuple[str, str], ...]], None] | None = None) -> None:
        self.store = store
        self.server_id = server_id
        self.address = address
        self.counts = counts
        self.on_alive = on_alive
        self.tunnel_proxies = tunnel_proxies
        self.on_tunnel_proxies = on_tunnel_proxies
        self.servers: list[ServerInfo] = []  # as of the last beat
        self.last_beat_at: float | None = None  # trio clock of the last beat the database took

    def silent_for(self, now: float) -> float:
        """How long this server could not beat (0 while it can): how long it has been cut off
        from the database, as the other servers see it."""
        return 0.0 if self.last_beat_at is None else max(0.0, now - self.last_beat_at)

    def peers(self) -> list[ServerInfo]:
        """The other servers that were alive as of the last beat."""
        return [s for s in self.servers if s.alive and s.id != self.server_id]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Beat once before `started` (so the others are known from the start), then every second."""
        started_at: float | None = None
        started = False
        try:
            while True:
                try:
                    now = await self.store.run(partial(store_engine.beat, server_id=self.server_id,
                                                       address=self.address, started_at=started_at,
                                                       counts=self.counts(),
                                                       tunnel_proxies=self.tunnel_proxies()))
                    started_at = started_at or now
                    rows, now = await self.store.run(store_engine.list_servers)
                    self.servers = [ServerInfo(r.id, r.address, r.started_at, max(0.0, now - r.seen_at), r.nodes,
                                               r.proxies, r.clients, _proxies(r.tunnel_proxies)) for r in rows]
                    self.last_beat_at = trio.current_time()
                    self.on_alive({s.id for s in self.servers if s.alive})
                    if self.on_tunnel_proxies is not None:
                        self.on_tunnel_proxies(tuple(p for s in self.servers if s.alive and s.id != self.server_id
                                                     for p in s.tunnel_proxies))
                except StoreError as error:
                    log.debug("server heartbeat failed: %s", error)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(BEAT_EVERY_S)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await self.store.run(partial(store_engine.forget_server, server_id=self.server_id))
                except StoreError:
                    pass  # it will look gone once it stops beating


def advertised_host(listen_host: str, advertise: str | None, db_url: str) -> str:
    """The host other servers reach this one at (`get servers`, their `/v1/health` probe): the one
    given, else the listening host; one listening everywhere names this machine's address on
    the way to the database, which the other servers reach too."""
    if advertise:
        return advertise
    if listen_host not in ("0.0.0.0", "::", ""):
        return listen_host
    parts = urlsplit(db_url)
    try:
        with socket.socket(socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET,
                           socket.SOCK_DGRAM) as probe:
            probe.connect((parts.hostname or "127.0.0.1", parts.port or 5432))  # UDP: nothing is sent
            return str(probe.getsockname()[0])
    except (OSError, ValueError):
        return socket.gethostname()


def _proxies(text: str) -> tuple[tuple[str, str], ...]:
    """A row's tunnel proxies; a damaged value (another version's) counts as none."""
    try:
        return tuple((str(i), str(a)) for i, a in json.loads(text))
    except (ValueError, TypeError):
        return ()
