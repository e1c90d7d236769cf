"""Tests for the tinylm example: serve.py runs as a real subprocess, as a vectorlay node starts it."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

HERE = Path(__file__).parent
SERVE = HERE / "serve.py"
REPLICA = "replica-7"
NODE = "node-3"


def _load_serve() -> ModuleType:
    # Load by path under a unique name: "serve" alone could clash with another module on sys.path.
    spec = importlib.util.spec_from_file_location("tinylm_serve", SERVE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


serve = _load_serve()


class ServerProcess:
    """serve.py on an OS-chosen port, with its stdout collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith("VECTORLAY_")}
        # -S keeps site-packages off sys.path: serve.py must run on a bare python3.
        command = [sys.executable, "-S", str(SERVE), "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env | (env or {})
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._collect_output, daemon=True).start()
        startup = self.wait_for_line("listening on")
        match = re.fullmatch(r"tinylm listening on 127\.0\.0\.1:(\d+) \(replica=.*\)", startup)
        assert match, startup
        self.port = int(match[1])

    def _collect_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for_line(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if needle in line:
                return line
        raise AssertionError(f"no output line containing {needle!r} within {timeout}s")

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(env={"VECTORLAY_REPLICA": REPLICA, "VECTORLAY_NODE": NODE})
    yield proc
    proc.stop()


def call(
    conn: http.client.HTTPConnection, method: str, path: str, body: object = None
) -> tuple[http.client.HTTPResponse, dict[str, Any]]:
    """One request on ``conn``; a non-bytes body is sent as JSON. Returns the response and its JSON."""
    payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response, json.loads(response.read())


def complete(server: ServerProcess, **fields: Any) -> dict[str, Any]:
    response, body = call(server.connect(), "POST", "/v1/completions", fields)
    assert response.status == 200, body
    return body


def test_healthz(server: ServerProcess) -> None:
    response, body = call(server.connect(), "GET", "/healthz")
    assert response.status == 200
    assert body["status"] == "ok"


def test_info_and_model_list(server: ServerProcess) -> None:
    conn = server.connect()
    _, info = call(conn, "GET", "/")
    assert info["name"] == "tinylm"
    assert info["order"] >= 4 and info["vocab_size"] > 50
    assert (info["replica"], info["node"]) == (REPLICA, NODE)
    _, models = call(conn, "GET", "/v1/models")
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tinylm"]


def test_completion_is_openai_shaped_and_deterministic(server: ServerProcess) -> None:
    first = complete(server, prompt="Return the ", max_tokens=40, temperature=0, seed=1)
    second = complete(server, prompt="Return the ", max_tokens=40, temperature=0, seed=1)
    assert first["object"] == "text_completion" and first["model"] == "tinylm"
    assert first["id"].startswith("cmpl-") and first["id"] != second["id"]
    [choice] = first["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert len(choice["text"]) == 40
    assert first["usage"] == {"prompt_tokens": 11, "completion_tokens": 40, "total_tokens": 51}
    assert second["choices"][0]["text"] == choice["text"]
    assert (first["replica"], first["node"]) == (REPLICA, NODE)


def test_sampling_depends_only_on_the_seed(server: ServerProcess) -> None:
    texts = [
        complete(server, prompt="The ", seed=seed, temperature=0.8)["choices"][0]["text"]
        for seed in (5, 5, 6)
    ]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_generated_text_resembles_english(server: ServerProcess) -> None:
    text = complete(server, prompt="The ", max_tokens=400, seed=0)["choices"][0]["text"]
    plain = sum(ch.isalpha() or ch.isspace() for ch in text)
    assert plain / len(text) > 0.85, text
    assert " the " in text, text


def test_max_tokens_is_capped(server: ServerProcess) -> None:
    body = complete(server, prompt="", max_tokens=100_000, seed=0)
    assert len(body["choices"][0]["text"]) == serve.MAX_TOKENS_CAP


def read_raw_stream(port: int, request: dict[str, Any]) -> tuple[bytes, bytes, float, float]:
    """POST a streaming request on a bare socket, reading as bytes arrive.

    Returns the response head, the raw chunked body, and when the first event and ``[DONE]`` arrived.
    """
    payload = json.dumps(request).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: tinylm\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        received = b""
        first_event_at = done_at = 0.0
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the stream ended"
            received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            if not first_event_at and b"data: {" in body:
                first_event_at = time.monotonic()
            if not done_at and b"data: [DONE]" in body:
                done_at = time.monotonic()
    return head, body, first_event_at, done_at


def decode_chunked(body: bytes) -> bytes:
    data = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return data
        data += body[:size]
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


def test_streaming_sends_events_as_tokens_are_generated(server: ServerProcess) -> None:
    request = {"prompt": "The ", "max_tokens": 8, "temperature": 0, "stream": True}
    head, body, first_event_at, done_at = read_raw_stream(server.port, request)

    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Type: text/event-stream" in head and b"Transfer-Encoding: chunked" in head
    events = decode_chunked(body).decode().split("\n\n")
    assert events.pop() == ""  # every event ends with a blank line
    assert all(e.startswith("data: ") for e in events)
    assert events.pop() == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events]
    assert len(chunks) == 8
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 7 + ["length"]
    assert all((c["replica"], c["node"]) == (REPLICA, NODE) for c in chunks)

    # Seven 20 ms pauses separate the tokens: the first arrived well before the stream ended.
    assert done_at - first_event_at > 0.07
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == complete(server, prompt="The ", max_tokens=8, temperature=0)["choices"][0]["text"]


def test_keep_alive_across_requests_and_errors(server: ServerProcess) -> None:
    conn = server.connect()
    call(conn, "GET", "/healthz")
    sock = conn.sock
    assert sock is not None
    requests: list[tuple[str, str, object, int]] = [
        ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 4}, 200),
        ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 4, "stream": True}, 200),
        ("POST", "/v1/completions", b"{not json", 400),
        ("POST", "/nowhere", {"prompt": "a"}, 404),
        ("GET", "/v1/models", None, 200),
    ]
    for method, path, body, status in requests:
        conn.request(method, path, body=body if isinstance(body, bytes | None) else json.dumps(body))
        response = conn.getresponse()
        response.read()
        assert response.status == status
        assert conn.sock is sock, f"{method} {path} closed the connection"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'{"temperature": NaN}',
        b"\xff\xfe\xfd",
        b"[" * 100_000,
        {"prompt": 5},
        {"max_tokens": "3"},
        {"max_tokens": True},
        {"max_tokens": -1},
        {"temperature": "hot"},
        {"temperature": 3},
        {"seed": 1.5},
        {"stream": "yes"},
    ],
)
def test_bad_requests_get_400_json(server: ServerProcess, body: object) -> None:
    response, error = call(server.connect(), "POST", "/v1/completions", body)
    assert response.status == 400
    assert response.getheader("Content-Type") == "application/json"
    assert error["error"]["message"]


