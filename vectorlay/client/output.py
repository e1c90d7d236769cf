"""Tables and JSON for `vectorlay get`, and the live progress of `apply`."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table


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


def _age(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    seconds = max(0, int(time.time() - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def cluster_table(clusters: list[dict[str, Any]]) -> Table:
    table = _table("NAME", "READY", "UP-TO-DATE", "ENDPOINT", "AGE", "STATUS")
    for c in clusters:
        table.add_row(c["name"], f"{c['ready']}/{c['replicas']}", str(c["up_to_date"]), c["endpoint"] or "-",
                      _age(c.get("created_at")), cluster_status(c))
    return table


def cluster_status(c: dict[str, Any]) -> str:
    parts = [f"{n} {state}" for state, n in sorted(c["states"].items()) if state != "ready"]
    if c.get("stopping"):
        parts.append(f"{c['stopping']} stopping")
    text = ", ".join(parts) if parts else ("ready" if c["replicas"] else "scaled to zero")
    if c["reasons"]:
        text += f" ({c['reasons'][0]})"
    return text


def node_table(nodes: list[dict[str, Any]]) -> Table:
    table = _table("NAME", "STATE", "ADDRESS", "GPUS", "REPLICAS", "LAST SEEN", "AGE")
    for n in nodes:
        gpus = ", ".join(f"{g['name']}{' (' + format(g['memory_gb'], 'g') + ' GB)' if g.get('memory_gb') else ''}"
                         for g in n["gpus"]) or "-"
        seen = f"{n['last_seen_s']:g}s ago" if n.get("last_seen_s") is not None else "-"
        table.add_row(n["name"], n["state"], n["address"], gpus, str(n["replicas"]), seen, _age(n.get("joined_at")))
    return table


def replica_table(replicas: list[dict[str, Any]]) -> Table:
    table = _table("ID", "CLUSTER", "NODE", "STATE", "ADDRESS", "AGE", "REASON")
    for r in replicas:
        table.add_row(r["id"], r["cluster"], r["node"] or "-", r["state"], r["address"] or "-",
                      _age(r.get("created_at")), r["reason"] or "")
    return table


def key_table(keys: list[dict[str, Any]]) -> Table:
    table = _table("ID", "NAME", "STATE", "AGE")
    for k in keys:
        table.add_row(k["id"], k["name"], k["state"], _age(k["created_at"]))
    return table


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
