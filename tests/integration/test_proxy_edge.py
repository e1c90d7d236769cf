"""The edge proxy as a real process, in front of scripted replicas on real sockets.

Routes come from a scripted control plane (`StaticRouteServer`) so each test decides exactly what
the proxy routes to and when that changes; replicas are `ScriptedUpstream`s whose behaviour each
test steers (status, held responses, gated streams). Everything crosses real TCP sockets.
"""

from __future__ import annotations

import http.client
import json
import re
import resource
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from testsupport.processes import Proc, http_request, wait_for
from testsupport.route_server import StaticRouteServer, spawn_proxy
from testsupport.upstreams import ScriptedUpstream
from vectorlay.core.protocol import Endpoint, Route

pytestmark = pytest.mark.slow

HOST = "echo.localhost"


def route(*upstreams: ScriptedUpstream, cluster: str = "echo") -> Route:
    return Route(cluster, tuple(Endpoint(f"r-{u.name}", u.address, f"n-{u.name}") for u in upstreams))


@pytest.fixture
def a() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream("a") as upstream:
        yield upstream


@pytest.fixture
def b() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream("b") as upstream:
        yield upstream


@pytest.fixture
def routes() -> Iterator[StaticRouteServer]:
    with StaticRouteServer() as server:
        yield server


ProxyStarter = Callable[..., tuple[Proc, int]]


@pytest.fixture
def start_proxy() -> Iterator[ProxyStarter]:
    """spawn_proxy, with every proxy started stopped when the test ends (else it outlives the test)."""
    started: list[Proc] = []

    def start(root: Path, server_url: str, *extra: str, name: str = "proxy") -> tuple[Proc, int]:
        proc, port = spawn_proxy(root, server_url, *extra, name=name)
        started.append(proc)
        return proc, port

    yield start
    for proc in started:
        proc.stop()


