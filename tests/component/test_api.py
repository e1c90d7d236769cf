"""The CLI's API on the real server, in-process: typed calls, refusals and the API version."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import trio
import trio.testing
from controller_harness import ControlPlane, MemoryListener, manifest, open_link

from vectorlay.client.api import handshake
from vectorlay.core import api
from vectorlay.core.model import Role
from vectorlay.core.protocol import PROTOCOL_VERSION, SERVER_TO_CLIENT, Call, ClientHello, Failure, Message, Result
from vectorlay.errors import AuthError, NotFoundError, PeerError, ProtocolError, UserError
from vectorlay.wire import CLOSE_PROTOCOL_ERROR, Link, LinkClosed, serve


@asynccontextmanager
async def running_plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    async with trio.open_nursery() as nursery:
        plane = ControlPlane(tmp_path)
        await plane.start(nursery)
        yield plane
        nursery.cancel_scope.cancel()


async def hello_refusal(plane: ControlPlane, api_version: int) -> tuple[int | None, str]:
    """How the server answers a valid admin token in a hello of `api_version`."""
    async with open_link(plane.listener, "/v1/api") as (link, _):
        await link.send(ClientHello(PROTOCOL_VERSION, plane.admin_token, api_version))
        with pytest.raises(LinkClosed) as closed:
            await link.receive(SERVER_TO_CLIENT)
    return closed.value.code, closed.value.reason


async def test_a_cli_of_another_api_version_is_told_in_one_line_whom_to_upgrade(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running_plane(tmp_path) as plane:
        older = await hello_refusal(plane, api.UNVERSIONED_API)  # a CLI from before this API: no `api` field
        assert older == (CLOSE_PROTOCOL_ERROR, "this vectorlay speaks API version 1; this server needs 2: "
                                               "upgrade vectorlay")
        newer = await hello_refusal(plane, api.API_VERSION + 1)
        assert newer == (CLOSE_PROTOCOL_ERROR, "this server speaks API version 2; this vectorlay needs 3: "
                                               "upgrade the server")
        async with plane.api() as client:  # this version is served
            assert (await client.call(api.WhoAmI())).role is Role.ADMIN


@dataclass(frozen=True)
class UnversionedClientHello(Message):
    """The client hello of servers from before API versions: no `api` field."""

    TYPE: ClassVar[str] = "client_hello"
    protocol: int
    token: str


async def test_a_server_from_before_api_versions_is_named_as_the_one_to_upgrade(
        autojump_clock: trio.testing.MockClock) -> None:
    async def old_server(path: str, link: Link) -> None:
        try:
            await link.receive((UnversionedClientHello,))  # as app.py decoded the hello then
        except ProtocolError as error:
            await link.reject(error)

    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(old_server, "", 0, frozenset({"/v1/api"}),
                                                      listeners=[listener], task_status=task_status))
        async with open_link(listener, "/v1/api") as (link, _):
            with pytest.raises(PeerError) as refused:
                await handshake(link, "abcdef.0123456789abcdef01")
        assert str(refused.value) == "this server speaks API version 1; this vectorlay needs 2: upgrade the server"
        nursery.cancel_scope.cancel()


async def raw_call(link: Link, call_id: int, method: str, params: dict[str, object]) -> Message:
    await link.send(Call(call_id, method, dict(params)))
    return await link.receive(SERVER_TO_CLIENT)


async def test_a_malformed_call_fails_alone_with_the_path_and_the_link_serves_on(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running_plane(tmp_path) as plane:
        async with open_link(plane.listener, "/v1/api") as (link, _):
            await handshake(link, plane.admin_token)
            assert await raw_call(link, 1, "get_clusters", {"name": 7}) == Failure(
                1, "user", "invalid 'get_clusters' call: name: expected a string, got an integer")
            assert await raw_call(link, 2, "delete", {"name": "web", "force": True}) == Failure(
                2, "user", "invalid 'delete' call: message: unknown field 'force'")
            assert await raw_call(link, 3, "drop_tables", {}) == Failure(3, "user", "unknown method 'drop_tables'")
            assert await raw_call(link, 4, "get_clusters", {}) == Result(4, {"clusters": []})


async def test_each_failure_arrives_as_the_error_its_kind_names(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running_plane(tmp_path) as plane:
        await plane.apply(manifest("web"))
        deployer = (await plane.call(api.TokenCreate(Role.DEPLOYER, project="acme"))).token
        async with plane.api() as admin:
            with pytest.raises(NotFoundError, match="cluster 'nope' not found"):
                await admin.call(api.DescribeCluster("nope"))
            with pytest.raises(UserError, match="page_size must be a positive integer"):
                await admin.call(api.GetReplicas(page_size=0))
        async with plane.api(deployer) as client:
            with pytest.raises(AuthError, match="a deployer token cannot do this"):
                await client.call(api.GetNodes())
            with pytest.raises(NotFoundError):  # another project's cluster is not even there
                await client.call(api.DescribeCluster("web", "default"))


async def test_long_listings_stream_in_pages_and_end_with_the_count(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running_plane(tmp_path) as plane:
        await plane.apply(manifest("web", replicas=5))
        async with plane.api() as client:
            pages: list[api.ReplicaPage] = []
            done = None
            async for item in client.stream(api.GetReplicas("web", page_size=2)):
                if isinstance(item, api.ReplicaPage):
                    pages.append(item)
                else:
                    done = item.response
            assert [len(p.replicas) for p in pages] == [2, 2, 1]
            assert done == api.Replicas(5)
            whole = await client.call(api.GetReplicas("web"))
            assert whole.total == 5 and [r.id for r in whole.replicas] == [r.id for p in pages for r in p.replicas]


async def test_listings_keep_to_the_project_asked_for_and_not_found_names_the_project(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running_plane(tmp_path) as plane:
        await plane.apply(manifest("web"))
        await plane.apply(manifest("web").replace("metadata: {name: web}", "metadata: {name: web, project: acme}"))
        async with plane.api() as admin:
            assert {c.key for c in (await admin.call(api.GetClusters())).clusters} == {"web", "web.acme"}
            assert [c.key for c in (await admin.call(api.GetClusters(project="acme"))).clusters] == ["web.acme"]
            replicas = (await admin.call(api.GetReplicas(project="acme"))).replicas
            assert [(r.cluster, r.project) for r in replicas] == [("web", "acme")]
            with pytest.raises(NotFoundError, match="cluster 'authlm' not found in project 'default'"):
                await admin.call(api.KeyCreate("authlm"))


async def test_the_audit_of_a_new_token_names_it(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with running_plane(tmp_path) as plane:
        created = await plane.call(api.TokenCreate(Role.DEPLOYER, project="acme", description="ci"))
        records = (await plane.call(api.Audit())).records
        [entry] = [r for r in records if r.action == "token.create"]
        assert entry.target == created.id and entry.project == "acme" and entry.detail == "deployer ci"
