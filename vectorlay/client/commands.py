"""What the client commands do, once the CLI has parsed their arguments."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.live import Live
from rich.text import Text

from vectorlay.client import output
from vectorlay.client.api import ApiClient, open_api
from vectorlay.client.config import Context
from vectorlay.core.launch_inputs import secret_value_problem
from vectorlay.core.manifest import parse_manifest
from vectorlay.errors import UserError, VectorlayError


class WaitTimedOut(VectorlayError):
    """`apply` or `delete` gave up waiting; the change itself was made."""


class DatabaseUnavailable(VectorlayError):
    """`status`: the server runs, its database does not answer (exit 1 for scripts)."""


class ClusterFailing(VectorlayError):
    """`apply` stopped waiting early: a cluster cannot get ready by itself (crash loop, quarantine)."""


def read_manifest(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read ({error})") from None


async def apply(ctx: Context, text: str, dry_run: bool, wait: bool, timeout_s: float | None, as_json: bool) -> None:
    parse_manifest(text)  # validate here first: a bad manifest never reaches the server
    async with open_api(ctx.server, ctx.token) as api:
        result = await api.call("apply", {"manifest": text, "dry_run": dry_run})
        keys = [change["cluster"] for change in result["changes"]]
        if as_json and (dry_run or not wait):
            output.print_json(result)
            return
        if not as_json:
            verb = "would be " if dry_run else ""
            for change in result["changes"]:
                detail = f" ({change['detail']})" if change["detail"] else ""
                output.stdout.print(f"cluster/{change['cluster']} {verb}{change['action']}{detail}", markup=False)
                if dry_run:
                    for line in change.get("fields", []):
                        output.stdout.print(f"  {line}", markup=False, highlight=False)
        if dry_run or not wait:
            return
        final = await _wait_ready(api, keys, timeout_s, quiet=as_json)
        if as_json:
            output.print_json({**result, "ready": final["ready"], "clusters": final["clusters"],
                               "failed": final.get("failed", [])})
        if final.get("failed"):
            raise ClusterFailing("; ".join(f"cluster/{f['cluster']} {f['reason']}" for f in final["failed"]))
        if not final["ready"]:
            raise WaitTimedOut(f"timed out after {timeout_s:g}s waiting for replicas to be ready; "
                               "see `vectorlay get replicas`")
        if not as_json:
            for cluster in final["clusters"]:
                if cluster["endpoint"]:
                    output.stdout.print(f"cluster/{cluster['key']} ready at {cluster['endpoint']}")
                else:
                    output.stdout.print(f"cluster/{cluster['key']} ready (no proxy connected yet)")


async def _wait_ready(api: ApiClient, names: list[str], timeout_s: float | None, quiet: bool) -> dict[str, Any]:
    """Stream readiness from the server with a live table (or plain lines when not a terminal)."""
    params = {"clusters": names, "timeout_s": timeout_s}
    interactive = output.stderr.is_terminal and not quiet
    last_line = ""
    result: dict[str, Any] = {}
    with Live(console=output.stderr, transient=True, auto_refresh=False) if interactive else _Null() as live:
        async for kind, value in api.stream("wait_ready", params):
            if kind == "result":
                result = value
                break
            if interactive:
                live.update(Text(output.cluster_table(value)), refresh=True)
            elif not quiet:
                line = "; ".join(f"{c['name']}: {_progress(c)}" + _why(c) for c in value)
                if line != last_line:
                    output.stderr.print(f"waiting: {line}")
                    last_line = line
    return result


def _progress(cluster: dict[str, Any]) -> str:
    """`1/2 ready`; while a roll replaces old copies: `2 serving, 0/2 updated`, so a roll in
    progress does not read like an outage."""
    rolling = cluster.get("up_to_date", cluster["replicas"]) < cluster["replicas"] or cluster.get("stopping") \
        or sum(cluster["states"].values()) > cluster["replicas"]
    if rolling and "serving" in cluster:
        return f"{cluster['serving']} serving, {cluster['ready']}/{cluster['replicas']} updated"
    return f"{cluster['ready']}/{cluster['replicas']} ready"


def _why(cluster: dict[str, Any]) -> str:
    health = (cluster.get("health") or {}).get("message")
    if health:
        return f" ({health})"
    return f" ({cluster['reasons'][0]})" if cluster["reasons"] else ""


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *args: object) -> None:
        return None

    def update(self, *args: object, **kwargs: object) -> None:
        return None


PAGE_SIZE = 500


async def get(ctx: Context, kind: str, name: str | None, as_json: bool) -> None:
    method = {"clusters": "get_clusters", "nodes": "get_nodes", "replicas": "get_replicas"}[kind]
    params: dict[str, Any] = _scope(ctx)
    if name is not None:
        params["cluster" if kind == "replicas" else "name"] = name
    items: list[dict[str, Any]] = []
    summary: dict[str, Any] | None = None
    async with open_api(ctx.server, ctx.token) as api:
        if kind == "clusters":
            items = await api.call(method, params)
        else:
            async for event, value in api.stream(method, {**params, "page_size": PAGE_SIZE}):
                if event == "event":
                    items.extend(value)
            if not as_json and name is None:
                summary = await api.call("fleet_summary")
    if as_json:
        output.print_json(items)
        return
    if summary is not None:
        output.stderr.print(output.summary_line(kind, summary), markup=False)
    if not items:
        output.stderr.print(f"no {kind}")
        return
    table = {"clusters": output.cluster_table, "nodes": output.node_table, "replicas": output.replica_table}[kind]
    sys.stdout.write(table(items))
    sys.stdout.flush()


async def delete(ctx: Context, name: str, wait: bool, timeout_s: float | None) -> None:
    async with open_api(ctx.server, ctx.token) as api:
        await api.call("delete", {"name": name, **_scope(ctx)})
        output.stdout.print(f"cluster/{name} deleted")
        if not wait:
            return
        result = await api.call("wait_deleted", {"name": name, "timeout_s": timeout_s, **_scope(ctx)})
        if not result["gone"]:
            raise WaitTimedOut(f"{result['left']} replica(s) of {name} are still stopping "
                               "(their node may be unreachable; they stop when it returns)")


async def logs(ctx: Context, cluster: str, follow: bool, tail: int, prefix: bool) -> None:
    async with open_api(ctx.server, ctx.token) as api:
        async for kind, value in api.stream("logs", {"cluster": cluster, "tail": tail, "follow": follow,
                                                     **_scope(ctx)}):
            if kind == "result":
                if value["replicas"] == 0:
                    output.stderr.print(f"cluster {cluster} has no replicas placed on a node yet")
                return
            label = f"[{value['replica']}] " if prefix else ""
            if "error" in value:
                output.stderr.print(f"{label}{value['error']}", markup=False)
                continue
            sys.stdout.write("".join(f"{label}{line}\n" for line in value["lines"]))
            sys.stdout.flush()


async def unquarantine(ctx: Context, name: str) -> None:
    async with open_api(ctx.server, ctx.token) as api:
        result = await api.call("cluster_unquarantine", {"name": name, **_scope(ctx)})
    if result["lifted"]:
        output.stdout.print(f"cluster/{name} unquarantined: it is placed again")
    else:
        output.stdout.print(f"cluster/{name} was not quarantined; nothing changed")


async def node_action(ctx: Context, action: str, name: str, wait: bool = True, timeout_s: float | None = None) -> None:
    """cordon / uncordon / rm, or drain with progress until the node holds no replica."""
    async with open_api(ctx.server, ctx.token) as api:
        if action != "drain":
            result = await api.call(f"node_{action}", {"name": name})
            done = {"cordon": "cordoned (no new replicas)", "uncordon": "uncordoned (schedulable again)",
                    "rm": f"removed ({result.get('replicas_replaced', 0)} replica(s) replaced elsewhere)"}[action]
            output.stdout.print(f"node/{name} {done}")
            return
        last = None
        async for kind, value in api.stream("node_drain", {"name": name, "wait": wait, "timeout_s": timeout_s}):
            if kind == "event":
                if value["replicas_left"] != last:
                    last = value["replicas_left"]
                    output.stderr.print(f"draining {name}: {last} replica(s) left")
                continue
            if value["drained"]:
                output.stdout.print(f"node/{name} drained")
            elif wait:
                raise WaitTimedOut(f"node {name} still holds {value['replicas_left']} replica(s) after the timeout "
                                   "(their replacements may have no room elsewhere)")
            else:
                output.stdout.print(f"node/{name} draining ({value['replicas_left']} replica(s) to move)")


async def key(ctx: Context, action: str, cluster: str, arg: str | None, as_json: bool) -> None:
    """create (prints the key once), list, revoke."""
    async with open_api(ctx.server, ctx.token) as api:
        if action == "create":
            result = await api.call("key_create", {"cluster": cluster, "name": arg, **_scope(ctx)})
            if as_json:
                output.print_json(result)
                return
            sys.stdout.write(result["key"] + "\n")
            note = "" if result["enforced"] else (" (not enforced yet: set spec.endpoint.auth: api-key "
                                                   "in the manifest)")
            output.stderr.print(f"key {result['id']} for cluster/{cluster}: shown once, store it now{note}",
                                markup=False)
        elif action == "list":
            keys = await api.call("key_list", {"cluster": cluster, **_scope(ctx)})
            if as_json:
                output.print_json(keys)
            elif keys:
                sys.stdout.write(output.key_table(keys))
            else:
                output.stderr.print(f"no API keys for cluster {cluster}")
        else:
            result = await api.call("key_revoke", {"cluster": cluster, "id": arg, **_scope(ctx)})
            output.print_json(result) if as_json else output.stdout.print(f"key {result['id']} revoked")


async def describe(ctx: Context, name: str, as_json: bool) -> None:
    async with open_api(ctx.server, ctx.token) as api:
        info = await api.call("describe_cluster", {"name": name, **_scope(ctx)})
    if as_json:
        output.print_json(info)
    else:
        output.print_description(info)


def _scope(ctx: Context) -> dict[str, Any]:
    return {"project": ctx.project} if ctx.project else {}


async def token_create(ctx: Context, role: str, ttl: str | None, uses: int | None, description: str,
                       project: str | None = None) -> None:
    async with open_api(ctx.server, ctx.token) as api:
        result = await api.call("token_create", {"role": role, "ttl": ttl, "uses": uses, "description": description,
                                                 "project": project})
    sys.stdout.write(result["token"] + "\n")


async def token_list(ctx: Context, as_json: bool) -> None:
    async with open_api(ctx.server, ctx.token) as api:
        tokens = await api.call("token_list")
    if as_json:
        output.print_json(tokens)
    else:
        sys.stdout.write(output.token_table(tokens))


async def token_revoke(ctx: Context, token_id: str) -> None:
    async with open_api(ctx.server, ctx.token) as api:
        await api.call("token_revoke", {"id": token_id})
    output.stdout.print(f"token {token_id} revoked; connections using it are closed")


async def secret(ctx: Context, action: str, project: str, name: str | None, value: str | None, as_json: bool) -> None:
    if value is not None and (problem := secret_value_problem(value)) is not None:
        raise UserError(f"invalid secret {name!r}: {problem}")  # before any connection is made
    async with open_api(ctx.server, ctx.token) as api:
        if action == "set":
            result = await api.call("secret_set", {"project": project, "name": name, "value": value})
            verb = "updated" if result["updated"] else "created"
            output.stdout.print(f"secret {project}/{name} {verb}")
        elif action == "delete":
            await api.call("secret_delete", {"project": project, "name": name})
            output.stdout.print(f"secret {project}/{name} deleted")
        else:
            secrets = await api.call("secret_list", {"project": project})
            if as_json:
                output.print_json(secrets)
            else:
                sys.stdout.write(output.columns(("PROJECT", "NAME", "UPDATED"),
                                                [(s["project"], s["name"], output.age(s["updated_at"]))
                                                 for s in secrets]))


async def audit(ctx: Context, limit: int, as_json: bool) -> None:
    async with open_api(ctx.server, ctx.token) as api:
        records = await api.call("audit", {"limit": limit, **_scope(ctx)})
    if as_json:
        output.print_json(records)
    else:
        sys.stdout.write(output.audit_table(records))


async def status(ctx: Context, as_json: bool) -> None:
    async with open_api(ctx.server, ctx.token) as api:
        info = await api.call("status")
    database = info["database"]
    if as_json:
        output.print_json(info)
    else:
        output.stdout.print(output.status_text(ctx.server, info), markup=False)
    if not database["available"]:
        raise DatabaseUnavailable(f"the server's database is unavailable: {database['reason'] or 'no answer'}")


async def check_server(ctx: Context) -> dict[str, Any]:
    async with open_api(ctx.server, ctx.token) as api:
        result: dict[str, Any] = await api.call("whoami")
        return result
