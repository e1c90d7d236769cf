"""A node's credential on a server that has not heard of the node yet (several servers: it joined
through another one a moment ago): the server reads the node's row before it refuses."""

from __future__ import annotations

import time
from typing import cast

import pytest

from vectorlay.core.tokens import format_token, hash_secret
from vectorlay.errors import AuthError, StoreUnavailable
from vectorlay.server.auth import Authenticator
from vectorlay.server.fleet import Fleet
from vectorlay.server.records import NodeRecord
from vectorlay.server.store import Store

SECRET = "s3cr3t-s3cr3t-s3cr3t"
JOINED_ELSEWHERE = NodeRecord("n-abc", "n1", hash_secret(SECRET), (), "", ("process",), 0.0)


def authenticator(stored: dict[str, NodeRecord], reachable: bool = True) -> tuple[Authenticator, list[str]]:
    fleet = Fleet()
    auth = Authenticator(cast(Store, None), fleet, time.time)
    loads: list[str] = []

    async def load_node(node_id: str) -> None:  # what the replicator does: the row, into memory
        loads.append(node_id)
        if not reachable:
            raise StoreUnavailable("database unavailable (connection refused)")
        if node_id in stored:
            fleet.put_node(stored[node_id])

    auth.load_node = load_node
    return auth, loads


async def test_a_node_that_joined_through_another_server_is_read_and_let_in() -> None:
    auth, loads = authenticator({"n-abc": JOINED_ELSEWHERE})
    record = await auth.check_node_credential(format_token("n-abc", SECRET))
    assert record.name == "n1" and loads == ["n-abc"]
    await auth.check_node_credential(format_token("n-abc", SECRET))  # known now: not read again
    assert loads == ["n-abc"]


async def test_a_node_no_server_knows_is_refused_and_a_wrong_secret_too() -> None:
    auth, _ = authenticator({"n-abc": JOINED_ELSEWHERE})
    with pytest.raises(AuthError, match="unknown node credential"):
        await auth.check_node_credential(format_token("n-gone", SECRET))
    with pytest.raises(AuthError, match="invalid node credential"):
        await auth.check_node_credential(format_token("n-abc", "nottheSecret0000000"))


async def test_without_the_database_the_node_is_told_to_try_again_not_refused() -> None:
    auth, _ = authenticator({}, reachable=False)
    with pytest.raises(StoreUnavailable):  # the server closes with "try again", never "join again"
        await auth.check_node_credential(format_token("n-abc", SECRET))


