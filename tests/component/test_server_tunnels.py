"""The server's tunnel service with stand-in sessions and links, on the autojump clock: who gets
which certificate and when, which proxies nodes are told to dial, which nodes proxies admit."""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vectorlay.core.model import Replica, ReplicaState
from vectorlay.core.protocol import (
    PROTOCOL_VERSION,
    AdmittedNodes,
    LogsData,
    LogsEnd,
    Message,
    NodeHello,
    ProxyHello,
    TunnelCredential,
    TunnelProxies,
    TunnelProxy,
)
from vectorlay.errors import ProtocolError
from vectorlay.server.fleet import Fleet
from vectorlay.server.records import NodeRecord
from vectorlay.server.route_feed import ProxyConnection, RouteFeed
from vectorlay.server.signals import Signals
from vectorlay.server.tunnel_ca import NODE_CERT_VALID_S, TunnelCa
from vectorlay.server.tunnels import TunnelService, reachable_address
from vectorlay.tunnel import identity
from vectorlay.wire import Link


@dataclass
class Session:
    sent: list[Message] = field(default_factory=list)

    def send_nowait(self, message: Message) -> None:
        self.sent.append(message)

    def close_soon(self, reason: str, code: int = 1001) -> None:
        raise AssertionError("not expected")

    def open_logs(self, replica_id: str, tail: int, follow: bool,
                  since: float | None = None) -> tuple[int, trio.MemoryReceiveChannel[LogsData | LogsEnd]]:
        raise AssertionError("not expected")

    def close_logs(self, stream_id: int) -> None:
        raise AssertionError("not expected")

    def of(self, kind: type[Any]) -> list[Any]:
        return [m for m in self.sent if isinstance(m, kind)]


class FakeController:
    """The parts of the control plane the tunnel service uses: the fleet and its signals."""

    def __init__(self) -> None:
        self.fleet = Fleet()
        self.signals = Signals()

    def announce(self) -> None:
        self.signals.announce()

    async def routes_marked(self) -> set[str]:
        with trio.move_on_after(1):
            return await self.signals.next_routes()
        return set()


class FakeFeed:
    def __init__(self) -> None:
        self.on_proxy_connected: list[Any] = []
        self.proxies: list[ProxyConnection] = []

    def connect(self, link: Link) -> ProxyConnection:
        proxy = ProxyConnection(link, "")
        for hook in self.on_proxy_connected:
            hook(proxy)
        self.proxies.append(proxy)
        return proxy


@dataclass
class FakeLink:
    remote: str


def queued(proxy: ProxyConnection) -> list[Message]:
    found = []
    while True:
        try:
            found.append(proxy.receive_channel.receive_nowait())
        except trio.WouldBlock:
            return found


def add_node(fleet: Fleet, node_id: str) -> None:
    fleet.put_node(NodeRecord(node_id, node_id, "h", (), "127.0.0.1", ("process",), 0.0, data_plane="tunnel"))


@pytest.fixture
def service(tmp_path: Path) -> tuple[TunnelService, FakeController, FakeFeed]:
    controller, feed = FakeController(), FakeFeed()
    tunnels = TunnelService(TunnelCa.in_state_dir(tmp_path), controller.fleet, controller.signals,
                            cast(RouteFeed, feed), time.time)
    return tunnels, controller, feed


def hello(csr: str) -> NodeHello:
    return NodeHello(PROTOCOL_VERSION, "cred", data_plane="tunnel", tunnel_csr=csr)


def proxy_hello(proxy_id: str, address: str) -> ProxyHello:
    return ProxyHello(PROTOCOL_VERSION, "t", "", proxy_id, address, identity.certificate_request(identity.new_key(), "p"))


def subject(certificate: str) -> tuple[str, str, list[x509.ObjectIdentifier]]:
    cert = x509.load_pem_x509_certificate(certificate.encode())
    unit = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    usage = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    return str(unit), str(name), usage


async def test_a_tunnel_node_gets_a_short_lived_certificate_renewed_while_it_stays(
        service: tuple[TunnelService, FakeController, FakeFeed], autojump_clock: trio.testing.MockClock) -> None:
    tunnels, controller, _ = service
    add_node(controller.fleet, "n-1")
    session = Session()
    key = identity.new_key()
    # The name in the request is ignored: the certificate names the node of the authenticated link.
    request = hello(identity.certificate_request(key, "n-someone-else"))
    async with trio.open_nursery() as nursery:
        await nursery.start(tunnels.run)
        tunnels.node_connected("n-1", session, tunnels.node_key(request), False)
        [credential] = session.of(TunnelCredential)
        assert subject(credential.certificate) == ("node", "n-1", [ExtendedKeyUsageOID.CLIENT_AUTH])
        assert credential.ca == tunnels.ca.pem
        assert credential.expires_at == pytest.approx(time.time() + NODE_CERT_VALID_S, abs=5)
        identity.client_context(credential.certificate, identity.key_pem(key), credential.ca)  # they make a pair
        assert session.of(TunnelProxies) == [TunnelProxies(())]
        await trio.sleep(NODE_CERT_VALID_S * 0.5 + 1)
        assert len(session.of(TunnelCredential)) == 2  # renewed at half-life
        tunnels.node_disconnected("n-1", cast(Any, session))
        await trio.sleep(NODE_CERT_VALID_S)
        assert len(session.of(TunnelCredential)) == 2  # not for a node that left
        nursery.cancel_scope.cancel()


