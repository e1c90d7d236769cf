"""Turn the node's options and its preflight checks into what the agent runs and advertises."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

import trio

from vectorlay.core.model import Gpu
from vectorlay.core.protocol import DATA_PLANES, DIRECT, TUNNEL
from vectorlay.errors import UserError
from vectorlay.node.container_args import ContainerCli
from vectorlay.node.container_runtime import ContainerRuntime
from vectorlay.node.gpu_health import NvmlMonitor
from vectorlay.node.oci import parse_oci_runtimes
from vectorlay.node.preflight import Preflight, run_checks
from vectorlay.node.process_runtime import ProcessRuntime
from vectorlay.node.runtime import ReplicaRuntime
from vectorlay.node.selector import RuntimeSelector

log = logging.getLogger("vectorlay.node")

CONTAINER_CLIS = ("podman", "docker")


@dataclass(frozen=True)
class NodeOptions:
    """How the node was started; saved at join so a plain `vectorlay node` runs the same way."""

    allow_process_runtime: bool = False
    container_cli: str = "podman"
    oci_runtimes: tuple[str, ...] = ()  # empty: every one that is found
    gpu_declarations: tuple[str, ...] = ()
    data_plane: str = TUNNEL  # how proxies reach the replicas: its own tunnels, or dialling it (direct)

    def __post_init__(self) -> None:
        if self.container_cli.rsplit("/", 1)[-1] not in CONTAINER_CLIS:
            raise UserError(f"unknown --container-cli {self.container_cli!r} (allowed: podman, docker, "
                            "or a path to either)")
        if self.data_plane not in DATA_PLANES:
            raise UserError(f"unknown --data-plane {self.data_plane!r} (allowed: tunnel, direct)")
        parse_oci_runtimes(self.oci_runtimes)

    def settings(self) -> dict[str, Any]:
        return {"gpu": list(self.gpu_declarations), "allow_process_runtime": self.allow_process_runtime,
                "container_cli": self.container_cli, "oci_runtime": list(self.oci_runtimes),
                "data_plane": self.data_plane}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> NodeOptions:
        # Settings saved before tunnels existed are a node that was dialled directly.
        return cls(allow_process_runtime=bool(settings.get("allow_process_runtime", False)),
                   container_cli=str(settings.get("container_cli", "podman")),
                   oci_runtimes=tuple(settings.get("oci_runtime", ())),
                   gpu_declarations=tuple(settings.get("gpu", ())),
                   data_plane=str(settings.get("data_plane", DIRECT)))


@dataclass
class NodeSetup:
    preflight: Preflight
    runtime: ReplicaRuntime
    publish_ip: str
    gpu_monitor: NvmlMonitor | None
    data_plane: str = TUNNEL

    @property
    def gpus(self) -> list[Gpu]:
        return list(self.preflight.gpus)

    @property
    def runtimes(self) -> tuple[str, ...]:
        return self.preflight.runtimes

    @property
    def isolation(self) -> tuple[str, ...]:
        return self.preflight.isolation


async def prepare_node(options: NodeOptions, advertise: str) -> NodeSetup:
    """Run the checks, log what is missing, and build the runtimes the node offers."""
    cli = ContainerCli.named(options.container_cli)
    preflight = await run_checks(cli, options.oci_runtimes, options.allow_process_runtime, options.gpu_declarations)
    log.info("%s", preflight.offer_line())
    for check in preflight.missing():  # `vectorlay node check` prints these, with their fixes
        log.debug("missing: %s: %s%s", check.item, check.detail, f" (fix: {check.fix})" if check.fix else "")
    for note in preflight.notes:
        log.warning("%s", note)
    if not preflight.runtimes:
        log.warning("this node can run no replicas: install podman and runc (see `vectorlay node check`), "
                    "or allow process replicas with --allow-process-runtime")
    runtimes: dict[str, ReplicaRuntime] = {"process": ProcessRuntime()}
    if preflight.container_ok:
        runtimes["container"] = ContainerRuntime(cli, preflight.oci_runtimes)
    monitor = None
    if preflight.gpus and not options.gpu_declarations:
        monitor = NvmlMonitor([g.uuid for g in preflight.gpus])
    # Behind tunnels nothing but the agent reaches the replicas: they publish on loopback only.
    ip = "127.0.0.1" if options.data_plane == TUNNEL else await trio.to_thread.run_sync(publish_ip, advertise)
    return NodeSetup(preflight, RuntimeSelector(runtimes, preflight.runtimes), ip, monitor, options.data_plane)


def publish_ip(advertise: str) -> str:
    """The local IP behind the advertised address, for publishing container ports on. An address
    that is not this machine's (a router forwarding to it) publishes on all addresses instead."""
    try:
        infos = socket.getaddrinfo(advertise, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return "0.0.0.0"
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((ip, 0))
        except OSError:
            continue
        return ip
    log.info("%s is not an address of this machine: container ports are published on all addresses", advertise)
    return "0.0.0.0"
