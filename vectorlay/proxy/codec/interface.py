"""The two sides of an HTTP/1.1 connection as the proxy drives them, without I/O (like h11).

Bytes received go in with `receive_data` (b"" when the peer closed its side); events come out of
`next_event`, which raises RemoteProtocolError for broken input; `send_*` return the bytes to
write. One request/response cycle at a time: after the request's END and the response's end,
`start_next_cycle` if `reusable()`, else close the connection.
"""

from __future__ import annotations

from typing import Protocol

from vectorlay.proxy.codec.events import Data, Headers, Request, Response, Signal


class ServerCodec(Protocol):
    """The proxy's side of a client connection: parses requests, frames responses."""

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> Request | Data | Signal: ...

    @property
    def request_started(self) -> bool:
        """Bytes of a request not yet returned as an event arrived (a pipelined next request)."""
        ...

    @property
    def request_done(self) -> bool:
        """The current request's END was returned: its body is fully read."""
        ...

    @property
    def waiting_for_100_continue(self) -> bool: ...

    @property
    def response_started(self) -> bool:
        """A final response head was sent: the client has seen part of an answer."""
        ...

    def reusable(self) -> bool: ...

    def start_next_cycle(self) -> None: ...

    def send_informational(self, status: int, reason: bytes) -> bytes: ...

    def send_response(self, status: int, reason: bytes, headers: Headers, close: bool = False) -> bytes:
        """The head; framing headers are added as the body needs (chunked, or close-delimited
        for an HTTP/1.0 client) and `Connection: close` when the connection ends after it."""
        ...

    def send_data(self, data: bytes) -> bytes: ...

    def send_end(self) -> bytes: ...


class ClientCodec(Protocol):
    """The proxy's side of an upstream connection: frames requests, parses responses."""

    def send_request(self, method: bytes, target: bytes, headers: Headers) -> bytes:
        """The head; its body is framed by the Content-Length or Transfer-Encoding in `headers`."""
        ...

    def send_data(self, data: bytes) -> bytes: ...

    def send_end(self) -> bytes: ...

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> Response | Data | Signal: ...

    def reusable(self) -> bool: ...

    def start_next_cycle(self) -> None: ...
