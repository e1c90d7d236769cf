"""Shared pieces of the CLI: option types, parsing of addresses and durations, running trio."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from vectorlay.client.config import Context, resolve
from vectorlay.core.durations import parse_duration
from vectorlay.errors import ListenError, UserError, first_error

SERVER_HELP = ("Server URL, ws://HOST:PORT or wss://HOST:PORT; for several servers of one control plane "
               "repeat it or give a comma list (the first that answers is used, the next when it goes away).")
ServerOpt = Annotated[list[str] | None, typer.Option("--server", "-s", envvar="VECTORLAY_SERVER",
                                                     help=SERVER_HELP + " Default: current context.")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", help="API token (else VECTORLAY_TOKEN, else the current context). It shows in `ps`: "
                    "prefer --token-file or the variable.")]
TokenFileOpt = Annotated[str | None, typer.Option(
    "--token-file", metavar="PATH", help="Read the token from this file, or from stdin with -.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")]
ProjectOpt = Annotated[str | None, typer.Option("--project", "-p", envvar="VECTORLAY_PROJECT",
                                                help="The project (tenant). Default: your token's, else default.")]


class Format(StrEnum):
    table = "table"
    json = "json"


OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table or json.")]


def token_of(token: str | None, token_file: str | None) -> str | None:
    """The token given with --token or --token-file (a path, or - for stdin); None if neither."""
    if token_file is None:
        return token
    if token is not None:
        raise UserError("give --token or --token-file, not both")
    where = "stdin" if token_file == "-" else token_file
    try:
        text = sys.stdin.read() if token_file == "-" else Path(token_file).read_text()
    except FileNotFoundError:
        raise UserError(f"--token-file {token_file}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--token-file {token_file}: cannot read it ({error})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise UserError(f"--token-file: expected one token in {where}, found {len(lines)} non-empty lines")
    return lines[0]


def servers(given: list[str] | None) -> str | None:
    """`--server a --server b,c` as the one comma list the clients take (None when not given)."""
    return ",".join(given) if given else None


def context(server: list[str] | None, token: str | None, token_file: str | None,
            project: str | None = None) -> Context:
    """The server, token and project a client command uses (see `resolve`)."""
    return resolve(servers(server), token_of(token, token_file), project)


def data_dir(role: str) -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vectorlay" / role


def parse_listen(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = (text, str(default_port)) if not text.isdigit() else ("127.0.0.1", text)
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"invalid listen address {text!r}: expected HOST:PORT")
    return host, int(port)


def duration(text: str | None, what: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as error:
        raise UserError(f"invalid {what}: {error}") from None


def run(fn: Any, *args: Any, listen_flags: Mapping[str, str] | None = None) -> None:
    """Run `fn` on trio. `listen_flags` names, for each address the role listens on (a
    ListenError's purpose), the flag that changes it, so a taken port says how to pick another."""
    try:
        trio.run(fn, *args)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (ListenError, BaseExceptionGroup) as error:
        reported = first_error(error)
        if isinstance(reported, ListenError) and listen_flags and reported.purpose in listen_flags:
            raise reported.with_flag(listen_flags[reported.purpose]) from None
        raise
