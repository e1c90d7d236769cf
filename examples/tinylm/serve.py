"""Serve tinylm, a character-level n-gram language model, over an OpenAI-style HTTP API.

This is the example inference workload vectorlay runs on machines without a GPU. It uses only the
standard library so that any ``python3`` >= 3.11 can start it:

    python3 examples/tinylm/serve.py --port 12345

Endpoints: ``GET /healthz``, ``GET /``, ``GET /v1/models`` and ``POST /v1/completions`` (optionally
streamed as server-sent events). One token is one character. Every response carries the
``X-Vectorlay-Replica`` / ``X-Vectorlay-Node`` headers taken from the environment so that callers can
see which replica answered.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MODEL_NAME = "tinylm"
MODEL_PATH = Path(__file__).with_name("model.json")
DEFAULT_MAX_TOKENS = 32
MAX_TOKENS_CAP = 512
DEFAULT_TEMPERATURE = 0.8
MAX_TEMPERATURE = 2.0  # the range OpenAI accepts
MAX_BODY_BYTES = 1 << 20

_log_lock = threading.Lock()


def log(line: str) -> None:
    """Write one line to stdout at once: the node captures stdout for `vectorlay logs`."""
    with _log_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# --- the model ---------------------------------------------------------------------------------


class NGramModel:
    """A character n-gram model that samples from the longest context seen in training.

    ``tables[k]`` maps a k-character context to ``(next_chars, counts)``, sorted by count
    (highest first); train.py writes them and prunes rare continuations.
    """

    def __init__(self, order: int, vocab: str, tables: list[dict[str, tuple[str, list[int]]]]) -> None:
        self.order = order
        self.vocab = vocab
        self.tables = tables

    @classmethod
    def load(cls, path: Path) -> NGramModel:
        data = json.loads(path.read_text(encoding="utf-8"))
        tables = [{ctx: (chars, counts) for ctx, (chars, counts) in t.items()} for t in data["tables"]]
        return cls(order=data["order"], vocab=data["vocab"], tables=tables)

    def generate(self, prompt: str, max_tokens: int, temperature: float, rng: random.Random) -> Iterator[str]:
        """Yield ``max_tokens`` characters continuing ``prompt``; temperature 0 is greedy."""
        # Corpus paragraphs follow a newline, so an empty prompt starts like a fresh paragraph.
        history = ("\n" + prompt)[-(self.order - 1) :]
        for _ in range(max_tokens):
            chars, counts = self._distribution(history)
            token = _sample(chars, counts, temperature, rng)
            history = (history + token)[-(self.order - 1) :]
            yield token

    def _distribution(self, history: str) -> tuple[str, list[int]]:
        for k in range(min(len(history), self.order - 1), 0, -1):
            entry = self.tables[k].get(history[-k:])
            if entry is not None:
                return entry
        return self.tables[0][""]


def _sample(chars: str, counts: list[int], temperature: float, rng: random.Random) -> str:
    if temperature == 0:
        return chars[0]  # counts are sorted, so this is the most likely character
    # Scale by the top count first so that count ** (1 / small temperature) cannot overflow.
    top = counts[0]
    weights = [(count / top) ** (1.0 / temperature) for count in counts]
    return rng.choices(chars, weights)[0]


# --- request parsing ---------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered with a JSON body. ``close`` drops the connection when the body is unread."""

    def __init__(self, status: HTTPStatus, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    max_tokens: int
    temperature: float
    seed: int | None
    stream: bool

    @classmethod
    def from_body(cls, body: bytes) -> CompletionRequest:
        data = _parse_json_object(body)
        prompt = _field(data, "prompt", str, "a string", "")
        max_tokens = _field(data, "max_tokens", int, "an integer", DEFAULT_MAX_TOKENS)
        temperature = _field(data, "temperature", (int, float), "a number", DEFAULT_TEMPERATURE)
        seed = _field(data, "seed", int, "an integer", None)
        stream = _field(data, "stream", bool, "a boolean", False)
        if max_tokens < 0:
            raise ApiError(HTTPStatus.BAD_REQUEST, "max_tokens must be >= 0")
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"temperature must be between 0 and {MAX_TEMPERATURE}")
        return cls(prompt, min(max_tokens, MAX_TOKENS_CAP), float(temperature), seed, stream)


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "the JSON body must be an object")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _field(data: dict[str, Any], name: str, types: type | tuple[type, ...], kind: str, default: Any) -> Any:
    value = data.get(name)
    if value is None:  # null means "use the default", as in OpenAI's API
        return default
    # bool is a subclass of int, but true/false is only valid where a boolean is expected.
    if isinstance(value, bool) != (types is bool) or not isinstance(value, types):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name} must be {kind}")
    return value


# --- the HTTP server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    replica: str
    node: str
    delay_s: float
    stream_interval_s: float


