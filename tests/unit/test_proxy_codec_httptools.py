"""The httptools codec where it does more than llhttp: bounds on what it buffers, what llhttp is
not told (a response to HEAD, the end of a close-delimited body), protocol switches the proxy
refuses, errors held behind good events, and hostile input that must end in RemoteProtocolError,
never in anything else.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vectorlay.proxy.codec import (
    CLOSED,
    END,
    NEED_DATA,
    Data,
    LocalProtocolError,
    RemoteProtocolError,
    Request,
    Response,
    Signal,
)
from vectorlay.proxy.codec.httptools_codec import HttptoolsClientCodec, HttptoolsServerCodec

LIMIT = 16 * 1024


def server() -> HttptoolsServerCodec:
    return HttptoolsServerCodec(LIMIT)


def client(method: bytes = b"GET") -> HttptoolsClientCodec:
    codec = HttptoolsClientCodec(LIMIT)
    codec.send_request(method, b"/", [(b"host", b"r")])
    codec.send_end()
    return codec


def drain(codec: HttptoolsServerCodec | HttptoolsClientCodec) -> list[Request | Response | Data | Signal]:
    """Every event available now, across cycles where the codec allows (NEED_DATA/CLOSED excluded)."""
    out: list[Request | Response | Data | Signal] = []
    event = codec.next_event()
    while event is not NEED_DATA and event is not CLOSED:
        out.append(event)
        event = codec.next_event()
    return out


def status_of_failure(codec: HttptoolsServerCodec | HttptoolsClientCodec, *pieces: bytes) -> int:
    with pytest.raises(RemoteProtocolError) as caught:
        for piece in pieces:
            codec.receive_data(piece)
            drain(codec)
    return caught.value.status


STRICTER_THAN_H11 = {  # RFC 9112 lets a server reject all of these; h11 accepts them
    "the same length twice": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
    "length and chunked": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "a folded header": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
    "bare LF line ends": b"GET / HTTP/1.1\nHost: a\n\n",
    "a method llhttp does not know": b"FROB / HTTP/1.1\r\nHost: a\r\n\r\n",
    "a lower-case method": b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("case", list(STRICTER_THAN_H11))
def test_what_llhttp_refuses_and_h11_would_accept_is_a_400(case: str) -> None:
    assert status_of_failure(server(), STRICTER_THAN_H11[case]) == 400


def test_only_http_1_0_and_1_1_are_spoken() -> None:
    assert status_of_failure(server(), b"GET / HTTP/2.0\r\nHost: a\r\n\r\n") == 505
    assert status_of_failure(server(), b"GET /\r\n\r\n") == 505  # HTTP/0.9


def test_a_refused_upgrade_is_an_ordinary_request_and_the_connection_stays_http() -> None:
    codec = server()
    codec.receive_data(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                       b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    first = codec.next_event()
    assert isinstance(first, Request) and first.target == b"/ws" and first.keep_alive
    assert codec.next_event() is END
    codec.send_response(400, b"Bad Request", [(b"content-length", b"0")])
    codec.send_end()
    codec.start_next_cycle()
    second = codec.next_event()
    assert isinstance(second, Request) and second.target == b"/next"


def test_an_upgrade_request_with_a_body_is_refused_since_llhttp_would_skip_the_body() -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 5\r\n\r\nhello"
    assert status_of_failure(server(), head) == 400


def test_bytes_after_connect_are_not_http_and_the_connection_ends_after_the_answer() -> None:
    codec = server()
    codec.receive_data(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n\x00\x01binary tunnel")
    request = codec.next_event()
    assert isinstance(request, Request) and request.method == b"CONNECT" and not request.keep_alive
    assert codec.next_event() is END
    codec.receive_data(b"more tunnel bytes")
    assert codec.next_event() is NEED_DATA
    assert b"connection: close" in codec.send_response(405, b"Method Not Allowed", [(b"content-length", b"0")])


def test_input_that_makes_no_progress_is_bounded() -> None:
    endless_header = server()
    assert status_of_failure(endless_header, b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: ",
                             *[b"v" * 4096] * 8) == 431
    endless_name = server()
    assert status_of_failure(endless_name, b"GET / HTTP/1.1\r\nHost: a\r\n", *[b"N" * 4096] * 8) == 431
    blank_lines = server()
    assert status_of_failure(blank_lines, *[b"\r\n" * 2048] * 8) == 400
    endless_extension = server()
    assert status_of_failure(endless_extension, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=",
                             *[b"e" * 4096] * 8) == 400


def test_trailers_are_dropped_within_the_head_limit() -> None:
    codec = server()
    start = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
    many = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 500) for i in range(40))
    assert status_of_failure(codec, start, many, b"\r\n") == 431


def test_a_held_error_comes_after_the_events_before_it_and_stays() -> None:
    codec = server()
    codec.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
    request = codec.next_event()
    assert isinstance(request, Request) and codec.next_event() is END  # the good request first
    for _ in range(2):
        with pytest.raises(RemoteProtocolError):
            codec.next_event()
    codec.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # ignored: the connection is done
    with pytest.raises(RemoteProtocolError):
        codec.next_event()


def test_a_cycle_cannot_restart_before_its_response_is_complete() -> None:
    codec = server()
    codec.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(codec)
    codec.send_response(200, b"OK", [(b"content-length", b"2")])
    with pytest.raises(LocalProtocolError):
        codec.start_next_cycle()
    with pytest.raises(LocalProtocolError):
        codec.send_response(200, b"OK", [])  # one response per request


def test_a_response_to_head_followed_by_more_bytes_ends_the_connection() -> None:
    for junk in (b"surprise", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"):
        codec = client(b"HEAD")
        codec.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" + junk)
        events = []
        with pytest.raises(RemoteProtocolError):
            while (event := codec.next_event()) is not NEED_DATA:
                events.append(event)
        assert len(events) == 2 and events[1] is END  # the answer itself is whole
        assert not codec.reusable()


def test_a_head_response_whose_replica_then_closes_is_complete_not_an_error() -> None:
    codec = client(b"HEAD")
    codec.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    codec.receive_data(b"")
    events = drain(codec)
    assert isinstance(events[0], Response) and events[1:] == [END]
    assert not codec.reusable()


def test_replica_answers_the_proxy_cannot_use() -> None:
    switching = client()
    assert status_of_failure(switching, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
    head_too_large = client()
    status_of_failure(head_too_large, b"HTTP/1.1 200 OK\r\n", *[b"X-H: " + b"h" * 1000 + b"\r\n"] * 20)
    newer = client()
    status_of_failure(newer, b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    extra = client()
    extra.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    with pytest.raises(RemoteProtocolError):
        drain(extra)
    assert not extra.reusable()


# ---- hostile input: anything at all ends in events or RemoteProtocolError ----

VALID_REQUESTS = [
    b"GET /a HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n",
    b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n3;e\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT x:1 HTTP/1.1\r\nHost: x:1\r\n\r\n",
]
VALID_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    b"HTTP/1.0 204 No Content\r\n\r\n",
]


@st.composite
def mangled(draw: st.DrawFn, samples: list[bytes]) -> list[bytes]:
    """Valid messages, cut, spliced and corrupted at random, in random pieces."""
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(samples), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        junk = draw(st.binary(min_size=1, max_size=8))
        if action == "flip" and at < len(data):
            data[at] = junk[0]
        elif action == "insert":
            data[at:at] = junk
        elif action == "delete":
            del data[at:at + len(junk)]
        else:
            del data[at:]
    sizes = draw(st.lists(st.integers(1, 40), max_size=20))
    pieces, rest = [], bytes(data)
    for size in sizes:
        pieces.append(rest[:size])
        rest = rest[size:]
    pieces.append(rest)
    if draw(st.booleans()):
        pieces.append(b"")  # and the peer closes
    return [p for p in pieces[:-1] if p] + [pieces[-1]]


def play(codec: HttptoolsServerCodec | HttptoolsClientCodec, pieces: list[bytes], answer: bool) -> None:
    """Drive `codec` as the proxy would, answering each request; only RemoteProtocolError may escape."""
    try:
        for piece in pieces:
            codec.receive_data(piece)
            while (event := codec.next_event()) is not NEED_DATA and event is not CLOSED:
                assert isinstance(event, (Request, Response, Data)) or event is END
                if event is END and answer:
                    assert isinstance(codec, HttptoolsServerCodec)
                    codec.send_response(200, b"OK", [(b"content-length", b"0")])
                    codec.send_end()
                    if not codec.reusable():
                        return
                    codec.start_next_cycle()
    except RemoteProtocolError as error:
        assert error.status in (400, 431, 501, 502, 505)


@settings(max_examples=500, deadline=None)
@given(pieces=mangled(VALID_REQUESTS))
def test_mangled_requests_never_crash_the_server_codec(pieces: list[bytes]) -> None:
    play(server(), pieces, answer=True)


@settings(max_examples=500, deadline=None)
@given(pieces=mangled(VALID_RESPONSES), method=st.sampled_from([b"GET", b"HEAD"]))
def test_mangled_responses_never_crash_the_client_codec(pieces: list[bytes], method: bytes) -> None:
    play(client(method), pieces, answer=False)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.binary(max_size=64), max_size=10))
def test_random_bytes_never_crash_either_side(pieces: list[bytes]) -> None:
    play(server(), pieces, answer=True)
    play(client(), pieces, answer=False)


def test_a_replica_ending_response_lines_with_a_bare_lf_is_understood() -> None:
    # busybox httpd does this; h11 and nginx accept it, so the default parser must too.
    codec = client()
    codec.receive_data(b"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 2\n\nhi")
    events = drain(codec)
    assert isinstance(events[0], Response) and events[0].status_code == 200
    assert (b"content-type", b"text/plain") in events[0].headers
    assert events[1:] == [Data(b"hi"), END]
