"""Header rewriting at the edge: hop-by-hop headers out, forwarding headers in, request ids."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence

import h11

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-connection",
})
# Set by the proxy: a client's own values are replaced (X-Forwarded-For is extended instead).
_SET_BY_US = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"})
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
# Fresh ids are a random per-process prefix and a counter: unique, 32 hex digits like a UUID, and
# far cheaper than a uuid4 per request.
_ID_PREFIX = os.urandom(8).hex().encode()
_ID_COUNTER = itertools.count(1)


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes:
    """The first value of `name` (lower case), or b""."""
    for key, value in headers:
        if key == name:
            return bytes(value)
    return b""


def head_size(request: h11.Request) -> int:
    """About the size of the request line and headers as they came on the wire."""
    size = len(request.method) + len(request.target) + 12
    for key, value in request.headers:
        size += len(key) + len(value) + 4
    return size


def _dropped(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Hop-by-hop headers, including any the Connection header names."""
    named = [v for k, v in headers if k == b"connection"]
    if not named:
        return HOP_BY_HOP
    extra = {token.strip().lower() for value in named for token in value.split(b",")}
    return HOP_BY_HOP | extra


def request_id(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The client's X-Request-Id if it is a sane token, else a fresh one (never echo junk)."""
    given = header(headers, b"x-request-id")
    if given and _REQUEST_ID.match(given):
        return given
    return b"%s%016x" % (_ID_PREFIX, next(_ID_COUNTER))


def upstream_request_headers(headers: Sequence[tuple[bytes, bytes]], peer: str, scheme: str, rid: bytes,
                             strip_authorization: bool) -> Headers:
    dropped = _dropped(headers)
    out = [(k, v) for k, v in headers
           if k not in dropped and k not in _SET_BY_US and not (strip_authorization and k == b"authorization")]
    forwarded_for = b", ".join(v for k, v in headers if k == b"x-forwarded-for")
    address = peer.encode()
    out.append((b"x-forwarded-for", forwarded_for + b", " + address if forwarded_for else address))
    out.append((b"x-forwarded-proto", scheme.encode()))
    out.append((b"x-request-id", rid))
    return out


def is_chunked(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(k == b"transfer-encoding" for k, _ in headers)


def set_body_framing(headers: Headers, length: int | None, had_body: bool) -> None:
    """Frame the body we send upstream: its exact length when it is all buffered, else the
    client's Content-Length if it gave one, else chunked (h11 would otherwise send no body)."""
    if length is not None:
        headers[:] = [(k, v) for k, v in headers if k != b"content-length"]
        if had_body:
            headers.append((b"content-length", str(length).encode()))
    elif not any(k == b"content-length" for k, _ in headers):
        headers.append((b"transfer-encoding", b"chunked"))


def client_response_headers(headers: Sequence[tuple[bytes, bytes]], rid: bytes, close: bool) -> Headers:
    dropped = _dropped(headers)
    out = [(k, v) for k, v in headers if k not in dropped and k != b"x-request-id"]
    out.append((b"x-request-id", rid))
    if close:
        out.append((b"connection", b"close"))
    return out
