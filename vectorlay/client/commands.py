"""What the client commands do, once the CLI has parsed their arguments."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import trio
from rich.live import Live
from rich.text import Text

from vectorlay.client import output
from vectorlay.client.api import ApiClient, Done, open_api
from vectorlay.client.config import Context
from vectorlay.client.log_merge import LogLine, LogMerger
from vectorlay.client.watch import WATCH_INTERVAL_S, Changes, Differ
from vectorlay.core import api, codec
from vectorlay.core.api_views import ClusterView, FleetSummary, NodeView, ReplicaView, ServerView
from vectorlay.core.launch_inputs import secret_value_problem
from vectorlay.core.manifest import parse_manifest
from vectorlay.core.model import Role
from vectorlay.errors import (
    AuthError,
    ConnectError,
    LinkLost,
    NotFoundError,
    PeerError,
    ProtocolError,
    ServerUnavailable,
    UserError,
    VectorlayError,
)
from vectorlay.wire import server_urls


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
    """Apply, then wait. With several servers (`--server ws://a,ws://b`), a server that goes
    away mid-way is replaced by the next: applying the same manifest again changes nothing, so
    the change is made exactly once."""
    parse_manifest(text)  # validate here first: a bad manifest never reaches the server
    urls = server_urls(ctx.server)
    for attempt in range(len(urls)):
        try:
            await _apply_once(ctx, text, dry_run, wait, timeout_s, as_json, attempt)
            return
        except PeerError as error:
            if isinstance(error, ProtocolError) or attempt == len(urls) - 1:
                raise
            output.stderr.print(f"the server went away ({error}); trying the next one", markup=False)


async def _apply_once(ctx: Context, text: str, dry_run: bool, wait: bool, timeout_s: float | None, as_json: bool,
                      start: int) -> None:
    async with open_api(ctx.server, ctx.token, start) as client:
        applied = await client.call(api.Apply(text, dry_run))
        keys = tuple(change.cluster for change in applied.changes)
        if as_json and (dry_run or not wait):
            output.print_json(applied)
            return
        if not as_json:
            verb = "would be " if dry_run else ""
            for change in applied.changes:
                detail = f" ({change.detail})" if change.detail else ""
                output.stdout.print(f"cluster/{change.cluster} {verb}{change.action}{detail}", markup=False)
                if dry_run:
                    for line in change.fields:
                        output.stdout.print(f"  {line}", markup=False, highlight=False)
        if dry_run or not wait:
            return
        final = await _wait_ready(client, keys, timeout_s, quiet=as_json)
        if as_json:
            output.print_json({"dry_run": applied.dry_run, "changes": applied.changes, "ready": final.ready,
                               "clusters": final.clusters, "failed": final.failed})
        _report_ready(final, timeout_s, as_json)


def _report_ready(final: api.ReadyWaited, timeout_s: float | None, as_json: bool) -> None:
    """How a wait for readiness ended (`apply`, `rollout undo`): the endpoints, or why not."""
    if final.failed:
        raise ClusterFailing("; ".join(f"cluster/{f.cluster} {f.reason}" for f in final.failed))
    if not final.ready:
        raise WaitTimedOut(f"timed out after {timeout_s:g}s waiting for replicas to be ready; "
                           "see `vectorlay get replicas`")
    if not as_json:
        for cluster in final.clusters:
            if cluster.endpoint:
                output.stdout.print(f"cluster/{cluster.key} ready at {cluster.endpoint}")
            else:
                output.stdout.print(f"cluster/{cluster.key} ready (no proxy connected yet)")


async def rollout_history(ctx: Context, name: str, as_json: bool) -> None:
    async with open_api(ctx.server, ctx.token) as client:
        revisions = (await client.call(api.RolloutHistory(name, ctx.project))).revisions
    if as_json:
        output.print_json(revisions)
    elif revisions:
        sys.stdout.write(output.revision_table(revisions))
    else:
        output.stderr.print(f"cluster {name} has no stored revisions")


async def rollout_undo(ctx: Context, name: str, to_revision: int | None, wait: bool, timeout_s: float | None,
                       as_json: bool) -> None:
    """Apply an earlier revision's spec again, then wait for it as `apply` does."""
    async with open_api(ctx.server, ctx.token) as client:
        undone = await client.call(api.RolloutUndo(name, ctx.project, to_revision))
        change = undone.change
        if change.action == "unchanged":
            wait = False  # nothing rolls: it runs that spec already
        if as_json and not wait:
            output.print_json(undone)
            return
        if not as_json:
            if change.action == "unchanged":
                output.stdout.print(f"cluster/{undone.cluster} unchanged: it runs revision {undone.to_revision}'s "
                                    "spec already", markup=False)
            else:
                detail = f" ({change.detail})" if change.detail else ""
                output.stdout.print(f"cluster/{undone.cluster} rolled back to revision {undone.to_revision}{detail}",
                                    markup=False)
                for line in change.fields:
                    output.stdout.print(f"  {line}", markup=False, highlight=False)
        if not wait:
            return
        final = await _wait_ready(client, (undone.cluster,), timeout_s, quiet=as_json)
        if as_json:
            output.print_json({"cluster": undone.cluster, "to_revision": undone.to_revision, "change": change,
                               "ready": final.ready, "clusters": final.clusters, "failed": final.failed})
        _report_ready(final, timeout_s, as_json)


