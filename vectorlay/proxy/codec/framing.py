"""Serialising HTTP/1.1 messages we send: heads, and bodies framed by length, chunks or close.

Used by the httptools codec (h11 does its own). Header values come from a parser that rejected
CR, LF and NUL, or from the proxy itself, so they are written as they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from vectorlay.proxy.codec.events import Headers, LocalProtocolError

NO_BODY_STATUSES = frozenset({204, 304})


def head(start_line: bytes, headers: Headers) -> bytes:
    # Joined in C (map over bytes.join): this runs twice a request.
    return b"\r\n".join([start_line, *map(b": ".join, headers), b"", b""])


class BodyWriter(ABC):
    """Frames the body of one message; `done` once its end was written."""

    done = False

    @abstractmethod
    def data(self, data: bytes) -> bytes:
        """`data` framed for the wire; each kind of body (length, chunked, close) frames its own."""

    def end(self) -> bytes:
        self.done = True
        return b""


class LengthWriter(BodyWriter):
    def __init__(self, length: int) -> None:
        self.remaining = length

    def data(self, data: bytes) -> bytes:
        self.remaining -= len(data)
        if self.remaining < 0:
            raise LocalProtocolError("too much data for the declared Content-Length")
        return data

    def end(self) -> bytes:
        if self.remaining:
            raise LocalProtocolError("too little data for the declared Content-Length")
        return super().end()


class ChunkedWriter(BodyWriter):
    def data(self, data: bytes) -> bytes:
        if not data:
            return b""  # an empty chunk would end the body
        return b"%x\r\n%s\r\n" % (len(data), data)

    def end(self) -> bytes:
        super().end()
        return b"0\r\n\r\n"


class UntilCloseWriter(BodyWriter):
    """An HTTP/1.0 client's body of unknown length: it ends when the connection closes."""

    def data(self, data: bytes) -> bytes:
        return data


def body_framing(headers: Headers) -> tuple[bool, int | None]:
    """(chunked, Content-Length) as the headers the proxy sends declare them, in one pass.
    A Content-Length here was validated by a parser or written by the proxy: digits."""
    named = dict(headers)  # in C; the last Content-Length counts, as in a loop over them
    value = named.get(b"content-length")
    length = None
    if value is not None:
        try:
            length = int(value)
        except ValueError:
            raise LocalProtocolError(f"invalid Content-Length {value[:40]!r}") from None
    return b"transfer-encoding" in named, length