def test_a_certificate_request_the_server_will_not_sign_is_a_protocol_error(
        service: tuple[TunnelService, FakeController, FakeFeed]) -> None:
    tunnels, _, _ = service
    with pytest.raises(ProtocolError, match="not a PEM CSR"):
        tunnels.node_key(hello("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"))
    with pytest.raises(ProtocolError, match="not a PEM CSR"):
        tunnels.proxy_credential(ProxyHello(PROTOCOL_VERSION, "t", "", "p-1", "h:1", "garbage"))
    assert tunnels.node_key(NodeHello(PROTOCOL_VERSION, "cred")) is None  # the direct data plane


async def test_nodes_are_told_the_proxies_to_dial_as_they_come_and_go(
        service: tuple[TunnelService, FakeController, FakeFeed], autojump_clock: trio.testing.MockClock) -> None:
    tunnels, controller, _ = service
    add_node(controller.fleet, "n-1")
    session = Session()
    tunnels.node_connected("n-1", session, identity.new_key().public_key(), False)
    first = proxy_hello("p-a", "0.0.0.0:7443")
    credential = tunnels.proxy_credential(first)
    assert credential is not None
    assert subject(credential.certificate) == ("proxy", "p-a", [ExtendedKeyUsageOID.SERVER_AUTH])
    cert = x509.load_pem_x509_certificate(credential.certificate.encode())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == [identity.proxy_hostname("p-a")]
    with tunnels.proxy_connected(first, cast(Link, FakeLink("203.0.113.9:51234"))):
        # It listens on every address: nodes dial the address it reached us from.
        assert session.of(TunnelProxies)[-1] == TunnelProxies((TunnelProxy("p-a", "203.0.113.9:7443"),))
        with tunnels.proxy_connected(proxy_hello("p-b", "edge.example.com:443"), cast(Link, FakeLink("x:1"))):
            assert session.of(TunnelProxies)[-1] == TunnelProxies((TunnelProxy("p-a", "203.0.113.9:7443"),
                                                                   TunnelProxy("p-b", "edge.example.com:443")))
        assert session.of(TunnelProxies)[-1] == TunnelProxies((TunnelProxy("p-a", "203.0.113.9:7443"),))
    assert session.of(TunnelProxies)[-1] == TunnelProxies(())


async def test_proxies_admit_the_nodes_the_fleet_knows_and_drop_removed_ones(
        service: tuple[TunnelService, FakeController, FakeFeed], autojump_clock: trio.testing.MockClock) -> None:
    tunnels, controller, feed = service
    add_node(controller.fleet, "n-1")
    async with trio.open_nursery() as nursery:
        await nursery.start(tunnels.run)
        await trio.testing.wait_all_tasks_blocked()  # it waits for the controller's next change
        edge_link = cast(Link, FakeLink("127.0.0.1:1"))
        monitor = feed.connect(cast(Link, FakeLink("127.0.0.1:2")))  # follows routes, accepts no tunnels
        with tunnels.proxy_connected(proxy_hello("p-a", "127.0.0.1:7443"), edge_link):
            edge = feed.connect(edge_link)
            assert queued(edge) == [AdmittedNodes(("n-1",), snapshot=True)]
            add_node(controller.fleet, "n-2")
            controller.announce()
            await trio.testing.wait_all_tasks_blocked()
            assert queued(edge) == [AdmittedNodes(("n-2",))]
            controller.fleet.remove_node("n-1")  # `vectorlay node rm`
            controller.announce()
            await trio.testing.wait_all_tasks_blocked()
            assert queued(edge) == [AdmittedNodes((), ("n-1",))]
        assert queued(monitor) == []
        nursery.cancel_scope.cancel()


async def test_a_node_changing_its_data_plane_changes_its_routes(
        service: tuple[TunnelService, FakeController, FakeFeed], autojump_clock: trio.testing.MockClock) -> None:
    tunnels, controller, _ = service
    add_node(controller.fleet, "n-1")
    controller.fleet.put_replica(Replica("echo-a", "echo", "n-1", (), ReplicaState.READY, "", "127.0.0.1:9", 1,
                                         False, "r"), 0.0)
    tunnels.node_connected("n-1", Session(), None, data_plane_changed=False)
    assert await controller.routes_marked() == set()
    tunnels.node_connected("n-1", Session(), None, data_plane_changed=True)
    assert await controller.routes_marked() == {"echo"}  # its endpoints are reached another way now
    tunnels.node_connected("n-1", Session(), None, data_plane_changed=False)  # back to direct
    assert "n-1" not in tunnels.nodes  # no certificate renewals, no proxy lists for it


def test_reachable_address_fills_in_an_unspecified_host() -> None:
    assert reachable_address("0.0.0.0:7443", "198.51.100.4:50000") == "198.51.100.4:7443"
    assert reachable_address("[::]:7443", "2001:db8::1:50000") == "[2001:db8::1]:7443"
    assert reachable_address("edge.example.com:7443", "198.51.100.4:50000") == "edge.example.com:7443"
    assert reachable_address("10.0.0.1:7443", "198.51.100.4:50000") == "10.0.0.1:7443"


def test_the_tunnel_ca_is_made_once(tmp_path: Path) -> None:
    first = TunnelCa.in_state_dir(tmp_path)
    assert TunnelCa.in_state_dir(tmp_path).pem == first.pem
    assert (tmp_path / "tunnel-ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert ssl.PEM_cert_to_DER_cert(first.pem)
