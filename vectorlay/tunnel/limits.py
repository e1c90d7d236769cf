"""How much one tunnel may hold, and how much a peer may ask of it, in one value."""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
# HTTP/2's largest flow-control window (RFC 9113, 6.9.1).
MAX_WINDOW = 2**31 - 1


@dataclass(frozen=True)
class TunnelLimits:
    # Streams open at once on one tunnel: one per pooled upstream connection, so a proxy holding a
    # thousand slow streaming responses from one node needs a thousand.
    max_streams: int = 1024
    # What a stream may have in flight towards a consumer that has not read it yet: the most the
    # receiving side buffers per stream. 256 KiB keeps a 10 MiB body moving at loopback speed and
    # bounds a slow client's cost (the node stops reading its replica once this is unread).
    stream_window: int = 256 * KIB
    # 64 KiB frames: four times fewer frames to parse for large bodies than h2's 16 KiB default.
    max_frame_size: int = 64 * KIB
    # A stream's request head is a CONNECT with one authority: a few hundred bytes. Anything near
    # this is abuse (HPACK bombs, CONTINUATION floods).
    max_header_list_size: int = 8 * KIB
    # SETTINGS, PING, RST_STREAM, PRIORITY, unknown and empty DATA frames: what the known HTTP/2
    # floods use (CVE-2019-9512/9514/9515/9518, rapid reset CVE-2023-44487). A healthy peer sends a
    # few a minute; a burst covers a proxy closing its idle pooled streams at once.
    control_frames_per_s: float = 200.0
    control_frame_burst: int = 2000
    # From the first byte to a usable tunnel (TLS handshake, then the peer's HTTP/2 SETTINGS).
    handshake_timeout_s: float = 10.0
    # The node pings; the proxy closes a tunnel that has said nothing for idle_timeout_s (three
    # missed pings). A tunnel whose path died silently (no FIN, no reset) while the node's link to
    # the server lives is noticed this way; a node gone altogether leaves routing at the server's
    # heartbeat deadline (1.6 s) first. At 5,000 nodes a proxy answers 500 pings a second.
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 5.0
    idle_timeout_s: float = 30.0
    # A write that makes no progress this long: the peer stopped reading, the tunnel is dead.
    send_stall_s: float = 30.0
    # Closed streams h2 remembers (to tell late frames from protocol errors); its default, 65,536,
    # costs megabytes on a long-lived connection.
    closed_streams_kept: int = 4096

    @property
    def connection_window(self) -> int:
        """Every stream may fill its window at once without starving the others: one stalled
        consumer must never block the streams of other clients on the same tunnel."""
        return min(MAX_WINDOW, self.max_streams * self.stream_window)
