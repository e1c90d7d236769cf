"""HTTP health probes of a replica, with h11 over a trio socket.

A failed probe's reason is shown to the user as the replica's reason, so it says what the
replica did ("refused the connection", "closed the connection before answering", "answered with
invalid HTTP", "timed out after 1s"), never a library's internal state.
"""

from __future__ import annotations

import errno

import h11
import trio

READ_SIZE = 4096


async def http_probe(host: str, port: int, path: str, timeout_s: float) -> tuple[bool, str]:
    """GET `path`: ok on 2xx or 3xx. Returns (ok, a short reason for the failure)."""
    with trio.move_on_after(timeout_s):
        return await _probe(host, port, path)
    return False, f"GET {path} timed out after {timeout_s:g}s"


async def _probe(host: str, port: int, path: str) -> tuple[bool, str]:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as error:
        cause = _connect_cause(error)
        if isinstance(cause, ConnectionRefusedError):
            return False, f"refused the connection (nothing listens on port {port} yet)"
        return False, f"connecting to port {port} failed: {cause.strerror or cause}"
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=path,
                              headers=[("Host", f"{host}:{port}"), ("Connection", "close"),
                                       ("User-Agent", "vectorlay-probe")])
        received = 0
        try:
            await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(READ_SIZE)
                    received += len(data)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    if 200 <= event.status_code < 400:
                        return True, ""
                    return False, f"GET {path} answered {event.status_code}"
                if isinstance(event, h11.ConnectionClosed):
                    return False, f"GET {path}: closed the connection before answering"
        except (OSError, trio.BrokenResourceError) as error:
            failure: BaseException = error.__cause__ if isinstance(error.__cause__, OSError) else error
            if isinstance(failure, OSError) and failure.errno in (errno.ECONNRESET, errno.EPIPE):
                return False, f"GET {path}: reset the connection before answering"
            return False, f"GET {path}: the connection failed ({getattr(failure, 'strerror', None) or failure})"
        except h11.RemoteProtocolError:
            # h11 says this in its own terms ("can't handle event type ConnectionClosed when
            # role=SERVER and state=SEND_RESPONSE"); what matters is what the replica sent.
            if received == 0:
                return False, f"GET {path}: closed the connection before answering"
            if conn.trailing_data[1]:  # the replica closed before its response head was complete
                return False, f"GET {path}: closed the connection in the middle of its answer"
            return False, f"GET {path}: answered with invalid HTTP"


def _connect_cause(error: OSError) -> OSError:
    """The error of the connection attempt: trio's open_tcp_stream raises its own OSError,
    caused by the attempts' errors (one, or a group of them)."""
    cause = error.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    return cause if isinstance(cause, OSError) else error
