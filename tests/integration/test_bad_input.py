"""Bad input gets one clear line and a non-zero exit; a misbehaving peer loses only its own link."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from vectorlay.testing.processes import Stack, tinylm_manifest

pytestmark = pytest.mark.slow

BAD_MANIFESTS = {
    "negative replicas": (tinylm_manifest().replace("replicas: 2", "replicas: -1"), "spec.replicas (line 6): must be at least 0"),
    "unknown key": (tinylm_manifest().replace("  port: 8000", "  port: 8000\n  prot: 1"), "unknown key 'prot'"),
    "duplicate key": (tinylm_manifest().replace("  port: 8000", "  port: 8000\n  port: 9000"), "duplicate key 'port'"),
    "bad name": (tinylm_manifest("Echo_1"), "metadata.name (line 4): 'Echo_1' is not a valid name"),
    "bad duration": (tinylm_manifest(reschedule_after="soon"), "spec.reschedule_after (line 12)"),
    "not yaml": ("apiVersion: [unclosed", "invalid YAML"),
}


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one `error:` line (after any progress lines), no traceback."""
    stderr = result.stderr.strip()
    assert result.returncode != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0], stderr
    return errors[0]


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_is_rejected_without_contacting_the_server(stack: Stack, case: str) -> None:
    text, expected = BAD_MANIFESTS[case]
    # No server is running: the manifest must be rejected before any connection is tried.
    result = stack.cli("apply", "-", check=False, input_text=text)
    assert expected in _one_line_error(result)


def test_missing_manifest_file_and_unreachable_server(stack: Stack, tmp_path: object) -> None:
    missing = stack.cli("apply", "/nonexistent/cluster.yaml", check=False)
    assert "no such file" in _one_line_error(missing)
    unreachable = stack.cli("get", "nodes", "--server", "ws://127.0.0.1:1", "--token", "abcdef.0123456789abcdef01",
                            check=False)
    assert "cannot reach the server at ws://127.0.0.1:1/v1/api" in _one_line_error(unreachable)
    no_config = stack.cli("get", "nodes", check=False)
    assert "no server configured" in _one_line_error(no_config)


def test_bad_tokens_are_refused_and_the_server_keeps_its_data(stack: Stack) -> None:
    stack.start_server()
    stack.cli("apply", "-", "--no-wait", input_text=tinylm_manifest("echo", replicas=1))

    wrong = stack.cli("node", "join", "--server", stack.server_url, "--token", "abcdef.0123456789abcdefXYZ",
                      "--name", "x", "--state-dir", str(stack.root / "x"), check=False)
    assert "refused to let this node join: invalid token" in _one_line_error(wrong)
    assert not (stack.root / "x" / "node.json").exists()

    expired_token = stack.token("node", "--ttl", "1s")
    time.sleep(1.2)
    expired = stack.cli("node", "join", "--server", stack.server_url, "--token", expired_token,
                        "--name", "y", "--state-dir", str(stack.root / "y"), check=False)
    assert "token has expired" in _one_line_error(expired)

    proxy_token = stack.token("proxy")
    as_join = stack.cli("node", "join", "--server", stack.server_url, "--token", proxy_token,
                        "--name", "z", "--state-dir", str(stack.root / "z"), check=False)
    assert "a proxy token cannot do this" in _one_line_error(as_join)

    one_use = stack.token("node", "--uses", "1")
    stack.join_node  # noqa: B018 - documented helper; here we need a custom token
    first = stack._spawn("u1", ["node", "join", "--server", stack.server_url, "--token", one_use, "--name", "u1",
                                "--state-dir", str(stack.root / "u1")])
    stack.procs.append(first)
    first.wait_log("connected to")
    second = stack.cli("node", "join", "--server", stack.server_url, "--token", one_use,
                       "--name", "u2", "--state-dir", str(stack.root / "u2"), check=False)
    assert "no uses left" in _one_line_error(second)

    bad_admin = stack.cli("get", "nodes", "--token", "abcdef.0123456789abcdef0123", check=False)
    assert "refused the token: invalid token" in _one_line_error(bad_admin)

    assert [n["name"] for n in stack.cli_json("get", "nodes")] == ["u1"]
    assert [c["name"] for c in stack.cli_json("get", "clusters")] == ["echo"]


