"""Bad input gets one clear line and a non-zero exit; a misbehaving peer loses only its own link."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from testsupport.background import BackgroundLoop
from testsupport.node_server import ScriptedNodeServer
from testsupport.processes import REPO_ROOT, Stack, replica_pids, tinylm_manifest, wait_for
from vectorlay.client.api import open_api
from vectorlay.core.api import Apply, Request, SecretSet
from vectorlay.core.model import Assignment, ClusterSpec, HealthCheck, ReplicaState, Runtime
from vectorlay.core.protocol import LogsEnd, LogsOpen, Message
from vectorlay.errors import ProtocolError, UserError
from vectorlay.node.state_dir import NodeStateDir
from vectorlay.wire import Link, serve

pytestmark = pytest.mark.slow

BAD_MANIFESTS = {
    "negative replicas": (tinylm_manifest().replace("replicas: 2", "replicas: -1"), "spec.replicas (line 6): must be at least 0"),
    "unknown key": (tinylm_manifest().replace("  port: 8000", "  port: 8000\n  prot: 1"), "unknown key 'prot'"),
    "duplicate key": (tinylm_manifest().replace("  port: 8000", "  port: 8000\n  port: 9000"), "duplicate key 'port'"),
    "bad name": (tinylm_manifest("Echo_1"), "metadata.name (line 4): 'Echo_1' is not a valid name"),
    "bad duration": (tinylm_manifest(reschedule_after="soon"), "spec.reschedule_after (line 12)"),
    "not yaml": ("apiVersion: [unclosed", "invalid YAML"),
    "NUL in command": (tinylm_manifest(extra_args=["x\\0"]), "spec.command[4] (line 9): contains a NUL byte"),
    "surrogate in command": (tinylm_manifest(extra_args=["\\ud800"]), "spec.command[4] (line 9): contains U+D800"),
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
    assert not NodeStateDir(stack.root / "x").is_joined()

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
            reason = closed.reason
            return (reason.code, reason.reason or "") if reason else (None, "")
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
    credential = node.files.load_credentials().credential
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


def test_secret_values_no_process_can_take_are_refused_before_contacting_the_server(stack: Stack) -> None:
    # No server listens there: `secret set` refuses these itself (a secret becomes an environment
    # variable), before it tries to connect.
    nowhere = ("--server", "ws://127.0.0.1:1", "--token", "abcdef.0123456789abcdef01")
    nul = stack.cli("secret", "set", "default", "hf-token", *nowhere, check=False, input_text="hf_\x00abc")
    assert "invalid secret 'hf-token': the value contains a NUL byte" in _one_line_error(nul)
    not_utf8 = subprocess.run([*stack.cli_argv(), "secret", "set", "default", "hf-token", *nowhere],
                              input=b"hf_\xff\xfe",
                              capture_output=True, env=stack.env(), cwd=REPO_ROOT, timeout=60)
    result = subprocess.CompletedProcess(not_utf8.args, not_utf8.returncode, not_utf8.stdout.decode(),
                                         not_utf8.stderr.decode())
    assert "the secret read from stdin is not valid UTF-8" in _one_line_error(result)


async def _call_refused(url: str, token: str, request: Request[Any]) -> str:
    async with open_api(url, token) as client:
        with pytest.raises(UserError) as refused:
            await client.call(request)
    return str(refused.value)


def test_the_server_refuses_what_no_process_can_take_from_a_client_that_does_not_check(stack: Stack) -> None:
    stack.start_server()
    manifest = tinylm_manifest(extra_args=["x\\0"])
    refused = trio.run(_call_refused, stack.server_url, stack.admin_token, Apply(manifest))
    assert refused == "spec.command[4] (line 9): contains a NUL byte (\\0), which no argument, environment " \
                      "variable or path can hold"
    for value in ("hf_\x00abc", "hf_\ud800"):
        refused = trio.run(_call_refused, stack.server_url, stack.admin_token,
                           SecretSet("default", "hf-token", value))
        assert refused.startswith("invalid secret 'hf-token': the value contains")
    # Nothing changed, and the server serves on.
    assert stack.cli_json("get", "clusters") == []
    assert stack.cli_json("secret", "list", "default") == []


@dataclass(frozen=True)
class UnversionedClientHello(Message):
    """The client hello of servers from before API versions: no `api` field."""

    TYPE: ClassVar[str] = "client_hello"
    protocol: int
    token: str


class UnversionedApiServer(BackgroundLoop):
    """A server from before API versions: it refuses a hello that carries one, as they did."""

    def __init__(self) -> None:
        super().__init__("unversioned API server")
        self.port = 0

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, self._handle, "127.0.0.1", 0, frozenset({"/v1/api"}))
            self.port = server.port
            self._started()

    async def _handle(self, path: str, link: Link) -> None:
        try:
            await link.receive((UnversionedClientHello,))
        except ProtocolError as error:
            await link.reject(error)


def test_a_cli_and_a_server_of_different_api_versions_say_in_one_line_which_to_upgrade(stack: Stack) -> None:
    stack.start_server()
    # A CLI from before API versions sends a hello without one: told to upgrade, with a valid token.
    hello = json.dumps({"type": "client_hello", "protocol": 1, "token": stack.admin_token})
    code, reason = trio.run(_send_raw, stack.server_url + "/v1/api", [hello])
    assert (code, reason) == (1002, "this vectorlay speaks API version 1; this server needs 2: upgrade vectorlay")
    # This CLI, against a server from before API versions.
    with UnversionedApiServer() as old:
        result = stack.cli("get", "clusters", "--server", f"ws://127.0.0.1:{old.port}", "--token",
                           "abcdef.0123456789abcdef01", check=False)
    assert _one_line_error(result) == "error: this server speaks API version 1; this vectorlay needs 2: upgrade the server"


TINYLM = ClusterSpec("web", 1, runtime=Runtime.PROCESS,
                     command=("python3", "examples/tinylm/serve.py", "--port", "${PORT}"),
                     health=HealthCheck(path="/healthz", interval_s=0.5, timeout_s=0.4))
SLEEPER = ClusterSpec("bad", 1, runtime=Runtime.PROCESS, command=("sleep", "100"), health=None)
NUL_REASON = "contains a NUL byte (\\0), which no argument, environment variable or path can hold"
POISON = {
    # The poison pill: this killed every agent it landed on.
    "nul-command": (Assignment("nul-command", "bad", 1, replace(SLEEPER, command=("sh", "-c", "sleep 100 # \0"))),
                    f"spec.command[2]: {NUL_REASON}"),
    "nul-env": (Assignment("nul-env", "bad", 1, replace(SLEEPER, env={"A": "x\0y"})), f"spec.env.A: {NUL_REASON}"),
    "nul-workdir": (Assignment("nul-workdir", "bad", 1, replace(SLEEPER, workdir="/tmp\0")),
                    f"spec.workdir: {NUL_REASON}"),
    "nul-secret": (Assignment("nul-secret", "bad", 1, SLEEPER, secret_env={"HF_TOKEN": "hf\0"}),
                   f"spec.env_from_secret.HF_TOKEN: {NUL_REASON}"),
    "surrogate-env": (Assignment("surrogate-env", "bad", 1, replace(SLEEPER, env={"A": "\ud800"})),
                      "spec.env.A: contains U+D800, a lone surrogate that cannot be encoded as UTF-8"),
    "space-in-probe": (Assignment("space-in-probe", "bad", 1, replace(SLEEPER, health=HealthCheck(path="/a b"))),
                       "spec.health.path: '/a b' is not a valid URL path"),
}


def test_an_assignment_no_process_can_take_fails_that_replica_and_the_agent_serves_on(stack: Stack) -> None:
    # A server that does not check (an older version, or a hostile one) sends a real agent with the
    # process runtime what `apply` refuses, beside a healthy replica.
    good = Assignment("web-good1", "web", 1, TINYLM)
    with ScriptedNodeServer([good, *(assignment for assignment, _ in POISON.values())]) as server:
        server.write_credentials(stack.root / "n1", "n1")
        node = stack.start_node("n1", "--allow-process-runtime")
        wait_for(lambda: server.state("web-good1") is ReplicaState.READY
                 and all(server.state(replica) is ReplicaState.FAILED for replica in POISON), 30,
                 message="the good replica ready and each poisoned one failed")
        for replica, (_, reason) in POISON.items():
            report = server.report(replica)
            assert report is not None and report.reason.startswith(f"cannot be launched: {reason}"), report
            assert not report.node_fault  # the cluster's fault: no other node would do better
            assert not replica_pids(replica=replica)

        # A hostile log request, and a log that cannot be read, end only their own streams.
        NodeStateDir(stack.root / "n1").replica_log("odd-1").mkdir(parents=True)
        server.send(LogsOpen(7, "../../etc/passwd"))
        server.send(LogsOpen(8, "odd-1"))
        wait_for(lambda: len([m for m in server.logs() if isinstance(m, LogsEnd)]) == 2, 10,
                 message="both log requests to end")
        ends = {m.stream_id: m.error for m in server.logs() if isinstance(m, LogsEnd)}
        assert ends[7] == "replica id '../../etc/passwd' is not a valid file name"
        assert ends[8].startswith("cannot read the log of odd-1: [Errno 21] Is a directory")

        time.sleep(2)  # a while later: the agent is up, connected once, and still serving
        assert node.alive and server.hellos == 1, node.log()[-3000:]
        assert "Traceback" not in node.log()
        good_report = server.report("web-good1")
        assert good_report is not None and good_report.state is ReplicaState.READY and good_report.address
        with urllib.request.urlopen(f"http://{good_report.address}/healthz", timeout=5) as answer:
            assert answer.status == 200
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
