"""The client config file (like a kubeconfig): named contexts of server URL, token and proxy.

`vectorlay server` and `vectorlay dev` write a context and make it current, so that a plain
`vectorlay apply FILE` afterwards talks to them. Flags beat environment variables beat the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vectorlay.errors import UserError
from vectorlay.files import write_private


@dataclass(frozen=True)
class Context:
    server: str
    token: str
    proxy: str | None = None
    project: str | None = None  # which project commands are about (else the token's own, or default)


def config_path() -> Path:
    explicit = os.environ.get("VECTORLAY_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vectorlay" / "config.json"


def _read() -> dict[str, Any]:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"current": None, "contexts": {}}
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error}); fix or remove it") from None
    if not isinstance(data, dict) or not isinstance(data.get("contexts"), dict):
        raise UserError(f"{path} is not a vectorlay config; fix or remove it")
    return data


def save_context(name: str, context: Context, make_current: bool = True) -> Path:
    data = _read()
    data["contexts"][name] = asdict(context)
    if make_current or not data.get("current"):
        data["current"] = name
    path = config_path()
    write_private(path, json.dumps(data, indent=2) + "\n")
    return path


def current_context() -> tuple[str, Context] | None:
    data = _read()
    name = data.get("current")
    raw = data["contexts"].get(name) if isinstance(name, str) else None
    if not isinstance(name, str) or not isinstance(raw, dict):
        return None
    try:
        return name, Context(**{k: v for k, v in raw.items() if k in Context.__dataclass_fields__})
    except TypeError:
        raise UserError(f"context {name!r} in {config_path()} is malformed; fix or remove it") from None


def list_contexts() -> tuple[str | None, dict[str, Context]]:
    data = _read()
    return data.get("current"), {k: Context(**v) for k, v in data["contexts"].items()}


def use_context(name: str) -> None:
    data = _read()
    if name not in data["contexts"]:
        raise UserError(f"no context named {name!r} in {config_path()}")
    data["current"] = name
    write_private(config_path(), json.dumps(data, indent=2) + "\n")


def resolve(server: str | None, token: str | None, project: str | None = None) -> Context:
    """Server and token from flags, else VECTORLAY_SERVER/VECTORLAY_TOKEN, else the current context.
    The project likewise: --project, else VECTORLAY_PROJECT, else none (the server decides)."""
    server = server or os.environ.get("VECTORLAY_SERVER") or None
    token = token or os.environ.get("VECTORLAY_TOKEN") or None
    project = project or os.environ.get("VECTORLAY_PROJECT") or None
    proxy = None
    if server is None or token is None:
        found = current_context()
        if found is not None:
            _, context = found
            if server is None or server == context.server:
                server = server or context.server
                token = token or context.token
                proxy = context.proxy
    if server is None:
        raise UserError("no server configured: pass --server, set VECTORLAY_SERVER, "
                        "or start a local stack with `vectorlay dev`")
    if token is None:
        raise UserError("no token: pass --token or set VECTORLAY_TOKEN (the admin token is in the "
                        "server's state dir, admin.token)")
    return Context(server, token, proxy, project)