def test_unknown_path_and_wrong_method(server: ServerProcess) -> None:
    conn = server.connect()
    response, body = call(conn, "GET", "/v2/nothing")
    assert response.status == 404 and "error" in body
    response, body = call(conn, "GET", "/v1/completions")
    assert response.status == 405 and "error" in body
    response, body = call(conn, "DELETE", "/healthz")
    assert response.status == 501 and "error" in body


def test_identity_headers_and_log_lines(server: ServerProcess) -> None:
    for path in ("/healthz", "/missing"):
        response, body = call(server.connect(), "GET", path)
        assert response.getheader("X-Vectorlay-Replica") == REPLICA
        assert response.getheader("X-Vectorlay-Node") == NODE
        assert (body["replica"], body["node"]) == (REPLICA, NODE)
    line = server.wait_for_line("GET /missing")
    assert re.fullmatch(rf"tinylm replica={REPLICA} GET /missing 404 \d+ms", line)


def test_identity_defaults_to_empty() -> None:
    bare = ServerProcess()
    try:
        response, body = call(bare.connect(), "GET", "/healthz")
        assert response.getheader("X-Vectorlay-Replica") == ""
        assert response.getheader("X-Vectorlay-Node") == ""
        assert (body["replica"], body["node"]) == ("", "")
    finally:
        bare.stop()


def test_delay_ms_slows_completions() -> None:
    slow = ServerProcess("--delay-ms", "300")
    try:
        started = time.monotonic()
        complete(slow, prompt="x", max_tokens=1)
        assert time.monotonic() - started >= 0.3
    finally:
        slow.stop()


def test_sigterm_exits_promptly_with_idle_connections_open() -> None:
    proc = ServerProcess()
    idle = proc.connect()
    call(idle, "GET", "/healthz")  # leaves a keep-alive connection open on the server
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 2
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proc.port), timeout=2)


def test_generation_is_fast() -> None:
    model = serve.NGramModel.load(serve.MODEL_PATH)
    started = time.perf_counter()
    for seed in range(20):
        "".join(model.generate("The quick ", 32, 0.8, random.Random(seed)))
    assert (time.perf_counter() - started) / 20 < 0.05


def test_model_file_is_small() -> None:
    assert serve.MODEL_PATH.stat().st_size < 1_500_000


def test_training_reproduces_model_json(tmp_path: Path) -> None:
    shipped = serve.MODEL_PATH.read_bytes()
    trained_with = json.loads(shipped)["corpus"]["python"]
    if trained_with != ".".join(map(str, sys.version_info[:3])):
        pytest.skip(f"model.json was trained on Python {trained_with}; docstrings differ between versions")
    output = tmp_path / "model.json"
    subprocess.run([sys.executable, str(HERE / "train.py"), "--output", str(output)], check=True)
    assert output.read_bytes() == shipped
