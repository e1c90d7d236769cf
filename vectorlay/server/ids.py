"""Random identifiers the server hands out (tokens, nodes, replicas, API keys)."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_lowercase + string.digits


def random_id(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_replica_id(cluster_name: str) -> str:
    return f"{cluster_name}-{random_id(5)}"
