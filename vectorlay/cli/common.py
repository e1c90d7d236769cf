"""Shared pieces of the CLI: option types, parsing of addresses and durations, running trio."""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from vectorlay.core.durations import parse_duration
from vectorlay.errors import ListenError, UserError, first_error

ServerOpt = Annotated[str | None, typer.Option("--server", "-s", envvar="VECTORLAY_SERVER",
                                               help="Server URL, ws://HOST:PORT. Default: current context.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="VECTORLAY_TOKEN",
                                              help="API token. Default: current context.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")]
ProjectOpt = Annotated[str | None, typer.Option("--project", "-p", envvar="VECTORLAY_PROJECT",
                                                help="The project (tenant). Default: your token's, else default.")]


class Format(StrEnum):
    table = "table"
    json = "json"


OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table or json.")]


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
