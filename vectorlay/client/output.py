"""Tables and JSON for `vectorlay get`, and the live progress of `apply`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console


def _console(to_stderr: bool) -> Console:
    console = Console(stderr=to_stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 1000  # piped output: one row per line, never wrapped mid-cell
    return console


stdout = _console(False)
stderr = _console(True)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")
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


def cluster_table(clusters: list[dict[str, Any]]) -> str:
    rows = [(c["name"], f"{c['ready']}/{c['replicas']}", str(c["up_to_date"]), c["endpoint"] or "-",
             age(c.get("created_at")), cluster_status(c)) for c in clusters]
    if all(c.get("project", "default") == "default" for c in clusters):
        return columns(("NAME", "READY", "UP-TO-DATE", "ENDPOINT", "AGE", "STATUS"), rows)
    return columns(("PROJECT", "NAME", "READY", "UP-TO-DATE", "ENDPOINT", "AGE", "STATUS"),
                   [(c["project"], *row) for c, row in zip(clusters, rows, strict=True)])


def cluster_status(c: dict[str, Any]) -> str:
    parts = [f"{n} {state}" for state, n in sorted(c["states"].items()) if state != "ready"]
    if c.get("stopping"):
        parts.append(f"{c['stopping']} stopping")
    text = ", ".join(parts) if parts else ("ready" if c["replicas"] else "scaled to zero")
    trouble = (c.get("health") or {}).get("message")
    if trouble:
        return f"{trouble}; {text}"
    if c["reasons"]:
        text += f" ({c['reasons'][0]})"
    return text


def _gpus(gpus: list[dict[str, Any]]) -> str:
    return ", ".join(g["name"] + (f" ({g['memory_gb']:g} GB)" if g.get("memory_gb") else "") for g in gpus) or "-"


def node_table(nodes: list[dict[str, Any]]) -> str:
    return columns(("NAME", "STATE", "DATA PLANE", "ADDRESS", "REPLICAS", "LAST SEEN", "AGE", "GPUS"), [
        (n["name"], n["state"] + ("" if n.get("schedulable", True) else ",cordoned"), _data_plane(n),
         n["address"] if n.get("data_plane") != "tunnel" else "-",
         str(n["replicas"]), f"{n['last_seen_s']:g}s ago" if n.get("last_seen_s") is not None else "-",
         age(n.get("joined_at")), _gpus(n["gpus"])) for n in nodes])


def _data_plane(node: dict[str, Any]) -> str:
    """`tunnel (2 proxies)`, or `direct`."""
    plane = str(node.get("data_plane") or "direct")
    if plane != "tunnel":
        return plane
    count = node.get("tunnels")
    if count is None:
        return "tunnel"
    return f"tunnel ({count} prox{'y' if count == 1 else 'ies'})"


def replica_table(replicas: list[dict[str, Any]]) -> str:
    return columns(("ID", "CLUSTER", "NODE", "STATE", "ADDRESS", "AGE", "REASON"), [
        (r["id"], r["cluster"], r["node"] or "-", "stopping" if r.get("stopping") else r["state"], r["address"] or "-",
         age(r.get("created_at")), r["reason"] or "") for r in replicas])


def key_table(keys: list[dict[str, Any]]) -> str:
    return columns(("ID", "NAME", "STATE", "AGE"),
                   [(k["id"], k["name"], k["state"], age(k["created_at"])) for k in keys])


def token_table(tokens: list[dict[str, Any]]) -> str:
    def expiry(t: dict[str, Any]) -> str:
        if t["revoked"]:
            return "revoked"
        if t["expires_at"] is None:
            return "never"
        left = t["expires_at"] - time.time()
        return "expired" if left <= 0 else f"in {age(time.time() - left)}"

    return columns(("ID", "ROLE", "PROJECT", "EXPIRES", "USES LEFT", "AGE", "DESCRIPTION"), [
        (t["id"], t["role"], t["project"] or "-", expiry(t), "-" if t["uses_left"] is None else str(t["uses_left"]),
         age(t["created_at"]), t["description"]) for t in tokens])


def audit_table(records: list[dict[str, Any]]) -> str:
    return columns(("TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"), [
        (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"])), r["actor"], r["action"], r["target"] or "-",
         r["detail"]) for r in records])


def status_text(server: str, info: dict[str, Any]) -> str:
    """`vectorlay status`: the server, its database (the line that matters in an outage), the fleet."""
    database = info["database"]
    if database["available"]:
        db = "available"
    else:
        since = _clock(database["since"]) if database.get("since") else "?"
        db = f"unavailable since {since} ({database['reason'] or 'no answer'})"
    if database.get("pending_writes"):
        db += f"; {database['pending_writes']} observation(s) waiting to be stored"
    return "\n".join([
        f"server:    {server} (vectorlay {info['version']})",
        f"database:  {db}",
        f"nodes:     {info['nodes_connected']} connected of {info['nodes']}",
        f"clusters:  {info['clusters']}",
    ])


def summary_line(kind: str, summary: dict[str, Any]) -> str:
    """`5000 nodes: 4999 ready, 1 suspect` above a long listing."""
    counts = summary["nodes"] if kind == "nodes" else summary["replicas"]
    total = summary["nodes_total"] if kind == "nodes" else summary["replicas_total"]
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{total} {kind}" + (f": {parts}" if parts else "")


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def print_description(info: dict[str, Any]) -> None:
    """`vectorlay describe cluster`: the cluster, each replica with its last events, recent events."""
    spec = info.get("spec") or {}
    cluster = info["cluster"]
    lines = [
        f"Name:        {cluster['name']}",
        f"Endpoint:    {cluster['endpoint'] or '-'}",
        f"Replicas:    {cluster['ready']}/{cluster['replicas']} ready, {cluster['up_to_date']} up to date"
        + (f", {cluster['stopping']} stopping" if cluster["stopping"] else ""),
        f"Health:      {(cluster.get('health') or {}).get('message') or 'ok'}",
    ]
    if spec:
        gpu = spec["gpu"]
        kinds = ", ".join(gpu["types"]) or "any"
        lines.append(f"Runtime:     {spec['runtime']}" + (f" ({spec['isolation']} isolation)"
                                                          if spec["runtime"] == "container" else ""))
        if spec.get("image"):
            lines.append(f"Image:       {spec['image']} (pull: {spec['image_pull']})")
        lines.append(f"GPU:         {gpu['count']} x {kinds}" if gpu["count"] else "GPU:         none")
    lines.append("")
    lines.append("Replicas:")
    for r in info["replicas"]:
        lines.append(f"  {r['id']}  node={r['node'] or '-'}  state={r['state']}  address={r['address'] or '-'}"
                     + (f"  digest={r['image_digest']}" if r.get("image_digest") else ""))
        if r["reason"]:
            lines.append(f"    reason: {r['reason']}")
        for event in r["events"]:
            lines.append(f"    {_clock(event['at'])}  {event['message']}")
    lines.append("")
    lines.append("Events:")
    for event in info["events"]:
        who = f"{event['replica']}: " if event["replica"] else ""
        lines.append(f"  {_clock(event['at'])}  {who}{event['message']}")
    if not info["events"]:
        lines.append("  none")
    stdout.print("\n".join(lines), markup=False)
