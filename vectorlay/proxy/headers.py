"""Header rewriting at the edge: hop-by-hop headers out, forwarding headers in, request ids."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence

from vectorlay.proxy.codec import Headers

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-connection",
})
# Set by the proxy: a client's own values are replaced (X-Forwarded-For is extended instead).
_SET_BY_US = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"})
_NOT_FORWARDED = HOP_BY_HOP | _SET_BY_US | {b"content-length"}
_NOT_FORWARDED_WITH_AUTH = _NOT_FORWARDED | {b"authorization"}  # a key for the proxy, not the replica
_NOT_RETURNED = HOP_BY_HOP | {b"x-request-id"}
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})  # name no extra hop-by-hop header
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
# Fresh ids are a random per-process prefix and a counter: unique, 32 hex digits like a UUID, and
# far cheaper than a uuid4 per request.
_ID_PREFIX = os.urandom(8).hex().encode()
_ID_COUNTER = itertools.count(1)


def first_values(headers: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Each header's first value by name (lower case), built in one pass in C: the proxy looks up
    several headers of every request, and a Python loop over the list per lookup costs more."""
    return dict(reversed(headers))


def _dropped(headers: Sequence[tuple[bytes, bytes]], base: frozenset[bytes],
             named: dict[bytes, bytes]) -> frozenset[bytes]:
    """`base` (hop-by-hop headers and more), plus any header the Connection header names.
    `named` is first_values(headers): when no name repeats it holds every value."""
    connection = named.get(b"connection")
    if connection is None:
        return base
    if len(named) == len(headers):  # a single Connection header, usually `keep-alive` or `close`
        if connection.lower() in _PLAIN_CONNECTION:
            return base
        values = [connection]
    else:
        values = [v for k, v in headers if k == b"connection"]
    extra = {token.strip().lower() for value in values for token in value.split(b",")}
    return base if extra <= base else base | extra


def request_id(named: dict[bytes, bytes]) -> bytes:
    """The client's X-Request-Id if it is a sane token, else a fresh one (never echo junk).
    `named` is first_values() of the request's headers."""
    given = named.get(b"x-request-id")
    if given and _REQUEST_ID.match(given):
        return given
    return b"%s%016x" % (_ID_PREFIX, next(_ID_COUNTER))


def upstream_request_headers(headers: Sequence[tuple[bytes, bytes]], peer: bytes, scheme: bytes, rid: bytes,
                             strip_authorization: bool, named: dict[bytes, bytes] | None = None) -> Headers:
    """The client's headers as sent to the replica, less the body's framing (add_body_framing sets it).
    `named` is first_values(headers), if the caller has it."""
    if named is None:
        named = first_values(headers)
    dropped = _dropped(headers, _NOT_FORWARDED_WITH_AUTH if strip_authorization else _NOT_FORWARDED, named)
    out = [(k, v) for k, v in headers if k not in dropped]
    if b"x-forwarded-for" in named:
        forwarded_for = b", ".join([v for k, v in headers if k == b"x-forwarded-for"])
        out.append((b"x-forwarded-for", forwarded_for + b", " + peer))
    else:
        out.append((b"x-forwarded-for", peer))
    out.append((b"x-forwarded-proto", scheme))
    out.append((b"x-request-id", rid))
    return out


def add_body_framing(headers: Headers, length: int | None, declared: bytes, had_body: bool) -> None:
    """Frame the body we send upstream: its exact `length` when it is all buffered (none for no
    body), else the client's Content-Length (`declared`) if it gave one, else chunked."""
    if length is not None:
        if had_body:
            headers.append((b"content-length", b"%d" % length))
    elif declared:
        headers.append((b"content-length", declared))
    else:
        headers.append((b"transfer-encoding", b"chunked"))


def client_response_headers(headers: Sequence[tuple[bytes, bytes]], rid: bytes,
                            named: dict[bytes, bytes] | None = None) -> Headers:
    """The replica's headers less hop-by-hop ones (the codec frames the body and says close).
    `named` is first_values(headers), if the caller has it."""
    if named is None:
        named = first_values(headers)
    dropped = _dropped(headers, _NOT_RETURNED, named)
    out = [(k, v) for k, v in headers if k not in dropped]
    out.append((b"x-request-id", rid))
    return out
