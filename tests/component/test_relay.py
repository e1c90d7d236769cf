"""The fault-injecting TCP relay: pass, blackhole, stall, cut, reject, close, and its counters.

Each test talks through a real `Relay` on loopback to a plain listening socket that stands in for the
server. The relay's upstream connect completes in the kernel's backlog, so `accept()` hands the test the
server side of each relayed connection and the test drives both ends with blocking sockets.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from testsupport.processes import wait_for
from testsupport.relay import Relay

TIMEOUT_S = 5.0
QUIET_S = 0.1  # how long "nothing arrives" is watched for; only absences need it


@pytest.fixture
def server() -> Iterator[socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    listener.settimeout(TIMEOUT_S)
    yield listener
    listener.close()


@pytest.fixture
def relay(server: socket.socket) -> Iterator[Relay]:
    with Relay(server.getsockname()[1]) as relay:
        relay.start()
        yield relay


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def connect(relay: Relay, sockets: list[socket.socket]) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT_S)
    sockets.append(client)
    return client


def relayed_pair(
    relay: Relay, server: socket.socket, sockets: list[socket.socket]
) -> tuple[socket.socket, socket.socket]:
    """A client connected through the relay, and the server's side of the same connection."""
    client = connect(relay, sockets)
    upstream, _ = server.accept()
    upstream.settimeout(TIMEOUT_S)
    sockets.append(upstream)
    return client, upstream


def wait_until_accepted(relay: Relay, count: int) -> None:
    wait_for(lambda: relay.accepted == count, TIMEOUT_S, message=f"the relay to accept {count} connections")


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        assert chunk, f"EOF after {len(chunks)} of {size} bytes"
        chunks += chunk
    return bytes(chunks)


def assert_quiet(*socks: socket.socket) -> None:
    """Nothing (no data, no EOF, no reset) is readable on any of `socks` for a short while."""
    readable, _, _ = select.select(list(socks), [], [], QUIET_S)
    assert readable == []


def connect_and_expect_teardown(relay: Relay, sockets: list[socket.socket]) -> None:
    """Connect through the relay and see the relay tear the connection down at once: the next read sees a
    reset or an EOF, not a timeout. The kernel completes the handshake before the relay even sees the
    connection, but under load the reset can overtake a slow client and fail the connect call itself."""
    try:
        client = connect(relay, sockets)
        assert client.recv(1) == b""
    except ConnectionResetError:
        pass


