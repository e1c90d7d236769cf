"""The proxy's HTTP/1.1 codecs against one contract: h11 (the reference) and httptools give the same
events for the same bytes, frame what the proxy sends the same way, and turn broken input into
RemoteProtocolError with the status the client deserves. Differences allowed by RFC 9112 (where
llhttp is stricter than h11) are in test_proxy_codec_httptools.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vectorlay.proxy.codec import (
    CLOSED,
    END,
    NEED_DATA,
    ClientCodec,
    Data,
    HttpParser,
    LocalProtocolError,
    RemoteProtocolError,
    Request,
    Response,
    ServerCodec,
    Signal,
    client_codec,
    server_codec,
)

LIMIT = 16 * 1024
PARSERS = list(HttpParser)


@pytest.fixture(params=PARSERS, ids=[p.value for p in PARSERS])
def parser(request: pytest.FixtureRequest) -> HttpParser:
    return HttpParser(request.param)


def events_of(codec: ServerCodec | ClientCodec, *pieces: bytes) -> list[Request | Response | Data | Signal]:
    """Feed `pieces` one by one; the events up to the first END (or until more data is needed)."""
    out: list[Request | Response | Data | Signal] = []
    for piece in pieces:
        codec.receive_data(piece)
        while True:
            event = codec.next_event()
            if event is NEED_DATA:
                break
            out.append(event)
            if event is END or event is CLOSED:
                return out
    return out


def body_of(events: list[Request | Response | Data | Signal]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data))


def respond(codec: ServerCodec, status: int = 200, body: bytes = b"ok", headers: list[tuple[bytes, bytes]] | None = None,
            close: bool = False) -> bytes:
    framing = [(b"content-length", b"%d" % len(body))] if headers is None else headers
    return codec.send_response(status, b"OK", framing, close) + codec.send_data(body) + codec.send_end()


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


# ---- the server side: requests in, responses out ----

def test_a_request_is_parsed_with_lower_case_names_and_trimmed_values(parser: HttpParser) -> None:
    codec = server_codec(parser, LIMIT)
    events = events_of(codec, b"GET /a?b=1 HTTP/1.1\r\nHost: echo.localhost\r\nX-Thing:  spaced \t\r\n\r\n")
    request = events[0]
    assert isinstance(request, Request) and events[1:] == [END]
    assert (request.method, request.target, request.http_version) == (b"GET", b"/a?b=1", b"1.1")
    assert request.headers == [(b"host", b"echo.localhost"), (b"x-thing", b"spaced")]
    assert request.keep_alive and not request.expects_continue
    assert codec.request_done and not codec.response_started


def test_a_request_trickling_in_byte_by_byte_gives_the_same_events(parser: HttpParser) -> None:
    data = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    whole = events_of(server_codec(parser, LIMIT), data)
    trickled = events_of(server_codec(parser, LIMIT), *split_every(data, 1))
    assert whole[0] == trickled[0] and body_of(whole) == body_of(trickled) == b"hello"
    assert whole[-1] is END and trickled[-1] is END


def test_a_chunked_body_with_extensions_and_trailers_comes_out_whole_without_the_trailers(parser: HttpParser) -> None:
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    for pieces in ([data], split_every(data, 3)):
        events = events_of(server_codec(parser, LIMIT), *pieces)
        assert body_of(events) == b"hello world" and events[-1] is END
        request = events[0]
        assert isinstance(request, Request) and (b"x-trailer", b"t") not in request.headers


def test_keep_alive_cycles_and_pipelined_requests_wait_their_turn(parser: HttpParser) -> None:
    codec = server_codec(parser, LIMIT)
    first = events_of(codec, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(first[0], Request) and first[0].target == b"/1"
    assert respond(codec).startswith(b"HTTP/1.1 200 ")
    assert codec.reusable()
    codec.start_next_cycle()
    assert codec.request_started  # the second request is here already
    second = [codec.next_event(), codec.next_event()]
    assert isinstance(second[0], Request) and second[0].target == b"/2" and second[1] is END


def test_connection_close_and_http_1_0_clients_get_one_response_and_close(parser: HttpParser) -> None:
    for head in (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                 b"GET / HTTP/1.0\r\n\r\n", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"):
        codec = server_codec(parser, LIMIT)
        request = events_of(codec, head)[0]
        assert isinstance(request, Request) and not request.keep_alive
        assert b"connection: close\r\n" in respond(codec).lower()
        assert not codec.reusable()


def test_we_can_close_a_kept_alive_connection_after_a_response(parser: HttpParser) -> None:
    codec = server_codec(parser, LIMIT)
    events_of(codec, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"connection: close\r\n" in respond(codec, close=True).lower()
    assert not codec.reusable()


def test_a_body_of_unknown_length_is_chunked_for_http_1_1_and_delimited_by_close_for_http_1_0(
        parser: HttpParser) -> None:
    codec = server_codec(parser, LIMIT)
    events_of(codec, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = codec.send_response(200, b"OK", [(b"content-type", b"text/event-stream")])
    assert b"transfer-encoding: chunked\r\n" in head.lower()
    assert codec.send_data(b"hello") == b"5\r\nhello\r\n"
    assert codec.send_data(b"") == b""  # an empty chunk would end the body
    assert codec.send_end() == b"0\r\n\r\n"
    assert codec.reusable()

    old = server_codec(parser, LIMIT)
    events_of(old, b"GET / HTTP/1.0\r\n\r\n")
    head = old.send_response(200, b"OK", [(b"content-type", b"text/event-stream")]).lower()
    assert b"transfer-encoding" not in head and b"connection: close\r\n" in head
    assert old.send_data(b"hello") == b"hello" and old.send_end() == b""
    assert not old.reusable()


def test_a_response_to_head_declares_its_length_but_sends_no_body(parser: HttpParser) -> None:
    codec = server_codec(parser, LIMIT)
    events_of(codec, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = codec.send_response(200, b"OK", [(b"content-length", b"10")])
    assert b"content-length: 10\r\n" in head.lower()
    assert codec.send_end() == b"" and codec.reusable()
    wrong = server_codec(parser, LIMIT)  # after a LocalProtocolError the connection is only good for closing
    events_of(wrong, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    wrong.send_response(200, b"OK", [(b"content-length", b"10")])
    with pytest.raises(LocalProtocolError):
        wrong.send_data(b"x")


def test_204_and_304_have_no_body_and_no_framing_added(parser: HttpParser) -> None:
    for status in (204, 304):
        codec = server_codec(parser, LIMIT)
        events_of(codec, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        head = codec.send_response(status, b"X", [(b"etag", b'"1"')])
        assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
        assert codec.send_end() == b"" and codec.reusable()


def test_the_declared_length_is_enforced_on_what_we_send(parser: HttpParser) -> None:
    codec = server_codec(parser, LIMIT)
    events_of(codec, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    codec.send_response(200, b"OK", [(b"content-length", b"3")])
    codec.send_data(b"ab")
    with pytest.raises(LocalProtocolError):
        codec.send_end()  # one byte short
    too_much = server_codec(parser, LIMIT)
    events_of(too_much, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    too_much.send_response(200, b"OK", [(b"content-length", b"3")])
    with pytest.raises(LocalProtocolError):
        too_much.send_data(b"abcd")


def test_expect_100_continue_waits_until_we_answer_or_the_body_comes(parser: HttpParser) -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    codec = server_codec(parser, LIMIT)
    request = events_of(codec, head)[0]
    assert isinstance(request, Request) and request.expects_continue and codec.waiting_for_100_continue
    assert codec.send_informational(100, b"Continue").startswith(b"HTTP/1.1 100 ")
    assert not codec.waiting_for_100_continue
    assert body_of(events_of(codec, b"hi")) == b"hi"
    eager = server_codec(parser, LIMIT)
    events_of(eager, head)
    assert eager.waiting_for_100_continue
    assert body_of(events_of(eager, b"hi")) == b"hi" and not eager.waiting_for_100_continue


def test_the_client_closing_between_requests_is_quiet_and_mid_request_is_an_error(parser: HttpParser) -> None:
    idle = server_codec(parser, LIMIT)
    assert events_of(idle, b"") == [CLOSED]
    mid_body = server_codec(parser, LIMIT)
    events_of(mid_body, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
    mid_body.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as caught:
        while mid_body.next_event() is not NEED_DATA:
            pass
    assert caught.value.status == 400
    mid_head = server_codec(parser, LIMIT)
    mid_head.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n")
    mid_head.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        mid_head.next_event()


BROKEN = {
    "not HTTP": (b"GARBAGE\r\n\r\n", 400),
    "HTTP/1.1 without Host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "conflicting lengths": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    "negative length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    "invalid chunk size": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "NUL in a value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    "space in the target": (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "unsupported coding": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    "coding under chunked": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "head over the limit": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    "two Host headers": (b"GET / HTTP/1.1\r\nHost: a.localhost\r\nHost: b.localhost\r\n\r\n", 400),
    "two Host headers, one empty": (b"GET / HTTP/1.1\r\nHost: a.localhost\r\nHost:\r\n\r\n", 400),
    "an absolute target without a host": (b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_requests_raise_the_status_they_deserve_whole_or_trickled(parser: HttpParser, case: str) -> None:
    data, status = BROKEN[case]
    for pieces in ([data], split_every(data, 7)):
        codec = server_codec(parser, LIMIT)
        with pytest.raises(RemoteProtocolError) as caught:
            events_of(codec, *pieces)
        assert caught.value.status == status


@pytest.mark.parametrize(("target", "host", "path"), [
    (b"http://a.localhost/v1/x?q=1", b"a.localhost", b"/v1/x?q=1"),
    (b"http://a.localhost:8080", b"a.localhost:8080", b"/"),
    (b"HTTPS://user:pw@a.localhost?q", b"a.localhost", b"/?q"),
])
def test_an_absolute_target_names_the_host_and_goes_on_in_origin_form(
        parser: HttpParser, target: bytes, host: bytes, path: bytes) -> None:
    """RFC 9112 3.2.2: the target's authority wins over the Host header; the replica gets origin form."""
    for head in (b"GET %s HTTP/1.1\r\nHost: b.localhost\r\nX-A: 1\r\n\r\n" % target,
                 b"GET %s HTTP/1.0\r\nX-A: 1\r\n\r\n" % target):
        request = events_of(server_codec(parser, LIMIT), head)[0]
        assert isinstance(request, Request)
        assert request.target == path
        assert request.headers == [(b"host", host), (b"x-a", b"1")]


