"""The codec interface on h11: the reference implementation, slower than httptools' parser."""

from __future__ import annotations

import h11

from vectorlay.proxy.codec.events import (
    CLOSED,
    END,
    NEED_DATA,
    Data,
    Headers,
    LocalProtocolError,
    RemoteProtocolError,
    Request,
    Response,
    Signal,
)
from vectorlay.proxy.codec.target import is_absolute, origin_form

_REQUEST_UNFINISHED = (h11.IDLE, h11.SEND_BODY)


def head_size(request: h11.Request) -> int:
    """About the size of the request line and headers as they came on the wire."""
    size = len(request.method) + len(request.target) + 12
    for key, value in request.headers:
        size += len(key) + len(value) + 4
    return size


class H11ServerCodec:
    def __init__(self, max_head_bytes: int) -> None:
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes

    def receive_data(self, data: bytes) -> None:
        self.conn.receive_data(data)

    def next_event(self) -> Request | Data | Signal:
        event = _next_event(self.conn)
        if isinstance(event, h11.Request):
            # h11 only bounds a head still arriving; one that came in a single read is measured here.
            if head_size(event) > self.max_head_bytes:
                raise RemoteProtocolError("request line and headers too large", 431)
            headers = list(event.headers)  # h11 refused a second Host header (400), as httptools' codec does
            target = event.target
            if is_absolute(target):
                target, headers = origin_form(target, headers)
            return Request(event.method, target, headers, event.http_version, _keep_alive(event),
                           self.conn.they_are_waiting_for_100_continue)
        return event if isinstance(event, (Data, Signal)) else CLOSED

    @property
    def request_started(self) -> bool:
        return bool(self.conn.trailing_data[0])

    @property
    def request_done(self) -> bool:
        return self.conn.their_state not in _REQUEST_UNFINISHED

    @property
    def waiting_for_100_continue(self) -> bool:
        return self.conn.they_are_waiting_for_100_continue

    @property
    def response_started(self) -> bool:
        return self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        self.conn.start_next_cycle()

    def send_informational(self, status: int, reason: bytes) -> bytes:
        return _send(self.conn, h11.InformationalResponse(status_code=status, reason=reason, headers=[]))

    def send_response(self, status: int, reason: bytes, headers: Headers, close: bool = False) -> bytes:
        if close:
            headers = [*headers, (b"connection", b"close")]
        return _send(self.conn, h11.Response(status_code=status, reason=reason, headers=headers))

    def send_data(self, data: bytes) -> bytes:
        return _send(self.conn, h11.Data(data=data))

    def send_end(self) -> bytes:
        return _send(self.conn, h11.EndOfMessage())


class H11ClientCodec:
    def __init__(self) -> None:
        self.conn = h11.Connection(h11.CLIENT)
        self.closed = False  # the replica closed its side (h11 would still call a close-delimited end DONE)

    def send_request(self, method: bytes, target: bytes, headers: Headers) -> bytes:
        return _send(self.conn, h11.Request(method=method, target=target, headers=headers))

    def send_data(self, data: bytes) -> bytes:
        return _send(self.conn, h11.Data(data=data))

    def send_end(self) -> bytes:
        return _send(self.conn, h11.EndOfMessage())

    def receive_data(self, data: bytes) -> None:
        self.closed = self.closed or not data
        self.conn.receive_data(data)

    def next_event(self) -> Response | Data | Signal:
        event = _next_event(self.conn)
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            return Response(event.status_code, event.reason, list(event.headers), event.http_version)
        return event if isinstance(event, (Data, Signal)) else CLOSED

    def reusable(self) -> bool:
        return not self.closed and self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        self.conn.start_next_cycle()


def _keep_alive(request: h11.Request) -> bool:
    """As h11 decides it: HTTP/1.1 without `Connection: close`."""
    if request.http_version < b"1.1":
        return False
    return not any(name == b"connection" and b"close" in [t.strip() for t in value.lower().split(b",")]
                   for name, value in request.headers)


def _next_event(conn: h11.Connection) -> h11.Event | Data | Signal:
    """h11's next event, with what both sides read alike translated: body data, the end of a
    message, NEED_DATA, PAUSED (CLOSED: nothing more to read here) and broken input
    (RemoteProtocolError). Heads, and ConnectionClosed, are left to each side."""
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as error:
        raise RemoteProtocolError(str(error), error.error_status_hint) from None
    if isinstance(event, h11.Data):
        return Data(bytes(event.data))
    if isinstance(event, h11.EndOfMessage):
        return END
    if isinstance(event, h11.Event):
        return event
    return NEED_DATA if event is h11.NEED_DATA else CLOSED


def _send(conn: h11.Connection, event: h11.Event) -> bytes:
    try:
        return conn.send(event) or b""
    except h11.LocalProtocolError as error:
        raise LocalProtocolError(str(error)) from None
