"""Client commands: apply, get, logs, delete, describe, tokens, keys and contexts."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from vectorlay import __version__
from vectorlay.cli.common import (
    Format,
    OutputOpt,
    ProjectOpt,
    ServerOpt,
    TokenFileOpt,
    TokenOpt,
    context,
    duration,
    run,
)
from vectorlay.client import commands
from vectorlay.client.config import config_path, list_contexts, use_context
from vectorlay.client.output import stderr, stdout
from vectorlay.errors import UserError

token_app = typer.Typer(help="Create tokens for nodes, proxies and admins.", no_args_is_help=True)
context_app = typer.Typer(help="Client contexts (server URL + token) in the config file.", no_args_is_help=True)
key_app = typer.Typer(help="API keys for a cluster's endpoint (with spec.endpoint.auth: api-key).",
                      no_args_is_help=True)
secret_app = typer.Typer(help="Secrets of a project, stored encrypted, given to replicas as env vars.",
                         no_args_is_help=True)
describe_app = typer.Typer(help="Show one object in detail, with its recent events.", no_args_is_help=True)
rollout_app = typer.Typer(
    help="A cluster's revisions: every apply that changes its spec stores one (the last 10 are kept).",
    no_args_is_help=True)
cluster_app = typer.Typer(help="Act on one cluster (its manifest is changed with `apply`).", no_args_is_help=True)


class Kind(StrEnum):
    clusters = "clusters"
    nodes = "nodes"
    replicas = "replicas"
    servers = "servers"


class TokenRole(StrEnum):
    node = "node"
    proxy = "proxy"
    deployer = "deployer"
    admin = "admin"


def apply(
    file: Annotated[str, typer.Argument(help="Manifest file (YAML, several documents allowed), or - for stdin.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; change nothing.")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once the server accepted the change.")] = False,
    timeout: Annotated[str, typer.Option(help="How long to wait for all replicas to be ready.")] = "5m",
    output_format: OutputOpt = Format.table,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Create or update clusters from a manifest and wait until their replicas are ready."""
    text = commands.read_manifest(file)
    from vectorlay.core.manifest import parse_manifest

    parse_manifest(text, source="stdin" if file == "-" else file)  # fails here, before any connection is made
    ctx = context(server_url, token, token_file)
    run(commands.apply, ctx, text, dry_run, not no_wait, duration(timeout, "--timeout"),
         output_format is Format.json)


