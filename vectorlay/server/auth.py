"""Who is on the other end: join tokens, admin/proxy tokens and node credentials."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from vectorlay.core.model import Role
from vectorlay.core.tokens import format_token, hash_secret, parse_token, secret_matches
from vectorlay.errors import AuthError
from vectorlay.server.fleet import Fleet
from vectorlay.server.records import NodeRecord, TokenRecord
from vectorlay.server.store import Store, ops

TOKEN_ID_LENGTH = 6


def new_secret() -> str:
    return secrets.token_urlsafe(24)


class Authenticator:
    def __init__(self, store: Store, fleet: Fleet, wall_clock: Callable[[], float]) -> None:
        self.store = store
        self.fleet = fleet
        self.wall_clock = wall_clock

    async def create_token(self, role: Role, ttl_s: float | None, uses: int | None = None,
                           description: str = "") -> str:
        from vectorlay.server.controller import random_id

        secret = new_secret()
        now = self.wall_clock()
        record = TokenRecord(random_id(TOKEN_ID_LENGTH), hash_secret(secret), role, now,
                             now + ttl_s if ttl_s else None, uses, False, description)
        await self.store.apply([ops.PutToken(record)])
        return format_token(record.id, secret)

    async def check_token(self, text: str, roles: frozenset[Role], spend_use: bool = False) -> TokenRecord:
        """The token's record if it is valid for one of `roles`; AuthError with the reason if not."""
        parsed = parse_token(text)
        if parsed is None:
            raise AuthError("malformed token: expected <id>.<secret>")
        record = await self.store.get_token(parsed.id)
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

    def check_node_credential(self, text: str) -> NodeRecord:
        parsed = parse_token(text)
        if parsed is None:
            raise AuthError("malformed node credential")
        record = self.fleet.nodes.get(parsed.id)
        if record is None:
            raise AuthError("unknown node credential (was this node removed? join it again)")
        if not secret_matches(parsed.secret, record.credential_hash):
            raise AuthError("invalid node credential")
        return record