async def _wait_ready(client: ApiClient, keys: tuple[str, ...], timeout_s: float | None,
                      quiet: bool) -> api.ReadyWaited:
    """Stream readiness from the server with a live table (or plain lines when not a terminal)."""
    interactive = output.stderr.is_terminal and not quiet
    last_line = ""
    with Live(console=output.stderr, transient=True, auto_refresh=False) if interactive else _Null() as live:
        async for item in client.stream(api.WaitReady(keys, timeout_s)):
            if isinstance(item, Done):
                return item.response
            if interactive:
                live.update(Text(output.cluster_table(item.clusters)), refresh=True)
            elif not quiet:
                line = "; ".join(f"{c.name}: {_progress(c)}" + _why(c) for c in item.clusters)
                if line != last_line:
                    output.stderr.print(f"waiting: {line}")
                    last_line = line
    raise ProtocolError("the server ended the wait without a result")


def _progress(cluster: ClusterView) -> str:
    """`1/2 ready`; while a roll replaces old copies: `2 serving, 0/2 updated`, so a roll in
    progress does not read like an outage."""
    live = sum(cluster.states.values())
    if live > cluster.up_to_date or cluster.stopping:
        return f"{cluster.serving} serving, {cluster.ready}/{cluster.replicas} updated"
    return f"{cluster.ready}/{cluster.replicas} ready"


def _why(cluster: ClusterView) -> str:
    if cluster.health.message:
        return f" ({cluster.health.message})"
    return f" ({cluster.reasons[0]})" if cluster.reasons else ""


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *args: object) -> None:
        return None

    def update(self, *args: object, **kwargs: object) -> None:
        return None


PAGE_SIZE = 500


async def get(ctx: Context, kind: str, name: str | None, as_json: bool, watch: bool = False) -> None:
    if watch:
        await _watch(ctx, kind, name, as_json)
        return
    urls = server_urls(ctx.server)
    for attempt in range(len(urls)):  # a read may be answered by any server of the control plane
        try:
            table, items, summary = await _read(ctx, kind, name, as_json, attempt)
            break
        except (ServerUnavailable, ConnectError, LinkLost):
            if attempt == len(urls) - 1:
                raise
    if as_json:
        output.print_json(items)
        return
    if summary is not None:
        output.stderr.print(output.summary_line(kind, summary), markup=False)
    if not items:
        output.stderr.print(f"no {kind}")
        return
    sys.stdout.write(table)
    sys.stdout.flush()


Listing = Sequence[ClusterView] | Sequence[NodeView] | Sequence[ReplicaView] | Sequence[ServerView]


