"""Tables and JSON for `vectorlay get`, and the live progress of `apply`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from vectorlay.core import codec
from vectorlay.core.api import ServerStatus
from vectorlay.core.api_views import (
    AuditView,
    ClusterDescription,
    ClusterView,
    FleetSummary,
    GpuView,
    KeyView,
    NodeDescription,
    NodeView,
    ReplicaDescription,
    ReplicaView,
    RevisionView,
    SecretView,
    ServerView,
    TokenView,
)


def _console(to_stderr: bool) -> Console:
    console = Console(stderr=to_stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 1000  # piped output: one row per line, never wrapped mid-cell
    return console


stdout = _console(False)
stderr = _console(True)


def print_json(value: Any) -> None:
    """`-o json`: a view (or a list or dict of them) as its JSON."""
    sys.stdout.write(json.dumps(codec.dump(value), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def age(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    seconds = max(0, int(time.time() - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def columns(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned table, like kubectl's: fast for thousands of rows, easy to grep and cut."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("   ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def cluster_table(clusters: Sequence[ClusterView]) -> str:
    rows = [(c.name, f"{c.ready}/{c.replicas}", str(c.up_to_date), c.endpoint or "-", age(c.created_at),
             cluster_status(c)) for c in clusters]
    if all(c.project == "default" for c in clusters):
        return columns(("NAME", "READY", "UP-TO-DATE", "ENDPOINT", "AGE", "STATUS"), rows)
    return columns(("PROJECT", "NAME", "READY", "UP-TO-DATE", "ENDPOINT", "AGE", "STATUS"),
                   [(c.project, *row) for c, row in zip(clusters, rows, strict=True)])


def cluster_status(c: ClusterView) -> str:
    parts = [f"{n} {state}" for state, n in sorted(c.states.items()) if state != "ready"]
    if c.stopping:
        parts.append(f"{c.stopping} stopping")
    text = ", ".join(parts) if parts else ("ready" if c.replicas else "scaled to zero")
    if c.health.message:
        return f"{c.health.message}; {text}"
    if c.reasons:
        text += f" ({c.reasons[0]})"
    return text


def _gpus(gpus: Sequence[GpuView]) -> str:
    return ", ".join(g.name + (f" ({g.memory_gb:g} GB)" if g.memory_gb else "") for g in gpus) or "-"


def node_table(nodes: Sequence[NodeView]) -> str:
    return columns(("NAME", "STATE", "DATA PLANE", "ADDRESS", "REPLICAS", "LAST SEEN", "AGE", "GPUS"), [
        (n.name, n.state + ("" if n.schedulable else ",cordoned"), _data_plane(n),
         n.address if n.data_plane != "tunnel" else "-",
         str(n.replicas), f"{n.last_seen_s:g}s ago" if n.last_seen_s is not None else "-",
         age(n.joined_at), _gpus(n.gpus)) for n in nodes])


def _data_plane(node: NodeView) -> str:
    """`tunnel (2 proxies)`, or `direct`."""
    if node.data_plane != "tunnel":
        return node.data_plane
    if node.tunnels is None:
        return "tunnel"
    return f"tunnel ({node.tunnels} prox{'y' if node.tunnels == 1 else 'ies'})"
def server_table(servers: Sequence[ServerView]) -> str:
    return columns(("ID", "ADDRESS", "LEADER", "EPOCH", "NODES", "PROXIES", "CLIENTS", "SEEN"), [
        (s.id + (" (this)" if s.this else ""), s.address, "yes" if s.leader else "no",
         str(s.epoch) if s.epoch is not None else "-", str(s.nodes), str(s.proxies), str(s.clients),
         f"{s.seen_s_ago:g}s ago") for s in servers])


def replica_table(replicas: Sequence[ReplicaView]) -> str:
    return columns(("ID", "CLUSTER", "NODE", "STATE", "ADDRESS", "AGE", "REASON"), [
        (r.id, r.cluster, r.node or "-", "stopping" if r.stopping else r.state, r.address or "-", age(r.created_at),
         r.reason) for r in replicas])


def revision_table(revisions: Sequence[RevisionView]) -> str:
    """`rollout history`: oldest first, like kubectl; the newest is what runs now."""
    return columns(("REVISION", "APPLIED", "AGE", "BY", "CHANGE"), [
        (str(r.revision) + (" (current)" if r.current else ""),
         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.at)), age(r.at), r.actor, r.change or "-")
        for r in revisions])


def table_of(kind: str, items: Sequence[Any]) -> str:
    """The `get KIND` table of `items` (views of that kind)."""
    tables = {"clusters": cluster_table, "nodes": node_table, "replicas": replica_table, "servers": server_table}
    table: Any = tables[kind]
    return str(table(items))


def key_table(keys: Sequence[KeyView]) -> str:
    return columns(("ID", "NAME", "STATE", "AGE"), [(k.id, k.name, k.state, age(k.created_at)) for k in keys])


def token_table(tokens: Sequence[TokenView]) -> str:
    def expiry(t: TokenView) -> str:
        if t.revoked:
            return "revoked"
        if t.expires_at is None:
            return "never"
        left = t.expires_at - time.time()
        return "expired" if left <= 0 else f"in {age(time.time() - left)}"

    return columns(("ID", "ROLE", "PROJECT", "EXPIRES", "USES LEFT", "AGE", "DESCRIPTION"), [
        (t.id, t.role.value, t.project or "-", expiry(t), "-" if t.uses_left is None else str(t.uses_left),
         age(t.created_at), t.description) for t in tokens])


def secret_table(secrets: Sequence[SecretView]) -> str:
    return columns(("PROJECT", "NAME", "UPDATED"), [(s.project, s.name, age(s.updated_at)) for s in secrets])


def audit_table(records: Sequence[AuditView]) -> str:
    return columns(("TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"), [
        (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.at)), r.actor, r.action, r.target or "-", r.detail)
        for r in records])


def status_text(server: str, info: ServerStatus) -> str:
    """`vectorlay status`: the server, its database (the line that matters in an outage), the fleet."""
    database = info.database
    if database.available:
        db = "available"
    else:
        since = _clock(database.since) if database.since else "?"
        db = f"unavailable since {since} ({database.reason or 'no answer'})"
    if database.pending_writes:
        db += f"; {database.pending_writes} observation(s) waiting to be stored"
    return "\n".join([
        f"server:    {server} (vectorlay {info.version})",
        f"database:  {db}",
        f"nodes:     {info.nodes_connected} connected of {info.nodes}",
        f"clusters:  {info.clusters}",
    ])


def summary_line(kind: str, summary: FleetSummary) -> str:
    """`5000 nodes: 4999 ready, 1 suspect` above a long listing."""
    counts = summary.nodes if kind == "nodes" else summary.replicas
    total = summary.nodes_total if kind == "nodes" else summary.replicas_total
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{total} {kind}" + (f": {parts}" if parts else "")


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def print_description(info: ClusterDescription) -> None:
    """`vectorlay describe cluster`: the cluster, each replica with its last events, recent events."""
    spec = info.spec
    cluster = info.cluster
    lines = [
        f"Name:        {cluster.name}",
        f"Endpoint:    {cluster.endpoint or '-'}",
        f"Replicas:    {cluster.ready}/{cluster.replicas} ready, {cluster.up_to_date} up to date"
        + (f", {cluster.stopping} stopping" if cluster.stopping else ""),
        f"Health:      {cluster.health.message or 'ok'}",
    ]
    if spec is not None:
        gpu = spec.gpu
        kinds = ", ".join(gpu.types) or "any"
        lines.append(f"Runtime:     {spec.runtime.value}" + (f" ({spec.isolation.value} isolation)"
                                                               if spec.runtime.value == "container" else ""))
        if spec.image:
            lines.append(f"Image:       {spec.image} (pull: {spec.image_pull.value})")
        lines.append(f"GPU:         {gpu.count} x {kinds}" if gpu.count else "GPU:         none")
    lines.append("")
    lines.append("Replicas:")
    for r in info.replicas:
        state = "stopping" if r.stopping else r.state
        lines.append(f"  {r.id}  node={r.node or '-'}  state={state}  address={r.address or '-'}"
                     + (f"  digest={r.image_digest}" if r.image_digest else ""))
        if r.reason:
            lines.append(f"    reason: {r.reason}")
        for event in r.events:
            lines.append(f"    {_clock(event.at)}  {event.message}")
    lines.append("")
    lines.append("Events:")
    for event in info.events:
        who = f"{event.replica}: " if event.replica else ""
        lines.append(f"  {_clock(event.at)}  {who}{event.message}")
    if not info.events:
        lines.append("  none")
    stdout.print("\n".join(lines), markup=False)


def _when(timestamp: float | None) -> str:
    """`2024-05-01 12:03:07 (3m ago)`, or `-`."""
    if timestamp is None:
        return "-"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(timestamp))} ({age(timestamp)} ago)"


def _gpu_health(gpu: GpuView) -> str:
    if gpu.healthy is None:
        return "health not reported yet"
    return "healthy" if gpu.healthy else f"UNHEALTHY: {gpu.health_reason or 'no reason given'}"


def print_node_description(info: NodeDescription) -> None:
    """`vectorlay describe node`: state, data plane, GPUs with health, replicas, events, changes."""
    node = info.node
    flags = [] if node.schedulable else ["cordoned"]
    if info.draining:
        flags.append("draining")
    heartbeat = f"{node.last_seen_s:g}s ago" if node.last_seen_s is not None else "none since this server started"
    lines = [
        f"Name:          {node.name}",
        f"ID:            {node.id}",
        f"State:         {node.state}" + (f" ({', '.join(flags)})" if flags else "")
        + ("" if node.connected else ", not connected"),
        f"Data plane:    {_data_plane(node)}" + (f", address {node.address}" if node.data_plane != "tunnel" else ""),
        f"Heartbeat:     {heartbeat}" + (f"; stored {_when(info.last_seen_at)}" if info.last_seen_at else ""),
        f"Joined:        {_when(node.joined_at)}",
        f"Runtimes:      {', '.join(node.runtimes) or '-'}"
        + (f" (isolation: {', '.join(node.isolation)})" if node.isolation else ""),
    ]
    if info.session_server:
        lines.append(f"Session on:    server {info.session_server}")
    lines.append(f"GPUs:          {len(node.gpus)}" + ("" if node.gpus_healthy else
                                                      " (a GPU is unhealthy: no new replicas here)"))
    for gpu in node.gpus:
        memory = f", {gpu.memory_gb:g} GB" if gpu.memory_gb else ""
        use = "in use" if gpu.in_use else "free"
        extra = "".join(f", {text}" for text in (
            f"{gpu.utilization_pct:g}% busy" if gpu.utilization_pct is not None else "",
            f"{gpu.temperature_c:g}°C" if gpu.temperature_c is not None else "") if text)
        lines.append(f"  [{gpu.index}] {gpu.name}{memory}, {use}, {_gpu_health(gpu)}{extra}  ({gpu.uuid})")
    lines += ["", "Replicas:"]
    for r in info.replicas:
        state = "stopping" if r.stopping else r.state
        lines.append(f"  {r.id}  cluster={r.cluster}" + (f"  project={r.project}" if r.project != "default" else "")
                     + f"  state={state}  address={r.address or '-'}" + (f"  reason: {r.reason}" if r.reason else ""))
    if not info.replicas:
        lines.append("  none")
    lines += ["", "Events:"]
    lines += [f"  {_clock(e.at)}  {e.replica + ': ' if e.replica else ''}{e.message}" for e in info.events]
    if not info.events:
        lines.append("  none")
    lines += ["", "Changes:"]
    lines += [f"  {_when(c.at)}  {c.action} by {c.actor}" + (f" ({c.detail})" if c.detail else "")
              for c in info.changes]
    if not info.changes:
        lines.append("  none")
    stdout.print("\n".join(lines), markup=False, highlight=False)


def print_replica_description(info: ReplicaDescription) -> None:
    """`vectorlay describe replica`: where it runs, its state and reason, its history."""
    r = info.replica
    lines = [
        f"ID:            {r.id}",
        f"Cluster:       {r.cluster}" + (f" (project {r.project})" if r.project != "default" else ""),
        f"Node:          {r.node or '- (not placed)'}",
        f"State:         {'stopping' if r.stopping else r.state}",
        f"Reason:        {r.reason or '-'}",
        f"Restarts:      {info.restarts}",
        f"Failures:      {info.failures}",
        f"Port:          {info.port if info.port is not None else '-'} (published at {r.address or '-'})",
        f"GPUs:          {', '.join(r.gpus) or 'none'}",
        f"Image digest:  {r.image_digest or '-'}",
        f"Revision:      {r.revision or '-'} (generation {r.generation})",
        f"Created:       {_when(r.created_at)}",
        "",
        "Events:",
    ]
    lines += [f"  {_clock(e.at)}  {e.message}" for e in info.events]
    if not info.events:
        lines.append("  none")
    stdout.print("\n".join(lines), markup=False, highlight=False)
