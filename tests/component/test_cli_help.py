"""`--help` as a user reads it: piped through grep (plain, every option name whole) and on a
terminal (boxed), a flag never shown as taking a `<bool>`; shell completion is offered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vectorlay.cli import app, help_format


def _help(*command: str) -> str:
    """The help as a pipe gets it (stdout is not a terminal), from a real `vectorlay` process."""
    result = subprocess.run([sys.executable, "-m", "vectorlay", *command, "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(("command", "option"), [
    (("node", "join"), "--allow-process-runtime / --no-allow-process-runtime"),
    (("proxy",), "--max-connections-per-client"),
    (("apply",), "--dry-run"),
    (("get",), "--watch"),
    (("rollout", "undo"), "--to-revision"),
    (("describe", "replica"), "--output"),
])
def test_piped_help_keeps_every_option_name_whole_and_shows_no_bool(command: tuple[str, ...], option: str) -> None:
    text = _help(*command)
    assert option in text
    assert "<bool>" not in text and "…" not in text and "╭" not in text


def test_terminal_help_shows_no_bool_for_flags() -> None:
    help_format.configure(terminal=True)
    result = CliRunner().invoke(app, ["apply", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    dry_run = next(line for line in result.output.splitlines() if "--dry-run" in line)
    assert "<bool>" not in dry_run and "Show what would change" in dry_run
    assert "<str>" in next(line for line in result.output.splitlines() if "--timeout" in line)


def test_shell_completion_is_offered() -> None:
    assert "--install-completion" in _help()
    installed = Path(sys.executable).with_name("vectorlay")  # the script pip made: completion is by its name
    # typer guesses the shell from the parent processes, which differ under pytest; its own switch
    # makes --show-completion take the shell's name instead.
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    script = subprocess.run([str(installed), "--show-completion", "bash"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert "_vectorlay_completion" in script.stdout
