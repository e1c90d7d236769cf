"""Endpoint API keys: `Authorization: Bearer <key>`, checked against the hashes the server pushes.

The proxy never sees the keys themselves, only digests of valid ones (`core/tokens.py::hash_api_key`).
Keys are long random secrets, so looking the digest up in a set leaks nothing useful through timing.
"""

from __future__ import annotations

from dataclasses import dataclass

from vectorlay.core.tokens import hash_api_key

NONE = "none"
API_KEY = "api-key"
MAX_KEY_BYTES = 512


@dataclass(frozen=True)
class AuthResult:
    allowed: bool
    key_hash: str | None = None  # who the client is, for per-client rate limits
    problem: str = ""


_OPEN = AuthResult(True)  # made once: most endpoints are open, and this is per request


def bearer_token(authorization: bytes) -> bytes | None:
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token or len(token) > MAX_KEY_BYTES:
        return None
    return token


def authorize(mode: str, key_hashes: frozenset[str], authorization: bytes) -> AuthResult:
    """Check one request's Authorization header against a cluster's endpoint settings."""
    if mode == NONE:
        return _OPEN
    if mode != API_KEY:
        # A mode this proxy does not know (a newer server): refuse rather than serve unguarded.
        return AuthResult(False, problem=f"this proxy does not support the endpoint's auth mode {mode!r}")
    if not authorization:
        return AuthResult(False, problem="this endpoint needs an API key: Authorization: Bearer <key>")
    token = bearer_token(authorization)
    if token is None:
        return AuthResult(False, problem="malformed Authorization header: expected Bearer <key>")
    digest = hash_api_key(token)
    if digest not in key_hashes:
        return AuthResult(False, problem="invalid or revoked API key")
    return AuthResult(True, key_hash=digest)
