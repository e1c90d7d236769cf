"""The data plane between nodes and proxies: TLS connections the node opens, carrying HTTP/2
streams (one per upstream connection) that the proxy opens towards the node's replicas.

Shared by `vectorlay.node` and `vectorlay.proxy`; imports only `vectorlay.core`,
`vectorlay.errors` and libraries.
"""

from vectorlay.tunnel.connection import CONTROL_AUTHORITY, IncomingStream, StreamRefused, TunnelConnection
from vectorlay.tunnel.limits import TunnelLimits
from vectorlay.tunnel.stream import TunnelStream

__all__ = ["CONTROL_AUTHORITY", "IncomingStream", "StreamRefused", "TunnelConnection", "TunnelLimits",
           "TunnelStream"]
