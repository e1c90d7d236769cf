"""One PostgreSQL connection that LISTENs for what other servers changed (see `changes.py`).

Waiting happens in the caller's trio loop on the connection's socket (`fileno()`), so no thread
sits in a blocking wait; reading what arrived never blocks (`notifications()`).
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
from sqlalchemy import Engine

from vectorlay.errors import StoreUnavailable
from vectorlay.server.store.changes import CHANNEL


class Listener:
    def __init__(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        self._conn = conn

    @classmethod
    def open(cls, engine: Engine, connect_timeout_s: int) -> Listener:
        """Blocking (call it in a worker thread)."""
        url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout_s)
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as error:
            raise StoreUnavailable(f"database unavailable ({_first_line(error)})") from None
        return cls(conn)

    def fileno(self) -> int:
        return self._conn.fileno()

    def notifications(self) -> Iterator[str]:
        """The payloads that arrived, without waiting for more."""
        try:
            for notice in self._conn.notifies(timeout=0):
                yield notice.payload
        except psycopg.Error as error:
            raise StoreUnavailable(f"database unavailable ({_first_line(error)})") from None

    def check(self) -> None:
        """Blocking round trip: StoreUnavailable if the connection no longer works."""
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error as error:
            raise StoreUnavailable(f"database unavailable ({_first_line(error)})") from None

    def close(self) -> None:
        self._conn.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
