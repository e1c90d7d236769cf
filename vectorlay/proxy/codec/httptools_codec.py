"""The codec interface on httptools (llhttp in C): a request/response cycle costs a few µs, not h11's ~90.

llhttp parses all it is fed at once, so events are queued and handed out in order (a pipelined
request waits its turn) and a parse error is held until the events before it are consumed. What
llhttp leaves to its caller is done here, as h11 does it:

- bounds: a request head over the limit is 431; so is input that makes no progress for longer
  than the limit (a header, trailer or chunk line that never ends), which httptools would buffer;
- `Host` is required in HTTP/1.1, `Transfer-Encoding` must be just `chunked` (else 501), and only
  HTTP/1.0 and 1.1 are spoken (else 505);
- HTTP/1.0 clients get no keep-alive, and a response body of unknown length is delimited by
  closing the connection instead of chunked;
- a response to HEAD has no body, though llhttp (which is not told the method) would wait for one;
- the end of a response body delimited by the connection closing (httptools cannot be told of EOF).

Unlike h11, llhttp rejects methods it does not know (400) and, since it skips the body of a request
that asks for a protocol upgrade, such a request with a body is refused (400); without a body it
is an ordinary request (the proxy drops the upgrade headers). Bytes after a CONNECT request are
not HTTP and are ignored; the connection closes after the answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import Generic, TypeVar

import httptools

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
from vectorlay.proxy.codec.framing import (
    NO_BODY_STATUSES,
    BodyWriter,
    ChunkedWriter,
    LengthWriter,
    UntilCloseWriter,
    body_framing,
    head,
)
from vectorlay.proxy.codec.target import is_absolute, origin_form

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_WATCHED = frozenset({b"host", b"transfer-encoding", b"content-length", b"expect"})
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_LINE_BYTES = 14  # what a request or status line adds to its parts: spaces, "HTTP/1.1", CRLF

EventT = TypeVar("EventT", Request | Data | Signal, Response | Data | Signal)


class _Stop(Exception):
    """Raised in a callback to stop llhttp; the error to report is already recorded."""


class _Parsing(ABC, Generic[EventT]):
    """What the two sides share: the event queue, the held error, the bounds on input, and
    the framing of the body they send."""

    _SENDS = "message"  # what this side sends, for errors: "response" or "request"

    def __init__(self, max_head_bytes: int) -> None:
        self.max_head_bytes = max_head_bytes
        self._writer: BodyWriter | None = None  # frames the body of the message being sent
        self.events: deque[EventT] = deque()
        self.error: RemoteProtocolError | None = None
        self.ignore_input = False  # after an error, after EOF, or tunnel bytes after CONNECT
        self.eof = False
        self.parsing = False  # between a message's first byte and its end
        self.in_head = False
        self.headers: Headers = []
        self.head_bytes = 0
        self.trailer_bytes = 0
        self.progress = False  # a callback fired during the current feed
        self.stalled = 0  # bytes fed since the last callback

    def fail(self, error: RemoteProtocolError) -> None:
        """Record the first error; parsing stops there."""
        if self.error is None:
            self.error = error
        self.ignore_input = True

    def stop(self, message: str, status: int = 400) -> _Stop:
        self.fail(RemoteProtocolError(message, status))
        return _Stop()

    def feed(self, parser: httptools.HttpRequestParser | httptools.HttpResponseParser, data: bytes) -> None:
        self.progress = False
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded(data[upgrade.args[0]:])
        except httptools.HttpParserError as error:
            self.fail(RemoteProtocolError(f"invalid HTTP: {error}"))
        if self.progress:
            self.stalled = 0
        else:
            self.stalled += len(data)
            if self.stalled > self.max_head_bytes:
                status = 431 if self.in_head else 400
                self.fail(RemoteProtocolError("a header, trailer or chunk line too long", status))

    @abstractmethod
    def upgraded(self, rest: bytes) -> None:
        """llhttp stopped at a protocol switch; `rest` is what followed. Requests and responses
        each say what that means for them."""

    def begin(self) -> None:
        self.parsing = self.in_head = self.progress = True
        self.headers = []
        self.head_bytes = _LINE_BYTES
        self.trailer_bytes = 0

    def trailer(self, name: bytes, value: bytes) -> None:
        """A header after a chunked body: the proxy passes none on, so it is counted and dropped."""
        self.trailer_bytes += len(name) + len(value) + 4
        if self.trailer_bytes > self.max_head_bytes:
            raise self.stop("trailers too large", 431)

    def send_data(self, data: bytes) -> bytes:
        if self._writer is None:
            raise LocalProtocolError(f"body data before the {self._SENDS} head")
        return self._writer.data(data)

    def send_end(self) -> bytes:
        if self._writer is None:
            raise LocalProtocolError(f"end of a {self._SENDS} that was not started")
        return self._writer.end()

    def no_event(self) -> Signal:
        """What next_event says once the queued events are consumed (each side pops its own,
        inline, because this runs several times a request)."""
        if self.error is not None:
            raise self.error
        return CLOSED if self.eof else NEED_DATA


def _tolerant(parser: httptools.HttpResponseParser) -> httptools.HttpResponseParser:
    """Accept response lines ended by a bare LF, as h11 and nginx do: small servers in replicas
    (busybox httpd) send them. Safe in a proxy that rebuilds every head it forwards rather than
    passing lines on; requests, from untrusted clients, stay strict."""
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    return parser


class HttptoolsServerCodec(_Parsing[Request | Data | Signal]):
    _SENDS = "response"

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(max_head_bytes)
        self._parser = httptools.HttpRequestParser(self)
        self._target = b""
        self._host = False
        self._transfer_encodings: list[bytes] = []
        self._has_length = False
        self._expects_continue = False
        self._tunnel = False  # the request being parsed is a CONNECT
        # The cycle being served (the parser may be a request ahead).
        self._request: Request | None = None
        self._request_done = False
        self._waiting_100 = False
        self._keep_alive = False

    # ---- parsing (llhttp's callbacks) ----

    def receive_data(self, data: bytes) -> None:
        if self.ignore_input:
            return
        if not data:
            self.eof = self.ignore_input = True
            if self.parsing:
                self.fail(RemoteProtocolError("the client closed the connection in the middle of a request"))
            return
        self.feed(self._parser, data)

    def upgraded(self, rest: bytes) -> None:
        """llhttp paused after a request asking to switch protocols; the proxy never does."""
        if self._tunnel:
            self.ignore_input = True  # what follows CONNECT is not HTTP
        elif rest:
            self.feed(self._parser, rest)  # a refused upgrade: the connection stays HTTP

    def on_message_begin(self) -> None:
        self.begin()
        self._target = b""
        self._host = self._has_length = self._expects_continue = False
        self._transfer_encodings = []

    def on_url(self, url: bytes) -> None:
        self.progress = True
        self._target += url
        self.head_bytes += len(url)
        if self.head_bytes > self.max_head_bytes:
            raise self.stop("request line and headers too large", 431)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.progress = True
        if not self.in_head:
            self.trailer(name, value)
            return
        size = self.head_bytes + len(name) + len(value) + 4
        if size > self.max_head_bytes:
            raise self.stop("request line and headers too large", 431)
        self.head_bytes = size
        name = name.lower()
        value = value.strip(b" \t")  # llhttp strips the leading whitespace, not the trailing
        self.headers.append((name, value))
        if name in _WATCHED:
            if name == b"host":
                if self._host:
                    raise self.stop("more than one Host header")
                self._host = True
            elif name == b"transfer-encoding":
                self._transfer_encodings.append(value)
            elif name == b"content-length":
                self._has_length = value != b"0"
            else:
                self._expects_continue = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self._parser
        method = parser.get_method()
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise self.stop(f"HTTP/{parser.get_http_version()} is not supported", 505)
        if version == b"1.1" and not self._host:
            raise self.stop("missing mandatory Host: header")
        encodings = self._transfer_encodings
        if encodings and (len(encodings) > 1 or encodings[0].lower() != b"chunked"):
            raise self.stop("only Transfer-Encoding: chunked is supported", 501)
        self.head_bytes += len(method)
        if self.head_bytes > self.max_head_bytes:
            raise self.stop("request line and headers too large", 431)
        keep_alive = version == b"1.1" and parser.should_keep_alive()
        if parser.should_upgrade():
            self._tunnel = method == b"CONNECT"
            if self._tunnel:
                keep_alive = False
            elif encodings or self._has_length:
                raise self.stop("a request body with Upgrade is not supported")
        target, headers = self._target, self.headers
        if is_absolute(target):
            try:
                target, headers = origin_form(target, headers)
            except RemoteProtocolError as error:
                raise self.stop(str(error)) from None
        self.events.append(Request(method, target, headers, version, keep_alive,
                                   self._expects_continue and version == b"1.1"))

    def on_body(self, body: bytes) -> None:
        self.progress = True
        self.events.append(Data(body))

    def on_message_complete(self) -> None:
        self.progress = True
        self.parsing = False
        self.events.append(END)

    # ---- the cycle ----

    def next_event(self) -> Request | Data | Signal:
        if not self.events:
            return self.no_event()
        event = self.events.popleft()
        if event is END:
            self._request_done = True
        elif type(event) is Data:
            self._waiting_100 = False  # it sent the body without waiting
        elif type(event) is Request:
            self._request = event
            self._waiting_100 = event.expects_continue
        return event

    @property
    def request_started(self) -> bool:
        return self.parsing or bool(self.events)

    @property
    def request_done(self) -> bool:
        return self._request_done

    @property
    def waiting_for_100_continue(self) -> bool:
        return self._waiting_100

    @property
    def response_started(self) -> bool:
        return self._writer is not None

    def reusable(self) -> bool:
        writer = self._writer
        return self._keep_alive and self._request_done and writer is not None and writer.done

    def start_next_cycle(self) -> None:
        if not self.reusable():
            raise LocalProtocolError("the connection cannot take another request")
        self._request = None
        self._request_done = self._waiting_100 = self._keep_alive = False
        self._writer = None

    # ---- sending ----

    def send_informational(self, status: int, reason: bytes) -> bytes:
        self._waiting_100 = False
        return b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason)

    def send_response(self, status: int, reason: bytes, headers: Headers, close: bool = False) -> bytes:
        if self._writer is not None:
            raise LocalProtocolError("a response was already sent")
        request = self._request
        self._waiting_100 = False
        keep = not close and request is not None and request.keep_alive
        method = request.method if request is not None else b""
        writer: BodyWriter
        chunked, length = body_framing(headers)
        if status in NO_BODY_STATUSES:
            writer = LengthWriter(0)
        elif length is not None and not chunked:
            writer = LengthWriter(length)
        elif request is not None and request.http_version == b"1.1":
            if not chunked:
                headers = [*headers, (b"transfer-encoding", b"chunked")]
            writer = ChunkedWriter()
        else:
            # Not understood as HTTP/1.1 (or an error before the request was): no chunked, so the
            # end of the body is the end of the connection.
            headers = [(k, v) for k, v in headers if k != b"transfer-encoding"]
            writer = UntilCloseWriter()
            keep = keep and method == b"HEAD"
        if method == b"HEAD":
            writer = LengthWriter(0)  # the head says what a GET would get; no body follows
        if not keep:
            headers = [*headers, (b"connection", b"close")]
        self._keep_alive = keep
        self._writer = writer
        return head(b"HTTP/1.1 %d %s" % (status, reason), headers)


class HttptoolsClientCodec(_Parsing[Response | Data | Signal]):
    _SENDS = "request"

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(max_head_bytes)
        self._parser = _tolerant(httptools.HttpResponseParser(self))
        self._method = b""
        self._reason = b""
        self._framed = False  # the response being parsed has Content-Length or Transfer-Encoding
        self._informational = False
        self._until_close = False  # its body ends when the replica closes the connection
        self._skip_body = False  # a response to HEAD: llhttp waits for a body that never comes
        self._response_done = False
        self._keep_alive = False

    # ---- sending ----

    def send_request(self, method: bytes, target: bytes, headers: Headers) -> bytes:
        if self._writer is not None:
            raise LocalProtocolError("a request was already sent in this cycle")
        self._method = method
        chunked, length = body_framing(headers)
        self._writer = ChunkedWriter() if chunked else LengthWriter(length or 0)
        return head(b"%s %s HTTP/1.1" % (method, target), headers)

    # ---- parsing (llhttp's callbacks) ----

    def receive_data(self, data: bytes) -> None:
        if self.ignore_input:
            return
        if not data:
            self.eof = self.ignore_input = True
            self._keep_alive = False
            if self.parsing and not self._skip_body:
                if self._until_close and not self.in_head:
                    self.events.append(END)
                else:
                    self.fail(RemoteProtocolError("the replica closed the connection in the middle of a response"))
            return
        self.feed(self._parser, data)

    def upgraded(self, rest: bytes) -> None:
        self.fail(RemoteProtocolError("the replica switched protocols, which the proxy never asks for"))

    def on_message_begin(self) -> None:
        if self._skip_body:
            raise self.stop("the replica sent more after its response to HEAD", 502)
        self.begin()
        self._reason = b""
        self._framed = self._informational = self._until_close = False

    def on_status(self, reason: bytes) -> None:
        self.progress = True
        self._reason += reason
        self.head_bytes += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.progress = True
        if not self.in_head:
            self.trailer(name, value)
            return
        size = self.head_bytes + len(name) + len(value) + 4
        if size > self.max_head_bytes:
            raise self.stop("response headers too large", 502)
        self.head_bytes = size
        name = name.lower()
        self.headers.append((name, value.strip(b" \t")))
        if name in _FRAMING:
            self._framed = True

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise self.stop(f"HTTP/{parser.get_http_version()} is not supported", 502)
        status = parser.get_status_code()
        self.events.append(Response(status, self._reason.strip(b" \t"), self.headers, version))
        if status < 200:
            self._informational = True  # llhttp ends it here; the final response follows
            return
        self._keep_alive = version == b"1.1" and parser.should_keep_alive()
        if self._method == b"HEAD":
            self._skip_body = True
            self.events.append(END)
        else:
            self._until_close = not self._framed and status not in NO_BODY_STATUSES

    def on_body(self, body: bytes) -> None:
        self.progress = True
        if self._skip_body:
            raise self.stop("the replica sent a body with its response to HEAD", 502)
        self.events.append(Data(body))

    def on_message_complete(self) -> None:
        self.progress = True
        self.parsing = False
        if self._informational:
            self._informational = False
        elif not self._skip_body:
            self.events.append(END)

    # ---- the cycle ----

    def next_event(self) -> Response | Data | Signal:
        if not self.events:
            return self.no_event()
        event = self.events.popleft()
        if event is END:
            self._response_done = True
        return event

    def reusable(self) -> bool:
        writer = self._writer
        return (self._keep_alive and self._response_done and writer is not None and writer.done
                and self.error is None and not self.events)

    def start_next_cycle(self) -> None:
        if not self.reusable():
            raise LocalProtocolError("the connection cannot take another request")
        if self._skip_body:
            self._parser = _tolerant(httptools.HttpResponseParser(self))  # the old one may still expect a body
            self.parsing = self._skip_body = False
        self._writer = None
        self._response_done = self._keep_alive = False