def get(
    kind: Annotated[Kind, typer.Argument(help="clusters, nodes, replicas or servers.")],
    name: Annotated[str | None, typer.Argument(help="One cluster or node (for replicas: a cluster).")] = None,
    watch: Annotated[bool, typer.Option(
        "--watch", "-w", help="Print the table, then each row that changes, appears or goes (polled every "
                              "second) until Ctrl-C; with -o json, the whole listing as one line per change.")]
    = False,
    output_format: OutputOpt = Format.table,
    project: ProjectOpt = None,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """List clusters, nodes, replicas or servers (the control plane's, with the one that leads).
    With -w, keep watching: rows that change are printed as they change (asked once a second)
    until Ctrl-C, which exits 0."""
    run(commands.get, context(server_url, token, token_file, project), kind.value, name, output_format is Format.json,
        watch)


def logs(
    cluster: Annotated[str, typer.Argument()],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new lines.")] = False,
    tail: Annotated[int, typer.Option(min=0, help="Lines from the end of each replica's log.")] = 100,
    since: Annotated[str | None, typer.Option(
        help="Only lines written in this last while, e.g. 10m or 1h (to about a second).")] = None,
    no_prefix: Annotated[bool, typer.Option("--no-prefix", help="Do not prefix lines with the replica id.")]
    = False,
    project: ProjectOpt = None,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Print the stdout and stderr of a cluster's replicas, merged in the order they were written."""
    run(commands.logs, context(server_url, token, token_file, project), cluster, follow, tail, not no_prefix,
        duration(since, "--since"))


def delete(
    cluster: Annotated[str, typer.Argument()],
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for the replicas to stop.")] = False,
    timeout: Annotated[str, typer.Option()] = "1m",
    project: ProjectOpt = None,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Delete a cluster: its endpoint goes away and its replicas are stopped."""
    run(commands.delete, context(server_url, token, token_file, project),
        cluster, not no_wait, duration(timeout, "--timeout"))


def version() -> None:
    """Print the version."""
    print(__version__)


def status(output_format: OutputOpt = Format.table, server_url: ServerOpt = None, token: TokenOpt = None,
           token_file: TokenFileOpt = None) -> None:
    """How the server is: its database (available, or unavailable since when and why), nodes
    and clusters. Exits 1 while the database is unavailable, so scripts can wait on it."""
    run(commands.status, context(server_url, token, token_file), output_format is Format.json)


@token_app.command("create")
def token_create(
    role: Annotated[TokenRole, typer.Option(
        help="node: joins one machine; proxy: runs a proxy; deployer: manages one project's clusters; "
             "admin: everything.")] = TokenRole.node,
    project: Annotated[str | None, typer.Option("--project", "-p", help="The project of a deployer token.")] = None,
    ttl: Annotated[str, typer.Option(help="Lifetime, e.g. 24h; 0 never expires.")] = "24h",
    uses: Annotated[int | None, typer.Option(min=1, help="How many times it may be used (node tokens).")] = None,
    description: Annotated[str, typer.Option()] = "",
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Create a token and print only the token on stdout (it is not stored: keep it now)."""
    duration(ttl, "--ttl")
    run(commands.token_create, context(server_url, token, token_file), role.value, ttl, uses, description, project)


@token_app.command("list")
def token_list(output_format: OutputOpt = Format.table, server_url: ServerOpt = None, token: TokenOpt = None,
    token_file: TokenFileOpt = None) -> None:
    """List tokens: ids, roles, projects, expiry; never their secrets."""
    run(commands.token_list, context(server_url, token, token_file), output_format is Format.json)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id: the part before the first dot.")],
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Revoke a token; connections opened with it are closed within seconds."""
    run(commands.token_revoke, context(server_url, token, token_file), token_id)


@secret_app.command("set")
def secret_set(
    project: Annotated[str, typer.Argument()],
    name: Annotated[str, typer.Argument()],
    value: Annotated[str | None, typer.Option(
        help="The value; by default it is read from stdin, which keeps it out of shell history.")] = None,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Create or replace a secret; clusters use it with spec.env_from_secret. Stored encrypted."""
    if value is None:
        try:
            value = sys.stdin.buffer.read().decode("utf-8").rstrip("\n")
        except UnicodeDecodeError as error:
            raise UserError(f"the secret read from stdin is not valid UTF-8 ({error.reason} at byte "
                            f"{error.start})") from None
    run(commands.secret, context(server_url, token, token_file), "set", project, name, value, False)


@secret_app.command("list")
def secret_list(project: Annotated[str, typer.Argument()], output_format: OutputOpt = Format.table,
                server_url: ServerOpt = None, token: TokenOpt = None,
    token_file: TokenFileOpt = None) -> None:
    """List a project's secrets (names only)."""
    run(commands.secret, context(server_url, token, token_file),
        "list", project, None, None, output_format is Format.json)


@secret_app.command("delete")
def secret_delete(project: Annotated[str, typer.Argument()], name: Annotated[str, typer.Argument()],
                  server_url: ServerOpt = None, token: TokenOpt = None,
    token_file: TokenFileOpt = None) -> None:
    """Delete a secret no cluster uses."""
    run(commands.secret, context(server_url, token, token_file), "delete", project, name, None, False)


def audit(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="How many of the newest records.")] = 100,
    project: ProjectOpt = None,
    output_format: OutputOpt = Format.table,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Who changed what, when: applies, deletes, tokens, keys, secrets, nodes joining and leaving."""
    run(commands.audit, context(server_url, token, token_file, project), limit, output_format is Format.json)


@key_app.command("create")
def key_create(
    cluster: Annotated[str, typer.Argument()],
    name: Annotated[str | None, typer.Option(help="A label to recognise the key by.")] = None,
    output_format: OutputOpt = Format.table,
    project: ProjectOpt = None,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Create a key and print it on stdout: it is shown this once (only its hash is stored)."""
    run(commands.key, context(server_url, token, token_file, project),
        "create", cluster, name, output_format is Format.json)


@key_app.command("list")
def key_list(
    cluster: Annotated[str, typer.Argument()],
    output_format: OutputOpt = Format.table,
    project: ProjectOpt = None,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """List a cluster's keys (ids and names; never the keys)."""
    run(commands.key, context(server_url, token, token_file, project),
        "list", cluster, None, output_format is Format.json)


@key_app.command("revoke")
def key_revoke(
    cluster: Annotated[str, typer.Argument()],
    key_id: Annotated[str, typer.Argument(metavar="ID")],
    output_format: OutputOpt = Format.table,
    project: ProjectOpt = None,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Revoke a key; proxies refuse it as soon as the change reaches them."""
    run(commands.key, context(server_url, token, token_file, project),
        "revoke", cluster, key_id, output_format is Format.json)


@describe_app.command("cluster")
def describe_cluster(
    name: Annotated[str, typer.Argument()],
    output_format: OutputOpt = Format.table,
    project: ProjectOpt = None,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """A cluster, each replica (node, state, image digest) with its last events, and recent events."""
    run(commands.describe, context(server_url, token, token_file, project), name, output_format is Format.json)


@describe_app.command("node")
def describe_node(
    name: Annotated[str, typer.Argument(help="The node's name, as `get nodes` lists it.")],
    output_format: OutputOpt = Format.table,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """A node (admin tokens only): state, last heartbeat, data plane and tunnels, each GPU with
    its health, the replicas on it with their recent events, and who joined, cordoned or
    drained it."""
    run(commands.describe_node, context(server_url, token, token_file), name, output_format is Format.json)


@describe_app.command("replica")
def describe_replica(
    replica_id: Annotated[str, typer.Argument(metavar="ID", help="The replica's id, as `get replicas` lists it.")],
    output_format: OutputOpt = Format.table,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """A replica: its cluster, node, state and reason, how often it restarted or failed, its
    port, when it was created, and its recent events. A deployer token sees its project's only."""
    run(commands.describe_replica, context(server_url, token, token_file), replica_id,
        output_format is Format.json)


@rollout_app.command("history")
def rollout_history(
    cluster: Annotated[str, typer.Argument()],
    output_format: OutputOpt = Format.table,
    project: ProjectOpt = None,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """List a cluster's stored revisions, oldest first (the newest, marked current, is what runs
    now): number, when, by whom and what changed. -o json adds each revision's spec."""
    run(commands.rollout_history, context(server_url, token, token_file, project), cluster,
        output_format is Format.json)


@rollout_app.command("undo")
def rollout_undo(
    cluster: Annotated[str, typer.Argument()],
    to_revision: Annotated[int | None, typer.Option(
        "--to-revision", min=1, help="The revision to go back to (see `rollout history`). Default: the one "
                                     "before the current.")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once the server accepted the change.")] = False,
    timeout: Annotated[str, typer.Option(help="How long to wait for all replicas to be ready.")] = "5m",
    output_format: OutputOpt = Format.table,
    project: ProjectOpt = None,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Apply an earlier revision's spec again, as `apply` would: audited, stored as a new
    revision, replicas rolled (new ones ready before old ones stop); waits until they are ready."""
    run(commands.rollout_undo, context(server_url, token, token_file, project), cluster, to_revision,
        not no_wait, duration(timeout, "--timeout"), output_format is Format.json)


@cluster_app.command("unquarantine")
def cluster_unquarantine(
    name: Annotated[str, typer.Argument()],
    project: ProjectOpt = None,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Place a quarantined cluster again (and forget its failures). A cluster is quarantined when
    the agents of nodes die right after receiving its replicas; applying a changed manifest lifts
    the quarantine too."""
    run(commands.unquarantine, context(server_url, token, token_file, project), name)


@context_app.command("list")
def context_list() -> None:
    """Show the contexts in the config file; * marks the current one."""
    current, contexts = list_contexts()
    for name, ctx in sorted(contexts.items()):
        marker = "*" if name == current else " "
        stdout.print(f"{marker} {name}  {ctx.server}" + (f"  proxy {ctx.proxy}" if ctx.proxy else ""), markup=False)
    if not contexts:
        stderr.print(f"no contexts in {config_path()}")


@context_app.command("use")
def context_use(name: Annotated[str, typer.Argument()]) -> None:
    """Make NAME the current context."""
    use_context(name)
    stdout.print(f"using context {name}")
