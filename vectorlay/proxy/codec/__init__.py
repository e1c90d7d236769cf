"""HTTP/1.1 codecs for the proxy's client and upstream connections, one interface, two parsers."""

from __future__ import annotations

from enum import StrEnum

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
from vectorlay.proxy.codec.h11_codec import H11ClientCodec, H11ServerCodec
from vectorlay.proxy.codec.httptools_codec import HttptoolsClientCodec, HttptoolsServerCodec
from vectorlay.proxy.codec.interface import ClientCodec, ServerCodec

__all__ = [
    "CLOSED", "DEFAULT_PARSER", "END", "NEED_DATA", "ClientCodec", "Data", "Headers", "HttpParser",
    "LocalProtocolError", "RemoteProtocolError", "Request", "Response", "ServerCodec", "Signal", "client_codec",
    "server_codec",
]


class HttpParser(StrEnum):
    H11 = "h11"  # pure Python, the reference
    HTTPTOOLS = "httptools"  # llhttp in C: several times the throughput


DEFAULT_PARSER = HttpParser.HTTPTOOLS


def server_codec(parser: HttpParser, max_head_bytes: int) -> ServerCodec:
    if parser is HttpParser.H11:
        return H11ServerCodec(max_head_bytes)
    return HttptoolsServerCodec(max_head_bytes)


def client_codec(parser: HttpParser, max_head_bytes: int) -> ClientCodec:
    if parser is HttpParser.H11:
        return H11ClientCodec()  # h11 bounds only an incomplete head, at its own 16 KiB
    return HttptoolsClientCodec(max_head_bytes)
