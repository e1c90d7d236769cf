"""A trio loop in a daemon thread, so synchronous tests can run async helpers beside them.

Subclasses implement `_serve`, calling `_started()` once they are ready for the test to go on;
`start()` waits for that (or for the loop to fail first), `close()` cancels the loop and joins the
thread, and the object is a context manager doing both.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar

import trio

T = TypeVar("T")


class BackgroundLoop(ABC):
    def __init__(self, name: str, start_timeout_s: float = 10.0) -> None:
        self._label = name  # for errors; subclasses keep `name` for themselves
        self._start_timeout_s = start_timeout_s
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), name=name, daemon=True)

    @abstractmethod
    async def _serve(self) -> None:
        """The helper's work, in the background loop; calls `_started()` when ready."""

    def _started(self) -> None:
        self._ready.set()

    def start(self) -> Self:
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s) or self._error is not None:
            raise RuntimeError(f"{self._label} did not start" + (f": {self._error!r}" if self._error else ""))
        return self

    def close(self) -> None:
        if self._token is not None and self._scope is not None:
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` inside the background loop and return its result."""
        if self._token is None:
            raise RuntimeError(f"{self._label} is not started")
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                await self._serve()
        except Exception as error:
            self._error = error
            if self._ready.is_set():
                raise  # after start(): the thread reports it
        finally:
            self._ready.set()  # start() wakes at once if the loop ended before it was ready

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
