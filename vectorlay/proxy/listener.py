"""Accept client connections: the connection limits, TLS, and a graceful stop.

Each new connection is admitted or not by `admission.py`: past a client address's share, or at
the global cap with every connection busy, it gets a short 503 and is closed at once (clients
learn it, rather than waiting in the kernel's backlog); at the cap with some connection idle, the
idlest is closed to make room. `shutdown` stops accepting, lets every request in flight finish
within a grace period, and closes idle keep-alive connections at once.
"""

from __future__ import annotations

import errno
import logging
import resource

import trio

from vectorlay.proxy.admission import Admitted
from vectorlay.proxy.http import Proxy
from vectorlay.proxy.tls import TlsTerminator

log = logging.getLogger("vectorlay.proxy")



def _refusal(message: bytes) -> bytes:
    body = b'{"error": "%s", "status": 503}\n' % message
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))


OVERLOADED = _refusal(b"too many connections to this proxy")
CLIENT_OVERLOADED = _refusal(b"too many connections from your address")
REJECT_TIMEOUT_S = 1.0
# Out of file descriptors (or kernel buffers): wait a little and accept again, as trio.serve_listeners does.
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_BACKOFF_S = 0.1


class Edge:
    def __init__(self, proxy: Proxy, listeners: list[trio.SocketListener], tls: TlsTerminator | None) -> None:
        self.proxy = proxy
        self.listeners = listeners
        self.tls = tls
        self._all_closed = trio.Event()
        self._accepting = trio.CancelScope()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as connections:
            with self._accepting:
                async with trio.open_nursery() as accepting:
                    for listener in self.listeners:
                        accepting.start_soon(self._accept_loop, listener, connections)
                    task_status.started()
            # Stopped accepting (shutdown): connections finish in their own nursery.
            for listener in self.listeners:
                await listener.aclose()

    async def shutdown(self, grace_s: float) -> bool:
        """Stop accepting and wait for requests in flight; True if all finished within the grace."""
        self._accepting.cancel()
        self.proxy.drain()
        if self.open == 0:
            return True
        with trio.move_on_after(grace_s):
            await self._all_closed.wait()
            return True
        log.warning("%d connection(s) still busy after %gs; closing them", self.open, grace_s)
        return False

    @property
    def open(self) -> int:
        return self.proxy.admission.open

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in _RESOURCE_ERRORS:
                    raise
                log.error("accept failed (%s); retrying in %gs", error.strerror, ACCEPT_BACKOFF_S)
                await trio.sleep(ACCEPT_BACKOFF_S)
                continue
            try:
                peer = str(stream.socket.getpeername()[0])
            except OSError:
                peer = "unknown"
            admitted = self.proxy.admission.admit(peer)
            self.proxy.metrics.connections_evicted = self.proxy.admission.evicted
            if admitted is not Admitted.YES:
                self.proxy.metrics.connections_rejected += 1
                connections.start_soon(self._reject, stream,
                                       CLIENT_OVERLOADED if admitted is Admitted.CLIENT_FULL else OVERLOADED)
                continue
            connections.start_soon(self._handle, stream, peer)

    async def _handle(self, raw: trio.SocketStream, peer: str) -> None:
        try:
            if self.tls is None:
                await self.proxy.handle_connection(raw, peer, "http", admitted=True)
            else:
                await self.proxy.handle_connection(self.tls.wrap(raw), peer, "https", admitted=True)
        except Exception:  # noqa: BLE001 - one connection's failure must never take the proxy down
            log.exception("internal error while serving %s; closed that connection", peer)
        finally:
            if self.open == 0 and self.proxy.draining:
                self._all_closed.set()

    async def _reject(self, stream: trio.SocketStream, answer: bytes) -> None:
        with trio.move_on_after(REJECT_TIMEOUT_S):
            try:
                if self.tls is None:
                    await stream.send_all(answer)
                    # Read what the client sent, so that closing does not reset away our answer.
                    await stream.send_eof()
                    while await stream.receive_some(16 * 1024):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with trio.CancelScope(shield=True):
            await stream.aclose()


def raise_open_files_limit(wanted: int) -> None:
    """Each client connection needs a descriptor and its upstream one more; the default soft limit
    (often 1024) is far below what a proxy holds. Raise it up to the hard limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        log.warning("could not raise the open files limit: %s", error)
