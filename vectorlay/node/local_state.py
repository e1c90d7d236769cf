"""What the agent runs, kept in its state dir so a restarted agent re-attaches instead of restarting.

The file carries a checksum: a torn or hand-edited file is detected, set aside, and the agent
falls back to finding its replicas by scanning the runtime (so no replica runs twice).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vectorlay.core import codec
from vectorlay.core.model import Assignment
from vectorlay.files import write_private
from vectorlay.node.runtime import Handle

log = logging.getLogger("vectorlay.node")

STATE_VERSION = 1


@dataclass(frozen=True)
class RunningRecord:
    assignment: Assignment
    handle: Handle
    host_port: int


@dataclass
class AgentState:
    generation: int = 0
    applied_seq: int = 0
    running: dict[str, RunningRecord] = field(default_factory=dict)


class CorruptState(Exception):
    pass


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save(path: Path, state: AgentState) -> None:
    body = {
        "version": STATE_VERSION,
        "generation": state.generation,
        "applied_seq": state.applied_seq,
        "running": {rid: codec.dump(_without_secret_values(record)) for rid, record in sorted(state.running.items())},
    }
    write_private(path, json.dumps({**body, "checksum": _checksum(body)}, indent=1, sort_keys=True))


def _without_secret_values(record: RunningRecord) -> RunningRecord:
    """Secret values never touch the disk: the file keeps their names (in the spec's
    env_from_secret) and the server sends the values again with the assignment."""
    if not record.assignment.secret_env:
        return record
    return replace(record, assignment=replace(record.assignment, secret_env={}))


def load(path: Path) -> AgentState:
    """The saved state; an empty one if there is none; CorruptState if it cannot be trusted."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return AgentState()
    try:
        data = json.loads(raw.decode("utf-8"))  # a torn or overwritten file need not even be text
        checksum = data.pop("checksum")
        if checksum != _checksum(data):
            raise CorruptState("checksum mismatch")
        if data.get("version") != STATE_VERSION:
            raise CorruptState(f"unknown state version {data.get('version')!r}")
        running = {rid: codec.load(RunningRecord, record) for rid, record in data["running"].items()}
        return AgentState(int(data["generation"]), int(data["applied_seq"]), running)
    except (ValueError, KeyError, TypeError, AttributeError, codec.CodecError) as error:
        raise CorruptState(str(error)) from None


def set_aside(path: Path, target: Path) -> Path:
    """Keep a state file that cannot be trusted for inspection, out of the agent's way."""
    path.replace(target)
    return target
