"""A fault-injecting TCP relay for integration tests: cut, stall or blackhole one link, then heal it.

Integration tests run real `vectorlay` processes on 127.0.0.1. To break the link between one node and the
server, the node is pointed at a `Relay`'s port instead of the server's; the relay forwards the bytes to the
server and can be switched, at any moment, to misbehave like a bad network:

- ``"pass"``: forward bytes both ways (the default). An EOF (FIN) is forwarded as a half-close, a reset from
  one side is forwarded as a reset to the other.
- ``"blackhole"``: keep every connection open but silently discard all bytes in both directions, so neither
  side learns anything until its own timeouts fire. Discarded bytes are gone: after switching back to
  ``"pass"`` only new bytes arrive (a real dead path would make TCP retransmit them, so the peers see a gap
  in the stream that a real network would not produce; framed protocols will usually notice and drop the
  connection). An EOF read while blackholed is held back and delivered once the relay passes again.
  Limitation: new connections are still accepted, because the relay's kernel completes the TCP handshake
  before the relay sees them, and the relay also connects them to the target; a real blackhole would leave
  the connect hanging until it timed out.
- ``"stall"``: stop reading from both sides, so bytes pile up in the kernel buffers and, once those are
  full, the senders block. Switching back to ``"pass"`` delivers everything that was buffered, in order,
  with nothing lost.
- ``"reject"``: abort every current connection (as `Relay.cut`) and abort every new connection right after
  accepting it, without connecting it to the target. The client's connect succeeds (the kernel accepts it)
  and the first read or write after it fails with a reset.

Every mode applies to the existing connections as well as new ones, promptly, even to a connection blocked
in a read. Aborting a connection sets ``SO_LINGER`` to (1, 0) before closing each socket, so both peers see a
reset (``ECONNRESET``) rather than an orderly EOF.

The relay runs its own trio loop in a background thread, so ordinary synchronous tests that drive
subprocesses can control it::

    with Relay(server_port) as relay:
        relay.start()
        node = stack.start_node(server_port=relay.port)
        relay.set_mode("blackhole")     # the node's heartbeats vanish
        ...
        relay.set_mode("pass")          # heal

The control methods block the calling thread for the moment it takes the relay's loop to apply them (they
are fine to call from another trio loop's thread too, where they block that loop just as briefly).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Final, Literal, TypeVar, get_args

import trio

__all__ = ["MODES", "Mode", "Relay"]

log = logging.getLogger("testsupport.relay")

Mode = Literal["pass", "blackhole", "stall", "reject"]
MODES: Final[frozenset[str]] = frozenset(get_args(Mode))

T = TypeVar("T")

_CHUNK: Final = 64 * 1024
_START_TIMEOUT_S: Final = 10.0
_JOIN_TIMEOUT_S: Final = 10.0
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
_LINGER_DEFAULT: Final = struct.pack("ii", 0, 0)
_EXPECTED_ERRORS: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_ids = itertools.count(1)


def _reset_on_close(sock: trio.socket.SocketType) -> None:
    """Make closing `sock` send a reset (SO_LINGER 0) instead of an orderly FIN."""
    with contextlib.suppress(OSError):  # already closed
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)


def _abort_socket(sock: trio.socket.SocketType | None) -> None:
    """Close `sock` with a reset; harmless on a socket that is already closed."""
    if sock is not None:
        _reset_on_close(sock)
        sock.close()


def _close_orderly(sock: trio.socket.SocketType | None) -> None:
    """Close `sock` with a FIN even though it was made to reset on close."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_DEFAULT)
        sock.close()


class _Connection:
    """One relayed connection: the accepted client side, the upstream socket as soon as it exists (so a cut
    reaches a connect in progress), and the scopes that let a mode change or a cut reach its tasks.

    Both sockets reset on close unless closed with `_close_orderly`, so a connection torn down any other way
    (a cut, a crash, a cancelled connect, `Relay.close`) is always seen as a reset by the peers.
    """

    def __init__(self, client: trio.SocketStream) -> None:
        self.client = client
        self.upstream_socket: trio.socket.SocketType | None = None
        self.scope = trio.CancelScope()
        self.receive_scopes: set[trio.CancelScope] = set()