async def _read(ctx: Context, kind: str, name: str | None, as_json: bool,
                start: int) -> tuple[str, Listing, FleetSummary | None]:
    """One server's answer to `get KIND`: the table, the items, and the fleet summary line."""
    async with open_api(ctx.server, ctx.token, start) as client:
        return await _read_on(client, ctx, kind, name, not as_json)


async def _read_on(client: ApiClient, ctx: Context, kind: str, name: str | None,
                   summary_too: bool) -> tuple[str, Listing, FleetSummary | None]:
    """One listing on an open link: the table, the items, and (if asked) the fleet summary line."""
    items: Listing
    if kind == "clusters":
        items = (await client.call(api.GetClusters(name, ctx.project))).clusters
    elif kind == "servers":
        items = (await client.call(api.GetServers())).servers
    elif kind == "nodes":
        nodes: list[NodeView] = []
        async for item in client.stream(api.GetNodes(name, page_size=PAGE_SIZE)):
            if isinstance(item, api.NodePage):
                nodes.extend(item.nodes)
        items = nodes
    else:
        replicas: list[ReplicaView] = []
        async for page in client.stream(api.GetReplicas(name, ctx.project, page_size=PAGE_SIZE)):
            if isinstance(page, api.ReplicaPage):
                replicas.extend(page.replicas)
        items = replicas
    summary = None
    if summary_too and kind in ("nodes", "replicas") and name is None:
        try:
            summary = await client.call(api.GetFleetSummary())
        except AuthError:
            pass  # the fleet's counts are the admin's: a deployer gets its rows without them
    return output.table_of(kind, items), items, summary


WATCH_RECONNECTS = 5  # tries, a second apart, before a watch whose servers went away gives up


async def _watch(ctx: Context, kind: str, name: str | None, as_json: bool) -> None:
    """`get -w`: the listing, then what changes, polled once a second (client/watch.py says why),
    until Ctrl-C, which ends it with exit status 0. Table: the rows that changed or appeared, and
    a line for each one gone. JSON: the whole listing again, one line per change."""
    differ = Differ()
    first = True
    urls = server_urls(ctx.server)
    failures = 0
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        async with trio.open_nursery() as nursery:
            async def stop_on_interrupt() -> None:
                async for _ in interrupts:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_interrupt)
            while True:
                try:
                    async with open_api(ctx.server, ctx.token, failures % len(urls)) as client:
                        while True:
                            try:
                                table, items, summary = await _read_on(client, ctx, kind, name,
                                                                       first and not as_json)
                            except NotFoundError:
                                if first:
                                    raise
                                table, items, summary = "", [], None  # deleted meanwhile: its rows go
                            failures = 0
                            _print_changes(kind, differ.update(items), items, table, summary, first, as_json)
                            first = False
                            await trio.sleep(WATCH_INTERVAL_S)
                except (ServerUnavailable, ConnectError, LinkLost) as error:
                    failures += 1
                    if failures > WATCH_RECONNECTS:
                        raise
                    output.stderr.print(f"watch: {error}; trying again", markup=False)
                    await trio.sleep(WATCH_INTERVAL_S)


def _print_changes(kind: str, changes: Changes, items: Listing, table: str, summary: FleetSummary | None,
                   first: bool, as_json: bool) -> None:
    if as_json:
        if first or changes:
            sys.stdout.write(json.dumps(codec.dump(list(items)), separators=(",", ":")) + "\n")
            sys.stdout.flush()
        return
    if first:
        if summary is not None:
            output.stderr.print(output.summary_line(kind, summary), markup=False)
        if not items:
            output.stderr.print(f"no {kind} yet; watching")
        else:
            sys.stdout.write(table)
        sys.stdout.flush()
        return
    if changes.changed:
        rows = output.table_of(kind, list(changes.changed)).splitlines()[1:]  # the header was printed once
        sys.stdout.write("".join(f"{row}\n" for row in rows))
    for key in changes.removed:
        sys.stdout.write(f"{kind.rstrip('s')}/{key} deleted\n")
    sys.stdout.flush()