def test_a_head_over_the_limit_in_many_small_headers_is_431(parser: HttpParser) -> None:
    codec = server_codec(parser, LIMIT)
    codec.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n")
    with pytest.raises(RemoteProtocolError) as caught:
        for _ in range(40):
            assert codec.next_event() is NEED_DATA
            codec.receive_data(b"X-Filler: " + b"b" * 1000 + b"\r\n")
    assert caught.value.status == 431


def test_an_error_in_a_pipelined_request_comes_after_the_good_one(parser: HttpParser) -> None:
    codec = server_codec(parser, LIMIT)
    first = events_of(codec, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGARBAGE\r\n\r\n")
    assert isinstance(first[0], Request) and first[-1] is END
    respond(codec)
    codec.start_next_cycle()
    with pytest.raises(RemoteProtocolError):
        codec.next_event()


# ---- the client side: requests out, responses in ----

def exchange(codec: ClientCodec, method: bytes = b"GET", headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    sent = codec.send_request(method, b"/x", [(b"host", b"r"), *(headers or [])])
    return sent + codec.send_end()


def test_a_request_is_framed_by_its_headers(parser: HttpParser) -> None:
    codec = client_codec(parser, 64 * 1024)
    assert exchange(codec) == b"GET /x HTTP/1.1\r\nhost: r\r\n\r\n"
    sized = client_codec(parser, 64 * 1024)
    head = sized.send_request(b"POST", b"/x", [(b"host", b"r"), (b"content-length", b"5")])
    assert head + sized.send_data(b"hello") + sized.send_end() == (
        b"POST /x HTTP/1.1\r\nhost: r\r\ncontent-length: 5\r\n\r\nhello")
    chunked = client_codec(parser, 64 * 1024)
    chunked.send_request(b"POST", b"/x", [(b"host", b"r"), (b"transfer-encoding", b"chunked")])
    assert chunked.send_data(b"hello") == b"5\r\nhello\r\n" and chunked.send_end() == b"0\r\n\r\n"
    bodiless = client_codec(parser, 64 * 1024)
    bodiless.send_request(b"POST", b"/x", [(b"host", b"r")])
    with pytest.raises(LocalProtocolError):
        bodiless.send_data(b"x")  # nothing declared a body


def test_a_response_with_a_length_then_another_on_the_same_connection(parser: HttpParser) -> None:
    codec = client_codec(parser, 64 * 1024)
    for n in range(2):
        exchange(codec)
        events = events_of(codec, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-N: %d\r\n\r\nhel" % n, b"lo")
        response = events[0]
        assert isinstance(response, Response) and (response.status_code, response.reason) == (200, b"OK")
        assert (b"x-n", b"%d" % n) in response.headers and response.http_version == b"1.1"
        assert body_of(events) == b"hello" and events[-1] is END
        assert codec.reusable()
        codec.start_next_cycle()


def test_informational_responses_come_before_the_final_one(parser: HttpParser) -> None:
    codec = client_codec(parser, 64 * 1024)
    exchange(codec)
    codec.receive_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    statuses = []
    event = codec.next_event()
    while event is not END:
        assert isinstance(event, Response)
        statuses.append(event.status_code)
        event = codec.next_event()
    assert statuses == [100, 201] and codec.reusable()


def test_a_response_to_head_ends_at_its_head_and_the_connection_is_reused(parser: HttpParser) -> None:
    codec = client_codec(parser, 64 * 1024)
    exchange(codec, b"HEAD")
    events = events_of(codec, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert isinstance(events[0], Response) and events[1:] == [END]
    assert codec.reusable()
    codec.start_next_cycle()
    exchange(codec)
    assert body_of(events_of(codec, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) == b"ok"


def test_a_body_delimited_by_close_ends_when_the_replica_closes(parser: HttpParser) -> None:
    codec = client_codec(parser, 64 * 1024)
    exchange(codec)
    events = events_of(codec, b"HTTP/1.1 200 OK\r\n\r\nstream", b" of bytes", b"")
    assert body_of(events) == b"stream of bytes" and events[-1] is END
    assert not codec.reusable()


def test_a_chunked_response_with_trailers(parser: HttpParser) -> None:
    codec = client_codec(parser, 64 * 1024)
    exchange(codec)
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n"
    events = events_of(codec, *split_every(data, 5))
    assert body_of(events) == b"abc" and events[-1] is END and codec.reusable()


def test_responses_that_forbid_reuse(parser: HttpParser) -> None:
    for response in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                     b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"):
        codec = client_codec(parser, 64 * 1024)
        exchange(codec)
        assert events_of(codec, response)[-1] is END
        assert not codec.reusable()


def test_204_and_304_responses_have_no_body_whatever_they_declare(parser: HttpParser) -> None:
    for status in (204, 304):
        codec = client_codec(parser, 64 * 1024)
        exchange(codec)
        events = events_of(codec, b"HTTP/1.1 %d X\r\nContent-Length: 7\r\n\r\n" % status)
        assert events[1:] == [END] and codec.reusable()


def test_a_replica_closing_mid_body_or_sending_junk_is_an_error(parser: HttpParser) -> None:
    short = client_codec(parser, 64 * 1024)
    exchange(short)
    with pytest.raises(RemoteProtocolError):
        events_of(short, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", b"")
    junk = client_codec(parser, 64 * 1024)
    exchange(junk)
    with pytest.raises(RemoteProtocolError):
        events_of(junk, b"SMTP ready\r\n\r\n")


# ---- both parsers agree on any well-formed request ----

token = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).map(str.encode)
value = st.text("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 ;=,./:-_\t", max_size=30).map(
    lambda text: text.strip(" \t").encode())
methods = st.sampled_from([b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"])
targets = st.text("abcdefghijklmnopqrstuvwxyz0123456789/?=&%-._~", max_size=40).map(lambda t: ("/" + t).encode())


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, Request, bytes]:
    method, target = draw(methods), draw(targets)
    headers = [(b"host", b"a")] + draw(st.lists(st.tuples(token.filter(
        lambda n: n not in (b"host", b"content-length", b"transfer-encoding", b"connection", b"expect")), value),
        max_size=8))
    body = draw(st.binary(max_size=300))
    if body and draw(st.booleans()):
        sizes = draw(st.lists(st.integers(1, 50), min_size=1, max_size=10))
        chunks, rest = [], body
        for size in sizes:
            chunks.append(rest[:size])
            rest = rest[size:]
        chunks.append(rest)
        encoded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"
        headers.append((b"transfer-encoding", b"chunked"))
    else:
        encoded = body
        headers.append((b"content-length", b"%d" % len(body)))
    wire = b"%s %s HTTP/1.1\r\n" % (method, target) + b"".join(b"%s: %s\r\n" % h for h in headers) + b"\r\n"
    return wire + encoded, Request(method, target, headers, b"1.1", True, False), body


@settings(max_examples=200, deadline=None)
@given(case=requests(), piece=st.integers(1, 64))
def test_both_parsers_read_any_well_formed_request_alike(case: tuple[bytes, Request, bytes], piece: int) -> None:
    wire, expected, body = case
    for parser in PARSERS:
        events = events_of(server_codec(parser, LIMIT), *split_every(wire, piece))
        assert events[0] == expected, parser
        assert body_of(events) == body and events[-1] is END, parser
