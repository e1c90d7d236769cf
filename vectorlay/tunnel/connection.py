"""One HTTP/2 connection carrying byte streams: the tunnel between a node and a proxy.

Driven from trio in the style of hypercorn's trio + h2 code: the task running `run` reads the
transport and feeds `h2`; one writer task sends whatever h2 has queued, so reading never waits on
writing (two peers both blocked writing while nobody reads would deadlock) and two writes never
interleave. Each stream is a CONNECT-style byte stream (`TunnelStream`) named by its
`:authority`; the proxy is the HTTP/2 client and opens streams, the node is the server and
accepts them.

Flow control is end to end: received DATA is acknowledged only as the stream's consumer reads
it, so a stream never buffers more than its window, and a slow reader on one end makes the
sender on the other end wait instead of buffering. The connection window is as large as all the
stream windows together, so one stalled stream never blocks the others.

Anything a peer does wrong (an HTTP/2 protocol error, a flood of control frames, a header block
over the limit, streams it may not open) closes that connection with GOAWAY and one log line;
the error never leaves `run`.

A control stream (authority `CONTROL_AUTHORITY`, opened by the client right after the handshake)
carries one-line messages from the node, such as `drain restart`: HTTP/2's own GOAWAY cannot
say "finish what you have, open nothing new" with h2, which refuses every frame after a GOAWAY.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from vectorlay.core.token_bucket import TokenBucket
from vectorlay.errors import TunnelError
from vectorlay.tunnel.limits import TunnelLimits
from vectorlay.tunnel.stream import StreamState, TunnelStream

log = logging.getLogger("vectorlay.tunnel")

READ_SIZE = 256 * 1024
CONTROL_AUTHORITY = "control.vectorlay"  # replica ids are DNS labels: never one with a dot
MAX_CONTROL_LINE = 256
CLOSE_FLUSH_S = 1.0  # how long a closing connection may spend sending its GOAWAY
ACK_BATCH = 16 * 1024
ErrorCodes = h2.errors.ErrorCodes

StreamHandler = Callable[["IncomingStream"], Awaitable[None]]


class _Abuse(Exception):
    """The peer broke one of our limits: closed with ENHANCE_YOUR_CALM."""


class IncomingStream:
    """A stream the peer opened (server side): answer it with `accept` or `refuse`."""

    def __init__(self, connection: TunnelConnection, state: StreamState, authority: str) -> None:
        self.connection = connection
        self.state = state
        self.authority = authority
        self.answered = False

    def accept(self) -> TunnelStream:
        self.answered = True
        self.connection.respond(self.state, 200)
        return TunnelStream(self.connection, self.state)

    def refuse(self, status: int) -> None:
        self.answered = True
        self.connection.respond(self.state, status, end=True)


class TunnelConnection:
    def __init__(self, transport: trio.abc.Stream, *, client_side: bool, limits: TunnelLimits = TunnelLimits(),
                 handler: StreamHandler | None = None, peer: str = "peer", ping: bool = False) -> None:
        self.transport = transport
        self.client_side = client_side
        self.limits = limits
        self.handler = handler
        self.peer = peer
        self.ping = ping
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side, header_encoding=None))
        self.h2.MAX_CLOSED_STREAMS = limits.closed_streams_kept
        self.h2.local_settings = h2.settings.Settings(client=client_side, initial_values={
            # The node (server) accepts streams; the proxy (client) accepts none (no push).
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0 if client_side else limits.max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        # Our own limits hold from the first byte: h2 would apply them only once the peer
        # acknowledged them, and checks the frames of one read against the limit it began with.
        self.h2.max_inbound_frame_size = limits.max_frame_size
        self.h2.decoder.max_header_list_size = limits.max_header_list_size
        self.streams: dict[int, StreamState] = {}
        # Read bytes are acknowledged in batches this large; a quarter of the window at most, so
        # the sender never waits on the batching.
        self._ack_batch = min(ACK_BATCH, limits.stream_window // 4)
        self.ready = False  # the peer's SETTINGS arrived
        self.started = False  # ...and `run` told its caller so (nothing broke in that same read)
        self.closing = False
        self.close_reason = ""
        self.failure_logged = False  # the peer broke a rule, and a line says so
        self.closed = trio.Event()
        self.draining = False  # no new streams: set by a `drain` control message (client) or `drain` (server)
        self.on_control: Callable[[str], None] | None = None  # control messages, client side
        self.last_received = trio.current_time()
        self.bytes_received = 0  # stream payload, both totals
        self.bytes_sent = 0
        self.streams_opened = 0
        self._control_id: int | None = None
        self._control_buffer = b""
        self._budget = TokenBucket.full(limits.control_frames_per_s, limits.control_frame_burst, trio.current_time())
        self._writer_lot = trio.lowlevel.ParkingLot()
        self.writing_since: float | None = None  # when the writer task began waiting on a write
        self._idle_lot = trio.lowlevel.ParkingLot()  # streams finished: for drain()
        self._pings: dict[bytes, trio.Event] = {}  # our pings waiting for an answer, by payload
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    # ---- running ----

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it closes; `started` once both sides exchanged SETTINGS.
        Raises TunnelError only if it closed before that (the handshake failed)."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self._nursery = nursery
                self.h2.initiate_connection()
                extra = self.limits.connection_window - 65_535  # the connection window starts at 65,535
                if extra > 0:
                    self.h2.increment_flow_control_window(extra)
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._handshake_deadline)
                self._wake_writer()
                await self._read_loop(task_status)
        finally:
            self._close(self.close_reason or "closed", goaway=False)
            self.closed.set()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_FLUSH_S):
                try:
                    await self.transport.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        if not self.started:
            raise TunnelError(f"closed during the handshake: {self.close_reason}")

    async def _handshake_deadline(self) -> None:
        await trio.sleep(self.limits.handshake_timeout_s)
        if not self.ready:
            self._close(f"no HTTP/2 settings within {self.limits.handshake_timeout_s:g}s", ErrorCodes.SETTINGS_TIMEOUT)

    async def _read_loop(self, task_status: trio.TaskStatus[None]) -> None:
        while not self.closing:
            try:
                data = await self.transport.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                self._close(f"connection lost: {_describe(error)}", goaway=False)
                return
            if not data:
                self._close("the peer closed the connection", goaway=False)
                return
            self.last_received = trio.current_time()
            try:
                events = self.h2.receive_data(data)
                for event in events:
                    self._on_event(event)
                self._check_partial_frame()
            except h2.exceptions.ProtocolError as error:
                if self.closing:
                    return  # frames the peer sent before it saw our GOAWAY: nothing wrong
                code = ErrorCodes.ENHANCE_YOUR_CALM if isinstance(error, h2.exceptions.DenialOfServiceError) \
                    else getattr(error, "error_code", ErrorCodes.PROTOCOL_ERROR)
                self._fail(f"HTTP/2 protocol error: {error}", code)
                return
            except _Abuse as abuse:
                self._fail(str(abuse), ErrorCodes.ENHANCE_YOUR_CALM)
                return
            self._wake_writer()
            if self.ready and not self.started:
                self.started = True
                task_status.started()
                if self.client_side:
                    self._open_control()
                if self.ping and self._nursery is not None:
                    self._nursery.start_soon(self._ping_loop)

    async def _write_loop(self) -> None:
        """Send whatever h2 has queued, as one write: under load one write carries the frames of
        many streams (one system call and one TLS record for several requests). A write that
        makes no progress for send_stall_s ends the connection (`check_stall`)."""
        while True:
            data = self.h2.data_to_send()
            if data:
                self.writing_since = trio.current_time()
                try:
                    await self.transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                    self._close(f"connection lost: {_describe(error)}", goaway=False)
                    self._stop()
                    return
                finally:
                    self.writing_since = None
                continue
            if self.closing:
                self._stop()  # everything, the GOAWAY included, is sent
                return
            await self._writer_lot.park()

    def stalled_for(self, now: float) -> float:
        """How long the current write has waited for the peer to read (0 if none waits)."""
        return now - self.writing_since if self.writing_since is not None else 0.0

    def check_stall(self, now: float) -> bool:
        """Close the connection if a write has waited over send_stall_s (the peer stopped
        reading): called by whoever watches the connection (the node's pings, the proxy's sweep),
        rather than a timer around every write. True if it closed."""
        if self.stalled_for(now) <= self.limits.send_stall_s:
            return False
        self._close(f"the peer read nothing for {self.limits.send_stall_s:g}s", goaway=False)
        self._stop()
        return True

    async def _ping_loop(self) -> None:
        while not self.closing:
            await trio.sleep(self.limits.ping_interval_s)
            if self.check_stall(trio.current_time()):
                return
            with trio.move_on_after(self.limits.ping_timeout_s):
                await self._round_trip()
                continue
            self._close(f"no answer to a ping within {self.limits.ping_timeout_s:g}s", goaway=False)
            self._stop()
            return

    async def _round_trip(self) -> None:
        """Send a PING and wait for its answer (or for the connection to close)."""
        payload = os.urandom(8)
        pong = self._pings[payload] = trio.Event()
        try:
            self.h2.ping(payload)
            self._wake_writer()
            await wait_any(pong, self.closed)
        except h2.exceptions.ProtocolError:
            return
        finally:
            self._pings.pop(payload, None)

    def _stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def _wake_writer(self) -> None:
        self._writer_lot.unpark_all()

    # ---- closing ----

    def close(self, reason: str, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Close with GOAWAY (sent within CLOSE_FLUSH_S); streams still open are broken."""
        self._close(reason, error_code)

    def _fail(self, reason: str, error_code: int) -> None:
        if not self.closing:
            log.warning("tunnel %s: %s; closing it", self.peer, reason)
            self.failure_logged = True
        self._close(reason, error_code)

    def _close(self, reason: str, error_code: int = ErrorCodes.NO_ERROR, goaway: bool = True) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        # h2 sends a GOAWAY itself for some errors it detects; one is enough.
        if goaway and self.h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            try:
                self.h2.close_connection(error_code, additional_data=reason.encode()[:200])
            except h2.exceptions.ProtocolError:
                pass
        for state in self.streams.values():
            state.break_(f"tunnel closed: {reason}")
        self._idle_lot.unpark_all()
        self._wake_writer()  # to send what is left (the GOAWAY) and end the connection
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + CLOSE_FLUSH_S)

    # ---- events from the peer ----

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.WindowUpdated):
            self._window_opened(event.stream_id)
        elif isinstance(event, h2.events.ResponseReceived):
            state = self.streams.get(event.stream_id)
            if state is not None:
                state.response = event.headers
                state.wake()
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.StreamEnded):
            state = self.streams.get(event.stream_id)
            if state is not None:
                state.ended = True
                state.wake()
        elif isinstance(event, h2.events.StreamReset):
            self._count_control("RST_STREAM")
            state = self.streams.get(event.stream_id)
            if state is not None:
                state.break_(f"reset by the peer ({_code_name(event.error_code)})")
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if self.ready:
                self._count_control("SETTINGS")
            self.ready = True
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._window_opened(0)
        elif isinstance(event, h2.events.PingReceived):
            self._count_control("PING")
        elif isinstance(event, h2.events.PingAckReceived):
            pong = self._pings.pop(event.ping_data or b"", None)
            if pong is not None:
                pong.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            detail = event.additional_data.decode(errors="replace") if event.additional_data else ""
            self._close(f"the peer closed the tunnel ({_code_name(event.error_code)}{': ' + detail if detail else ''})",
                        goaway=False)
        elif isinstance(event, h2.events.TrailersReceived | h2.events.InformationalResponseReceived):
            raise _Abuse(f"unexpected {type(event).__name__} on stream {event.stream_id}")
        elif isinstance(event, h2.events.PriorityUpdated | h2.events.UnknownFrameReceived):
            self._count_control(type(event).__name__)

    def _check_partial_frame(self) -> None:
        """h2 checks a frame's length only once the whole frame is buffered: a peer announcing a
        16 MiB frame would make it buffer 16 MiB first. What h2 keeps after a read is the start of
        the next frame: refuse it as soon as its header says it is too long."""
        pending = getattr(self.h2.incoming_buffer, "_data", b"")
        if len(pending) >= 9 and int.from_bytes(pending[:3], "big") > self.limits.max_frame_size:
            raise _Abuse(f"a frame of {int.from_bytes(pending[:3], 'big')} bytes announced "
                         f"(the limit is {self.limits.max_frame_size})")

    def _count_control(self, kind: str) -> None:
        allowed, self._budget = self._budget.take(trio.current_time())
        if not allowed:
            raise _Abuse(f"flood of control frames (last {kind}): over {self.limits.control_frames_per_s:g}/s")

    def _on_data(self, event: h2.events.DataReceived) -> None:
        size = event.flow_controlled_length or 0
        data = event.data or b""
        if not data and not event.stream_ended:
            self._count_control("empty DATA")
        state = self.streams.get(event.stream_id)
        if event.stream_id == self._control_id and self._control_id is not None:
            self._ack(size, event.stream_id)
            self._on_control_data(data)
            return
        if state is None or state.broken is not None:
            self._ack(size, event.stream_id)  # nobody will read it: give the window back
            return
        if size > len(data):
            self._ack(size - len(data), event.stream_id)  # padding is never read
        if data:
            state.push(data)
            self.bytes_received += len(data)

    def _ack(self, size: int, stream_id: int) -> None:
        if size:
            try:
                self.h2.acknowledge_received_data(size, stream_id)
            except h2.exceptions.ProtocolError:
                pass

    def consumed(self, state: StreamState, size: int) -> None:
        """The stream's reader took `size` bytes: hand that much window back to the sender, a
        batch at a time (h2's bookkeeping per call costs more than the bytes of a small response)."""
        state.unacked += size
        if state.unacked >= self._ack_batch and not self.closing:
            self._ack(state.unacked, state.id)
            state.unacked = 0
            self._wake_writer()

    def _window_opened(self, stream_id: int) -> None:
        if stream_id == 0:
            for state in self.streams.values():
                state.wake_sender()
        else:
            one = self.streams.get(stream_id)
            if one is not None:
                one.wake_sender()

    # ---- server side: streams the peer opens ----

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        headers = dict(event.headers or ())
        authority = headers.get(b":authority", b"")
        if headers.get(b":method") != b"CONNECT" or not authority:
            self._refuse(event.stream_id, 400)
            return
        try:
            name = authority.decode("ascii")
        except UnicodeDecodeError:
            self._refuse(event.stream_id, 400)
            return
        if name == CONTROL_AUTHORITY:
            if self._control_id is not None:
                raise _Abuse("a second control stream")
            self._control_id = event.stream_id
            self._send_headers(event.stream_id, 200)
            return
        if self.handler is None or self._nursery is None or self.closing:
            self._refuse(event.stream_id, 503)
            return
        state = StreamState(self, event.stream_id)
        self.streams[event.stream_id] = state
        self.streams_opened += 1
        self._nursery.start_soon(self._serve_stream, IncomingStream(self, state, name))

    async def _serve_stream(self, incoming: IncomingStream) -> None:
        assert self.handler is not None
        try:
            await self.handler(incoming)
        except Exception:  # noqa: BLE001 - one stream's failure must never take the tunnel down
            log.exception("tunnel %s: internal error while serving stream %d", self.peer, incoming.state.id)
        finally:
            if not incoming.answered:
                incoming.refuse(502)
            self.release(incoming.state)

    def _refuse(self, stream_id: int, status: int) -> None:
        self._send_headers(stream_id, status, end=True)

    def respond(self, state: StreamState, status: int, end: bool = False) -> None:
        self._send_headers(state.id, status, end)
        if end:
            state.local_ended = True

    def _send_headers(self, stream_id: int, status: int, end: bool = False) -> None:
        try:
            self.h2.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=end)
        except h2.exceptions.ProtocolError:
            return  # the stream or connection is already gone
        self._wake_writer()

    def send_control(self, message: str) -> None:
        """A one-line message to the client on the control stream (server side)."""
        if self._control_id is None or self.closing:
            return
        try:
            self.h2.send_data(self._control_id, message.encode() + b"\n")
        except h2.exceptions.ProtocolError:
            return  # window exhausted (the client reads it at once) or stream gone
        self._wake_writer()

    async def wait_idle(self) -> None:
        """Return once no stream is open (or the connection is closing)."""
        while self.streams and not self.closing:
            await self._idle_lot.park()

    async def drain(self, message: str, timeout_s: float) -> None:
        """Tell the client to open no new streams (`message` says why), wait up to `timeout_s`
        for the streams in flight to finish, then close.

        A ping follows the message: its answer comes after the client read the message, so by
        then every stream it opened before knowing has arrived and is waited for too (the same
        barrier HTTP/2 servers use with GOAWAY)."""
        self.draining = True
        self.send_control(message)
        with trio.move_on_after(timeout_s):
            await self._round_trip()
            await self.wait_idle()
        self.close("drained")
        with trio.move_on_after(CLOSE_FLUSH_S):
            await self.closed.wait()  # the message and the GOAWAY are out

    # ---- client side: opening streams ----

    def _open_control(self) -> None:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", CONTROL_AUTHORITY.encode())])
        self._control_id = stream_id
        self._wake_writer()

    def _on_control_data(self, data: bytes) -> None:
        if not self.client_side:
            return  # the client says nothing on it
        buffered = self._control_buffer + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_CONTROL_LINE:
            raise _Abuse("control message too long")
        self._control_buffer = rest
        for line in lines:
            message = line.decode("ascii", errors="replace").strip()
            if message.startswith("drain"):
                self.draining = True
            if self.on_control is not None:
                self.on_control(message)

    async def open_stream(self, authority: str) -> TunnelStream:
        """A new byte stream to `authority` (client side); TunnelError if the tunnel is not usable
        or the peer refuses (`StreamRefused`)."""
        if self.closing or not self.ready:
            raise TunnelError(f"tunnel to {self.peer} is {'closed' if self.closing else 'not ready'}")
        try:
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", authority.encode())])
        except h2.exceptions.TooManyStreamsError:
            raise TunnelError(f"tunnel to {self.peer} has its most streams open") from None
        except h2.exceptions.ProtocolError as error:
            raise TunnelError(f"cannot open a stream to {self.peer}: {error}") from None
        state = StreamState(self, stream_id)
        self.streams[stream_id] = state
        self.streams_opened += 1
        self._wake_writer()
        opened = False
        try:
            while state.response is None:
                if state.broken is not None:
                    raise TunnelError(f"stream to {authority} failed: {state.broken}")
                await state.wait()
            status = dict(state.response).get(b":status", b"")
            if status != b"200":
                raise StreamRefused(authority, status.decode("ascii", errors="replace"))
            opened = True
            return TunnelStream(self, state)
        finally:
            if not opened:
                self.release(state)

    def release(self, state: StreamState) -> None:
        """The stream's owner is done with it: reset it unless both sides ended it."""
        if self.streams.pop(state.id, None) is None:
            return
        # What it received and nobody will acknowledge any more still counts against the
        # connection's window: give it back.
        leftover = state.unacked + sum(len(chunk) for chunk in state.chunks)
        if leftover and not self.closing:
            self._ack(leftover, state.id)
        state.unacked = 0
        state.chunks.clear()
        if not self.closing and state.broken is None and not (state.ended and state.local_ended):
            try:
                self.h2.reset_stream(state.id, ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                pass
            self._wake_writer()
        state.break_("closed")
        if not self.streams:
            self._idle_lot.unpark_all()

    @property
    def open_streams(self) -> int:
        return len(self.streams)


class StreamRefused(TunnelError):
    """The node answered a stream with an error status (no such replica, or it cannot reach it)."""

    def __init__(self, authority: str, status: str) -> None:
        self.status = status
        super().__init__(f"the node refused a stream to {authority} (status {status})")


async def wait_any(*events: trio.Event) -> None:
    """Return as soon as any of `events` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:
            nursery.start_soon(_wait_and_cancel, event, nursery.cancel_scope)


async def _wait_and_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _code_name(code: int | None) -> str:
    try:
        return ErrorCodes(code).name if code is not None else "no code"
    except ValueError:
        return f"code {code}"



def _describe(error: BaseException) -> str:
    cause = error.__cause__ if isinstance(error, trio.BrokenResourceError) and error.__cause__ else error
    return str(cause) or type(cause).__name__