def metrics(proc: Proc) -> dict[str, float]:
    port = int(proc.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
    text = http_request(port, "metrics", "/metrics").body.decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def raw_exchange(port: int, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection and read until the proxy closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}: {received!r}"
        received += chunk
    return received


def status_of(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, response[:200]
    return int(match.group(1))


def test_forwarding_headers_are_set_and_hop_by_hop_headers_stripped(
        tmp_path: Path, a: ScriptedUpstream, routes: StaticRouteServer, start_proxy: ProxyStarter) -> None:
    routes.set_route(route(a))
    proc, port = start_proxy(tmp_path, routes.url)
    result = http_request(port, HOST, "/v1/x", headers={
        "X-Forwarded-For": "203.0.113.9", "Connection": "keep-alive, X-Secret", "X-Secret": "for this hop only",
        "Keep-Alive": "timeout=5", "TE": "trailers", "Proxy-Authorization": "Basic Zm9v", "X-Request-Id": "abc-123",
        "X-Forwarded-Proto": "ftp", "X-Custom": "kept",
    })
    assert result.status == 200
    seen = dict(result.json()["headers"])
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-request-id"] == "abc-123"
    assert seen["x-custom"] == "kept"
    for gone in ("connection", "x-secret", "keep-alive", "te", "proxy-authorization"):
        assert gone not in seen
    assert result.headers["x-request-id"] == "abc-123"
    # A request id that is not a sane token is replaced, never echoed.
    replaced = http_request(port, HOST, "/", headers={"X-Request-Id": "<script>"})
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    assert dict(replaced.json()["headers"])["x-request-id"] == replaced.headers["x-request-id"]
    assert http_request(port, "other.example.com").status == 404
    assert http_request(port, "nope.localhost").json()["error"] == "unknown cluster"


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_host_comes_from_an_absolute_target_and_two_host_headers_are_refused(
        tmp_path: Path, a: ScriptedUpstream, b: ScriptedUpstream, routes: StaticRouteServer,
        start_proxy: ProxyStarter, parser: str) -> None:
    routes.set_route(route(a, cluster="echo"))
    routes.set_route(route(b, cluster="other"))
    _, port = start_proxy(tmp_path, routes.url, "--http-parser", parser)
    absolute = raw_exchange(port, b"GET http://echo.localhost/v1/x?q=1 HTTP/1.1\r\nHost: other.localhost\r\n"
                                  b"Connection: close\r\n\r\n")
    assert status_of(absolute) == 200
    echo = json.loads(absolute.split(b"\r\n\r\n", 1)[1])
    assert echo["upstream"] == "a" and echo["path"] == "/v1/x"  # origin form reached the replica
    assert [v for k, v in echo["headers"] if k == "host"] == ["echo.localhost"]
    assert not b.seen
    two = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: echo.localhost\r\nHost: other.localhost\r\n\r\n")
    assert status_of(two) == 400 and b"Host" in two
    assert not b.seen and len(a.seen) == 1


def test_hostile_and_malformed_clients_get_their_status_and_the_proxy_keeps_serving(
        tmp_path: Path, a: ScriptedUpstream, routes: StaticRouteServer, start_proxy: ProxyStarter) -> None:
    routes.set_route(route(a))
    proc, port = start_proxy(tmp_path, routes.url, "--header-timeout", "1s", "--max-body", "64KiB",
                             "--max-connections", "6", "--metrics-listen", "127.0.0.1:0")
    # 400: not HTTP at all, and a broken chunked body.
    assert status_of(raw_exchange(port, b"GARBAGE\r\n\r\n")) == 400
    broken_chunks = (b"POST / HTTP/1.1\r\nHost: echo.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"zz\r\nhello\r\n0\r\n\r\n")
    assert status_of(raw_exchange(port, broken_chunks)) == 400
    smuggle = (b"POST / HTTP/1.1\r\nHost: echo.localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
    assert status_of(raw_exchange(port, smuggle)) == 400
    # 431: request headers over the limit, whether they arrive at once or in pieces.
    big = b"GET / HTTP/1.1\r\nHost: echo.localhost\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    assert status_of(raw_exchange(port, big)) == 431
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n")
        try:
            for _ in range(40):
                sock.sendall(b"X-Filler: " + b"b" * 1000 + b"\r\n")
        except OSError:
            pass  # the proxy answered and closed before the client finished
        assert status_of(read_until_closed(sock)) == 431
    # 408: a slowloris trickling its headers never finishes them in time, however often it sends.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n")
        answer = b""
        sock.settimeout(0.3)
        for _ in range(40):
            try:
                answer = sock.recv(65536)
                break
            except TimeoutError:
                sock.sendall(b"X-Drip: 1\r\n")
        assert status_of(answer) == 408
    # 413: a declared body over the limit is refused before it is read; a chunked one once it grows past it.
    too_big = b"POST / HTTP/1.1\r\nHost: echo.localhost\r\nContent-Length: 100000\r\n\r\n"
    assert status_of(raw_exchange(port, too_big)) == 413
    chunk = b"%x\r\n%s\r\n" % (32 * 1024, b"c" * 32 * 1024)
    chunked = b"POST / HTTP/1.1\r\nHost: echo.localhost\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(chunked)
        assert status_of(read_until_closed(sock)) == 413
    # Connection limit with every connection busy (a request in flight on each): the 7th
    # connection at once gets a 503 and is closed; a freed slot is reused.
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
    try:
        for sock in held:
            sock.sendall(b"POST /hold HTTP/1.1\r\nHost: echo.localhost\r\nContent-Length: 0\r\n\r\n")
        wait_for(lambda: a.held == 6, 10, message="six requests in flight")
        refused = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        assert status_of(refused) == 503 and b"too many connections to this proxy" in refused
        a.release.set()
        for sock in held:
            assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
        wait_for(lambda: http_request(port, HOST).status == 200, 10, message="a free connection slot")
    finally:
        a.release.clear()
        for sock in held:
            sock.close()
    assert proc.alive
    wait_for(lambda: http_request(port, HOST).status == 200, 10, message="the proxy to serve again")
    assert metrics(proc)["vectorlay_proxy_connections_rejected_total"] >= 1


def test_a_failing_replica_is_ejected_its_requests_retried_and_it_is_readmitted_after_backoff(
        tmp_path: Path, a: ScriptedUpstream, b: ScriptedUpstream, routes: StaticRouteServer,
        start_proxy: ProxyStarter) -> None:
    a.status = 503
    routes.set_route(route(a, b))
    proc, port = start_proxy(tmp_path, routes.url, "--eject-time", "1s", "--metrics-listen", "127.0.0.1:0")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    served_by = [http_request(port, HOST, connection=conn).headers["x-upstream"] for _ in range(30)]
    assert served_by == ["b"] * 30  # every 503 from a was retried on b before the client saw it
    # Ejected at each 503 for 1 s, 2 s, 4 s...: a handful of tries, where round robin gives it half.
    assert 1 <= a.requests <= 4
    numbers = metrics(proc)
    assert numbers['vectorlay_proxy_ejections_total{cluster="echo"}'] >= 1
    assert numbers['vectorlay_proxy_retries_total{cluster="echo"}'] >= 1
    assert numbers['vectorlay_proxy_requests_total{cluster="echo",code="200"}'] == 30
    # Healed: once its ejection runs out it gets traffic again.
    a.status = 200
    wait_for(lambda: http_request(port, HOST, connection=conn).headers["x-upstream"] == "a", 15, interval_s=0.02,
             message="replica a to be readmitted")
    conn.close()


def test_connect_failures_eject_and_fail_over_without_client_errors(
        tmp_path: Path, a: ScriptedUpstream, routes: StaticRouteServer, start_proxy: ProxyStarter) -> None:
    with socket.socket() as closed:  # a port nothing listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        dead = Endpoint("r-dead", f"127.0.0.1:{closed.getsockname()[1]}", "n-dead")
        routes.set_route(Route("echo", (dead, *route(a).endpoints)))
        proc, port = start_proxy(tmp_path, routes.url, "--metrics-listen", "127.0.0.1:0")
        assert [http_request(port, HOST).status for _ in range(20)] == [200] * 20
    numbers = metrics(proc)
    assert numbers['vectorlay_proxy_upstream_connect_errors_total{cluster="echo"}'] >= 1
    assert numbers['vectorlay_proxy_ejections_total{cluster="echo"}'] >= 1


def test_the_retry_budget_keeps_a_dead_cluster_from_multiplying_load(
        tmp_path: Path, routes: StaticRouteServer, start_proxy: ProxyStarter) -> None:
    with ScriptedUpstream("x", status=503) as x, ScriptedUpstream("y", status=503) as y, \
            ScriptedUpstream("z", status=503) as z:
        routes.set_route(route(x, y, z))
        _, port = start_proxy(tmp_path, routes.url)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        sent = 200
        started = time.monotonic()
        statuses = {http_request(port, HOST, connection=conn).status for _ in range(sent)}
        elapsed = time.monotonic() - started
        conn.close()
        assert statuses == {503}  # the replicas' own answer, passed on once nothing else is left
        attempts = x.requests + y.requests + z.requests
    # Without a budget every request would be tried on all three replicas (600 attempts). With it,
    # retries are a fifth of the requests plus a floor of 10 a second (a burst of 10).
    assert attempts <= sent * 1.2 + 10 + 10 * elapsed + 1, (attempts, elapsed)
    assert attempts < sent * 2.5


def test_streams_pass_through_chunk_by_chunk_and_a_client_that_leaves_cancels_upstream(
        tmp_path: Path, a: ScriptedUpstream, routes: StaticRouteServer, start_proxy: ProxyStarter) -> None:
    routes.set_route(route(a))
    _, port = start_proxy(tmp_path, routes.url)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/gated-stream", headers={"Host": HOST})
    response = conn.getresponse()
    assert response.getheader("content-type") == "text/event-stream"
    # The first event arrives while the replica is still holding the rest of its response.
    assert response.readline() == b"data: first\n"
    assert response.readline() == b"\n"
    assert a.held == 1
    a.release.set()
    assert response.read() == b"data: last\n\n"
    conn.close()
    a.release.clear()

    # A client that goes away mid-stream: the proxy closes the replica's connection too.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /gated-stream HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        read_until(sock, b"data: first")
    wait_for(lambda: a.aborted == 1, 10, message="the replica to see its client leave")
    # And one that leaves while the replica is still working on the response head.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /hold HTTP/1.1\r\nHost: echo.localhost\r\nContent-Length: 2\r\n\r\n{}")
        wait_for(lambda: a.held == 1, 10, message="the request to reach the replica")
    wait_for(lambda: a.aborted == 2, 10, message="the replica to see its client leave")


def test_large_bodies_stream_through_up_to_the_limit(
        tmp_path: Path, a: ScriptedUpstream, routes: StaticRouteServer, start_proxy: ProxyStarter) -> None:
    routes.set_route(route(a))
    _, port = start_proxy(tmp_path, routes.url, "--max-body", "8MiB")
    body = b"x" * (5 * 1024 * 1024)  # over the retry buffer: streamed, not held whole
    result = http_request(port, HOST, "/upload", "POST", body)
    assert result.status == 200 and result.json()["body_bytes"] == len(body)

    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b"y" * (1024 * 1024)

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/upload", body=chunks(), headers={"Host": HOST}, encode_chunked=True)
    chunked = conn.getresponse()
    assert chunked.status == 200 and json.loads(chunked.read())["body_bytes"] == 5 * 1024 * 1024
    conn.close()
    # Over the limit: refused from the declared length, before the body is sent.
    head = b"POST /upload HTTP/1.1\r\nHost: echo.localhost\r\nContent-Length: %d\r\n\r\n" % (9 * 1024 * 1024)
    assert status_of(raw_exchange(port, head)) == 413


def test_route_updates_do_not_drop_requests_in_flight(
        tmp_path: Path, a: ScriptedUpstream, b: ScriptedUpstream, routes: StaticRouteServer,
        start_proxy: ProxyStarter) -> None:
    routes.set_route(route(a))
    _, port = start_proxy(tmp_path, routes.url)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/gated-stream", headers={"Host": HOST})
    response = conn.getresponse()
    assert response.readline() == b"data: first\n"
    # The replica streaming this response leaves routing (b takes over) while the stream goes on.
    routes.set_route(route(b))
    wait_for(lambda: http_request(port, HOST).headers.get("x-upstream") == "b", 10, message="the new route")
    a.release.set()
    assert response.read() == b"\ndata: last\n\n"
    conn.close()


def test_graceful_shutdown_finishes_requests_in_flight(
        tmp_path: Path, a: ScriptedUpstream, routes: StaticRouteServer, start_proxy: ProxyStarter) -> None:
    routes.set_route(route(a))
    proc, port = start_proxy(tmp_path, routes.url)
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert http_request(port, HOST, connection=idle).status == 200
    busy = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    busy.request("GET", "/hold", headers={"Host": HOST})
    wait_for(lambda: a.held == 1, 10, message="the request to reach the replica")
    proc.signal(signal.SIGTERM)
    proc.wait_log("shutting down")
    assert idle.sock is not None
    assert read_until_closed(idle.sock) == b""  # an idle keep-alive connection is closed at once
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close(), 10,
                 message="the listener to close")
    assert proc.alive  # still finishing the request in flight
    a.release.set()
    response = busy.getresponse()
    assert response.status == 200 and response.getheader("connection") == "close"
    assert json.loads(response.read())["path"] == "/hold"
    assert proc.popen.wait(10) == 0


def tls_client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def peer_certificate(port: int, context: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=HOST) as tls:
            cert = tls.getpeercert(binary_form=True)
            assert cert is not None
            return cert


def test_tls_termination_and_certificate_reload_on_sighup(
        tmp_path: Path, a: ScriptedUpstream, routes: StaticRouteServer, start_proxy: ProxyStarter) -> None:
    routes.set_route(route(a))
    ca = trustme.CA()
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    first = ca.issue_cert(HOST, "127.0.0.1")
    first.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    first.private_key_pem.write_to_path(str(key_path))
    proc, port = start_proxy(tmp_path, routes.url, "--tls-cert", str(cert_path), "--tls-key", str(key_path))
    context = tls_client_context(ca)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    conn.request("GET", "/", headers={"Host": HOST})
    response = conn.getresponse()
    assert response.status == 200
    assert dict(json.loads(response.read())["headers"])["x-forwarded-proto"] == "https"
    # Plain HTTP on the TLS port is not served (and does not hurt the proxy).
    assert raw_exchange(port, b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n") == b""
    before = peer_certificate(port, context)

    # A renewed certificate: SIGHUP loads it for new connections; the open one keeps working.
    second = ca.issue_cert(HOST, "127.0.0.1")
    second.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    second.private_key_pem.write_to_path(str(key_path))
    proc.signal(signal.SIGHUP)
    proc.wait_log("TLS certificate reloaded")
    after = peer_certificate(port, context)
    assert after == ssl.PEM_cert_to_DER_cert(second.cert_chain_pems[0].bytes().decode()) != before
    conn.request("GET", "/", headers={"Host": HOST})
    assert conn.getresponse().status == 200
    conn.close()

    # A broken file on reload keeps the certificate already loaded.
    key_path.write_text("not a key")
    proc.signal(signal.SIGHUP)
    proc.wait_log("keeping the certificate already loaded")
    assert peer_certificate(port, context) == after
    assert proc.alive


def test_bad_tls_files_are_one_clear_line_and_a_non_zero_exit(
        tmp_path: Path, routes: StaticRouteServer, start_proxy: ProxyStarter) -> None:
    (tmp_path / "cert.pem").write_text("garbage")
    (tmp_path / "key.pem").write_text("garbage")
    with pytest.raises(AssertionError):
        start_proxy(tmp_path, routes.url, "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key",
                    str(tmp_path / "key.pem"), name="bad")
    text = (tmp_path / "bad.log").read_text()
    assert "error: TLS: cannot load certificate" in text and "Traceback" not in text


def test_chunked_responses_whose_clients_close_at_once_are_counted_as_received(
        tmp_path: Path, a: ScriptedUpstream, routes: StaticRouteServer, start_proxy: ProxyStarter) -> None:
    """curl closes the moment a chunked response ends; the metrics count what it received (200)."""
    routes.set_route(route(a))
    proc, port = start_proxy(tmp_path, routes.url, "--metrics-listen", "127.0.0.1:0")
    rounds = 200
    for _ in range(rounds):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /stream?n=2&interval_ms=0 HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
            answer = read_until(sock, b"\r\n0\r\n\r\n")
            assert status_of(answer) == 200 and b"data: [DONE]" in answer

    def settled() -> dict[str, float] | None:
        found = metrics(proc)
        return found if found["vectorlay_proxy_connections"] == 0 else None

    counts = wait_for(settled, 10, message="every connection to close")
    codes = {k: v for k, v in counts.items() if k.startswith('vectorlay_proxy_requests_total{cluster="echo"')}
    assert codes == {'vectorlay_proxy_requests_total{cluster="echo",code="200"}': rounds}


def _open_idle(port: int, count: int, source: str = "127.0.0.1") -> tuple[list[socket.socket], list[int]]:
    """`count` keep-alive connections from `source`, each sending one GET and reading its answer,
    then left idle; (the sockets, the status each got)."""
    socks, statuses = [], []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        socks.append(sock)
    for sock in socks:
        head = read_until(sock, b"\r\n\r\n")
        statuses.append(status_of(head))
        length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
        body = head.split(b"\r\n\r\n", 1)[1]
        while len(body) < length:
            body += sock.recv(65536)
    return socks, statuses


def _rss_mib(proc: Proc) -> float:
    status = Path(f"/proc/{proc.popen.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


@pytest.fixture
def many_sockets() -> Iterator[None]:
    """This test process may open a few thousand sockets (the default soft limit is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_one_address_holding_thousands_of_idle_connections_does_not_deny_another_client(
        tmp_path: Path, a: ScriptedUpstream, routes: StaticRouteServer, start_proxy: ProxyStarter,
        many_sockets: None) -> None:
    """Thousands of keep-alive connections from one address, each idle after one GET: that address
    gets its share (then 503s), and a client from another address is still served, at once."""
    routes.set_route(route(a))
    proc, port = start_proxy(tmp_path, routes.url, "--metrics-listen", "127.0.0.1:0",
                             "--max-connections-per-client", "1000")
    held: list[socket.socket] = []
    try:
        before = _rss_mib(proc)
        socks, statuses = _open_idle(port, 2500)
        held += socks
        assert statuses.count(200) == 1000 and statuses.count(503) == 1500
        refused = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")  # from 127.0.0.1 again
        assert status_of(refused) == 503 and b"too many connections from your address" in refused
        other = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
        held.append(other)
        other.sendall(b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        assert status_of(read_until(other, b"\r\n\r\n")) == 200
        print(f"proxy RSS {before:.0f} MiB -> {_rss_mib(proc):.0f} MiB with 1000 idle connections held")
    finally:
        for sock in held:
            sock.close()


def test_at_the_connection_limit_the_idlest_connections_make_room_for_new_clients(
        tmp_path: Path, a: ScriptedUpstream, routes: StaticRouteServer, start_proxy: ProxyStarter,
        many_sockets: None) -> None:
    routes.set_route(route(a))
    proc, port = start_proxy(tmp_path, routes.url, "--metrics-listen", "127.0.0.1:0", "--max-connections", "200")
    held: list[socket.socket] = []
    try:
        socks, statuses = _open_idle(port, 1000)  # each new one closes the oldest idle one
        held += socks
        assert statuses == [200] * 1000
        first, last = socks[0], socks[-1]
        assert first.recv(65536) == b""  # the idlest went first
        other = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
        held.append(other)
        other.sendall(b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        assert status_of(read_until(other, b"\r\n\r\n")) == 200
        last.sendall(b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")  # a recent one still works
        assert status_of(read_until(last, b"\r\n\r\n")) == 200
        found = metrics(proc)
        assert found["vectorlay_proxy_connections_evicted_total"] >= 800
        assert found["vectorlay_proxy_connections"] <= 201
    finally:
        for sock in held:
            sock.close()