async def delete(ctx: Context, name: str, wait: bool, timeout_s: float | None) -> None:
    async with open_api(ctx.server, ctx.token) as client:
        await client.call(api.Delete(name, ctx.project))
        output.stdout.print(f"cluster/{name} deleted")
        if not wait:
            return
        result = await client.call(api.WaitDeleted(name, ctx.project, timeout_s))
        if not result.gone:
            raise WaitTimedOut(f"{result.left} replica(s) of {name} are still stopping "
                               "(their node may be unreachable; they stop when it returns)")


async def logs(ctx: Context, cluster: str, follow: bool, tail: int, prefix: bool,
               since_s: float | None = None) -> None:
    """Every replica's lines merged in the order they were written (each says its replica); with
    `follow`, the tails merged first, then new lines as they come."""
    since = time.time() - since_s if since_s is not None else None
    merger = LogMerger(follow)
    async with open_api(ctx.server, ctx.token) as client:
        async for item in client.stream(api.Logs(cluster, ctx.project, tail, follow, since)):
            if isinstance(item, Done):
                _write_lines(merger.finish(), prefix)
                if item.response.replicas == 0:
                    output.stderr.print(f"cluster {cluster} has no replicas placed on a node yet")
                return
            if not item.replica:
                merger.expect(list(item.expected))
            elif item.error is not None:
                label = f"[{item.replica}] " if prefix else ""
                output.stderr.print(f"{label}{item.error}", markup=False)
                _write_lines(merger.ended(item.replica), prefix)
            else:
                _write_lines(merger.add(item.replica, list(item.lines), list(item.times), item.live, time.time()),
                             prefix)


def _write_lines(lines: list[LogLine], prefix: bool) -> None:
    if lines:
        sys.stdout.write("".join(f"[{line.replica}] {line.text}\n" if prefix else f"{line.text}\n"
                                 for line in lines))
        sys.stdout.flush()


async def unquarantine(ctx: Context, name: str) -> None:
    async with open_api(ctx.server, ctx.token) as client:
        result = await client.call(api.Unquarantine(name, ctx.project))
    if result.lifted:
        output.stdout.print(f"cluster/{name} unquarantined: it is placed again")
    else:
        output.stdout.print(f"cluster/{name} was not quarantined; nothing changed")


async def node_action(ctx: Context, action: str, name: str, wait: bool = True, timeout_s: float | None = None) -> None:
    """cordon / uncordon / rm, or drain with progress until the node holds no replica."""
    async with open_api(ctx.server, ctx.token) as client:
        if action == "cordon":
            await client.call(api.NodeCordon(name))
            output.stdout.print(f"node/{name} cordoned (no new replicas)")
            return
        if action == "uncordon":
            await client.call(api.NodeUncordon(name))
            output.stdout.print(f"node/{name} uncordoned (schedulable again)")
            return
        if action == "rm":
            removed = await client.call(api.NodeRemove(name))
            output.stdout.print(f"node/{name} removed ({removed.replicas_replaced} replica(s) replaced elsewhere)")
            return
        last = None
        async for item in client.stream(api.NodeDrain(name, wait, timeout_s)):
            if not isinstance(item, Done):
                if item.replicas_left != last:
                    last = item.replicas_left
                    output.stderr.print(f"draining {name}: {last} replica(s) left")
                continue
            drained = item.response
            if drained.drained:
                output.stdout.print(f"node/{name} drained")
            elif wait:
                raise WaitTimedOut(f"node {name} still holds {drained.replicas_left} replica(s) after the timeout "
                                   "(their replacements may have no room elsewhere)")
            else:
                output.stdout.print(f"node/{name} draining ({drained.replicas_left} replica(s) to move)")


