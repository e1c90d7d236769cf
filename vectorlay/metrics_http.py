"""Prometheus' text format over HTTP on `--metrics-listen`: one small server for every role.

Scrapes are answered one at a time per connection with h11, within SCRAPE_TIMEOUT_S, and the
connection is closed after the answer: a metrics port needs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import h11
import trio

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT_S = 5.0


async def serve_metrics(render: Callable[[], bytes], listeners: Sequence[trio.SocketListener],
                        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer `GET /metrics` with `render()` on `listeners` until cancelled."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(SCRAPE_TIMEOUT_S):
                await _answer_scrape(stream, render)
        finally:
            await stream.aclose()

    task_status.started()
    await trio.serve_listeners(handle, list(listeners))


async def _answer_scrape(stream: trio.SocketStream, render: Callable[[], bytes]) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(16 * 1024))
                continue
            break
        if not isinstance(event, h11.Request):
            return
        path = event.target.split(b"?", 1)[0]
        if event.method in (b"GET", b"HEAD") and path == b"/metrics":
            status, body, kind = 200, render(), CONTENT_TYPE
        else:
            status, body, kind = 404, b"not found; metrics are at /metrics\n", b"text/plain"
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        data = conn.send(h11.Response(status_code=status, headers=headers))
        if event.method != b"HEAD":
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
