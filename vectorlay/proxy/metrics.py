"""Counters the proxy keeps per cluster, rendered in Prometheus' text format on `--metrics-listen`.

Plain ints and dicts updated inline on the request path (one trio thread, no locks). The cluster
label only ever holds names from the route table, so a client inventing Host headers cannot grow
the series without bound.
"""

from __future__ import annotations

import bisect
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

import trio

from vectorlay import metrics_http

log = logging.getLogger("vectorlay.proxy")

UNKNOWN = "_unknown"  # requests for hosts that are not a known cluster
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class ClusterMetrics:
    requests: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))  # by status
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))
    latency_sum_s: float = 0.0
    in_flight: int = 0
    retries: int = 0
    ejections: int = 0
    connect_errors: int = 0

    def observe(self, status: int, seconds: float) -> None:
        self.requests[status] += 1
        self.latency_buckets[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.latency_sum_s += seconds


class TunnelCounters(Protocol):
    """What the proxy's tunnel hub counts (`proxy/tunnels.py`)."""

    accepted: int
    refused: int

    @property
    def open_tunnels(self) -> int: ...

    @property
    def streams_open(self) -> int: ...

    @property
    def streams_total(self) -> int: ...

    @property
    def bytes_in(self) -> int: ...

    @property
    def bytes_out(self) -> int: ...


class Metrics:
    def __init__(self) -> None:
        self.clusters: defaultdict[str, ClusterMetrics] = defaultdict(ClusterMetrics)
        self.connections = 0
        self.connections_rejected = 0
        self.tunnels: TunnelCounters | None = None
        self.connections_evicted = 0

    def render(self) -> bytes:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        clusters = sorted(self.clusters.items())
        family("vectorlay_proxy_requests_total", "counter",
               "Requests answered, by cluster and the status code the client received "
               "(499: the client left before any answer).")
        for name, m in clusters:
            for status, count in sorted(m.requests.items()):
                lines.append(f'vectorlay_proxy_requests_total{{cluster="{name}",code="{status}"}} {count}')
        family("vectorlay_proxy_request_duration_seconds", "histogram",
               "Time from a request's head to the end of its response.")
        for name, m in clusters:
            running = 0
            for bound, count in zip((*BUCKETS_S, float("inf")), m.latency_buckets, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'vectorlay_proxy_request_duration_seconds_bucket{{cluster="{name}",le="{le}"}} {running}')
            lines.append(f'vectorlay_proxy_request_duration_seconds_sum{{cluster="{name}"}} {m.latency_sum_s:.6f}')
            lines.append(f'vectorlay_proxy_request_duration_seconds_count{{cluster="{name}"}} {running}')
        for metric, kind, attr, help_text in (
            ("vectorlay_proxy_requests_in_flight", "gauge", "in_flight", "Requests being served now."),
            ("vectorlay_proxy_retries_total", "counter", "retries", "Requests sent again to another replica."),
            ("vectorlay_proxy_ejections_total", "counter", "ejections", "Replicas ejected after a failure."),
            ("vectorlay_proxy_upstream_connect_errors_total", "counter", "connect_errors",
             "Connections to replicas that failed or timed out."),
        ):
            family(metric, kind, help_text)
            for name, m in clusters:
                lines.append(f'{metric}{{cluster="{name}"}} {getattr(m, attr)}')
        family("vectorlay_proxy_connections", "gauge", "Client connections open now.")
        lines.append(f"vectorlay_proxy_connections {self.connections}")
        family("vectorlay_proxy_connections_rejected_total", "counter",
               "Client connections refused: the limit was reached with every connection busy, "
               "or their address holds its share.")
        lines.append(f"vectorlay_proxy_connections_rejected_total {self.connections_rejected}")
        family("vectorlay_proxy_connections_evicted_total", "counter",
               "Idle kept-alive client connections closed to make room for new ones at the connection limit.")
        lines.append(f"vectorlay_proxy_connections_evicted_total {self.connections_evicted}")
        if self.tunnels is not None:
            tunnels = self.tunnels
            for metric, kind, value, help_text in (
                ("vectorlay_proxy_tunnels", "gauge", tunnels.open_tunnels, "Nodes with a tunnel to this proxy now."),
                ("vectorlay_proxy_tunnels_accepted_total", "counter", tunnels.accepted, "Tunnels accepted."),
                ("vectorlay_proxy_tunnels_refused_total", "counter", tunnels.refused,
                 "Tunnels refused: TLS failed, no valid node certificate, node not admitted, handshake failed."),
                ("vectorlay_proxy_tunnel_streams", "gauge", tunnels.streams_open,
                 "Streams open on tunnels now (one per upstream connection to a replica)."),
                ("vectorlay_proxy_tunnel_streams_total", "counter", tunnels.streams_total,
                 "Streams opened on tunnels."),
                ("vectorlay_proxy_tunnel_received_bytes_total", "counter", tunnels.bytes_in,
                 "Stream bytes received from nodes through tunnels."),
                ("vectorlay_proxy_tunnel_sent_bytes_total", "counter", tunnels.bytes_out,
                 "Stream bytes sent to nodes through tunnels."),
            ):
                family(metric, kind, help_text)
                lines.append(f"{metric} {value}")
        return ("\n".join(lines) + "\n").encode()


async def serve_metrics(metrics: Metrics, listeners: list[trio.SocketListener],
                        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    await metrics_http.serve_metrics(metrics.render, listeners, task_status=task_status)
