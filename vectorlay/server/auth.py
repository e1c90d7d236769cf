"""Who is on the other end: join tokens, admin/proxy tokens and node credentials."""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import trio

from vectorlay.core.model import Role
from vectorlay.core.tokens import format_token, hash_secret, parse_token, secret_matches
from vectorlay.errors import AuthError, NotFoundError, StoreUnavailable
from vectorlay.server.fleet import Fleet
from vectorlay.server.ids import random_id
from vectorlay.server.records import NodeRecord, TokenRecord
from vectorlay.server.store import Store, ops

log = logging.getLogger("vectorlay.server")

TOKEN_ID_LENGTH = 6
EXPIRY_CHECK_S = 2.0
TOKEN_CACHE_S = 3600.0  # how old a token read may be, to let its holder in while the database is away
TOKEN_CACHE_MAX = 10_000


def new_secret() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Principal:
    """Who is calling the API: the token's role, its id (for the audit log), a deployer's project."""

    role: Role
    token_id: str
    project: str = ""

    @property
    def actor(self) -> str:
        return f"{self.role.value}:{self.token_id}"

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def may_touch(self, project: str) -> bool:
        return self.is_admin or project == self.project


class OpenSessions:
    """Links opened with each token, so revoking (or expiry) closes them within seconds."""

    def __init__(self) -> None:
        self._by_token: dict[str, dict[int, Callable[[str], None]]] = {}
        self._expiry: dict[str, float | None] = {}
        self._ids = itertools.count()

    @contextmanager
    def track(self, record: TokenRecord, close: Callable[[str], None]) -> Iterator[None]:
        key = next(self._ids)
        self._by_token.setdefault(record.id, {})[key] = close
        self._expiry[record.id] = record.expires_at
        try:
            yield
        finally:
            sessions = self._by_token.get(record.id, {})
            sessions.pop(key, None)
            if not sessions:
                self._by_token.pop(record.id, None)
                self._expiry.pop(record.id, None)

    def close_all(self, token_id: str, reason: str) -> int:
        closers = list(self._by_token.get(token_id, {}).values())
        for close in closers:
            close(reason)
        return len(closers)

    async def close_expired(self, wall_clock: Callable[[], float]) -> None:
        while True:
            await trio.sleep(EXPIRY_CHECK_S)
            now = wall_clock()
            for token_id, expires_at in list(self._expiry.items()):
                if expires_at is not None and now >= expires_at:
                    self.close_all(token_id, "token has expired")


class Authenticator:
    def __init__(self, store: Store, fleet: Fleet, wall_clock: Callable[[], float], ca_pin: str | None = None) -> None:
        self.store = store
        self.fleet = fleet
        self.wall_clock = wall_clock
        self.ca_pin = ca_pin  # SHA-256 of the CA's public key, carried in every token when TLS is on
        self.sessions = OpenSessions()
        self._recent: dict[str, tuple[TokenRecord, float]] = {}  # token id -> (record, when read)
        self.load_node: Callable[[str], Awaitable[None]] | None = None  # several servers: read a node's row

    async def create_token(self, role: Role, ttl_s: float | None, uses: int | None = None,
                           description: str = "", project: str = "",
                           extra: Callable[[str], Sequence[ops.Op]] = lambda token_id: ()
                           ) -> tuple[TokenRecord, str]:
        """A new token; only the hash of its secret is stored. `extra(token_id)` ops (the audit
        record, which names the new token) are written in the same transaction."""
        secret = new_secret()
        now = self.wall_clock()
        record = TokenRecord(random_id(TOKEN_ID_LENGTH), hash_secret(secret), role, now,
                             now + ttl_s if ttl_s else None, uses, False, description, project)
        await self.store.apply([ops.PutToken(record), *extra(record.id)])
        return record, self.token_text(record.id, secret)

    def token_text(self, token_id: str, secret: str) -> str:
        """What users copy: `<id>.<secret>`, prefixed with the CA pin when TLS is on."""
        return format_token(token_id, secret, self.ca_pin)

    async def revoke_token(self, token_id: str, extra: Sequence[ops.Op] = ()) -> TokenRecord:
        record = await self.store.get_token(token_id)
        if record is None:
            raise NotFoundError(f"token {token_id!r} not found")
        if not record.revoked:
            record = replace(record, revoked=True)
            await self.store.apply([ops.PutToken(record), *extra])
        self._recent.pop(token_id, None)
        closed = self.sessions.close_all(token_id, "token has been revoked")
        if closed:
            log.info("token %s revoked: closed %d open connection(s)", token_id, closed)
        return record

    async def check_token(self, text: str, roles: frozenset[Role], spend_use: bool = False) -> TokenRecord:
        """The token's record if it is valid for one of `roles`; AuthError with the reason if not."""
        parsed = parse_token(text)
        if parsed is None:
            raise AuthError("malformed token: expected <id>.<secret>")
        if parsed.pin is not None and self.ca_pin is not None and parsed.pin != self.ca_pin:
            raise AuthError("this token was issued by another server (its CA pin does not match)")
        record = await self._token_record(parsed.id, spend_use)
        if record is None or not secret_matches(parsed.secret, record.secret_hash):
            raise AuthError("invalid token")
        if record.revoked:
            raise AuthError("token has been revoked")
        if record.expires_at is not None and self.wall_clock() >= record.expires_at:
            raise AuthError("token has expired; create a new one with `vectorlay token create`")
        if record.role not in roles:
            wanted = " or ".join(sorted(r.value for r in roles))
            raise AuthError(f"a {record.role.value} token cannot do this (needs a {wanted} token)")
        if spend_use and record.uses_left is not None and not await self.store.consume_token_use(record.id):
            raise AuthError("token has no uses left")
        return record

    async def _token_record(self, token_id: str, spend_use: bool) -> TokenRecord | None:
        """The stored token; while the database is away, the copy read within the last
        TOKEN_CACHE_S (a proxy or CLI reconnecting during an outage must not be locked out; a
        join, which spends a use, still needs the database)."""
        try:
            record = await self.store.get_token(token_id)
        except StoreUnavailable:
            cached = self._recent.get(token_id)
            if spend_use or cached is None or self.wall_clock() - cached[1] > TOKEN_CACHE_S:
                raise
            return cached[0]
        if record is not None:
            if len(self._recent) >= TOKEN_CACHE_MAX:
                self._recent.clear()
            self._recent[token_id] = (record, self.wall_clock())
        else:
            self._recent.pop(token_id, None)
        return record

    async def check_node_credential(self, text: str) -> NodeRecord:
        parsed = parse_token(text)
        if parsed is None:
            raise AuthError("malformed node credential")
        record = self.fleet.nodes.get(parsed.id)
        if record is None and self.load_node is not None:
            # Several servers: a node that just joined through another server may say hello here
            # before that server's notification did; read its row (StoreUnavailable: try again).
            await self.load_node(parsed.id)
            record = self.fleet.nodes.get(parsed.id)
        if record is None:
            raise AuthError("unknown node credential (was this node removed? join it again)")
        if not secret_matches(parsed.secret, record.credential_hash):
            raise AuthError("invalid node credential")
        return record
