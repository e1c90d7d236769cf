"""The request target and Host as the proxy routes by them, the same for both parsers (RFC 9112 §3.2).

A request carries one Host header; two are a 400 (they could name two different clusters, and the
proxy and the replica might each believe another). A target in absolute form (`GET
http://a.localhost/x HTTP/1.1`, as sent to a forward proxy) names the host itself: its authority
wins over any Host header, and the request goes on in origin form (`GET /x`, `Host: a.localhost`),
which is what a replica expects.
"""

from __future__ import annotations

from vectorlay.proxy.codec.events import Headers, RemoteProtocolError

_SCHEMES = (b"http://", b"https://")


def is_absolute(target: bytes) -> bool:
    return not target.startswith(b"/") and target[:8].lower().startswith(_SCHEMES)


def origin_form(target: bytes, headers: Headers) -> tuple[bytes, Headers]:
    """An absolute-form target as (origin-form target, headers with Host set to its authority)."""
    rest = target.split(b"://", 1)[1]
    slash = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    authority, path = rest[:slash], rest[slash:]
    authority = authority.rsplit(b"@", 1)[-1]  # userinfo is not part of the host
    if not authority:
        raise RemoteProtocolError("the request target names no host")
    if not path.startswith(b"/"):
        path = b"/" + path  # `http://host` or `http://host?q` has the path `/`
    return path, [(b"host", authority), *((k, v) for k, v in headers if k != b"host")]
