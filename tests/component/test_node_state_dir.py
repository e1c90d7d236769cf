"""node.state_dir: the files of a node's state directory, by the names nodes in the field already use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vectorlay.errors import UserError
from vectorlay.node.state_dir import Credentials, NodeStateDir

CREDS = Credentials("wss://control:7070", "n-abc", "gpu1", "n-abc.secret", "10.0.0.7", "-----BEGIN CERTIFICATE")


def test_the_file_names_stay_those_joined_nodes_have_on_disk(tmp_path: Path) -> None:
    files = NodeStateDir(tmp_path)
    names = [files.credentials_file, files.settings_file, files.agent_state_file, files.corrupt_agent_state_file,
             files.replica_log("web-1")]
    assert [p.relative_to(tmp_path).as_posix() for p in names] == [
        "node.json", "settings.json", "agent-state.json", "agent-state.json.corrupt", "logs/web-1.log"]


def test_credentials_round_trip_privately_and_mark_the_directory_joined(tmp_path: Path) -> None:
    files = NodeStateDir(tmp_path / "node")
    assert not files.is_joined()
    files.save_credentials(CREDS)
    assert files.is_joined()
    assert files.load_credentials() == CREDS
    assert files.credentials_file.stat().st_mode & 0o077 == 0
    # The format a node joined with an earlier version wrote, before `ca_pem` existed.
    files.credentials_file.write_text(json.dumps({"server": "ws://c:7070", "node_id": "n-1", "name": "a",
                                                  "credential": "n-1.s", "address": "127.0.0.1"}))
    assert files.load_credentials() == Credentials("ws://c:7070", "n-1", "a", "n-1.s", "127.0.0.1")


def test_missing_or_damaged_credentials_are_one_clear_line(tmp_path: Path) -> None:
    files = NodeStateDir(tmp_path)
    with pytest.raises(UserError, match="no node credentials in .*: run `vectorlay node join"):
        files.load_credentials()
    files.credentials_file.write_text('{"server": "ws://c:7070"}')
    with pytest.raises(UserError, match=r"node\.json is damaged \('node_id'\); remove it and join again"):
        files.load_credentials()


def test_settings_round_trip_and_start_empty(tmp_path: Path) -> None:
    files = NodeStateDir(tmp_path)
    assert files.load_settings() == {}
    files.save_settings({"allow_process_runtime": True, "gpu": ["RTX 4090:24"]})
    assert files.load_settings() == {"allow_process_runtime": True, "gpu": ["RTX 4090:24"]}
    files.settings_file.write_text("{not json")
    with pytest.raises(UserError, match=r"settings\.json is damaged"):
        files.load_settings()