async def key(ctx: Context, action: str, cluster: str, arg: str | None, as_json: bool) -> None:
    """create (prints the key once), list, revoke."""
    async with open_api(ctx.server, ctx.token) as client:
        if action == "create":
            created = await client.call(api.KeyCreate(cluster, arg, ctx.project))
            if as_json:
                output.print_json(created)
                return
            sys.stdout.write(created.key + "\n")
            note = "" if created.enforced else (" (not enforced yet: set spec.endpoint.auth: api-key "
                                                "in the manifest)")
            output.stderr.print(f"key {created.id} for cluster/{cluster}: shown once, store it now{note}",
                                markup=False)
        elif action == "list":
            keys = (await client.call(api.KeyList(cluster, ctx.project))).keys
            if as_json:
                output.print_json(keys)
            elif keys:
                sys.stdout.write(output.key_table(keys))
            else:
                output.stderr.print(f"no API keys for cluster {cluster}")
        else:
            revoked = await client.call(api.KeyRevoke(cluster, arg or "", ctx.project))
            output.print_json(revoked) if as_json else output.stdout.print(f"key {revoked.id} revoked")


async def describe(ctx: Context, name: str, as_json: bool) -> None:
    async with open_api(ctx.server, ctx.token) as client:
        info = await client.call(api.DescribeCluster(name, ctx.project))
    if as_json:
        output.print_json(info)
    else:
        output.print_description(info)


async def describe_node(ctx: Context, name: str, as_json: bool) -> None:
    async with open_api(ctx.server, ctx.token) as client:
        info = await client.call(api.DescribeNode(name))
    if as_json:
        output.print_json(info)
    else:
        output.print_node_description(info)


async def describe_replica(ctx: Context, replica_id: str, as_json: bool) -> None:
    async with open_api(ctx.server, ctx.token) as client:
        info = await client.call(api.DescribeReplica(replica_id))
    if as_json:
        output.print_json(info)
    else:
        output.print_replica_description(info)


async def token_create(ctx: Context, role: str, ttl: str | None, uses: int | None, description: str,
                       project: str | None = None) -> None:
    async with open_api(ctx.server, ctx.token) as client:
        created = await client.call(api.TokenCreate(Role(role), ttl, uses, description, project))
    sys.stdout.write(created.token + "\n")


async def token_list(ctx: Context, as_json: bool) -> None:
    async with open_api(ctx.server, ctx.token) as client:
        tokens = (await client.call(api.TokenList())).tokens
    if as_json:
        output.print_json(tokens)
    else:
        sys.stdout.write(output.token_table(tokens))


async def token_revoke(ctx: Context, token_id: str) -> None:
    async with open_api(ctx.server, ctx.token) as client:
        await client.call(api.TokenRevoke(token_id))
    output.stdout.print(f"token {token_id} revoked; connections using it are closed")


async def secret(ctx: Context, action: str, project: str, name: str | None, value: str | None, as_json: bool) -> None:
    if value is not None and (problem := secret_value_problem(value)) is not None:
        raise UserError(f"invalid secret {name!r}: {problem}")  # before any connection is made
    async with open_api(ctx.server, ctx.token) as client:
        if action == "set":
            saved = await client.call(api.SecretSet(project, name or "", value or ""))
            verb = "updated" if saved.updated else "created"
            output.stdout.print(f"secret {project}/{name} {verb}")
        elif action == "delete":
            await client.call(api.SecretDelete(project, name or ""))
            output.stdout.print(f"secret {project}/{name} deleted")
        else:
            secrets = (await client.call(api.SecretList(project))).secrets
            if as_json:
                output.print_json(secrets)
            else:
                sys.stdout.write(output.secret_table(secrets))


async def audit(ctx: Context, limit: int, as_json: bool) -> None:
    async with open_api(ctx.server, ctx.token) as client:
        records = (await client.call(api.Audit(limit, ctx.project))).records
    if as_json:
        output.print_json(records)
    else:
        sys.stdout.write(output.audit_table(records))



async def status(ctx: Context, as_json: bool) -> None:
    async with open_api(ctx.server, ctx.token) as client:
        info = await client.call(api.GetStatus())
    if as_json:
        output.print_json(codec.dump(info))
    else:
        output.stdout.print(output.status_text(ctx.server, info), markup=False)
    if not info.database.available:
        raise DatabaseUnavailable(f"the server's database is unavailable: {info.database.reason or 'no answer'}")
