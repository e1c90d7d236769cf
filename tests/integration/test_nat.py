"""A node behind a real NAT: it serves through its tunnel while nothing outside can dial it.

The node (and so its replicas) runs in a network namespace joined to this machine by a veth pair;
inside, iptables drops every new inbound connection (conntrack NEW -> DROP), as a home router or a
carrier-grade NAT does; connections the node opens itself, and their replies, pass. The server and
the proxy run outside. Needs root (network namespaces, iptables), which the tests and CI have.
"""

from __future__ import annotations

import http.client
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from tests_support import missing_service

from testsupport.processes import Stack, http_request, upstream_manifest, wait_for

pytestmark = pytest.mark.slow

MIB = 1024 * 1024


@dataclass(frozen=True)
class Nat:
    namespace: str
    outside_ip: str  # this machine, as the node sees it
    inside_ip: str  # the node's address: what someone outside would have to dial

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.namespace, *argv], capture_output=True, text=True,
                              check=check, timeout=30)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], capture_output=True, text=True, check=True, timeout=30)


@pytest.fixture
def nat() -> Iterator[Nat]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        missing_service("root with `ip` and `iptables` (network namespaces)")
    tag = secrets.token_hex(3)
    subnet = 16 + secrets.randbelow(200)
    box = Nat(f"vlnat-{tag}", f"10.213.{subnet}.1", f"10.213.{subnet}.2")
    outside, inside = f"vlo{tag}", f"vli{tag}"  # interface names are at most 15 characters
    try:
        _ip("netns", "add", box.namespace)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", box.namespace)
        _ip("addr", "add", f"{box.outside_ip}/30", "dev", outside)
        _ip("link", "set", outside, "up")
        box.run("ip", "addr", "add", f"{box.inside_ip}/30", "dev", inside)
        box.run("ip", "link", "set", inside, "up")
        box.run("ip", "link", "set", "lo", "up")
        box.run("ip", "route", "add", "default", "via", box.outside_ip)
        box.run("iptables", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
        box.run("iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
        yield box
    finally:
        box.run("iptables", "-F", "INPUT", check=False)
        subprocess.run(["ip", "netns", "del", box.namespace], capture_output=True, timeout=30)  # and its veth end
        subprocess.run(["ip", "link", "del", outside], capture_output=True, timeout=30)  # if the pair was half made
        assert box.namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_a_node_behind_nat_serves_with_no_inbound_port(nat: Nat, stack: Stack) -> None:
    stack.listen_host = "0.0.0.0"  # the node reaches the server from inside the namespace
    stack.start_server()
    _, port = stack.start_proxy("--tunnel-listen", "0.0.0.0:0", "--tunnel-advertise", nat.outside_ip)
    stack.join_node("home", server_url=f"ws://{nat.outside_ip}:{stack.server_port}",
                    prefix=["ip", "netns", "exec", nat.namespace])
    # The replica listens on every address of the node, not only its loopback: what keeps it
    # unreachable below is the NAT alone.
    stack.cli("apply", "-", "--timeout", "60s", input_text=upstream_manifest("up", host="0.0.0.0"))
    [replica] = stack.cli_json("get", "replicas")
    replica_port = int(replica["address"].rsplit(":", 1)[1])
    wait_for(lambda: [(n["data_plane"], n["tunnels"]) for n in stack.cli_json("get", "nodes")] == [("tunnel", 1)],
             10, message="the node to report its tunnel")

    # Inside, the replica answers on the node's address...
    inside = nat.run("python3", "-c", f"import socket; socket.create_connection(('{nat.inside_ip}', {replica_port}), "
                                      "timeout=5).close(); print('connected')")
    assert inside.stdout.strip() == "connected"
    # ...and from outside nobody can dial it: the SYN is dropped, the connect times out.
    with pytest.raises(OSError):
        socket.create_connection((nat.inside_ip, replica_port), timeout=2)

    # Through the proxy, everything works: plain requests, a streamed response, a 10 MiB upload.
    assert http_request(port, "up.localhost", "/").json()["upstream"] == replica["id"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/stream?n=5&interval_ms=100", headers={"Host": "up.localhost"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type") == "text/event-stream"
    events = [line for line in response.read().split(b"\n") if line.startswith(b"data: ")]
    assert events == [b"data: token %d" % i for i in range(5)] + [b"data: [DONE]"]
    upload = http_request(port, "up.localhost", "/upload", "POST", b"n" * (10 * MIB), timeout_s=60, connection=conn)
    assert upload.status == 200 and upload.json()["body_bytes"] == 10 * MIB
    download = http_request(port, "up.localhost", f"/bytes?n={10 * MIB}", timeout_s=60, connection=conn)
    assert download.status == 200 and len(download.body) == 10 * MIB
    conn.close()
