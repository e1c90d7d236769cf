"""The `vectorlay` command: parse arguments, load files, run the role. No logic lives here."""

from __future__ import annotations

import os
import socket
import sys
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from vectorlay import __version__
from vectorlay.client import commands
from vectorlay.client.config import Context, config_path, list_contexts, resolve, save_context, use_context
from vectorlay.client.output import stderr, stdout
from vectorlay.core.durations import parse_duration
from vectorlay.errors import UserError, VectorlayError, first_error
from vectorlay.lifecycle import setup_logging, until_signalled

app = typer.Typer(
    name="vectorlay",
    help="vectorlay: an overlay network for GPU inference on machines other people own.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
token_app = typer.Typer(help="Create tokens for nodes, proxies and admins.", no_args_is_help=True)
node_app = typer.Typer(help="Run this machine as a node: [bold]join[/bold] once, then plain "
                            "[bold]vectorlay node[/bold] runs the agent from saved credentials.")
context_app = typer.Typer(help="Client contexts (server URL + token) in the config file.", no_args_is_help=True)
key_app = typer.Typer(help="API keys for a cluster's endpoint (with spec.endpoint.auth: api-key).",
                      no_args_is_help=True)
describe_app = typer.Typer(help="Show one object in detail, with its recent events.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(node_app, name="node")
app.add_typer(context_app, name="context")
app.add_typer(key_app, name="key")
app.add_typer(describe_app, name="describe")


def _data_dir(role: str) -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vectorlay" / role


def _parse_listen(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = (text, str(default_port)) if not text.isdigit() else ("127.0.0.1", text)
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"invalid listen address {text!r}: expected HOST:PORT")
    return host, int(port)


def _duration(text: str | None, what: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as error:
        raise UserError(f"invalid {what}: {error}") from None


ServerOpt = Annotated[str | None, typer.Option("--server", "-s", envvar="VECTORLAY_SERVER",
                                               help="Server URL, ws://HOST:PORT. Default: current context.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="VECTORLAY_TOKEN",
                                              help="API token. Default: current context.")]


class Format(StrEnum):
    table = "table"
    json = "json"


class Kind(StrEnum):
    clusters = "clusters"
    nodes = "nodes"
    replicas = "replicas"


class TokenRole(StrEnum):
    node = "node"
    proxy = "proxy"
    admin = "admin"


# --- long-running roles ---------------------------------------------------------------------


@app.command()
def server(
    listen: Annotated[str, typer.Option(help="Address for nodes, proxies and the CLI.")] = "127.0.0.1:7070",
    db: Annotated[str | None, typer.Option(
        help="Database URL. Default: SQLite in the state dir. "
             "PostgreSQL: postgresql+psycopg://USER@HOST:PORT/DB")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Where the SQLite file and admin.token live.")] = None,
    heartbeat_interval: Annotated[str, typer.Option(help="How often nodes heartbeat (e.g. 1s).")] = "1s",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the control plane. The first start creates an admin token, prints it and saves it."""
    from vectorlay.server.app import ServerConfig, run_server

    setup_logging(verbose)
    host, port = _parse_listen(listen, 7070)
    directory = state_dir or _data_dir("server")
    interval = _duration(heartbeat_interval, "--heartbeat-interval") or 1.0
    # VECTORLAY_FAULTS names crash points for fault-injection tests; never set it in production.
    faults = frozenset(f for f in os.environ.get("VECTORLAY_FAULTS", "").split(",") if f)
    config = ServerConfig(directory.resolve(), host, port, db, interval, crash_points=faults)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            started = await nursery.start(run_server, config)
            if started.created_admin_token:
                stderr.print(f"admin token (also in {directory / 'admin.token'}):")
                print(started.admin_token, flush=True)
            if started.admin_token:
                client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
                save_context(f"{client_host}:{started.port}", Context(f"ws://{client_host}:{started.port}",
                                                                     started.admin_token))

    _run(partial(until_signalled, main))


@node_app.callback(invoke_without_command=True)
def node(
    ctx: typer.Context,
    state_dir: Annotated[Path | None, typer.Option(help="Where the node's credential and replica logs live.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the node agent from the credentials saved by [bold]vectorlay node join[/bold]."""
    if ctx.invoked_subcommand is not None:
        return
    from vectorlay.node.agent import load_credentials

    setup_logging(verbose)
    directory = state_dir or _data_dir("node")
    creds = load_credentials(directory)
    settings = _load_node_settings(directory)
    _run_node(creds, directory, settings.get("gpu", []))


@node_app.command("join")
def node_join(
    server_url: Annotated[str, typer.Option("--server", "-s", envvar="VECTORLAY_SERVER", help="ws://HOST:PORT")],
    token: Annotated[str, typer.Option(envvar="VECTORLAY_JOIN_TOKEN",
                                       help="A join token from `vectorlay token create --role node`.")],
    name: Annotated[str | None, typer.Option(help="Node name (default: this machine's hostname).")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Where to keep the node credential.")] = None,
    gpu: Annotated[list[str] | None, typer.Option(
        help="Declare a GPU as TYPE[:MEMORY_GB] (repeat per GPU); overrides NVML.")] = None,
    advertise: Annotated[str, typer.Option(help="Address the proxy uses to reach this node's replicas.")]
    = "127.0.0.1",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Join a server with a join token, save this node's credential, then run the agent."""
    from vectorlay.node.agent import join
    from vectorlay.node.gpus import inventory

    setup_logging(verbose)
    directory = state_dir or _data_dir("node")
    if (directory / "node.json").exists():
        raise UserError(f"{directory} already holds a joined node; run `vectorlay node --state-dir {directory}` "
                        "or pick another --state-dir")
    node_name = name or _hostname_label()
    declarations = gpu or []
    gpus, note = inventory(declarations)
    stderr.print(f"{node_name}: {note}")
    creds = trio.run(join, server_url, token, node_name, gpus, advertise, ("process",), directory)
    _save_node_settings(directory, {"gpu": declarations})
    stderr.print(f"joined as {creds.name} ({creds.node_id}); credential saved in {directory}")
    _run_node(creds, directory, declarations)


@node_app.command("cordon")
def node_cordon(name: Annotated[str, typer.Argument()], server_url: ServerOpt = None, token: TokenOpt = None) -> None:
    """Stop placing new replicas on a node; the ones it runs stay."""
    _run(commands.node_action, resolve(server_url, token), "cordon", name)


@node_app.command("uncordon")
def node_uncordon(name: Annotated[str, typer.Argument()], server_url: ServerOpt = None,
                  token: TokenOpt = None) -> None:
    """Make a cordoned or drained node schedulable again."""
    _run(commands.node_action, resolve(server_url, token), "uncordon", name)


@node_app.command("drain")
def node_drain(
    name: Annotated[str, typer.Argument()],
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once draining has started.")] = False,
    timeout: Annotated[str, typer.Option(help="How long to wait for the node to be empty.")] = "5m",
    server_url: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Move a node's replicas elsewhere before its owner takes it back: new copies become ready
    on other nodes first, then the old ones stop. The node stays cordoned until uncordoned."""
    _run(commands.node_action, resolve(server_url, token), "drain", name, not no_wait, _duration(timeout, "--timeout"))


@node_app.command("rm")
def node_rm(name: Annotated[str, typer.Argument()], server_url: ServerOpt = None, token: TokenOpt = None) -> None:
    """Forget a node: its credential stops working and its replicas are replaced elsewhere."""
    _run(commands.node_action, resolve(server_url, token), "rm", name)


def _run_node(creds: Any, directory: Path, declarations: list[str]) -> None:
    from vectorlay.node.agent import run_node
    from vectorlay.node.gpus import inventory
    from vectorlay.node.process_runtime import ProcessRuntime

    gpus, note = inventory(declarations)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_node, creds, directory, ProcessRuntime(), gpus, ("process",))

    _run(partial(until_signalled, main))


def _load_node_settings(directory: Path) -> dict[str, Any]:
    import json

    path = directory / "settings.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as error:
        raise UserError(f"{path} is damaged ({error})") from None
    return data if isinstance(data, dict) else {}


def _save_node_settings(directory: Path, settings: dict[str, Any]) -> None:
    import json

    from vectorlay.files import write_private

    write_private(directory / "settings.json", json.dumps(settings, indent=2) + "\n")


def _hostname_label() -> str:
    import re

    label = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return label[:63] or "node"


@app.command()
def proxy(
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    listen: Annotated[str, typer.Option(help="HTTP address to serve clusters on.")] = "127.0.0.1:8080",
    domain: Annotated[str, typer.Option(help="Clusters are served at <cluster>.<domain>.")] = "localhost",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the edge proxy: routes http://<cluster>.<domain>/ to ready replicas."""
    from vectorlay.proxy.app import ProxyConfig, run_proxy

    setup_logging(verbose)
    ctx = resolve(server_url, token)
    host, port = _parse_listen(listen, 8080)
    config = ProxyConfig(ctx.server, ctx.token, host, port, domain)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_proxy, config)

    _run(partial(until_signalled, main))


@app.command()
def dev(
    state_dir: Annotated[Path, typer.Option(help="State of the whole stack.")] = Path(".vectorlay/dev"),
    nodes: Annotated[int, typer.Option(min=1, max=32, help="How many nodes to run.")] = 2,
    server_port: Annotated[int, typer.Option(help="0 picks a free port.")] = 7070,
    proxy_port: Annotated[int, typer.Option(help="0 picks a free port.")] = 8080,
    domain: Annotated[str, typer.Option()] = "localhost",
    gpu: Annotated[list[str] | None, typer.Option(help="Declare GPUs on every dev node, TYPE[:MEMORY_GB].")] = None,
    apply_file: Annotated[str | None, typer.Option("--apply", help="Apply this manifest once the stack is up.")]
    = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a server, N nodes and a proxy in one process, and point the CLI at them."""
    from vectorlay.dev import DevConfig, run_dev

    setup_logging(verbose)
    config = DevConfig(state_dir, nodes, server_port, proxy_port, domain, tuple(gpu or ()), apply_file)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_dev, config)

    _run(partial(until_signalled, main))


# --- client commands ------------------------------------------------------------------------


@app.command()
def apply(
    file: Annotated[str, typer.Argument(help="Manifest file (YAML, several documents allowed), or - for stdin.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; change nothing.")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once the server accepted the change.")] = False,
    timeout: Annotated[str, typer.Option(help="How long to wait for all replicas to be ready.")] = "5m",
    output_format: Annotated[Format, typer.Option("--output", "-o")] = Format.table,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create or update clusters from a manifest and wait until their replicas are ready."""
    text = commands.read_manifest(file)
    from vectorlay.core.manifest import parse_manifest

    parse_manifest(text)  # a bad manifest fails here, before any connection is made
    ctx = resolve(server_url, token)
    _run(commands.apply, ctx, text, dry_run, not no_wait, _duration(timeout, "--timeout"),
         output_format is Format.json)


@app.command()
def get(
    kind: Annotated[Kind, typer.Argument(help="clusters, nodes or replicas.")],
    name: Annotated[str | None, typer.Argument(help="One cluster or node (for replicas: a cluster).")] = None,
    output_format: Annotated[Format, typer.Option("--output", "-o")] = Format.table,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """List clusters, nodes or replicas."""
    _run(commands.get, resolve(server_url, token), kind.value, name, output_format is Format.json)


@app.command()
def logs(
    cluster: Annotated[str, typer.Argument()],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new lines.")] = False,
    tail: Annotated[int, typer.Option(min=0, help="Lines from the end of each replica's log.")] = 100,
    no_prefix: Annotated[bool, typer.Option("--no-prefix", help="Do not prefix lines with the replica id.")]
    = False,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Print the stdout and stderr of a cluster's replicas."""
    _run(commands.logs, resolve(server_url, token), cluster, follow, tail, not no_prefix)


@app.command()
def delete(
    cluster: Annotated[str, typer.Argument()],
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for the replicas to stop.")] = False,
    timeout: Annotated[str, typer.Option()] = "1m",
    server_url: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a cluster: its endpoint goes away and its replicas are stopped."""
    _run(commands.delete, resolve(server_url, token), cluster, not no_wait, _duration(timeout, "--timeout"))


@token_app.command("create")
def token_create(
    role: Annotated[TokenRole, typer.Option(help="node: joins one machine; proxy: runs a proxy.")] = TokenRole.node,
    ttl: Annotated[str, typer.Option(help="Lifetime, e.g. 24h; 0 never expires.")] = "24h",
    uses: Annotated[int | None, typer.Option(min=1, help="How many times it may be used (node tokens).")] = None,
    description: Annotated[str, typer.Option()] = "",
    server_url: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a token and print only the token on stdout."""
    _duration(ttl, "--ttl")
    _run(commands.token_create, resolve(server_url, token), role.value, ttl, uses, description)


@key_app.command("create")
def key_create(
    cluster: Annotated[str, typer.Argument()],
    name: Annotated[str | None, typer.Option(help="A label to recognise the key by.")] = None,
    output_format: Annotated[Format, typer.Option("--output", "-o")] = Format.table,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a key and print it on stdout: it is shown this once (only its hash is stored)."""
    _run(commands.key, resolve(server_url, token), "create", cluster, name, output_format is Format.json)


@key_app.command("list")
def key_list(
    cluster: Annotated[str, typer.Argument()],
    output_format: Annotated[Format, typer.Option("--output", "-o")] = Format.table,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """List a cluster's keys (ids and names; never the keys)."""
    _run(commands.key, resolve(server_url, token), "list", cluster, None, output_format is Format.json)


@key_app.command("revoke")
def key_revoke(
    cluster: Annotated[str, typer.Argument()],
    key_id: Annotated[str, typer.Argument(metavar="ID")],
    output_format: Annotated[Format, typer.Option("--output", "-o")] = Format.table,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Revoke a key; proxies refuse it as soon as the change reaches them."""
    _run(commands.key, resolve(server_url, token), "revoke", cluster, key_id, output_format is Format.json)


@describe_app.command("cluster")
def describe_cluster(
    name: Annotated[str, typer.Argument()],
    output_format: Annotated[Format, typer.Option("--output", "-o")] = Format.table,
    server_url: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """A cluster, each replica (node, state, image digest) with its last events, and recent events."""
    _run(commands.describe, resolve(server_url, token), name, output_format is Format.json)


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


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


# --- running and errors ---------------------------------------------------------------------


def _run(fn: Any, *args: Any) -> None:
    try:
        trio.run(fn, *args)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def main() -> None:
    try:
        app()
    except (VectorlayError, BaseExceptionGroup) as error:
        reported = first_error(error)
        if not isinstance(reported, VectorlayError):
            raise
        stderr.print(f"error: {reported}", markup=False)
        sys.exit(1)
