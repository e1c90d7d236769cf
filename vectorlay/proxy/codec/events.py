"""What an HTTP/1.1 codec hands the proxy, whichever parser is behind it, and the errors it raises.

Header names are lower case and values have no surrounding whitespace, as h11 gives them.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from vectorlay.errors import ProtocolError, VectorlayError

Headers = list[tuple[bytes, bytes]]

# Events are NamedTuples: immutable like a frozen dataclass, and a quarter of its cost to make
# (a few are made per request).


class Request(NamedTuple):
    method: bytes
    target: bytes
    headers: Headers
    http_version: bytes  # b"1.1" or b"1.0"
    keep_alive: bool  # the client allows another request on this connection after this one
    expects_continue: bool  # it sent `Expect: 100-continue` and waits before sending its body


class Response(NamedTuple):
    status_code: int  # under 200: an informational response, a final one follows
    reason: bytes
    headers: Headers
    http_version: bytes


class Data(NamedTuple):
    data: bytes


class Signal(enum.Enum):
    NEED_DATA = "need data"  # nothing complete is buffered: receive more
    END = "end of message"  # the message (request or response) is complete
    CLOSED = "closed"  # the peer closed its side between messages: nothing more will come


NEED_DATA = Signal.NEED_DATA
END = Signal.END
CLOSED = Signal.CLOSED


class RemoteProtocolError(ProtocolError):
    """The peer broke HTTP/1.1 (or one of our limits); `status` is the answer it deserves."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class LocalProtocolError(VectorlayError):
    """We tried to send something HTTP/1.1 does not allow here (for example more body than declared)."""
