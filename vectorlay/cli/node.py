"""`vectorlay node ...`: join, run the agent, and manage nodes from the CLI."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import trio
import typer

from vectorlay.cli.common import (
    SERVER_HELP,
    ServerOpt,
    TokenFileOpt,
    TokenOpt,
    VerboseOpt,
    context,
    data_dir,
    duration,
    run,
    token_of,
)
from vectorlay.client import commands
from vectorlay.client.output import stderr, stdout
from vectorlay.errors import UserError
from vectorlay.lifecycle import CleanStop, setup_logging, until_signalled
from vectorlay.node.state_dir import Credentials, NodeStateDir

if TYPE_CHECKING:
    from vectorlay.node.faults import FaultPoints
    from vectorlay.node.setup import NodeOptions, NodeSetup

node_app = typer.Typer(help="Run this machine as a node: `join` once, then plain `vectorlay node` runs the "
                            "agent from saved credentials.")


AllowProcessOpt = Annotated[bool | None, typer.Option(
    "--allow-process-runtime/--no-allow-process-runtime",
    help="Also run `runtime: process` replicas, as plain processes on this host (not isolated).")]
ContainerCliOpt = Annotated[str | None, typer.Option(
    "--container-cli", help="The container CLI: podman (default) or docker, or a path to either.")]
OciRuntimeOpt = Annotated[list[str] | None, typer.Option(
    "--oci-runtime", help="An OCI runtime to offer: runc|crun (container), runsc (sandbox), kata (microvm); "
                          "repeat for several. Default: every one found.")]
GpuOpt = Annotated[list[str] | None, typer.Option(
    help="Declare a GPU as TYPE[:MEMORY_GB] (repeat per GPU); overrides NVML.")]
DIRECT_EXPOSES = ("proxies dial {address} on the ports replicas are published on: anyone who can reach them "
                  "uses the replicas directly, past the edge's API keys and rate limits, and requests cross "
                  "the network unencrypted. Use it only on a private datacenter network.")


@node_app.callback(invoke_without_command=True)
def node(
    ctx: typer.Context,
    state_dir: Annotated[Path | None, typer.Option(help="Where the node's credential and replica logs live.")] = None,
    allow_process_runtime: AllowProcessOpt = None,
    container_cli: ContainerCliOpt = None,
    oci_runtime: OciRuntimeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the node agent from the credentials saved by `vectorlay node join`."""
    if ctx.invoked_subcommand is not None:
        return
    setup_logging(verbose)
    directory = state_dir or data_dir("node")
    files = NodeStateDir(directory)
    creds = files.load_credentials()
    options = _options(files.load_settings(), allow_process_runtime, container_cli, oci_runtime, None)
    files.save_settings(options.settings())
    clean_stop = CleanStop()
    run(partial(until_signalled, partial(_run_node, creds, directory, options, clean_stop, _faults()), clean_stop))