async def _send_raw(url: str, frames: list[str]) -> tuple[int | None, str]:
    """Send raw frames on a fresh WebSocket and return how the server closed it."""
    async with open_websocket_url(url) as ws:
        try:
            for frame in frames:
                await ws.send_message(frame)
            with trio.fail_after(10):
                while True:
                    await ws.get_message()
        except ConnectionClosed as closed:
            return closed.reason.code, closed.reason.reason or ""
    return None, ""


@pytest.mark.parametrize(("path", "frames", "code", "reason"), [
    ("/v1/node", ["not json"], 1002, "not valid JSON"),
    ("/v1/node", ['{"type": "heartbeat"}'], 1002, "unexpected message type 'heartbeat'"),
    ("/v1/node", ['{"type": "join", "protocol": 1, "token": 5, "name": "x"}'], 1002, "token: expected a string"),
    ("/v1/node", ['{"type": "join", "protocol": 99, "token": "a.b", "name": "x"}'], 1002, "protocol version 99"),
    ("/v1/node", ['{"type": "node_hello", "protocol": 1, "credential": "n-abc.0123456789abcdefgh"}'], 1008,
     "unknown node credential"),
    ("/v1/api", ['{"type": "client_hello", "protocol": 1, "token": "nope"}'], 1008, "malformed token"),
    ("/v1/proxy", ["[1, 2, 3]"], 1002, "must be a JSON object"),
])
def test_malformed_peer_messages_close_that_link_with_a_reason(stack: Stack, path: str, frames: list[str],
                                                                code: int, reason: str) -> None:
    stack.start_server()
    got_code, got_reason = trio.run(_send_raw, stack.server_url + path, frames)
    assert got_code == code
    assert reason in got_reason
    # The server is still up and serving everyone else.
    assert stack.server is not None and stack.server.alive
    assert stack.cli_json("get", "nodes") == []


def test_garbage_after_hello_closes_only_that_node(stack: Stack) -> None:
    stack.start_server()
    node = stack.join_node("n1", gpus=["RTX 4090:24"])
    credential = json.loads((node.state_dir / "node.json").read_text())["credential"]
    # A second connection with a valid credential, then garbage: closed with a reason. The real
    # agent is paused meanwhile so that its reconnect cannot race the rogue session.
    node.signal(signal.SIGSTOP)
    hello = json.dumps({"type": "node_hello", "protocol": 1, "credential": credential})
    code, reason = trio.run(_send_raw, stack.server_url + "/v1/node",
                            [hello, '{"type": "replica_status", "report": {"replica_id": 1}}'])
    assert code == 1002 and "replica_id: expected a string" in reason
    node.signal(signal.SIGCONT)
    # The real agent reconnects (its session was replaced by the rogue one) and stays healthy.
    stack.cli("apply", "-", input_text=tinylm_manifest("echo", replicas=1), timeout_s=60)
    assert [(n["name"], n["state"]) for n in stack.cli_json("get", "nodes")] == [("n1", "ready")]


def test_a_taken_port_is_one_line_that_names_the_address_and_the_flag(stack: Stack, tmp_path: Path) -> None:
    """A port another process holds: no traceback, the address, the flag that picks another, exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        address = f"127.0.0.1:{port}"
        cases = [
            (["server", "--listen", address, "--state-dir", str(tmp_path / "s")], "for the server", "--listen"),
            (["proxy", "--server", "ws://127.0.0.1:1", "--token", "a.b", "--listen", address], "for the proxy",
             "--listen"),
            (["proxy", "--server", "ws://127.0.0.1:1", "--token", "a.b", "--listen", "127.0.0.1:0",
              "--metrics-listen", address], "for the proxy's metrics", "--metrics-listen"),
            (["dev", "--state-dir", str(tmp_path / "d1"), "--server-port", str(port)], "for the server",
             "--server-port"),
            (["dev", "--state-dir", str(tmp_path / "d2"), "--server-port", "0", "--proxy-port", str(port)],
             "for the proxy", "--proxy-port"),
        ]
        for args, purpose, flag in cases:
            result = stack.cli(*args, check=False)
            assert result.returncode == 1, result.stderr
            line = _one_line_error(result)
            assert f"cannot listen on {address} {purpose}: address already in use" in line, line
            assert f"choose another with {flag}" in line, line
