"""The proxy's tunnel hub and the node's tunnels together, in-process over real loopback TLS.

The tunnel CA is a real one (`server/tunnel_ca.py`) in a temporary directory; replicas are real
HTTP servers on loopback; requests go through the proxy's real request path. What is checked:
routing follows tunnels, a node is reached only through its own tunnel and serves only its own
replicas, credentials are checked on every tunnel, and a node that restarts or renews its
certificate keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from test_proxy_http import FakeReplica, request

from vectorlay.core.protocol import (
    TUNNEL,
    AdmittedNodes,
    Endpoint,
    Route,
    RouteSnapshot,
    RouteUpdate,
    TunnelCredential,
    TunnelProxies,
    TunnelProxy,
)
from vectorlay.errors import TunnelError
from vectorlay.lifecycle import CleanStop
from vectorlay.node.tunnels import NodeTunnels
from vectorlay.proxy.http import Proxy
from vectorlay.proxy.routing import RouteTable
from vectorlay.proxy.tunnels import TunnelHub
from vectorlay.server.tunnel_ca import NODE_CERT_VALID_S, TunnelCa
from vectorlay.tunnel import StreamRefused, TunnelLimits


@dataclass
class Ports:
    """What a node runs now: replica id -> its loopback port."""

    ports: dict[str, int] = field(default_factory=dict)

    def local_address(self, replica_id: str) -> tuple[str, int] | None:
        port = self.ports.get(replica_id)
        return ("127.0.0.1", port) if port is not None else None


@dataclass
class Edge:
    ca: TunnelCa
    hub: TunnelHub
    proxy: Proxy
    table: RouteTable
    nursery: trio.Nursery
    nodes: dict[str, tuple[NodeTunnels, trio.CancelScope]] = field(default_factory=dict)

    def credential(self, node_id: str, tunnels: NodeTunnels, now: float | None = None,
                   ca: TunnelCa | None = None) -> TunnelCredential:
        signer = ca or self.ca
        issued_at = time.time() if now is None else now
        certificate = signer.issue_node(signer.requested_key(tunnels.csr), node_id, issued_at)
        return TunnelCredential(certificate, self.ca.pem, issued_at + NODE_CERT_VALID_S)

    async def start_node(self, node_id: str, ports: Ports,
                         credential: Callable[[NodeTunnels], TunnelCredential] | None = None,
                         clean_stop: CleanStop | None = None) -> NodeTunnels:
        tunnels = NodeTunnels(node_id, ports, clean_stop=clean_stop)
        tunnels.set_credential(credential(tunnels) if credential else self.credential(node_id, tunnels))
        tunnels.set_proxies(TunnelProxies((TunnelProxy(self.hub.proxy_id, self.hub.address),)))
        scope = trio.CancelScope()
        self.nodes[node_id] = (tunnels, scope)

        async def run() -> None:
            with scope:
                await tunnels.run()

        self.nursery.start_soon(run)
        return tunnels

    def stop_node(self, node_id: str) -> None:
        self.nodes.pop(node_id)[1].cancel()

    async def client(self, *args: object, **kwargs: object) -> tuple[int, dict[bytes, bytes], bytes]:
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.proxy.handle_connection, theirs, "192.0.2.7")
        try:
            return await request(ours, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            await ours.aclose()


@asynccontextmanager
async def edge(tmp_path: Path, admitted: tuple[str, ...] = ("n-1", "n-2"),
               limits: TunnelLimits = TunnelLimits()) -> AsyncIterator[Edge]:
    ca = TunnelCa.in_state_dir(tmp_path)
    table = RouteTable()
    hub = TunnelHub(table, limits=limits, restart_grace_s=10.0)
    proxy = Proxy(table, "localhost", tunnels=hub)
    hub.attach(proxy)
    certificate = ca.issue_proxy(ca.requested_key(hub.csr), hub.proxy_id, time.time())
    hub.set_credential(TunnelCredential(certificate, ca.pem, time.time() + 3600))
    hub.admit(AdmittedNodes(admitted, snapshot=True))
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        hub.address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        await nursery.start(hub.serve, listeners)
        yield Edge(ca, hub, proxy, table, nursery)
        nursery.cancel_scope.cancel()


async def serve_replica(nursery: trio.Nursery, replica: FakeReplica) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, replica.serve, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def tunnel_endpoint(replica_id: str, node_id: str) -> Endpoint:
    # The address is not where the replica listens: tunnel endpoints are never dialled directly.
    return Endpoint(replica_id, "127.0.0.1:9", node_id, node_id, TUNNEL)


async def until(predicate: object, timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.01)


async def test_requests_reach_each_replica_through_its_own_nodes_tunnel(tmp_path: Path) -> None:
    async with edge(tmp_path) as e:
        r1, r2 = FakeReplica("r1"), FakeReplica("r2")
        n1 = await e.start_node("n-1", Ports({"r1": await serve_replica(e.nursery, r1)}))
        n2 = await e.start_node("n-2", Ports({"r2": await serve_replica(e.nursery, r2)}))
        e.table.load_snapshot(RouteSnapshot(1, (Route("echo", (tunnel_endpoint("r1", "n-1"),
                                                                tunnel_endpoint("r2", "n-2"))),)))
        await until(lambda: e.table.reachable == {"n-1", "n-2"})
        bodies = set()
        for _ in range(20):
            status, _, body = await e.client()
            assert status == 200
            bodies.add(body)
        assert bodies == {b"r1", b"r2"}
        assert r1.requests + r2.requests == 20
        assert n1.connected == n2.connected == 1
        metrics = e.proxy.metrics.render().decode()
        assert "vectorlay_proxy_tunnels 2" in metrics
        assert "vectorlay_proxy_tunnels_accepted_total 2" in metrics
        assert e.hub.streams_total >= 2 and e.hub.bytes_out > 0 and e.hub.bytes_in > 0


async def test_a_node_serves_only_the_replicas_it_runs(tmp_path: Path) -> None:
    async with edge(tmp_path) as e:
        await e.start_node("n-1", Ports({"r1": await serve_replica(e.nursery, FakeReplica("r1"))}))
        await e.start_node("n-2", Ports({"r2": await serve_replica(e.nursery, FakeReplica("r2"))}))
        await until(lambda: len(e.hub.tunnels) == 2)
        with pytest.raises(StreamRefused, match="status 404"):
            await e.hub.open_stream("n-1", "r2")  # r2 runs on n-2: n-1 refuses it
        with pytest.raises(TunnelError, match="no tunnel from node n-9"):
            await e.hub.open_stream("n-9", "r1")
        # A route saying r1 is on n-2 (stale, or a lie) never reaches r1: n-2 refuses it.
        e.table.load_snapshot(RouteSnapshot(1, (Route("echo", (tunnel_endpoint("r1", "n-2"),)),)))
        status, _, body = await e.client()
        assert status == 502 and b"refused a stream to r1 (status 404)" in body


async def test_tunnel_endpoints_are_routable_only_while_their_tunnel_is_up(tmp_path: Path) -> None:
    async with edge(tmp_path) as e:
        e.table.load_snapshot(RouteSnapshot(1, (Route("echo", (tunnel_endpoint("r1", "n-1"),)),)))
        status, _, body = await e.client()
        assert status == 503 and b"no ready replica" in body  # no tunnel yet: nothing to route to
        await e.start_node("n-1", Ports({"r1": await serve_replica(e.nursery, FakeReplica("r1"))}))
        await until(lambda: "n-1" in e.table.reachable)
        assert (await e.client())[0] == 200
        # The tunnel drops (closed under it, no drain): out of routing at once...
        e.hub.tunnels["n-1"].close("test: the link died")
        await until(lambda: "n-1" not in e.table.reachable, 1)
        assert (await e.client())[0] == 503
        # ...and back once the node has dialled again (it reconnects with backoff on its own).
        await until(lambda: "n-1" in e.table.reachable)
        assert (await e.client())[0] == 200


async def test_requests_waiting_on_a_dropped_tunnel_are_retried_elsewhere(tmp_path: Path) -> None:
    async with edge(tmp_path) as e:
        slow, fast = FakeReplica("slow", delay_s=30), FakeReplica("fast")
        await e.start_node("n-1", Ports({"r1": await serve_replica(e.nursery, slow)}))
        await e.start_node("n-2", Ports({"r2": await serve_replica(e.nursery, fast)}))
        await until(lambda: len(e.hub.tunnels) == 2)
        e.table.load_snapshot(RouteSnapshot(1, (Route("echo", (tunnel_endpoint("r1", "n-1"),)),)))
        results: list[tuple[int, bytes]] = []

        async def one() -> None:
            status, _, body = await e.client()
            results.append((status, body))

        e.nursery.start_soon(one)
        await until(lambda: slow.requests == 1)  # the request is at the slow replica, waiting
        e.table.apply(RouteUpdate(2, Route("echo", (tunnel_endpoint("r1", "n-1"), tunnel_endpoint("r2", "n-2")))))
        e.hub.tunnels["n-1"].close("test: the link died")
        await until(lambda: bool(results))
        assert results == [(200, b"fast")]  # the client never saw the failure


async def test_a_node_not_admitted_gets_no_tunnel_and_a_removed_one_is_dropped(tmp_path: Path) -> None:
    async with edge(tmp_path, admitted=("n-1",)) as e:
        await e.start_node("n-1", Ports({"r1": await serve_replica(e.nursery, FakeReplica("r1"))}))
        intruder = await e.start_node("n-3", Ports({"r3": await serve_replica(e.nursery, FakeReplica("r3"))}))
        e.table.load_snapshot(RouteSnapshot(1, (Route("echo", (tunnel_endpoint("r1", "n-1"),
                                                                tunnel_endpoint("r3", "n-3"))),)))
        await until(lambda: "n-1" in e.hub.tunnels and e.hub.refused >= 1)
        assert "n-3" not in e.hub.tunnels and intruder.connected == 0
        for _ in range(10):
            status, _, body = await e.client()
            assert (status, body) == (200, b"r1")  # never r3: its node has no route
        e.hub.admit(AdmittedNodes(removed=("n-1",)))  # the server removed n-1
        assert "n-1" not in e.hub.tunnels and "n-1" not in e.table.reachable
        assert (await e.client())[0] == 503
        await trio.sleep(1.5)  # it keeps dialling; it keeps being refused
        assert "n-1" not in e.hub.tunnels


@pytest.mark.parametrize(("bad", "reason"), [
    ("other CA", "certificate signature failure"),
    ("expired", "certificate has expired"),
    ("proxy certificate", "unsuitable certificate purpose"),  # a valid certificate, but not a node's
])
async def test_a_tunnel_with_a_bad_credential_is_refused(tmp_path: Path, bad: str, reason: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    async with edge(tmp_path) as e:
        other = TunnelCa.in_state_dir(tmp_path / "other")

        def credential(tunnels: NodeTunnels) -> TunnelCredential:
            if bad == "other CA":
                return e.credential("n-1", tunnels, ca=other)
            if bad == "expired":
                return e.credential("n-1", tunnels, now=time.time() - 2 * NODE_CERT_VALID_S)
            certificate = e.ca.issue_proxy(e.ca.requested_key(tunnels.csr), "n-1", time.time())
            return TunnelCredential(certificate, e.ca.pem, time.time() + 3600)

        await e.start_node("n-1", Ports(), credential)
        await until(lambda: e.hub.refused >= 2)
        assert e.hub.tunnels == {} and e.hub.accepted == 0
    assert f"refused: TLS failed ([SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {reason}" in caplog.text


async def test_a_restarting_node_keeps_its_routes_and_requests_wait_for_it(tmp_path: Path) -> None:
    async with edge(tmp_path) as e:
        replica = FakeReplica("r1")
        ports = Ports({"r1": await serve_replica(e.nursery, replica)})
        await e.start_node("n-1", ports)
        e.table.load_snapshot(RouteSnapshot(1, (Route("echo", (tunnel_endpoint("r1", "n-1"),)),)))
        await until(lambda: "n-1" in e.table.reachable)
        assert (await e.client())[0] == 200
        e.stop_node("n-1")  # the agent stops: `drain restart`, then its tunnel closes
        await until(lambda: "n-1" not in e.hub.tunnels)
        assert "n-1" in e.table.reachable and "n-1" in e.hub.restarting
        results: list[int] = []

        async def one() -> None:
            results.append((await e.client())[0])

        e.nursery.start_soon(one)
        await trio.sleep(0.5)
        assert results == []  # waiting for the node, not failing
        await e.start_node("n-1", ports)  # the new agent
        await until(lambda: bool(results))
        assert results == [200]


async def test_a_restarting_node_that_does_not_come_back_leaves_routing(tmp_path: Path) -> None:
    async with edge(tmp_path) as e:
        # Long enough that the request below starts inside the grace on a loaded machine too
        # (one that starts after it finds no replica at all: a 503, not this test's case).
        e.hub.restart_grace_s = 3.0
        await e.start_node("n-1", Ports({"r1": await serve_replica(e.nursery, FakeReplica("r1"))}))
        e.table.load_snapshot(RouteSnapshot(1, (Route("echo", (tunnel_endpoint("r1", "n-1"),)),)))
        await until(lambda: "n-1" in e.table.reachable)
        e.stop_node("n-1")
        await until(lambda: "n-1" not in e.hub.tunnels)
        status, _, _ = await e.client()
        assert status == 502  # it waited for the grace, then gave up on the node
        await until(lambda: "n-1" not in e.table.reachable, 5)


async def test_a_renewed_certificate_replaces_the_tunnel_without_leaving_routing(tmp_path: Path) -> None:
    async with edge(tmp_path) as e:
        # Its first certificate expires in five minutes: time to move to the renewed one at once.
        ports = Ports({"r1": await serve_replica(e.nursery, FakeReplica("r1"))})
        tunnels = await e.start_node("n-1", ports, lambda t: e.credential("n-1", t, now=time.time() - 3300))
        e.table.load_snapshot(RouteSnapshot(1, (Route("echo", (tunnel_endpoint("r1", "n-1"),)),)))
        await until(lambda: "n-1" in e.table.reachable)
        first = e.hub.tunnels["n-1"]
        left: list[str] = []
        e.table.on_endpoint_removed.append(lambda endpoint: left.append(endpoint.replica_id))
        tunnels.set_credential(e.credential("n-1", tunnels))  # what the server sends at half-life
        await until(lambda: e.hub.tunnels["n-1"] is not first)
        await until(lambda: first.closing)  # the old one drained (nothing in flight) and closed
        assert left == [] and "n-1" in e.table.reachable and e.hub.accepted == 2
        assert (await e.client())[0] == 200


async def test_a_certificate_far_from_expiry_keeps_its_tunnel(tmp_path: Path) -> None:
    """Every hello brings a fresh certificate; a tunnel moves to it only near its own expiry."""
    async with edge(tmp_path) as e:
        tunnels = await e.start_node("n-1", Ports())
        await until(lambda: "n-1" in e.hub.tunnels)
        tunnels.set_credential(e.credential("n-1", tunnels))
        await trio.sleep(1)
        assert e.hub.accepted == 1


async def test_a_client_that_stops_reading_makes_the_node_stop_reading_its_replica(tmp_path: Path) -> None:
    produced = 0

    async def firehose(stream: trio.SocketStream) -> None:
        nonlocal produced
        chunk = b"x" * 65536
        try:
            while True:
                await stream.send_all(chunk)
                produced += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with edge(tmp_path) as e:
        listeners = await e.nursery.start(partial(trio.serve_tcp, firehose, 0, host="127.0.0.1"))
        await e.start_node("n-1", Ports({"f": listeners[0].socket.getsockname()[1]}))
        await until(lambda: "n-1" in e.hub.tunnels)
        stream = await e.hub.open_stream("n-1", "f")  # and never read
        await trio.sleep(1.0)
        stalled_at = produced
        await trio.sleep(1.0)
        assert produced == stalled_at  # the replica is blocked, nobody buffers more
        # What was produced sits in the stream window and the kernels' socket buffers, not in
        # memory that grows: far below what two seconds of loopback would carry (gigabytes).
        assert produced < 64 * 1024 * 1024
        assert sum(len(c) for c in e.hub.tunnels["n-1"].streams[stream.stream_id].chunks) <= 256 * 1024
        got = 0
        while got < 1024 * 1024:
            got += len(await stream.receive_some(65536))
        await until(lambda: produced > stalled_at)  # reading lets it go on
        await stream.aclose()


async def test_a_replaced_tunnel_is_closed_once_its_streams_are_done(tmp_path: Path) -> None:
    """A second tunnel for the same node (its key in another program, or an agent that restarted
    without closing its old one) becomes the current one; the old one is closed when idle."""
    async with edge(tmp_path) as e:
        await e.start_node("n-1", Ports({"r1": await serve_replica(e.nursery, FakeReplica("r1", delay_s=1))}))
        await until(lambda: "n-1" in e.hub.tunnels)
        first = e.hub.tunnels["n-1"]
        busy = await e.hub.open_stream("n-1", "r1")  # a stream in flight on it
        second = NodeTunnels("n-1", Ports())
        second.set_credential(e.credential("n-1", second))
        second.set_proxies(TunnelProxies((TunnelProxy(e.hub.proxy_id, e.hub.address),)))
        e.nursery.start_soon(second.run)
        await until(lambda: e.hub.tunnels.get("n-1") not in (None, first))
        await trio.sleep(0.5)
        assert not first.closing  # it still carries a stream
        await busy.aclose()
        await until(lambda: first.closing)
        assert first.close_reason == "replaced by a newer tunnel from the same node"


async def test_an_agent_dying_of_an_error_leaves_routing_at_once(tmp_path: Path) -> None:
    """Only a clean stop (a signal) says `drain restart`; any other end of the agent closes its
    tunnels without a word, and the proxy stops routing to it at once."""
    async with edge(tmp_path) as e:
        clean_stop = CleanStop()  # never requested: the agent ends for another reason
        await e.start_node("n-1", Ports({"r1": await serve_replica(e.nursery, FakeReplica("r1"))}),
                           clean_stop=clean_stop)
        e.table.load_snapshot(RouteSnapshot(1, (Route("echo", (tunnel_endpoint("r1", "n-1"),)),)))
        await until(lambda: "n-1" in e.table.reachable)
        e.stop_node("n-1")
        await until(lambda: "n-1" not in e.hub.tunnels)
        assert "n-1" not in e.hub.restarting and "n-1" not in e.table.reachable
        assert (await e.client())[0] == 503