class Relay:
    """A TCP relay from ``listen_host:<free port>`` to ``target_host:target_port`` with injectable faults.

    Call `start` (or use it as a context manager and call `start` inside), point the client at `port`, and
    change the link's behaviour with `set_mode` and `cut`. `close` stops everything; it is idempotent.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", listen_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._listen_host = listen_host
        self._name = f"vectorlay-relay-{next(_ids)}->{target_host}:{target_port}"
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._startup_error: BaseException | None = None
        # Written only by the relay's thread once it runs; plain reads from other threads are safe.
        self._token: trio.lowlevel.TrioToken | None = None
        self._main_scope: trio.CancelScope | None = None
        self._port: int | None = None
        self._mode: str = "pass"
        self._mode_changed: trio.Event | None = None
        self._connections: set[_Connection] = set()
        self._open = 0
        self._accepted = 0
        self._discarded = 0

    # ---- control, from any thread but the relay's own ----

    def start(self) -> int:
        """Start the relay's thread and listener; return the port it listens on (a free one)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("relay is closed")
            if self._thread is not None:
                raise RuntimeError("relay is already started")
            self._thread = threading.Thread(target=self._thread_main, name=self._name, daemon=True)
            self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"relay did not start within {_START_TIMEOUT_S:g}s")
        if self._startup_error is not None:
            self._thread.join(_JOIN_TIMEOUT_S)
            raise RuntimeError(f"relay failed to start: {self._startup_error!r}") from self._startup_error
        assert self._port is not None
        return self._port

    def close(self) -> None:
        """Abort every connection, stop listening and join the thread. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._ready.wait(_START_TIMEOUT_S)
        with contextlib.suppress(RuntimeError):  # the loop has already finished
            self._call(self._stop)
        thread.join(_JOIN_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"relay thread {thread.name} did not stop within {_JOIN_TIMEOUT_S:g}s")

    def __enter__(self) -> Relay:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        """The port the relay listens on; clients connect here instead of to the target."""
        if self._port is None:
            raise RuntimeError("relay is not started")
        return self._port

    @property
    def mode(self) -> str:
        """The current mode."""
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch to `mode` (one of `MODES`); it applies to the current connections and to new ones."""
        if mode not in MODES:
            raise ValueError(f"unknown relay mode {mode!r}; expected one of {sorted(MODES)}")
        self._call(lambda: self._apply_mode(mode))

    def cut(self) -> None:
        """Abort every current connection with a reset on both sides; keep accepting in the current mode."""
        self._call(self._cut_all)

    @property
    def connections(self) -> int:
        """How many relayed connections are open now (a rejected connection never counts)."""
        return self._open

    @property
    def accepted(self) -> int:
        """How many connections the relay has accepted so far, rejected ones included."""
        return self._accepted

    @property
    def discarded(self) -> int:
        """How many bytes the relay has thrown away in ``"blackhole"`` mode so far, both directions."""
        return self._discarded

    def _call(self, fn: Callable[[], T]) -> T:
        """Run the synchronous `fn` in the relay's loop and wait for its result."""
        token = self._token
        if token is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("relay is not running")
        if threading.get_ident() == self._thread.ident:
            raise RuntimeError("relay control methods cannot be called from the relay's own thread")
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:  # runs in the relay's loop, where an escaping exception would crash it
            try:
                done.set_result(fn())
            except Exception as error:
                done.set_exception(error)

        try:
            token.run_sync_soon(job)
        except trio.RunFinishedError:
            raise RuntimeError("relay is not running") from None
        return done.result()

    # ---- the relay's own thread ----

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except Exception as error:  # handed to start(), or logged if it happens later
            if self._ready.is_set():
                log.error("relay %s crashed", self._name, exc_info=error)
            else:
                self._startup_error = error
        finally:
            self._ready.set()

    async def _main(self) -> None:
        host, port = self._target
        listeners = await trio.open_tcp_listeners(0, host=self._listen_host)
        # With port 0 each address family would get its own port; one listener keeps `port` unambiguous.
        listener, extra = listeners[0], listeners[1:]
        for other in extra:
            await other.aclose()
        self._port = listener.socket.getsockname()[1]
        self._mode_changed = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        log.debug("relay %s listening on %s:%d", self._name, self._listen_host, self._port)
        async with trio.open_nursery() as nursery:
            self._main_scope = nursery.cancel_scope
            self._ready.set()
            await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)

    def _stop(self) -> None:
        self._cut_all()
        if self._main_scope is not None:
            self._main_scope.cancel()

    def _apply_mode(self, mode: str) -> None:
        previous, self._mode = self._mode, mode
        assert self._mode_changed is not None
        changed, self._mode_changed = self._mode_changed, trio.Event()
        changed.set()
        if mode == "reject":
            self._cut_all()
        elif mode == "stall":
            # A receive blocked since before the change must not complete: cancelling it is safe because a
            # cancelled trio socket receive has consumed nothing.
            for connection in self._connections:
                for scope in connection.receive_scopes:
                    scope.cancel()
        if previous != mode:
            log.debug("relay %s: mode %s -> %s", self._name, previous, mode)

    def _cut_all(self) -> None:
        for connection in list(self._connections):
            self._abort(connection)

    def _abort(self, connection: _Connection) -> None:
        """Reset both sides of `connection` and stop its tasks; idempotent."""
        _abort_socket(connection.client.socket)
        _abort_socket(connection.upstream_socket)
        connection.scope.cancel()
        self._forget(connection)

    def _forget(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        self._open = len(self._connections)

    async def _wait_for_mode(self, wanted: Callable[[str], bool]) -> str:
        while not wanted(self._mode):
            assert self._mode_changed is not None
            await self._mode_changed.wait()
        return self._mode

    async def _handle(self, client: trio.SocketStream) -> None:
        """Serve one accepted connection; nothing that goes wrong here may reach the listener."""
        self._accepted += 1
        _reset_on_close(client.socket)
        if self._mode == "reject":
            client.socket.close()
            return
        connection = _Connection(client)
        self._connections.add(connection)
        self._open = len(self._connections)
        finished = False
        try:
            with connection.scope:
                upstream = await self._connect_upstream(connection)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, connection, client, upstream)
                    nursery.start_soon(self._pump, connection, upstream, client)
                finished = not connection.scope.cancel_called
        except _EXPECTED_ERRORS as error:
            log.debug("relay %s: connection failed: %r", self._name, error)
        except Exception:
            log.exception("relay %s: unexpected error in a connection", self._name)
        finally:
            if finished:  # both directions reached EOF: an orderly close
                _close_orderly(client.socket)
                _close_orderly(connection.upstream_socket)
                self._forget(connection)
            else:
                self._abort(connection)

    async def _connect_upstream(self, connection: _Connection) -> trio.SocketStream:
        """Connect to the target, trying each address it resolves to; the socket resets on close."""
        host, port = self._target
        error: OSError = OSError(f"{host!r} resolved to no address")
        for family, type_, proto, _, address in await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            sock = trio.socket.socket(family, type_, proto)
            _reset_on_close(sock)
            connection.upstream_socket = sock
            try:
                await sock.connect(address)
            except OSError as failure:
                sock.close()
                error = failure
                continue
            return trio.SocketStream(sock)
        raise error

    async def _pump(self, connection: _Connection, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        """Copy one direction, obeying the mode; a broken side aborts the whole connection."""
        try:
            while True:
                await self._wait_for_mode(lambda mode: mode != "stall")
                with trio.CancelScope() as receive_scope:
                    connection.receive_scopes.add(receive_scope)
                    try:
                        data = await source.receive_some(_CHUNK)
                    finally:
                        connection.receive_scopes.discard(receive_scope)
                if receive_scope.cancelled_caught:
                    continue  # the mode changed while waiting; look at it again
                if not data:
                    await self._wait_for_mode(lambda mode: mode == "pass")
                    await sink.send_eof()
                    return
                if self._mode == "blackhole":
                    self._discarded += len(data)
                else:  # read in "pass", or read just before a stall began: it is on its way already
                    await sink.send_all(data)
        except _EXPECTED_ERRORS as error:
            log.debug("relay %s: connection broken: %r", self._name, error)
            self._abort(connection)
