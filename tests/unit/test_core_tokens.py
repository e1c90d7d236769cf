"""core.tokens: `<id>.<secret>` tokens; only a hash of the secret is stored."""

from __future__ import annotations

import hashlib

import pytest
from core_strategies import CHEAP, MEDIUM
from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core.tokens import ParsedToken, format_token, hash_api_key, hash_secret, parse_token, secret_matches

ids = st.from_regex(r"[a-z0-9][a-z0-9-]{2,62}", fullmatch=True)
secrets = st.from_regex(r"[A-Za-z0-9_-]{16,128}", fullmatch=True)

VALID_SECRET = "s" * 16


@MEDIUM
@given(ids, secrets)
def test_format_then_parse_round_trips(token_id: str, secret: str) -> None:
    assert parse_token(format_token(token_id, secret)) == ParsedToken(token_id, secret)


def test_surrounding_whitespace_is_ignored() -> None:
    assert parse_token(f"  node-1.{VALID_SECRET}\n") == ParsedToken("node-1", VALID_SECRET)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nodot",
        f".{VALID_SECRET}",
        "abc.",
        f"ab.{VALID_SECRET}",  # id too short
        f"{'a' * 64}.{VALID_SECRET}",  # id too long
        f"Abc.{VALID_SECRET}",  # upper case id
        f"-abc.{VALID_SECRET}",  # id must start with a letter or digit
        f"a_c.{VALID_SECRET}",
        "abc." + "s" * 15,  # secret too short
        "abc." + "s" * 129,  # secret too long
        f"abc.{VALID_SECRET}.extra",
        f"abc.{VALID_SECRET[:-1]}!",
        f"abc.{VALID_SECRET[:8]} {VALID_SECRET[8:]}",
        f"abc.{VALID_SECRET}\nabc.{VALID_SECRET}",
        f"abc.{'s' * 15}é",
        f"abc.{VALID_SECRET}\x00",
    ],
)
def test_malformed_tokens_parse_to_none(text: str) -> None:
    assert parse_token(text) is None


@CHEAP
@given(st.text(max_size=80))
def test_parse_never_raises_and_only_accepts_what_it_can_format_back(text: str) -> None:
    parsed = parse_token(text)
    if parsed is not None:
        assert format_token(parsed.id, parsed.secret) == text.strip()


def test_secret_matches_its_own_hash_only() -> None:
    stored = hash_secret(VALID_SECRET)
    assert stored == hashlib.sha256(VALID_SECRET.encode()).hexdigest()
    assert secret_matches(VALID_SECRET, stored)
    assert not secret_matches(VALID_SECRET + "x", stored)
    assert not secret_matches(VALID_SECRET.upper(), stored)
    assert not secret_matches(VALID_SECRET, "")
    assert not secret_matches(VALID_SECRET, stored.upper())


@MEDIUM
@given(secrets, secrets)
def test_secret_matches_property(secret: str, other: str) -> None:
    assert secret_matches(secret, hash_secret(secret))
    assert secret_matches(other, hash_secret(secret)) == (other == secret)
    assert secret not in hash_secret(secret)


def test_an_api_key_hashes_the_same_as_the_server_stores_it_and_as_a_proxy_reads_it() -> None:
    key = "vk-abc12345.0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"
    stored = hash_api_key(key)  # the server, from the key it made
    assert stored == hashlib.sha256(key.encode()).hexdigest()
    assert hash_api_key(key.encode()) == stored  # a proxy, from the bytes of the header
    assert hash_api_key(key + "x") != stored
