"""Opening the stream under a client's WebSocket, with every way it can fail told in one line.

A user who gets the URL, the scheme or the token slightly wrong should read what is wrong and what
to do, at once: not a library's exception name, and not a 10 s wait for a handshake that can never
finish. So the TCP connection and the TLS handshake are made here, step by step, each failure
named by the step it happened in; what the server then answers to the WebSocket upgrade is
recorded (`Recording`), so that an answer that is not a WebSocket one can be described too.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass

import trio

from vectorlay.errors import ConnectError

TLS_RECORD_TYPES = frozenset({0x14, 0x15, 0x16, 0x17})  # change cipher spec, alert, handshake, data
RECORDED_BYTES = 512  # enough of a server's first answer to tell what kind of server it is
PIN_HINT = ("if the server made its own CA (`--tls auto`), use a token from `vectorlay token create`, "
            "which carries that CA's pin")


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str  # ws or wss
    host: str
    port: int
    resource: str  # path and query

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def with_scheme(self, scheme: str) -> str:
        return f"{scheme}://{self.address}"

    def failed(self, problem: str) -> ConnectError:
        return ConnectError(f"cannot reach the server at {self.url}: {problem}")


async def open_stream(target: Target, context: ssl.SSLContext | None) -> trio.abc.Stream:
    """TCP, then TLS if `context` is given; ConnectError saying what went wrong. The caller bounds
    the time (a timeout while connecting is its to describe: see `describe_silence`)."""
    try:
        tcp = await trio.open_tcp_stream(target.host, target.port)
    except OSError as error:
        raise target.failed(_tcp_problem(target, error)) from None
    if context is None:
        return tcp
    stream = trio.SSLStream(tcp, context, server_hostname=target.host)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as error:
        await trio.aclose_forcefully(tcp)
        raise target.failed(_tls_problem(target, error.__cause__)) from None
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


def _tcp_problem(target: Target, error: OSError) -> str:
    if isinstance(error, socket.gaierror):
        return f"cannot find the host {target.host!r} ({error.strerror or error}): check the address"
    cause = _attempt_error(error)
    if isinstance(cause, ConnectionRefusedError):
        return f"nothing listens at {target.address} — is the server running, and is the port right?"
    if cause.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"no route to {target.host} ({cause.strerror}): check the address and the network"
    if cause.errno == errno.ETIMEDOUT:
        return f"{target.address} does not answer (a firewall may drop the connection)"
    return f"connecting to {target.address} failed: {cause.strerror or cause}"


def _attempt_error(error: OSError) -> OSError:
    """trio's open_tcp_stream raises an OSError of its own, caused by each attempt's error."""
    cause = error.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    return cause if isinstance(cause, OSError) else error


def _tls_problem(target: Target, cause: BaseException | None) -> str:
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"the server's TLS certificate is not trusted ({cause.verify_message}); {PIN_HINT}"
    reason = getattr(cause, "reason", None) or ""
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL",
                  "HTTP_REQUEST"):
        return f"the server does not use TLS: use {target.with_scheme('ws')} instead of wss://"
    if cause is None or isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError)):
        return (f"the server closed the connection during the TLS handshake: if it does not use TLS, "
                f"use {target.with_scheme('ws')} instead of wss://")
    return f"the TLS handshake failed ({reason or cause})"


class Recording(trio.abc.HalfCloseableStream):
    """A stream that remembers the start of what it received, to describe an answer afterwards."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.received = b""
        self.eof = False
        self.ended = trio.Event()  # the server closed, or the stream was closed (an unreadable answer)

    @property
    def socket(self) -> trio.socket.SocketType | None:
        """The socket, for trio-websocket's local/remote addresses."""
        inner = getattr(self.stream, "transport_stream", self.stream)
        found = getattr(inner, "socket", None)
        return found if isinstance(found, trio.socket.SocketType) else None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        if not data:
            self.eof = True
            self.ended.set()
        elif len(self.received) < RECORDED_BYTES:
            self.received += data[:RECORDED_BYTES - len(self.received)]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()

    async def aclose(self) -> None:
        self.ended.set()
        await self.stream.aclose()


def describe_answer(target: Target, recording: Recording) -> str:
    """What the server did instead of accepting the WebSocket, from what it sent."""
    data = recording.received
    if not data:
        if recording.eof:
            return ("the server closed the connection without answering: is this a vectorlay server? "
                    f"if it uses TLS, use {target.with_scheme('wss')}")
        return "the server accepted the connection but did not answer"
    if data[0] in TLS_RECORD_TYPES:
        return f"the server uses TLS: use {target.with_scheme('wss')} instead of ws://"
    if not data.startswith(b"HTTP/"):
        sample = data[:40].decode("ascii", errors="replace").strip()
        return f"the server does not speak HTTP (it sent {sample!r}): is this the vectorlay server's address?"
    return "the server's answer is not a WebSocket handshake: is this a vectorlay server?"


def describe_rejection(target: Target, status: int, body: bytes | None) -> str:
    """An HTTP answer to the WebSocket upgrade, in words."""
    text = (body or b"").decode("utf-8", errors="replace").strip()
    if "uses TLS" in text or "HTTPS port" in text:
        return f"the server uses TLS: use {target.with_scheme('wss')} instead of ws://"
    if status == 404:
        return (f"the server has no {target.resource} (HTTP 404): is {target.address} a vectorlay server, "
                "and is the URL just scheme://host:port?")
    return f"the server answered HTTP {status} instead of a WebSocket handshake: is this a vectorlay server?"


def describe_silence(target: Target, step: str, timeout_s: float) -> str:
    """A step of connecting that did not finish in time."""
    if step == "tls":
        return (f"no TLS handshake within {timeout_s:g}s: does the server use TLS? "
                f"if not, use {target.with_scheme('ws')}")
    if step == "tcp":
        return f"{target.address} did not accept a connection within {timeout_s:g}s"
    return f"the server accepted the connection but did not answer within {timeout_s:g}s: is it a vectorlay server?"
