"""Token format and hashing. Tokens are `<id>.<secret>`; only a hash of the secret is stored.

Secrets are 160+ bits of randomness, so a single SHA-256 is enough (no password stretching).
Randomness is passed in by the caller to keep this module pure.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import string
from dataclasses import dataclass

ID_ALPHABET = string.ascii_lowercase + string.digits
_TOKEN = re.compile(r"^([a-z0-9][a-z0-9-]{2,62})\.([A-Za-z0-9_-]{16,128})$")


@dataclass(frozen=True)
class ParsedToken:
    id: str
    secret: str


def parse_token(text: str) -> ParsedToken | None:
    match = _TOKEN.match(text.strip())
    if match is None:
        return None
    return ParsedToken(match.group(1), match.group(2))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def format_token(token_id: str, secret: str) -> str:
    return f"{token_id}.{secret}"
