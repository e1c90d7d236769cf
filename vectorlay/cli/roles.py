"""Long-running roles: `vectorlay server`, `vectorlay proxy` and `vectorlay dev`."""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path
from typing import Annotated

import trio
import typer

from vectorlay.cli.common import (
    ServerOpt,
    TokenFileOpt,
    TokenOpt,
    VerboseOpt,
    context,
    data_dir,
    duration,
    parse_listen,
    run,
)
from vectorlay.client.config import Context, save_context
from vectorlay.client.output import stderr
from vectorlay.errors import UserError
from vectorlay.lifecycle import CleanStop, setup_logging, until_signalled

TUNNEL_ADVERTISE = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253})(:[0-9]{1,5})?")


def server(
    listen: Annotated[str, typer.Option(help="Address for nodes, proxies and the CLI.")] = "127.0.0.1:7070",
    db: Annotated[str | None, typer.Option(
        help="Database URL. Default: SQLite in the state dir. "
             "PostgreSQL: postgresql+psycopg://USER@HOST:PORT/DB")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Where the SQLite file and admin.token live.")] = None,
    heartbeat_interval: Annotated[str, typer.Option(help="How often nodes heartbeat (e.g. 1s).")] = "1s",
    tls: Annotated[str, typer.Option(
        help="auto: a CA and certificate made in the state dir on first start (tokens pin the CA); "
             "off: plain ws:// (loopback development only). Ignored with --tls-cert.")] = "off",
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM, with its chain).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(
        help="The CA that issued --tls-cert; tokens pin it (default: the certificate's own key).")] = None,
    tls_san: Annotated[list[str] | None, typer.Option(
        help="Extra names or addresses the --tls auto certificate covers (repeat).")] = None,
    metrics_listen: Annotated[str | None, typer.Option(
        help="Serve Prometheus metrics (the database's health, nodes, clusters) at http://HOST:PORT/metrics.")]
    = None,
    advertise: Annotated[str | None, typer.Option(
        help="Several servers (PostgreSQL): the host or address the others reach this one at. Default: "
             "--listen's host; with 0.0.0.0, this machine's address towards the database.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the control plane. The first start creates an admin token, prints it and saves it."""
    from vectorlay.server.app import ServerConfig, run_server
    from vectorlay.tls import auto_tls, given_tls

    setup_logging(verbose)
    host, port = parse_listen(listen, 7070)
    directory = (state_dir or data_dir("server")).resolve()
    interval = duration(heartbeat_interval, "--heartbeat-interval") or 1.0
    if tls not in ("auto", "off"):
        raise UserError(f"invalid --tls {tls!r}: use auto or off (or give --tls-cert and --tls-key)")
    if (tls_cert is None) != (tls_key is None):
        raise UserError("--tls-cert and --tls-key go together")
    server_tls = None
    if tls_cert is not None and tls_key is not None:
        server_tls = given_tls(tls_cert, tls_key, tls_ca)
    elif tls == "auto":
        server_tls = auto_tls(directory / "tls", [host, *(tls_san or [])])
    # VECTORLAY_FAULTS names crash points for fault-injection tests; never set it in production.
    faults = frozenset(f for f in os.environ.get("VECTORLAY_FAULTS", "").split(",") if f)
    config = ServerConfig(directory, host, port, db, interval, crash_points=faults, tls=server_tls,
                          metrics_listen=parse_listen(metrics_listen, 9091) if metrics_listen else None,
                          advertise=advertise)
    scheme = "wss" if server_tls else "ws"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            started = await nursery.start(run_server, config)
            if started.created_admin_token:
                stderr.print(f"admin token (also in {directory / 'admin.token'}):")
                print(started.admin_token, flush=True)
            if started.admin_token:
                client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
                save_context(f"{client_host}:{started.port}",
                             Context(f"{scheme}://{client_host}:{started.port}", started.admin_token))

    run(partial(until_signalled, main), listen_flags={"server": "--listen"})


def proxy(
    server_url: ServerOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    listen: Annotated[str, typer.Option(help="HTTP address to serve clusters on.")] = "127.0.0.1:8080",
    domain: Annotated[str, typer.Option(help="Clusters are served at <cluster>.<domain>.")] = "localhost",
    tls_cert: Annotated[Path | None, typer.Option(help="Serve HTTPS with this certificate chain (PEM); "
                                                       "SIGHUP reloads it.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's private key (PEM).")] = None,
    metrics_listen: Annotated[str | None, typer.Option(
        help="Serve Prometheus metrics at http://HOST:PORT/metrics.")] = None,
    max_connections: Annotated[int, typer.Option(
        min=1, help="Client connections at once; at the limit the longest-idle one is closed for a new one, "
                    "and a new one gets 503 only if every connection is busy.")] = 10_000,
    max_connections_per_client: Annotated[int, typer.Option(
        min=1, help="Connections at once from one client address; more get 503.")] = 1_000,
    max_body: Annotated[str, typer.Option(help="Largest request body (e.g. 16MiB); more is 413.")] = "16MiB",
    header_timeout: Annotated[str, typer.Option(help="Time for a request's headers; then 408.")] = "10s",
    idle_timeout: Annotated[str, typer.Option(help="Close kept-alive client connections idle this long.")] = "60s",
    upstream_timeout: Annotated[str, typer.Option(
        help="Wait this long for a replica's response head (and between streamed chunks).")] = "300s",
    eject_time: Annotated[str, typer.Option(
        help="How long a failing replica is first left out; doubles while it keeps failing.")] = "5s",
    shutdown_grace: Annotated[str, typer.Option(
        help="On SIGTERM, how long requests in flight get to finish.")] = "30s",
    http_parser: Annotated[str, typer.Option(
        help="HTTP/1.1 parser: httptools (llhttp, in C, the fast default) or h11 (pure Python).")] = "httptools",
    tunnel_listen: Annotated[str, typer.Option(
        help="Accept nodes' tunnels (TLS, opened by the nodes) on HOST:PORT; `off` to serve direct nodes only. "
             "Nodes elsewhere need it reachable: e.g. 0.0.0.0:7443.")] = "127.0.0.1:7443",
    tunnel_advertise: Annotated[str | None, typer.Option(
        help="HOST[:PORT] nodes dial for tunnels, where it differs from --tunnel-listen (NAT, a load balancer). "
             "Default: the listen address (for 0.0.0.0, the address this proxy reaches the server from).")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the edge proxy: routes http://<cluster>.<domain>/ to ready replicas."""
    from vectorlay.proxy.app import ProxyConfig, serve_until_signalled
    from vectorlay.proxy.codec import HttpParser
    from vectorlay.proxy.limits import ProxyLimits, parse_size

    setup_logging(verbose)
    ctx = context(server_url, token, token_file)
    host, port = parse_listen(listen, 8080)
    if (tls_cert is None) != (tls_key is None):
        raise UserError("--tls-cert and --tls-key go together")
    try:
        parser = HttpParser(http_parser)
    except ValueError:
        raise UserError(f"invalid --http-parser {http_parser!r}: expected httptools or h11") from None

    def _seconds(text: str, option: str) -> float:
        value = duration(text, option)
        if not value:
            raise UserError(f"invalid {option}: must be more than 0")
        return value

    try:
        body_bytes = parse_size(max_body)
    except ValueError as error:
        raise UserError(f"invalid --max-body: {error}") from None
    defaults = ProxyLimits()
    limits = ProxyLimits(
        max_body_bytes=body_bytes,
        retry_buffer_bytes=min(defaults.retry_buffer_bytes, body_bytes),
        header_timeout_s=_seconds(header_timeout, "--header-timeout"),
        idle_timeout_s=_seconds(idle_timeout, "--idle-timeout"),
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
        upstream_response_timeout_s=_seconds(upstream_timeout, "--upstream-timeout"),
        eject_s=_seconds(eject_time, "--eject-time"),
        shutdown_grace_s=_seconds(shutdown_grace, "--shutdown-grace"),
    )
    tunnels = None if tunnel_listen.strip().lower() in ("off", "none", "") else parse_listen(tunnel_listen, 7443)
    if tunnel_advertise is not None and not TUNNEL_ADVERTISE.fullmatch(tunnel_advertise):
        raise UserError(f"invalid --tunnel-advertise {tunnel_advertise!r}: expected HOST or HOST:PORT "
                        "(an IPv6 address in brackets)")
    config = ProxyConfig(ctx.server, ctx.token, host, port, domain, limits, tls_cert=tls_cert, tls_key=tls_key,
                         metrics_listen=parse_listen(metrics_listen, 9090) if metrics_listen else None,
                         http_parser=parser, tunnel_listen=tunnels, tunnel_advertise=tunnel_advertise)
    run(serve_until_signalled, config,
        listen_flags={"proxy": "--listen", "proxy's metrics": "--metrics-listen", "proxy's tunnels": "--tunnel-listen"})


def dev(
    state_dir: Annotated[Path, typer.Option(help="State of the whole stack.")] = Path(".vectorlay/dev"),
    nodes: Annotated[int, typer.Option(min=1, max=32, help="How many nodes to run.")] = 2,
    server_port: Annotated[int, typer.Option(help="0 picks a free port.")] = 7070,
    proxy_port: Annotated[int, typer.Option(help="0 picks a free port.")] = 8080,
    domain: Annotated[str, typer.Option()] = "localhost",
    gpu: Annotated[list[str] | None, typer.Option(help="Declare GPUs on every dev node, TYPE[:MEMORY_GB].")] = None,
    apply_file: Annotated[str | None, typer.Option("--apply", help="Apply this manifest once the stack is up.")]
    = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a server, N nodes and a proxy in one process, and point the CLI at them."""
    from vectorlay.dev import DevConfig, run_dev

    setup_logging(verbose, tag_nodes=True)
    config = DevConfig(state_dir, nodes, server_port, proxy_port, domain, tuple(gpu or ()), apply_file)
    clean_stop = CleanStop()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_dev, config, clean_stop)

    run(partial(until_signalled, main, clean_stop),
        listen_flags={"server": "--server-port (0 picks a free port)", "proxy": "--proxy-port (0 picks a free port)"})
