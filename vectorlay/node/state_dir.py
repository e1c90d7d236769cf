"""The node's state directory (`--state-dir`), and every file in it: the one place that names them.

    node.json                   the node's identity: server URL, node id and name, credential,
                                advertised address, the server's CA (written by `node join`)
    settings.json               the runtime options it was joined with (`node`'s flags override them)
    tunnels.json                the tunnel key, its latest certificate, the tunnel CA and the proxy
                                list (tunnel data plane: for restarts and `node check`; node/tunnels.py)
    agent-state.json            what the agent runs, so a restarted agent re-attaches (local_state.py)
    agent-state.json.corrupt    a state file that failed its checksum, set aside for inspection
    logs/<replica>.log          each replica's stdout and stderr, written by the workload itself
    logs/<replica>.log.1        its rotated copy (logs.py)
    logs/<replica>.log.times    how far the log had grown, second by second, to date its lines
    run/<replica>/              where the container runtime runs for it (conmon's own files)

Everything is written private to the user running the agent (`files.write_private`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vectorlay.errors import UserError
from vectorlay.files import write_private


@dataclass(frozen=True)
class Credentials:
    """What `node join` got from the server: how this node connects from now on."""

    server: str
    node_id: str
    name: str
    credential: str
    address: str
    ca_pem: str | None = None  # the server's CA, checked against the join token's pin at join


@dataclass(frozen=True)
class NodeStateDir:
    root: Path

    @property
    def credentials_file(self) -> Path:
        return self.root / "node.json"

    @property
    def settings_file(self) -> Path:
        return self.root / "settings.json"

    @property
    def tunnels_file(self) -> Path:
        return self.root / "tunnels.json"

    @property
    def agent_state_file(self) -> Path:
        return self.root / "agent-state.json"

    @property
    def corrupt_agent_state_file(self) -> Path:
        return self.root / "agent-state.json.corrupt"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def replica_log(self, replica_id: str) -> Path:
        return self.log_dir / f"{replica_id}.log"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def replica_run_dir(self, replica_id: str) -> Path:
        """Where the container runtime runs for this replica (its own files, such as conmon's
        `oom` marker, land here rather than in the user's working directory)."""
        return self.run_dir / replica_id

    def forget_node(self) -> None:
        """This directory's node was removed from the fleet: drop its identity and what it ran,
        so the directory can join again (its replicas must have been stopped first)."""
        self.credentials_file.unlink(missing_ok=True)
        self.agent_state_file.unlink(missing_ok=True)
        self.tunnels_file.unlink(missing_ok=True)  # its certificate names the removed node

    # --- node.json ---

    def is_joined(self) -> bool:
        return self.credentials_file.exists()

    def load_credentials(self) -> Credentials:
        path = self.credentials_file
        try:
            data = json.loads(path.read_text())
            return Credentials(data["server"], data["node_id"], data["name"], data["credential"], data["address"],
                               data.get("ca_pem"))
        except FileNotFoundError:
            raise UserError(f"no node credentials in {self.root}: run `vectorlay node join --server URL --token "
                            "TOKEN` first") from None
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path} is damaged ({error}); remove it and join again") from None

    def save_credentials(self, creds: Credentials) -> None:
        write_private(self.credentials_file, json.dumps(asdict(creds), indent=2) + "\n")

    # --- settings.json ---

    def load_settings(self) -> dict[str, Any]:
        """The options saved at join (see `node/setup.py::NodeOptions`); {} before any."""
        path = self.settings_file
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as error:
            raise UserError(f"{path} is damaged ({error})") from None
        return data if isinstance(data, dict) else {}

    def save_settings(self, settings: dict[str, Any]) -> None:
        write_private(self.settings_file, json.dumps(settings, indent=2) + "\n")