class TinyLMServer(ThreadingHTTPServer):
    # Idle keep-alive connections must not hold up shutdown.
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], model: NGramModel, config: ServerConfig) -> None:
        super().__init__(address, Handler)
        self.model = model
        self.config = config


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tinylm/1"
    disable_nagle_algorithm = True  # each streamed token goes out as soon as it is written
    timeout = 120  # seconds; closes keep-alive connections whose client went away
    server: TinyLMServer

    _status: int | None  # set once a response has started; None means nothing to log
    _started: float

    # -- plumbing shared by every request

    def handle_one_request(self) -> None:
        self._status = None
        self._started = time.monotonic()
        try:
            super().handle_one_request()
        finally:
            if self._status is not None:
                self._log_request()

    def parse_request(self) -> bool:
        # The request line has just arrived: time from here, not from the keep-alive idle wait.
        self._started = time.monotonic()
        return super().parse_request()

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        self._status = code
        self.send_header("X-Vectorlay-Replica", self.server.config.replica)
        self.send_header("X-Vectorlay-Node", self.server.config.node)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The base class answers protocol errors (bad request line, unknown method) with HTML;
        # answer in JSON like everywhere else, and close as it does since the stream may be garbled.
        self.close_connection = True
        self._send_json(code, self._error_body(code, message or HTTPStatus(code).phrase))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _log_request writes one line per request once the response is complete

    def log_message(self, format: str, *args: Any) -> None:
        log(f"tinylm replica={self.server.config.replica} {format % args}")

    def _log_request(self) -> None:
        if self.path == "/healthz" and self._status == 200:
            return  # probed every few seconds: logging each success would drown the real requests
        elapsed_ms = (time.monotonic() - self._started) * 1000
        target = f"{self.command} {self.path}" if self.command else "- -"
        log(f"tinylm replica={self.server.config.replica} {target} {self._status} {elapsed_ms:.0f}ms")

    def _identity(self) -> dict[str, str]:
        return {"replica": self.server.config.replica, "node": self.server.config.node}

    def _error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "code": status}, **self._identity()}

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    # -- routing

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _routes(self) -> dict[tuple[str, str], Callable[[bytes], None]]:
        return {
            ("GET", "/healthz"): self._healthz,
            ("GET", "/"): self._info,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/completions"): self._completions,
        }

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        try:
            # Read the body even when it is not needed, so the next keep-alive request parses.
            body = self._read_body()
            routes = self._routes()
            handler = routes.get((self.command, path))
            if handler is None:
                if any(route_path == path for _, route_path in routes):
                    raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed on {path}")
                raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
            handler(body)
        except ApiError as exc:
            self.close_connection = self.close_connection or exc.close
            self._send_json(exc.status, self._error_body(exc.status, exc.message))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-response
        except Exception:
            traceback.print_exc()
            self.close_connection = True
            if self._status is None:  # nothing sent yet, so the client can still get an answer
                self._send_json(500, self._error_body(500, "internal error"))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not supported", close=True)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, "invalid Content-Length", close=True) from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body must be at most {MAX_BODY_BYTES} bytes",
                close=True,
            )
        return self.rfile.read(length)

    # -- endpoints

    def _healthz(self, body: bytes) -> None:
        self._send_json(200, {"status": "ok", **self._identity()})

    def _info(self, body: bytes) -> None:
        model = self.server.model
        info = {"name": MODEL_NAME, "kind": "character n-gram", "order": model.order}
        self._send_json(200, {**info, "vocab_size": len(model.vocab), **self._identity()})

    def _models(self, body: bytes) -> None:
        entry = {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "vectorlay"}
        self._send_json(200, {"object": "list", "data": [entry], **self._identity()})

    def _completions(self, body: bytes) -> None:
        request = CompletionRequest.from_body(body)
        time.sleep(self.server.config.delay_s)  # simulated accelerator latency
        rng = random.Random(request.seed)  # no seed: seeded from the OS, a fresh sample each time
        tokens = self.server.model.generate(request.prompt, request.max_tokens, request.temperature, rng)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": MODEL_NAME,
        }
        if request.stream:
            self._stream_completion(head, tokens, request.max_tokens)
        else:
            self._send_completion(head, request.prompt, "".join(tokens))

    def _send_completion(self, head: dict[str, Any], prompt: str, text: str) -> None:
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(text),
            "total_tokens": len(prompt) + len(text),
        }
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        self._send_json(200, {**head, "choices": [choice], "usage": usage, **self._identity()})

    def _stream_completion(self, head: dict[str, Any], tokens: Iterator[str], count: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, token in enumerate(tokens):
            if i:
                time.sleep(self.server.config.stream_interval_s)
            finish_reason = "length" if i == count - 1 else None
            choice = {"index": 0, "text": token, "logprobs": None, "finish_reason": finish_reason}
            self._write_event(json.dumps({**head, "choices": [choice], **self._identity()}))
        self._write_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")

    def _write_event(self, data: str) -> None:
        event = f"data: {data}\n\n".encode()
        # One write per chunk; wfile is unbuffered, so the event leaves at once.
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the tinylm example model over HTTP.")
    parser.add_argument("--host", default=os.environ.get("VECTORLAY_HOST", "0.0.0.0"),
                        help="address to listen on (default: $VECTORLAY_HOST, else 0.0.0.0)")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "8000")), help="default: $PORT, else 8000"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="extra latency per completion, to mimic a slow GPU"
    )
    parser.add_argument(
        "--stream-interval-ms", type=float, default=20.0, help="pause between streamed tokens (default: 20)"
    )
    parser.add_argument(
        "--model", type=Path, default=MODEL_PATH, help="model file (default: model.json here)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = ServerConfig(
        replica=os.environ.get("VECTORLAY_REPLICA", ""),
        node=os.environ.get("VECTORLAY_NODE", ""),
        delay_s=max(args.delay_ms, 0.0) / 1000,
        stream_interval_s=max(args.stream_interval_ms, 0.0) / 1000,
    )
    server = TinyLMServer((args.host, args.port), NGramModel.load(args.model), config)

    def stop(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever() to return, so it cannot run on the main thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"tinylm listening on {args.host}:{server.server_port} (replica={config.replica})")
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    log(f"tinylm stopped (replica={config.replica})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
