"""The server's metrics (`vectorlay server --metrics-listen`): the database's health above all,
so an outage shows on a dashboard and not only in `vectorlay status`."""

from __future__ import annotations

from vectorlay.server.fleet import Fleet
from vectorlay.server.sessions import Sessions
from vectorlay.server.writer import Writer


def render(fleet: Fleet, writer: Writer, sessions: Sessions) -> bytes:
    database = writer.database
    states: dict[str, int] = {}
    for node_id in fleet.nodes:
        state = fleet.node_state(node_id).value
        states[state] = states.get(state, 0) + 1
    lines = [
        "# HELP vectorlay_database_available 1 while the database answers, 0 during an outage.",
        "# TYPE vectorlay_database_available gauge",
        f"vectorlay_database_available {1 if database.available else 0}",
        "# HELP vectorlay_database_failures_total Database operations that failed (refused, timed out, full).",
        "# TYPE vectorlay_database_failures_total counter",
        f"vectorlay_database_failures_total {database.failures}",
        "# HELP vectorlay_database_outages_total Times the database became unavailable.",
        "# TYPE vectorlay_database_outages_total counter",
        f"vectorlay_database_outages_total {database.outages}",
        "# HELP vectorlay_database_pending_writes Observations kept in memory until the database takes them.",
        "# TYPE vectorlay_database_pending_writes gauge",
        f"vectorlay_database_pending_writes {len(writer.journal)}",
        "# HELP vectorlay_nodes Known nodes by state.",
        "# TYPE vectorlay_nodes gauge",
        *(f'vectorlay_nodes{{state="{state}"}} {count}' for state, count in sorted(states.items())),
        "# HELP vectorlay_node_sessions Nodes connected to this server.",
        "# TYPE vectorlay_node_sessions gauge",
        f"vectorlay_node_sessions {len(sessions)}",
        "# HELP vectorlay_clusters Clusters stored.",
        "# TYPE vectorlay_clusters gauge",
        f"vectorlay_clusters {len(fleet.clusters)}",
    ]
    return ("\n".join(lines) + "\n").encode()
