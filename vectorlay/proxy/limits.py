"""The proxy's limits against bad or hostile clients and failing replicas, in one value."""

from __future__ import annotations

import re
from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class ProxyLimits:
    max_header_bytes: int = 16 * KIB  # request line plus headers; more is 431
    max_body_bytes: int = 16 * MIB  # more is 413
    retry_buffer_bytes: int = 1 * MIB  # bodies up to this are buffered so they can be retried
    header_timeout_s: float = 10.0  # from a request's first byte to its last header byte; then 408
    body_timeout_s: float = 30.0  # the most a request body may pause between two reads
    idle_timeout_s: float = 60.0  # a kept-alive client connection with no request
    max_connections: int = 10_000  # client connections at once; at the cap the idlest is closed for a new one
    # From one client address at once; more are answered 503. A tenth of the default cap: one
    # address cannot hold most of the proxy, and a NAT with hundreds of users behind it still fits.
    max_connections_per_client: int = 1_000
    upstream_connect_timeout_s: float = 2.0
    upstream_response_timeout_s: float = 300.0  # for the response head, and between body chunks
    max_attempts: int = 3  # replicas tried for one request
    eject_s: float = 5.0  # first ejection of a failing replica; doubles while it keeps failing
    max_eject_s: float = 60.0
    retry_budget_ratio: float = 0.2  # retries may add this fraction to the requests...
    retry_budget_min_per_s: float = 10.0  # ...or this many per second, whichever is more
    shutdown_grace_s: float = 30.0  # requests in flight get this long to finish on SIGTERM


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?[bB])?\s*$")
_FACTORS = {"": 1, "k": KIB, "m": MIB, "g": 1024 * MIB}


def parse_size(text: str) -> int:
    """`16MiB`, `512k`, `1048576` -> bytes; ValueError with a readable message otherwise."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"expected a size like 16MiB, 512KiB or a number of bytes, got {text!r}")
    return int(float(match.group(1)) * _FACTORS[match.group(2).lower()])
