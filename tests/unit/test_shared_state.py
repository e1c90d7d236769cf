"""Servers sharing a database must hold the same keys: the decision, apart from any I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from vectorlay.errors import UserError
from vectorlay.server.shared_state import decide, fingerprint

MINE = {"tls_ca": "pin-a", "secrets_key": fingerprint(b"key-a"), "tunnel_ca": fingerprint("pem-a")}


def test_the_first_server_records_its_keys() -> None:
    decision = decide({}, MINE, [], Path("/state"))
    assert decision.to_record == {f"shared.{k}": v for k, v in MINE.items()} and decision.replaced == ()


def test_a_server_with_the_same_keys_records_nothing() -> None:
    stored = {f"shared.{k}": v for k, v in MINE.items()}
    assert decide(stored, MINE, ["s-1 at 10.0.0.1:7070"], Path("/state")).to_record == {}


def test_a_server_with_other_keys_is_refused_while_another_runs_and_told_what_to_copy() -> None:
    stored = {f"shared.{k}": v for k, v in MINE.items()}
    other = {**MINE, "secrets_key": fingerprint(b"key-b"), "tls_ca": "pin-b"}
    with pytest.raises(UserError) as refused:
        decide(stored, other, ["s-1 at 10.0.0.1:7070"], Path("/var/lib/vectorlay"))
    assert str(refused.value) == (
        "this server's TLS CA and secrets key differ from those of the running servers of this database "
        "(s-1 at 10.0.0.1:7070): copy tls/ and secrets.key from a running server's state dir into "
        "/var/lib/vectorlay, or give every server the same --state-dir")


def test_with_no_other_server_running_new_keys_are_adopted() -> None:
    stored = {f"shared.{k}": v for k, v in MINE.items()}
    decision = decide(stored, {**MINE, "tls_ca": "pin-rotated"}, [], Path("/state"))
    assert decision.to_record == {"shared.tls_ca": "pin-rotated"} and decision.replaced == ("tls_ca",)


def test_a_fingerprint_names_a_key_without_revealing_it() -> None:
    assert fingerprint(b"key-a") == fingerprint("key-a") != fingerprint(b"key-b")
    assert "key-a" not in fingerprint(b"key-a") and len(fingerprint(b"key-a")) == 32


def test_one_differing_key_is_named_alone() -> None:
    stored = {f"shared.{k}": v for k, v in MINE.items()}
    with pytest.raises(UserError, match=r"^this server's tunnel CA differs from that of the running servers .* "
                                        r"copy tunnel-ca/ from"):
        decide(stored, {**MINE, "tunnel_ca": fingerprint("pem-b")}, ["s-1 at 10.0.0.1:7070"], Path("/state"))
