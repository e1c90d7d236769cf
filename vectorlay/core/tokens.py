"""Token format and hashing. Tokens are `<id>.<secret>`; only a hash of the secret is stored.
Endpoint API keys are hashed here too (`hash_api_key`), for the server and the proxies alike.

When the server runs TLS, every token it issues also carries the SHA-256 of its CA's public key:
`vl1.<pin>.<id>.<secret>`. A client checks the server's certificate against that pin before it
sends the token, so a node cannot be talked into joining an impostor (kubeadm's discovery hash).

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
_TOKEN = re.compile(r"(?:vl1\.([0-9a-f]{64})\.)?([a-z0-9][a-z0-9-]{2,62})\.([A-Za-z0-9_-]{16,128})")


@dataclass(frozen=True)
class ParsedToken:
    id: str
    secret: str
    pin: str | None = None  # SHA-256 (hex) of the issuing server's CA public key


def parse_token(text: str) -> ParsedToken | None:
    match = _TOKEN.fullmatch(text.strip())
    if match is None:
        return None
    return ParsedToken(match.group(2), match.group(3), match.group(1))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def hash_api_key(key: str | bytes) -> str:
    """The hash of an endpoint API key that the server stores and sends to proxies, and that a
    proxy compares with the hash of the key a request presents: SHA-256 (hex) of the whole key."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def format_token(token_id: str, secret: str, pin: str | None = None) -> str:
    return f"vl1.{pin}.{token_id}.{secret}" if pin else f"{token_id}.{secret}"


def token_pin(text: str) -> str | None:
    parsed = parse_token(text)
    return parsed.pin if parsed else None
