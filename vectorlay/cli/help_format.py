"""How `--help` reads: boxed and coloured on a terminal, plain text when piped (through grep).

Rich's boxed help fits the terminal's width and cuts long option names short
(`--allow-process…`) when it has to; piped, there is no width to fit, so click's plain help is
used, which never shortens an option. Either way a flag is shown without a value type: typer
would print `--dry-run <bool>`, which reads as if it took a value.
"""

from __future__ import annotations

from typing import Any

import typer.core


def configure(terminal: bool) -> None:
    """Called by `vectorlay`'s main before parsing, so it changes nothing at import time."""
    if not terminal:
        typer.core.HAS_RICH = False
    option = typer.core.TyperOption
    if getattr(option.display_type_rich, "vectorlay_flags", False):
        return
    shown = option.display_type_rich

    def display_type_rich(self: typer.core.TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.vectorlay_flags = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich  # type: ignore[method-assign]
