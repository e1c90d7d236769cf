"""Opening a listening socket, with a failure told in one line a user can act on.

`vectorlay server`, `proxy` and `dev` all listen; a port already taken must not end in a page of
traceback. The role names what the address is for (`purpose`); the command that started it knows
which flag changes it, and adds that (see `ListenError.with_flag`).
"""

from __future__ import annotations

import errno

import trio

from vectorlay.errors import ListenError

_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "that address does not belong to this machine",
}


def describe(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_listeners(host: str, port: int, purpose: str) -> list[trio.SocketListener]:
    """trio.open_tcp_listeners, raising ListenError (a UserError) instead of OSError."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as error:
        reason = _REASONS.get(error.errno or 0) or (error.strerror or str(error))
        raise ListenError(describe(host, port), purpose, reason) from None
