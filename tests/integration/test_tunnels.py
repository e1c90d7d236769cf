"""The tunnel data plane with real processes on loopback: server, nodes, proxy, replicas.

Nodes join without --advertise (tunnels are the default): every request in these tests reaches a
replica through a tunnel its node opened. What travels (streams, large bodies, keep-alive), what
happens when a tunnel drops under load, who may hold one, and what an abusive tunnel peer gets.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from hyperframe.frame import HeadersFrame, PingFrame, SettingsFrame

from testsupport.load import SteadyClient
from testsupport.processes import (
    NodeProc,
    Proc,
    Stack,
    http_request,
    tinylm_manifest,
    upstream_manifest,
    wait_for,
)
from testsupport.relay import Relay
from vectorlay.node.state_dir import NodeStateDir
from vectorlay.server.tunnel_ca import NODE_CERT_VALID_S, TunnelCa
from vectorlay.tunnel import identity

pytestmark = pytest.mark.slow

MIB = 1024 * 1024


def start_proxy(stack: Stack, *extra: str) -> tuple[Proc, int, int, int]:
    """A proxy with metrics; (process, HTTP port, metrics port, tunnel port)."""
    proc, port = stack.start_proxy("--metrics-listen", "127.0.0.1:0", *extra)
    metrics = int(proc.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
    tunnel = int(proc.wait_log(r"accepting tunnels on port (\d+)").group(1))
    return proc, port, metrics, tunnel


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


def node_view(stack: Stack, name: str) -> dict[str, object]:
    return next(n for n in stack.cli_json("get", "nodes") if n["name"] == name)


def tunnelled(stack: Stack, name: str, proxies: int = 1) -> bool:
    view = node_view(stack, name)
    return view["data_plane"] == "tunnel" and view["tunnels"] == proxies


def test_streams_large_bodies_and_keep_alive_ride_the_tunnel(stack: Stack) -> None:
    stack.start_server()
    stack.join_node("n1")
    _, port, metrics_port, _ = start_proxy(stack)
    stack.cli("apply", "-", "--timeout", "60s", input_text=upstream_manifest("up"))
    wait_for(lambda: tunnelled(stack, "n1"), 10, message="n1 to report its tunnel")
    table = stack.cli("get", "nodes").stdout
    assert "DATA PLANE" in table and "tunnel (1 proxy)" in table
    host = "up.localhost"

    # Server-sent events pass through as they are written: the first arrives long before the last.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("GET", "/stream?n=4&interval_ms=400", headers={"Host": host})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type") == "text/event-stream"
    first = response.readline()
    first_at = time.monotonic()
    rest = response.read()
    done_at = time.monotonic()
    assert first.startswith(b"data: token 0")
    assert rest.count(b"data: token") == 3 and rest.endswith(b"data: [DONE]\n\n")
    assert done_at - first_at > 0.8  # three more events 400 ms apart came after the first one

    # A 10 MiB upload and a 10 MiB download, on one kept-alive client connection.
    body = b"u" * (10 * MIB)
    upload = http_request(port, host, "/upload", "POST", body, timeout_s=60, connection=conn)
    assert upload.status == 200 and upload.json()["body_bytes"] == 10 * MIB
    download = http_request(port, host, "/bytes?n=" + str(10 * MIB), timeout_s=60, connection=conn)
    assert download.status == 200 and download.body == b"v" * (10 * MIB)

    # Keep-alive both sides: 50 more requests take no new stream (one pooled upstream connection).
    streams_before = metric(metrics_port, "vectorlay_proxy_tunnel_streams_total")
    for _ in range(50):
        assert http_request(port, host, "/echo", connection=conn).status == 200
    conn.close()
    assert metric(metrics_port, "vectorlay_proxy_tunnel_streams_total") == streams_before
    assert metric(metrics_port, "vectorlay_proxy_tunnels") == 1
    assert metric(metrics_port, "vectorlay_proxy_tunnel_sent_bytes_total") > 10 * MIB
    assert metric(metrics_port, "vectorlay_proxy_tunnel_received_bytes_total") > 10 * MIB


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_tunnel_dropped_under_load_costs_no_client_error_and_comes_back(stack: Stack) -> None:
    """n1 reaches the proxy only through a fault relay (the server's link is untouched); n2 is
    dialled directly. Cutting the relay drops n1's tunnel alone."""
    stack.start_server()
    tunnel_port = free_port()
    with Relay(tunnel_port) as relay:
        relay.start()
        _, port, metrics_port, _ = start_proxy(stack, "--tunnel-listen", f"127.0.0.1:{tunnel_port}",
                                               "--tunnel-advertise", f"127.0.0.1:{relay.port}")
        stack.join_node("n1", gpus=["RTX 4090:24"])
        stack.cli("apply", "-", "--timeout", "60s",
                  input_text=tinylm_manifest("echo", replicas=1, extra_args=["--delay-ms", "30"]))
        stack.join_node("n2", gpus=["RTX 4090:24"], extra=["--data-plane", "direct", "--advertise", "127.0.0.1"])
        stack.cli("apply", "-", "--timeout", "60s",
                  input_text=tinylm_manifest("echo", replicas=2, extra_args=["--delay-ms", "30"]))
        assert {n["name"]: n["data_plane"] for n in stack.cli_json("get", "nodes")} == {"n1": "tunnel",
                                                                                         "n2": "direct"}
        wait_for(lambda: metric(metrics_port, "vectorlay_proxy_tunnels") == 1, 10, message="n1's tunnel")
        clients = [SteadyClient(port, "echo.localhost", rate_hz=25.0).start() for _ in range(4)]
        try:
            wait_for(lambda: all({"n1", "n2"} <= {s.node for s in c.samples} for c in clients), 20,
                     message="load on both nodes")
            cut_at = time.monotonic()
            relay.cut()  # both ends of n1's tunnel see a reset; requests on it are in flight
            wait_for(lambda: metric(metrics_port, "vectorlay_proxy_tunnels") == 0, 5, message="the tunnel to drop")
            # n1 dials again on its own (backoff with jitter) and is routed again.
            wait_for(lambda: any(s.node == "n1" and s.sent_at > cut_at + 0.2 for c in clients for s in c.samples),
                     30, message="n1 back in routing")
            time.sleep(1.0)
        finally:
            samples = [s for c in clients for s in c.stop()]
    assert len(samples) > 60
    assert [s for s in samples if s.status != 200] == []
    assert relay.accepted >= 2  # the first tunnel and the one after the cut
    assert node_view(stack, "n2")["tunnels"] is None  # a direct node holds none


def tunnel_ca(stack: Stack) -> TunnelCa:
    return TunnelCa.in_state_dir(stack.root / "server")


def tls_to_proxy(tunnel_port: int, certificate: str, key: str, ca: str) -> ssl.SSLSocket:
    """A TLS connection to the proxy's tunnel listener, presenting `certificate`."""
    context = identity.client_context(certificate, key, ca)
    context.check_hostname = False  # the test plays the node: any proxy certificate from the CA will do
    sock = socket.create_connection(("127.0.0.1", tunnel_port), timeout=20)
    return context.wrap_socket(sock, server_hostname="proxy")


def refused(tls: ssl.SSLSocket) -> str:
    """How the proxy ends a tunnel it does not accept: at TLS (an alert, or just closing), or with
    an HTTP/2 GOAWAY saying why."""
    observer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    observer.initiate_connection()
    try:
        while data := tls.recv(65536):
            for event in observer.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    return f"goaway: {(event.additional_data or b'').decode()}"
    except (ssl.SSLError, ConnectionError):
        return "at TLS"
    finally:
        tls.close()
    return "at TLS"  # closed without a word


def impersonate(tunnel_port: int, state_dir: Path, work: Callable[[], list[int]]) -> dict[str, list[Any]]:
    """Hold a tunnel with the node's saved certificate and key, refusing every stream (and noting
    the replica each names) while `work` runs."""
    saved = json.loads(NodeStateDir(state_dir).tunnels_file.read_text())
    tls = tls_to_proxy(tunnel_port, saved["certificate"], saved["key"], saved["ca"])
    tls.settimeout(0.2)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    replicas: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def serve() -> None:
        try:
            answer()
        except Exception as error:  # noqa: BLE001 - reported to the test below
            errors.append(error)

    def answer() -> None:
        while not done.is_set():
            try:
                data = tls.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    authority = dict(event.headers)[b":authority"].decode()
                    if authority != "control.vectorlay":
                        replicas.append(authority)
                    conn.send_headers(event.stream_id, [(b":status", b"200" if authority == "control.vectorlay"
                                                         else b"404")], end_stream=authority != "control.vectorlay")
            tls.sendall(conn.data_to_send())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    time.sleep(0.5)  # the proxy has made it n2's tunnel
    try:
        answers = work()
    finally:
        done.set()
        thread.join(5)
        tls.close()
    assert errors == []
    return {"answers": answers, "replicas": replicas}


def test_revoked_expired_and_other_nodes_credentials_get_no_traffic_and_no_route(stack: Stack,
                                                                                 tmp_path: Path) -> None:
    stack.heartbeat = "5s"  # n2's agent is paused below for a moment: the server must not give up on it
    stack.start_server()
    n1 = stack.join_node("n1")
    n2 = stack.join_node("n2")
    proxy, port, metrics_port, tunnel_port = start_proxy(stack)
    # Cluster `a` runs on n1 only, cluster `b` on n2 only.
    for name, other in (("a", "n2"), ("b", "n1")):
        stack.cli("node", "cordon", other)
        stack.cli("apply", "-", "--timeout", "60s", input_text=upstream_manifest(name))
        stack.cli("node", "uncordon", other)
    placed = {r["cluster"]: (r["id"], r["node"]) for r in stack.cli_json("get", "replicas")}
    assert {cluster: node for cluster, (_, node) in placed.items()} == {"a": "n1", "b": "n2"}
    on_n1, on_n2 = placed["a"][0], placed["b"][0]
    wait_for(lambda: metric(metrics_port, "vectorlay_proxy_tunnels") == 2, 10, message="both tunnels")
    ca = tunnel_ca(stack)
    key = identity.new_key()
    request = identity.certificate_request(key, n1.node_id)

    # Expired: a real certificate from the server's own tunnel CA, but out of date.
    expired = ca.issue_node(ca.requested_key(request), n1.node_id, time.time() - 2 * NODE_CERT_VALID_S)
    assert refused(tls_to_proxy(tunnel_port, expired, identity.key_pem(key), ca.pem)) == "at TLS"
    proxy.wait_log("certificate has expired")
    # Another node's name, certified by a CA that is not the server's: no tunnel either.
    forger = TunnelCa.in_state_dir(tmp_path / "forger")
    forged = forger.issue_node(forger.requested_key(request), n1.node_id, time.time())
    assert refused(tls_to_proxy(tunnel_port, forged, identity.key_pem(key), ca.pem)) == "at TLS"
    proxy.wait_log("certificate signature failure")
    assert metric(metrics_port, "vectorlay_proxy_tunnels_accepted_total") == 2  # only the two real ones
    assert http_request(port, "a.localhost", "/").json()["upstream"] == on_n1

    # A node's own credential gets it its own traffic only: n2's key in another program (n2
    # compromised; the real agent paused, so it does not take its tunnel back meanwhile) takes over
    # n2's tunnel and is asked for n2's replica, never for n1's.
    n2.signal(signal.SIGSTOP)
    try:
        asked = impersonate(tunnel_port, n2.state_dir, lambda: [
            http_request(port, host, "/").status for _ in range(10) for host in ("a.localhost", "b.localhost")])
    finally:
        n2.signal(signal.SIGCONT)
    assert asked["answers"][0::2] == [200] * 10  # cluster a, on n1, unharmed
    assert asked["replicas"] and set(asked["replicas"]) == {on_n2}

    # Revoked: `node rm` takes the node's tunnel away at once, and its replica out of every route.
    wait_for(lambda: http_request(port, "b.localhost", "/").status == 200, 20, message="n2 back after that")
    stack.cli("node", "rm", "n2")
    proxy.wait_log(rf"node {n2.node_id} is no longer admitted by the server; dropping its tunnel")
    wait_for(lambda: metric(metrics_port, "vectorlay_proxy_tunnels") == 1, 5, message="n2's tunnel to go")
    wait_for(lambda: not n2.alive, 10, message="the removed agent to exit")
    # Its tunnel certificate is still within its hour, and it would not help: not admitted.
    saved = json.loads(NodeStateDir(n2.state_dir).tunnels_file.read_text())
    assert refused(tls_to_proxy(tunnel_port, saved["certificate"], saved["key"], saved["ca"])) == \
        f"goaway: node {n2.node_id} is not admitted by the server"
    proxy.wait_log(rf"node {n2.node_id} is not admitted by the server")
    for _ in range(10):
        answer = http_request(port, "a.localhost", "/")
        assert answer.status == 200 and answer.json()["upstream"] == on_n1


def attack(tunnel_port: int, node: NodeProc, stack: Stack, frames: bytes) -> list[h2.events.Event]:
    """Open a tunnel as `node` (a valid certificate: a compromised node), send `frames` after our
    SETTINGS, and return what the proxy said until it closed the connection."""
    ca = tunnel_ca(stack)
    key = identity.new_key()
    certificate = ca.issue_node(ca.requested_key(identity.certificate_request(key, "x")), node.node_id, time.time())
    tls = tls_to_proxy(tunnel_port, certificate, identity.key_pem(key), ca.pem)
    observer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    observer.initiate_connection()
    observer.data_to_send()
    heard: list[h2.events.Event] = []
    try:
        tls.sendall(SettingsFrame(0).serialize() + frames)
        while data := tls.recv(65536):
            try:
                heard.extend(observer.receive_data(data))
            except h2.exceptions.ProtocolError:
                pass
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        tls.close()
    return heard


def goaway(heard: list[h2.events.Event]) -> h2.events.ConnectionTerminated:
    [terminated] = [e for e in heard if isinstance(e, h2.events.ConnectionTerminated)]
    return terminated


def test_http2_abuse_closes_that_tunnel_and_the_proxy_keeps_serving(stack: Stack) -> None:
    stack.start_server()
    stack.join_node("n1")
    n2 = stack.join_node("n2")
    proxy, port, metrics_port, tunnel_port = start_proxy(stack)
    stack.cli("apply", "-", "--timeout", "60s", input_text=upstream_manifest("up", replicas=1))
    [replica] = stack.cli_json("get", "replicas")
    assert replica["node"] == "n1"  # the attacks come as n2, a node with nothing to serve
    with SteadyClient(port, "up.localhost", rate_hz=20, path="/") as client:
        # Garbage where TLS should be.
        with socket.create_connection(("127.0.0.1", tunnel_port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
            try:
                assert raw.recv(65536) == b""  # closed...
            except ConnectionResetError:
                pass  # ...or reset, with our garbage unread
        # Garbage where HTTP/2 should be.
        heard = attack(tunnel_port, n2, stack, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" * 100)
        assert goaway(heard).error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        # A SETTINGS flood, a PING flood.
        for frame in (SettingsFrame(0).serialize(), PingFrame(0, b"12345678").serialize()):
            heard = attack(tunnel_port, n2, stack, frame * 5000)
            assert goaway(heard).error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        # Endless streams: a node may open none at all.
        encoder = h2.connection.H2Connection().encoder
        block = encoder.encode([(b":method", b"CONNECT"), (b":authority", b"r")])
        streams = b"".join(HeadersFrame(2 * i + 2, block, flags=["END_HEADERS"]).serialize() for i in range(100))
        heard = attack(tunnel_port, n2, stack, streams)
        assert goaway(heard).error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
        # A huge header block.
        huge = encoder.encode([(b":status", b"200"), (b"x-big", b"a" * 100_000)])
        heard = attack(tunnel_port, n2, stack, HeadersFrame(1, huge, flags=["END_HEADERS"]).serialize())
        assert goaway(heard).error_code != h2.errors.ErrorCodes.NO_ERROR
        time.sleep(0.5)
    assert proxy.alive
    assert len(client.samples) > 20 and client.failures() == []
    log = proxy.log()
    assert "flood of control frames (last SETTINGS)" in log and "flood of control frames (last PING)" in log
    assert "Traceback" not in log
    assert metric(metrics_port, "vectorlay_proxy_tunnels_refused_total") >= 1


def test_the_direct_data_plane_is_an_opt_in_that_says_what_it_exposes(stack: Stack) -> None:
    stack.start_server()
    refused_join = stack.cli("node", "join", "--server", stack.server_url, "--token", stack.token("node"),
                             "--advertise", "127.0.0.1", "--state-dir", str(stack.root / "x"), check=False)
    assert refused_join.returncode == 1
    assert "--advertise is only for --data-plane direct" in refused_join.stderr
    no_address = stack.cli("node", "join", "--server", stack.server_url, "--token", stack.token("node"),
                           "--data-plane", "direct", "--state-dir", str(stack.root / "x"), check=False)
    assert no_address.returncode == 1 and "--data-plane direct needs --advertise HOST" in no_address.stderr

    node = stack.join_node("d1", extra=["--data-plane", "direct", "--advertise", "127.0.0.1"])
    assert "anyone who can reach them uses the replicas directly" in node.log()
    _, port, metrics_port, _ = start_proxy(stack)
    stack.cli("apply", "-", "--timeout", "60s", input_text=upstream_manifest("up", host="0.0.0.0"))
    view = node_view(stack, "d1")
    assert view["data_plane"] == "direct" and view["tunnels"] is None and view["address"] == "127.0.0.1"
    assert http_request(port, "up.localhost", "/").status == 200
    assert metric(metrics_port, "vectorlay_proxy_tunnel_streams_total") == 0  # dialled, not tunnelled
    check = stack.cli("node", "check", "--state-dir", str(node.state_dir), "--allow-process-runtime")
    assert "direct data plane: proxies dial 127.0.0.1" in check.stdout
    assert "past the edge's API keys and rate limits" in check.stdout


def test_node_check_tells_whether_the_proxies_are_reachable(stack: Stack) -> None:
    stack.start_server()
    node = stack.join_node("n1")
    _, _, _, tunnel_port = start_proxy(stack)
    # A second proxy tells the server an address nodes cannot reach (a firewall in the way).
    start_proxy(stack, "--tunnel-advertise", f"127.0.0.1:{free_port()}")
    wait_for(lambda: tunnelled(stack, "n1"), 10, message="n1's tunnel to the first proxy")
    check = stack.cli("node", "check", "--state-dir", str(node.state_dir), "--allow-process-runtime", check=False)
    assert "tunnel data plane: replicas listen on 127.0.0.1 only" in check.stdout
    assert re.search(rf"present\s+proxy p-\S+\s+127\.0\.0\.1:{tunnel_port}: reachable; its tunnel certificate is "
                     "valid", check.stdout), check.stdout
    assert re.search(r"missing\s+proxy p-\S+\s+127\.0\.0\.1:\d+: cannot connect: .*refused", check.stdout), \
        check.stdout
    assert tunnelled(stack, "n1")  # checking did not disturb the node's own tunnel
