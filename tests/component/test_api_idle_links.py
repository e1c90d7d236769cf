"""CLI links that go idle are closed, as links that never say hello are; a call in flight (a
streaming one included) keeps its link open for as long as it runs. The real server in-process,
real WebSockets on loopback, a short idle timeout."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vectorlay.client.api import Done, open_api
from vectorlay.core import api as calls
from vectorlay.errors import PeerError
from vectorlay.server.app import ServerConfig, run_server

IDLE_S = 0.5
MANIFEST = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata: {name: pending}
spec:
  runtime: process
  command: ["serve"]
  gpu: {type: "RTX 4090", count: 1}
"""


async def test_an_idle_api_link_is_closed_and_a_call_in_flight_keeps_it_open(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_server, ServerConfig(tmp_path / "server", port=0,
                                                                  api_idle_timeout_s=IDLE_S))
            url = f"ws://127.0.0.1:{server.port}"
            async with open_api(url, server.admin_token) as api:
                applied = await api.call(calls.Apply(MANIFEST))
                keys = tuple(change.cluster for change in applied.changes)
                # A wait four times the idle timeout (no node has the GPU, so it runs to its end).
                started = trio.current_time()
                results = [item.response async for item in api.stream(calls.WaitReady(keys, 4 * IDLE_S))
                           if isinstance(item, Done)]
                assert trio.current_time() - started >= 4 * IDLE_S
                assert results[0].ready is False and [c.name for c in results[0].clusters] == ["pending"]
                assert await api.call(calls.WhoAmI()) is not None  # still open, and calls keep working
                await trio.sleep(4 * IDLE_S)  # now idle
                with pytest.raises(PeerError, match=r"closed the connection: idle for 0\.5s with no call in flight"):
                    await api.call(calls.WhoAmI())
            nursery.cancel_scope.cancel()
