"""The `vectorlay` command: parse arguments, load files, run the role. No logic lives here.

Each module holds one group of commands; this one assembles them in the order `--help` shows.
"""

from __future__ import annotations

import sys

import typer

from vectorlay.cli import client, help_format, node, roles
from vectorlay.client.output import stderr
from vectorlay.errors import VectorlayError, first_error

app = typer.Typer(
    name="vectorlay",
    help="vectorlay: an overlay network for GPU inference on machines other people own.",
    no_args_is_help=True,
    add_completion=True,  # `vectorlay --install-completion` (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command()(roles.server)
app.command()(roles.proxy)
app.command()(roles.dev)
app.command()(client.apply)
app.command()(client.get)
app.command()(client.logs)
app.command()(client.delete)
app.add_typer(client.describe_app, name="describe")
app.add_typer(client.cluster_app, name="cluster")
app.add_typer(client.rollout_app, name="rollout")
app.add_typer(node.node_app, name="node")
app.add_typer(client.token_app, name="token")
app.add_typer(client.key_app, name="key")
app.add_typer(client.secret_app, name="secret")
app.command()(client.audit)
app.add_typer(client.context_app, name="context")
app.command()(client.status)
app.command()(client.version)


def main() -> None:
    help_format.configure(terminal=sys.stdout.isatty())
    try:
        app()
    except (VectorlayError, BaseExceptionGroup) as error:
        reported = first_error(error)
        if not isinstance(reported, VectorlayError):
            raise
        stderr.print(f"error: {reported}", markup=False)
        sys.exit(1)
