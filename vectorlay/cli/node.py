"""`vectorlay node ...`: join, run the agent, and manage nodes from the CLI."""

from __future__ import annotations

import json
import re
import socket
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from vectorlay.cli.common import ServerOpt, TokenOpt, VerboseOpt, data_dir, duration, run
from vectorlay.client import commands
from vectorlay.client.config import resolve
from vectorlay.client.output import stderr
from vectorlay.errors import UserError
from vectorlay.files import write_private
from vectorlay.lifecycle import setup_logging, until_signalled

node_app = typer.Typer(help="Run this machine as a node: [bold]join[/bold] once, then plain "
                            "[bold]vectorlay node[/bold] runs the agent from saved credentials.")


@node_app.callback(invoke_without_command=True)
def node(
    ctx: typer.Context,
    state_dir: Annotated[Path | None, typer.Option(help="Where the node's credential and replica logs live.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the node agent from the credentials saved by [bold]vectorlay node join[/bold]."""
    if ctx.invoked_subcommand is not None:
        return
    from vectorlay.node.agent import load_credentials

    setup_logging(verbose)
    directory = state_dir or data_dir("node")
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
    verbose: VerboseOpt = False,
) -> None:
    """Join a server with a join token, save this node's credential, then run the agent."""
    from vectorlay.node.agent import join
    from vectorlay.node.gpus import inventory

    setup_logging(verbose)
    directory = state_dir or data_dir("node")
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
    run(commands.node_action, resolve(server_url, token), "cordon", name)


@node_app.command("uncordon")
def node_uncordon(name: Annotated[str, typer.Argument()], server_url: ServerOpt = None,
                  token: TokenOpt = None) -> None:
    """Make a cordoned or drained node schedulable again."""
    run(commands.node_action, resolve(server_url, token), "uncordon", name)


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
    run(commands.node_action, resolve(server_url, token), "drain", name, not no_wait, duration(timeout, "--timeout"))


@node_app.command("rm")
def node_rm(name: Annotated[str, typer.Argument()], server_url: ServerOpt = None, token: TokenOpt = None) -> None:
    """Forget a node: its credential stops working and its replicas are replaced elsewhere."""
    run(commands.node_action, resolve(server_url, token), "rm", name)


def _run_node(creds: Any, directory: Path, declarations: list[str]) -> None:
    from vectorlay.node.agent import run_node
    from vectorlay.node.gpus import inventory
    from vectorlay.node.process_runtime import ProcessRuntime

    gpus, note = inventory(declarations)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_node, creds, directory, ProcessRuntime(), gpus, ("process",))

    run(partial(until_signalled, main))


def _load_node_settings(directory: Path) -> dict[str, Any]:

    path = directory / "settings.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as error:
        raise UserError(f"{path} is damaged ({error})") from None
    return data if isinstance(data, dict) else {}


def _save_node_settings(directory: Path, settings: dict[str, Any]) -> None:


    write_private(directory / "settings.json", json.dumps(settings, indent=2) + "\n")


def _hostname_label() -> str:

    label = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return label[:63] or "node"
