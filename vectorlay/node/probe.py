"""HTTP health probes of a replica, with h11 over a trio socket."""

from __future__ import annotations

import h11
import trio


async def http_probe(host: str, port: int, path: str, timeout_s: float) -> tuple[bool, str]:
    """GET `path`: ok on 2xx or 3xx. Returns (ok, a short reason for the failure)."""
    with trio.move_on_after(timeout_s) as scope:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as error:
            cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
            if isinstance(cause, ConnectionRefusedError):
                return False, f"nothing listening on port {port} yet"
            return False, f"connect to port {port} failed: {cause.strerror or cause}"
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method="GET", target=path,
                                  headers=[("Host", f"{host}:{port}"), ("Connection", "close"),
                                           ("User-Agent", "vectorlay-probe")])
            try:
                await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(4096)
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Response):
                        if 200 <= event.status_code < 400:
                            return True, ""
                        return False, f"GET {path} answered {event.status_code}"
                    if isinstance(event, h11.ConnectionClosed):
                        return False, f"GET {path}: connection closed without a response"
            except (OSError, trio.BrokenResourceError) as error:
                return False, f"GET {path} failed: {error}"
            except h11.RemoteProtocolError as error:
                return False, f"GET {path}: invalid HTTP response ({error})"
    assert scope.cancelled_caught
    return False, f"GET {path} timed out after {timeout_s:g}s"