@node_app.command("join")
def node_join(
    server_url: Annotated[list[str], typer.Option("--server", "-s", envvar="VECTORLAY_SERVER", help=SERVER_HELP)],
    token: Annotated[str | None, typer.Option(
        help="A join token from `vectorlay token create --role node` (else VECTORLAY_JOIN_TOKEN). It shows "
             "in `ps`: prefer --token-file or the variable.")] = None,
    token_file: TokenFileOpt = None,
    name: Annotated[str | None, typer.Option(help="Node name (default: this machine's hostname).")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Where to keep the node credential.")] = None,
    gpu: GpuOpt = None,
    data_plane: Annotated[str, typer.Option(
        help="tunnel: this node opens encrypted tunnels to the proxies and nothing listens beyond its loopback "
             "(works behind NAT, no router change); direct: proxies dial --advertise (datacenter only).")]
    = "tunnel",
    advertise: Annotated[str | None, typer.Option(
        help="With --data-plane direct: the address proxies dial to reach this node's replicas.")] = None,
    allow_process_runtime: AllowProcessOpt = None,
    container_cli: ContainerCliOpt = None,
    oci_runtime: OciRuntimeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Join a server with a join token, save this node's credential, then run the agent."""
    from vectorlay.node.agent import join
    from vectorlay.node.setup import prepare_node

    setup_logging(verbose)
    join_token = token_of(token, token_file) or os.environ.get("VECTORLAY_JOIN_TOKEN")
    if not join_token:
        raise UserError("no join token: pass --token-file PATH (or - for stdin), set VECTORLAY_JOIN_TOKEN, "
                        "or pass --token; `vectorlay token create --role node` makes one")
    directory = state_dir or data_dir("node")
    files = NodeStateDir(directory)
    if files.is_joined():
        raise UserError(f"{directory} already holds a joined node; run `vectorlay node --state-dir {directory}` "
                        "or pick another --state-dir")
    node_name = name or _hostname_label()
    if data_plane not in ("tunnel", "direct"):
        raise UserError(f"invalid --data-plane {data_plane!r}: use tunnel or direct")
    if data_plane == "direct" and not advertise:
        raise UserError("--data-plane direct needs --advertise HOST: the address proxies dial to reach this node")
    if data_plane == "tunnel" and advertise:
        raise UserError("--advertise is only for --data-plane direct: behind tunnels no one dials this node")
    address = advertise or "127.0.0.1"
    options = replace(_options({}, allow_process_runtime, container_cli, oci_runtime, gpu), data_plane=data_plane)
    clean_stop = CleanStop()
    faults = _faults()

    async def main() -> None:
        setup = await prepare_node(options, address)  # logs what this node offers
        if data_plane == "direct":
            stderr.print("direct data plane: " + DIRECT_EXPOSES.format(address=address))
        creds = await join(",".join(server_url), join_token, node_name, setup.gpus, address, setup.runtimes, directory,
                           setup.isolation, data_plane)
        files.save_settings(options.settings())
        stderr.print(f"joined as {creds.name} ({creds.node_id}); credential saved in {directory}")
        await _run_setup(creds, directory, setup, clean_stop, faults)

    run(partial(until_signalled, main, clean_stop))


@node_app.command("check")
def node_check(
    state_dir: Annotated[Path | None, typer.Option(help="Use the options this node was joined with.")] = None,
    gpu: GpuOpt = None,
    allow_process_runtime: AllowProcessOpt = None,
    container_cli: ContainerCliOpt = None,
    oci_runtime: OciRuntimeOpt = None,
) -> None:
    """Check what this machine needs to be a node (podman, OCI runtimes, NVIDIA driver, CDI, KVM,
    IOMMU) and print each item as present or missing, with a fix. Exits 1 if it could run nothing."""
    from vectorlay.node.container_args import ContainerCli
    from vectorlay.node.preflight import run_checks

    saved = NodeStateDir(state_dir or data_dir("node")).load_settings()
    if not saved:
        saved = {"data_plane": "tunnel"}  # not joined yet: what `node join` does by default
    options = _options(saved, allow_process_runtime, container_cli, oci_runtime, gpu)

    directory = state_dir or data_dir("node")

    async def main() -> None:
        preflight = await run_checks(ContainerCli.named(options.container_cli), options.oci_runtimes,
                                     options.allow_process_runtime, options.gpu_declarations)
        for check in preflight.checks:
            stdout.print(check.line(), markup=False, highlight=False)
        for line in await _data_plane_lines(directory, options):
            stdout.print(line, markup=False, highlight=False)
        for gpu_info in preflight.gpus:
            memory = f"{gpu_info.memory_gb:g} GB" if gpu_info.memory_gb is not None else "memory unknown"
            stdout.print(f"         GPU {gpu_info.index}: {gpu_info.name}, {memory}, {gpu_info.uuid}",
                         markup=False, highlight=False)
        for note in preflight.notes:
            stdout.print(f"note: {note}", markup=False, highlight=False)
        stdout.print(preflight.summary(), markup=False, highlight=False)
        if not preflight.runtimes:
            raise typer.Exit(1)

    run(main)


@node_app.command("cordon")
def node_cordon(name: Annotated[str, typer.Argument()], server_url: ServerOpt = None, token: TokenOpt = None,
    token_file: TokenFileOpt = None) -> None:
    """Stop placing new replicas on a node; the ones it runs stay."""
    run(commands.node_action, context(server_url, token, token_file), "cordon", name)


@node_app.command("uncordon")
def node_uncordon(name: Annotated[str, typer.Argument()], server_url: ServerOpt = None,
                  token: TokenOpt = None,
    token_file: TokenFileOpt = None) -> None:
    """Make a cordoned or drained node schedulable again."""
    run(commands.node_action, context(server_url, token, token_file), "uncordon", name)


@node_app.command("drain")
def node_drain(
    name: Annotated[str, typer.Argument()],
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once draining has started.")] = False,
    timeout: Annotated[str, typer.Option(help="How long to wait for the node to be empty.")] = "5m",
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Move a node's replicas elsewhere before its owner takes it back: new copies become ready
    on other nodes first, then the old ones stop. The node stays cordoned until uncordoned."""
    run(commands.node_action, context(server_url, token, token_file),
        "drain", name, not no_wait, duration(timeout, "--timeout"))


@node_app.command("rm")
def node_rm(name: Annotated[str, typer.Argument()], server_url: ServerOpt = None, token: TokenOpt = None,
    token_file: TokenFileOpt = None) -> None:
    """Forget a node: its credential stops working and its replicas are replaced elsewhere."""
    run(commands.node_action, context(server_url, token, token_file), "rm", name)


async def _data_plane_lines(directory: Path, options: NodeOptions) -> list[str]:
    """What the data plane exposes and, behind tunnels, whether this machine reaches the proxies."""
    from vectorlay.node.preflight import Check
    from vectorlay.node.tunnels import check_proxies

    if options.data_plane == "direct":
        files = NodeStateDir(directory)
        address = files.load_credentials().address if files.is_joined() else "this node's advertised address"
        return [f"note: direct data plane: {DIRECT_EXPOSES.format(address=address)}"]
    lines = ["note: tunnel data plane: replicas listen on 127.0.0.1 only; the agent opens TLS tunnels to the "
             "proxies (outbound only), so no port is open and NAT needs no change"]
    reached = await check_proxies(directory)
    if reached is None:
        if NodeStateDir(directory).is_joined():
            lines.append(Check("proxies", False, "none known yet",
                               "run the agent (`vectorlay node`): the server tells it which proxies to dial").line())
        return lines
    if not reached:
        lines.append(Check("proxies", False, "the server lists no proxy that accepts tunnels",
                           "start `vectorlay proxy --tunnel-listen HOST:PORT`").line())
    for result in reached:
        fix = "" if result.ok else "this machine must be able to open connections to that address (outbound)"
        lines.append(Check(f"proxy {result.proxy.id}", result.ok, f"{result.proxy.address}: {result.detail}",
                           fix).line())
    return lines


def _options(saved: dict[str, Any], allow_process: bool | None, container_cli: str | None,
             oci_runtime: list[str] | None, gpu: list[str] | None) -> NodeOptions:
    """Flags given now win over the settings saved at join."""
    from vectorlay.node.setup import NodeOptions

    base = NodeOptions.from_settings(saved)
    return NodeOptions(
        allow_process_runtime=base.allow_process_runtime if allow_process is None else allow_process,
        container_cli=container_cli or base.container_cli,
        oci_runtimes=tuple(oci_runtime) if oci_runtime else base.oci_runtimes,
        gpu_declarations=tuple(gpu) if gpu is not None else base.gpu_declarations,
        data_plane=base.data_plane,
    )


def _faults() -> FaultPoints:
    """Fault points named in VECTORLAY_NODE_FAULTS, for fault-injection tests; never set it in production."""
    from vectorlay.node.faults import ENV_VAR, FaultPoints

    return FaultPoints.parse(os.environ.get(ENV_VAR, ""))


async def _run_node(creds: Credentials, directory: Path, options: NodeOptions, clean_stop: CleanStop,
                    faults: FaultPoints) -> None:
    from vectorlay.node.setup import prepare_node

    await _run_setup(creds, directory, await prepare_node(options, creds.address), clean_stop, faults)


async def _run_setup(creds: Credentials, directory: Path, setup: NodeSetup, clean_stop: CleanStop,
                     faults: FaultPoints) -> None:
    from vectorlay.node.agent import run_node

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_node, creds, directory, setup.runtime, setup.gpus, setup.runtimes,
                                    isolation=setup.isolation, publish_ip=setup.publish_ip,
                                    gpu_monitor=setup.gpu_monitor, clean_stop=clean_stop, faults=faults,
                                    data_plane=setup.data_plane))


def _hostname_label() -> str:

    label = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return label[:63] or "node"