def payload(size: int, seed: int) -> bytes:
    """Bytes whose order is checkable: a running counter, so a gap or a reordering changes them."""
    return b"".join(struct.pack(">I", seed + i) for i in range(size // 4))


def test_pass_forwards_both_ways_and_forwards_eof(
    relay: Relay, server: socket.socket, sockets: list[socket.socket]
) -> None:
    client, upstream = relayed_pair(relay, server, sockets)
    client.sendall(b"hello")
    assert recv_exactly(upstream, 5) == b"hello"
    upstream.sendall(b"world")
    assert recv_exactly(client, 5) == b"world"

    # A large transfer in both directions at once: neither side reads until it has started sending.
    up, down = payload(1 << 20, 0), payload(1 << 20, 7)
    sender = threading.Thread(target=client.sendall, args=(up,))
    sender.start()
    upstream.sendall(down)
    assert recv_exactly(upstream, len(up)) == up
    assert recv_exactly(client, len(down)) == down
    sender.join(TIMEOUT_S)

    assert (relay.accepted, relay.connections) == (1, 1)
    client.shutdown(socket.SHUT_WR)
    assert upstream.recv(1) == b""  # the half-close reached the server
    upstream.sendall(b"still open")  # the other direction keeps working
    assert recv_exactly(client, 10) == b"still open"
    upstream.close()
    assert client.recv(1) == b""
    wait_for(lambda: relay.connections == 0, TIMEOUT_S, message="the connection to be closed")


def test_a_reset_from_one_side_resets_the_other(
    relay: Relay, server: socket.socket, sockets: list[socket.socket]
) -> None:
    client, upstream = relayed_pair(relay, server, sockets)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    with pytest.raises(ConnectionResetError):
        upstream.recv(1)
    wait_for(lambda: relay.connections == 0, TIMEOUT_S, message="the connection to be dropped")


def test_blackhole_drops_data_both_ways_but_keeps_the_connection(
    relay: Relay, server: socket.socket, sockets: list[socket.socket]
) -> None:
    client, upstream = relayed_pair(relay, server, sockets)
    relay.set_mode("blackhole")
    assert relay.mode == "blackhole"

    client.sendall(b"lost-up")
    wait_for(lambda: relay.discarded == 7, TIMEOUT_S, message="the relay to discard the client's bytes")
    upstream.sendall(b"lost-down")
    wait_for(lambda: relay.discarded == 16, TIMEOUT_S, message="the relay to discard the server's bytes")
    assert_quiet(client, upstream)  # nothing delivered, and no EOF or reset either
    assert relay.connections == 1

    # A new connection is accepted (and connected upstream) but blackholed as well.
    late_client, late_upstream = relayed_pair(relay, server, sockets)
    late_client.sendall(b"late")
    wait_for(lambda: relay.discarded == 20, TIMEOUT_S, message="the relay to discard the new connection's bytes")
    assert relay.connections == 2

    client.shutdown(socket.SHUT_WR)  # an EOF is held back while blackholed...
    relay.set_mode("pass")
    client_data = b"found-up"
    upstream.sendall(b"found-down")
    assert recv_exactly(client, 10) == b"found-down"  # only the new bytes: the lost ones are gone for good
    assert upstream.recv(1) == b""  # ...and delivered once the path passes again
    late_client.sendall(client_data)
    assert recv_exactly(late_upstream, len(client_data)) == client_data
    late_upstream.sendall(b"ok")
    assert recv_exactly(late_client, 2) == b"ok"


def test_stall_then_pass_delivers_everything_buffered_in_order(
    relay: Relay, server: socket.socket, sockets: list[socket.socket]
) -> None:
    client, upstream = relayed_pair(relay, server, sockets)
    client.sendall(b"warm")  # both directions are mid-stream, the relay blocked in a read on each
    assert recv_exactly(upstream, 4) == b"warm"

    relay.set_mode("stall")
    up, down = payload(256 * 1024, 1), payload(256 * 1024, 2)
    senders = [
        threading.Thread(target=client.sendall, args=(up,)),
        threading.Thread(target=upstream.sendall, args=(down,)),
    ]
    for sender in senders:
        sender.start()
    assert_quiet(client, upstream)
    assert relay.discarded == 0 and relay.connections == 1

    relay.set_mode("pass")
    assert recv_exactly(upstream, len(up)) == up
    assert recv_exactly(client, len(down)) == down
    for sender in senders:
        sender.join(TIMEOUT_S)
        assert not sender.is_alive()


def test_cut_resets_every_connection_and_keeps_accepting(
    relay: Relay, server: socket.socket, sockets: list[socket.socket]
) -> None:
    pairs = [relayed_pair(relay, server, sockets) for _ in range(2)]
    wait_for(lambda: relay.connections == 2, TIMEOUT_S, message="two open connections")

    relay.cut()
    assert relay.connections == 0
    for client, upstream in pairs:
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        with pytest.raises(ConnectionResetError):
            upstream.recv(1)

    client, upstream = relayed_pair(relay, server, sockets)
    client.sendall(b"again")
    assert recv_exactly(upstream, 5) == b"again"
    assert (relay.accepted, relay.connections, relay.mode) == (3, 1, "pass")


def test_reject_cuts_current_connections_and_aborts_new_ones(
    relay: Relay, server: socket.socket, sockets: list[socket.socket]
) -> None:
    client, upstream = relayed_pair(relay, server, sockets)
    relay.set_mode("reject")
    assert relay.connections == 0
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    with pytest.raises(ConnectionResetError):
        upstream.recv(1)

    for count in (2, 3):
        connect_and_expect_teardown(relay, sockets)
        wait_until_accepted(relay, count)
    assert relay.connections == 0
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.accept()  # nothing was ever connected upstream for the rejected clients
    server.settimeout(TIMEOUT_S)

    relay.set_mode("pass")
    client, upstream = relayed_pair(relay, server, sockets)
    client.sendall(b"back")
    assert recv_exactly(upstream, 4) == b"back"


def test_a_target_that_refuses_resets_the_client_and_the_relay_carries_on(sockets: list[socket.socket]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]
    with Relay(dead_port) as relay:
        relay.start()
        for count in (1, 2):
            connect_and_expect_teardown(relay, sockets)
            assert relay.accepted == count
        wait_for(lambda: relay.connections == 0, TIMEOUT_S, message="the failed connections to be dropped")


def test_close_is_idempotent_stops_the_thread_and_resets_connections(
    server: socket.socket, sockets: list[socket.socket]
) -> None:
    threads_before = set(threading.enumerate())
    relay = Relay(server.getsockname()[1])
    port = relay.start()
    assert port == relay.port and port != server.getsockname()[1]
    assert len(set(threading.enumerate()) - threads_before) == 1
    client, upstream = relayed_pair(relay, server, sockets)

    relay.close()
    relay.close()
    assert set(threading.enumerate()) == threads_before
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    with pytest.raises(ConnectionResetError):
        upstream.recv(1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S).close()
    with pytest.raises(RuntimeError):
        relay.set_mode("stall")
    with pytest.raises(RuntimeError):
        relay.cut()
    with pytest.raises(RuntimeError):
        relay.start()


def test_api_misuse_fails_clearly(server: socket.socket) -> None:
    relay = Relay(server.getsockname()[1])
    with pytest.raises(RuntimeError):
        _ = relay.port
    with pytest.raises(RuntimeError):
        relay.cut()
    relay.close()  # closing a relay that never started is fine

    with Relay(server.getsockname()[1]) as started:
        started.start()
        with pytest.raises(ValueError, match="unknown relay mode"):
            started.set_mode("drop")
        with pytest.raises(RuntimeError, match="already started"):
            started.start()
        assert (started.mode, started.accepted, started.connections, started.discarded) == ("pass", 0, 0, 0)
